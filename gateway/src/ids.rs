//! Server message ids: cluster-unique and time-ordered, made at the accepting node without any
//! round trip. 64 bits: milliseconds since 2024-01-01 (42 bits), the node's 10-bit tag, and a
//! 12-bit per-millisecond sequence. When a millisecond's 4,096 ids are used up the generator moves
//! on to the next millisecond, so ids stay strictly increasing on a node.

use std::sync::atomic::{AtomicU64, Ordering};

use imgate_shared::MessageId;

/// 2024-01-01T00:00:00Z in milliseconds since the Unix epoch.
pub const ID_EPOCH_MS: u64 = 1_704_067_200_000;
const SEQ_BITS: u32 = 12;
const TAG_BITS: u32 = 10;

pub struct IdGenerator {
    tag: u64,
    /// `(milliseconds since ID_EPOCH_MS) << SEQ_BITS | sequence` of the last id handed out.
    last: AtomicU64,
}

impl IdGenerator {
    pub fn new(tag: u16) -> Self {
        assert!(
            tag < (1 << TAG_BITS),
            "node tag must fit in {TAG_BITS} bits"
        );
        IdGenerator {
            tag: u64::from(tag),
            last: AtomicU64::new(0),
        }
    }

    /// The default tag of a node id: a stable hash of it, folded to 10 bits.
    pub fn tag_for(node_id: &str) -> u16 {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in node_id.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (h % (1 << TAG_BITS)) as u16
    }

    pub fn next(&self) -> MessageId {
        let now = crate::base::unix_millis().saturating_sub(ID_EPOCH_MS) << SEQ_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let ms = next >> SEQ_BITS;
                    let seq = next & ((1 << SEQ_BITS) - 1);
                    return MessageId((ms << (TAG_BITS + SEQ_BITS)) | (self.tag << SEQ_BITS) | seq);
                }
                Err(actual) => last = actual,
            }
        }
    }

    /// When an id was made, in milliseconds since the Unix epoch.
    pub fn timestamp_ms(id: MessageId) -> u64 {
        (id.0 >> (TAG_BITS + SEQ_BITS)) + ID_EPOCH_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_carry_tag_and_time() {
        let g = IdGenerator::new(513);
        let before = crate::base::unix_millis();
        let ids: Vec<_> = (0..20_000).map(|_| g.next()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        for id in [ids[0], ids[19_999]] {
            assert_eq!((id.0 >> SEQ_BITS) & 1023, 513);
            assert!(IdGenerator::timestamp_ms(id) >= before);
        }
        assert_ne!(
            IdGenerator::tag_for("node-1"),
            IdGenerator::tag_for("node-2")
        );
    }

    #[test]
    fn concurrent_generation_is_unique() {
        let g = std::sync::Arc::new(IdGenerator::new(1));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || (0..10_000).map(|_| g.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40_000);
    }
}
