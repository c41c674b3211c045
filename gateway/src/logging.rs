//! Log hygiene: client-supplied text is escaped before it reaches a log line, and a warning that
//! clients can cause once per message or per connection is rate-limited per call site.
//!
//! - [`esc`] wraps a value whose `Display` output may carry client text (an id, a database error
//!   that quotes a value): control, format (bidi, zero-width) and non-space white-space
//!   characters are written as escapes (`\n`, `\u{202e}`), so that a value cannot forge a line
//!   or hide text. Plain `&str` fields (`user`, `user = &*x`) and `?` fields are escaped by the
//!   formatter already; `%` fields are not, so those carrying client text go through [`esc`].
//! - [`warn_limited!`](crate::warn_limited) logs at most `log.repeat_limit` lines per call site
//!   every `log.repeat_interval_ms`; the rest are counted in [`SUPPRESSED`] and reported by one
//!   line, "suppressed K similar lines", before the site's next line.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Log lines suppressed by the repeat limit, by call site (`file:line`).
pub const SUPPRESSED: &str = "imgate_log_lines_suppressed_total";

/// The metrics of this module with their kinds.
pub const CATALOG: &[(&str, &str)] = &[(SUPPRESSED, "counter")];

/// Lines one call site may log per interval (`log.repeat_limit`).
static REPEAT_LIMIT: AtomicU32 = AtomicU32::new(10);
/// The interval, in milliseconds (`log.repeat_interval_ms`).
static REPEAT_INTERVAL_MS: AtomicU64 = AtomicU64::new(10_000);

/// Sets the repeat limit for the whole process (the last node started wins; every node of a
/// process is expected to share its log settings, as it shares the log output).
pub fn configure(limit: u32, interval: Duration) {
    REPEAT_LIMIT.store(limit, Ordering::Relaxed);
    REPEAT_INTERVAL_MS.store(interval.as_millis() as u64, Ordering::Relaxed);
}

/// `value`'s `Display` output with unprintable characters escaped (see the module doc).
pub fn esc<T: fmt::Display>(value: T) -> Escaped<T> {
    Escaped(value)
}

/// See [`esc`].
pub struct Escaped<T>(T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::write(&mut EscapingWriter(f), format_args!("{}", self.0))
    }
}

impl<T: fmt::Display> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| c != ' ' && !crate::base::id_char(c)) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().expect("found at i");
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// The repeat limit of one call site. Use it through [`warn_limited!`](crate::warn_limited).
pub struct LogLimiter {
    site: &'static str,
    window: Mutex<Window>,
}

/// What a call site may do with its next line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it; first report that `suppressed` lines were left out before it (when not 0).
    Log { suppressed: u64 },
    /// Leave it out (counted).
    Suppress,
}

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Window {
    fn admit(&mut self, now: Instant, limit: u32, interval: Duration) -> Admit {
        match self.start {
            Some(start) if now.saturating_duration_since(start) < interval => {
                if self.logged < limit {
                    self.logged += 1;
                    Admit::Log { suppressed: 0 }
                } else {
                    self.suppressed += 1;
                    Admit::Suppress
                }
            }
            _ => {
                let suppressed = std::mem::take(&mut self.suppressed);
                self.start = Some(now);
                self.logged = 1;
                Admit::Log { suppressed }
            }
        }
    }
}

impl LogLimiter {
    pub const fn new(site: &'static str) -> Self {
        LogLimiter {
            site,
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn site(&self) -> &'static str {
        self.site
    }

    /// Whether the next line may be logged now; a suppressed one is counted in [`SUPPRESSED`].
    pub fn admit(&self) -> Admit {
        let limit = REPEAT_LIMIT.load(Ordering::Relaxed);
        let interval = Duration::from_millis(REPEAT_INTERVAL_MS.load(Ordering::Relaxed));
        let admit = self.window.lock().unwrap_or_else(|e| e.into_inner()).admit(
            Instant::now(),
            limit,
            interval,
        );
        if admit == Admit::Suppress {
            ::metrics::counter!(SUPPRESSED, "site" => self.site).increment(1);
        }
        admit
    }
}

/// `tracing::warn!` limited to `log.repeat_limit` lines per call site every
/// `log.repeat_interval_ms`; the lines left out are counted in
/// `imgate_log_lines_suppressed_total` and reported by one line before the site's next one.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::logging::LogLimiter =
            $crate::logging::LogLimiter::new(concat!(file!(), ":", line!()));
        if let $crate::logging::Admit::Log { suppressed } = LIMITER.admit() {
            if suppressed > 0 {
                ::tracing::warn!(site = LIMITER.site(), suppressed, "suppressed {suppressed} similar lines");
            }
            ::tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_or_hide_text() {
        let shown =
            esc("bob\n2026-01-01 INFO forged\r\t\u{1b}[31m\u{202e}x\u{200b} é 用户").to_string();
        assert_eq!(
            shown,
            "bob\\n2026-01-01 INFO forged\\r\\t\\u{1b}[31m\\u{202e}x\\u{200b} é 用户"
        );
        assert_eq!(format!("{:?}", esc("plain text")), "plain text");
    }

    #[test]
    fn a_site_logs_its_limit_per_interval_then_one_summary() {
        let mut w = Window::default();
        let t0 = Instant::now();
        let interval = Duration::from_secs(10);
        let at = |ms| t0 + Duration::from_millis(ms);
        for i in 0..3 {
            assert_eq!(w.admit(at(i), 3, interval), Admit::Log { suppressed: 0 });
        }
        for i in 3..1000 {
            assert_eq!(w.admit(at(i), 3, interval), Admit::Suppress);
        }
        // The next interval starts with the count of what the last one left out.
        assert_eq!(
            w.admit(at(10_000), 3, interval),
            Admit::Log { suppressed: 997 }
        );
        assert_eq!(
            w.admit(at(10_001), 3, interval),
            Admit::Log { suppressed: 0 }
        );
        assert_eq!(
            w.admit(at(10_002), 3, interval),
            Admit::Log { suppressed: 0 }
        );
        assert_eq!(w.admit(at(10_003), 3, interval), Admit::Suppress);
        assert_eq!(
            w.admit(at(60_000), 3, interval),
            Admit::Log { suppressed: 1 }
        );
    }
}
