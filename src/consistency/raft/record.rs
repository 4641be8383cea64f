//! How the ordered modes store a value in the backend: a 36-byte header in
//! front of the client's data (the client's flags are the store's own).
//!
//! ```text
//! "MDr1" | index u64 | cas u64 | written_ms u64 | deadline_ms u64 | data
//! ```
//! Integers are big-endian. `index` is the log index of the last entry that
//! wrote the key: an entry applied again (a replay after a crash, or after
//! a snapshot taken while entries were applied) is skipped for a key whose
//! index is already at or past it, so applying is idempotent. `cas` is the
//! CAS token clients see, naming the last write that changed the value
//! (`state::cas_token`: its log index and its place in the entry; `touch`
//! keeps it, as memcached does), the same on every node.
//! `written_ms` is the proposer's clock at that write, for `flush_all` with
//! a delay. A value without the magic was not written by this mode: it is
//! not visible.

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 4] = b"MDr1";
pub const HEADER_BYTES: usize = 4 + 8 * 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub index: u64,
    pub cas: u64,
    pub written_ms: u64,
    /// Absolute unix milliseconds; 0 never expires.
    pub deadline_ms: u64,
    pub data: Bytes,
}

impl Record {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_BYTES + self.data.len());
        b.put_slice(MAGIC);
        b.put_u64(self.index);
        b.put_u64(self.cas);
        b.put_u64(self.written_ms);
        b.put_u64(self.deadline_ms);
        b.put_slice(&self.data);
        b.freeze()
    }

    /// `None` for a value this mode did not write.
    pub fn decode(stored: &Bytes) -> Option<Record> {
        let h = stored
            .get(..HEADER_BYTES)
            .filter(|h| h.starts_with(MAGIC))?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Some(Record {
            index: u64_at(4),
            cas: u64_at(12),
            written_ms: u64_at(20),
            deadline_ms: u64_at(28),
            data: stored.slice(HEADER_BYTES..),
        })
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.deadline_ms != 0 && self.deadline_ms <= now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_foreign_values() {
        let r = Record {
            index: 7,
            cas: 5,
            written_ms: 1 << 40,
            deadline_ms: u64::MAX,
            data: Bytes::from_static(b"hello"),
        };
        let stored = r.encode();
        assert_eq!(stored.len(), HEADER_BYTES + 5);
        assert_eq!(Record::decode(&stored), Some(r));
        assert_eq!(Record::decode(&Bytes::from_static(b"plain value")), None);
        assert_eq!(Record::decode(&Bytes::from_static(b"MDr1short")), None);
    }

    #[test]
    fn expiry_is_at_the_deadline() {
        let r = |deadline_ms| Record {
            index: 1,
            cas: 1,
            written_ms: 0,
            deadline_ms,
            data: Bytes::new(),
        };
        assert!(!r(0).expired(u64::MAX));
        assert!(!r(10).expired(9));
        assert!(r(10).expired(10));
    }
}
