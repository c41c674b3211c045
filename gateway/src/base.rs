//! The vocabulary every module shares, and nothing else: the wall clock, the rule for ids, the
//! transport of a connection and a message's place in a stream. It imports nothing of this
//! crate, so that any module may import it without a cycle.

use std::time::{SystemTime, UNIX_EPOCH};

use imgate_shared::protocol::MAX_ID_LEN;
use imgate_shared::MessageId;
use serde::Serialize;

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What an id must be, for error messages: the rule [`valid_id`] checks.
pub const ID_RULE: &str = "1 to 128 bytes of UTF-8 without control characters (Cc), \
format characters (Cf, such as bidi overrides and zero-width characters) or white space";

/// Checks a user id, device id or client message id: 1 to [`MAX_ID_LEN`] bytes, every character
/// printable (see [`id_char`]).
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.chars().all(id_char)
}

/// Whether `c` may appear in an id: anything but a control character (general category Cc:
/// NUL, CR, LF, ESC, DEL, C1 controls), a format character (Cf: bidi overrides and isolates,
/// zero-width joiners and spaces, the BOM, soft hyphen, tag characters...) and white space
/// (the Unicode White_Space property, which includes the ASCII space and the line and
/// paragraph separators). Such characters forge or hide text where ids are shown: logs,
/// terminals, admin pages.
pub fn id_char(c: char) -> bool {
    !(c.is_control() || c.is_whitespace() || is_format_char(c))
}

/// General category Cf (Unicode 15.1).
fn is_format_char(c: char) -> bool {
    matches!(
        c as u32,
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// The `to` of a broadcast push; never a user id.
pub const BROADCAST_TO: &str = "*";

/// Checks a user id: a valid id other than [`BROADCAST_TO`].
pub fn valid_user_id(s: &str) -> bool {
    valid_id(s) && s != BROADCAST_TO
}

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Tcp,
    Ws,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Ws => "ws",
        }
    }
}

/// A message's place: its id and its position in the recipient's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub id: MessageId,
    /// 0 for pushes outside any stream (broadcasts).
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_printable_without_white_space() {
        for ok in [
            "alice",
            "bob-phone",
            "用户42",
            "Ünïcödé",
            "a.b_c@d",
            "😀",
            "x",
        ] {
            assert!(valid_id(ok), "{ok:?}");
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        for bad in [
            "",
            long.as_str(),
            "a\nb",
            "a\r",
            "a\0",
            "\u{1b}[31mred",
            "a\u{7f}",
            "a\u{85}",
            "a b",
            "a\tb",
            "a\u{a0}b",
            "a\u{2028}b",
            "evil\u{202e}gnp.exe",
            "a\u{2066}b",
            "zero\u{200b}width",
            "\u{feff}bom",
            "soft\u{ad}hyphen",
            "tag\u{e0041}",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(valid_id(&"é".repeat(MAX_ID_LEN / 2)));
        assert!(
            !valid_id(&"é".repeat(MAX_ID_LEN / 2 + 1)),
            "bytes, not characters"
        );
        assert!(!valid_user_id(BROADCAST_TO));
        assert!(ID_RULE.contains(&MAX_ID_LEN.to_string()));
    }
}
