//! How a replicated mode stores a value in the backend: a 25-byte header in
//! front of the client's data, so the store itself keeps each key's version,
//! deadline and tombstone. Nothing about a key lives only in memdial's
//! memory, so a memdial restart loses nothing its store still holds.
//!
//! ```text
//! "MDv1" | kind u8 (0 live, 1 tombstone) | version.ts u64 | version.node u32 | deadline_ms u64 | data
//! ```
//! Integers are big-endian. A value without the magic (written by something
//! else) reads as a live value at version zero, which any write beats.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::messages::Version;

const MAGIC: &[u8; 4] = b"MDv1";
pub const HEADER_BYTES: usize = 4 + 1 + 8 + 4 + 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub tombstone: bool,
    pub version: Version,
    /// Absolute unix milliseconds; 0 never expires.
    pub deadline_ms: u64,
    pub data: Bytes,
}

impl Record {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_BYTES + self.data.len());
        b.put_slice(MAGIC);
        b.put_u8(u8::from(self.tombstone));
        b.put_u64(self.version.ts);
        b.put_u32(self.version.node);
        b.put_u64(self.deadline_ms);
        b.put_slice(&self.data);
        b.freeze()
    }

    /// The record a stored value holds; the data is the stored bytes past
    /// the header. It takes the value rather than a reference: cloning a
    /// `Bytes` copied out of a reply allocates.
    pub fn take(mut stored: Bytes) -> Record {
        let header = stored.get(..HEADER_BYTES).filter(|h| h.starts_with(MAGIC));
        let Some(h) = header else {
            return Record {
                tombstone: false,
                version: Version::default(),
                deadline_ms: 0,
                data: stored,
            };
        };
        let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().unwrap_or_default());
        let (tombstone, version, deadline_ms) = (
            h[4] == 1,
            Version {
                ts: u64_at(5),
                node: u32::from_be_bytes(h[13..17].try_into().unwrap_or_default()),
            },
            u64_at(17),
        );
        stored.advance(HEADER_BYTES);
        Record {
            tombstone,
            version,
            deadline_ms,
            data: stored,
        }
    }

    /// True when the record is a live value at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        !self.tombstone && !self.expired(now_ms)
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.deadline_ms != 0 && self.deadline_ms <= now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_foreign_values() {
        let r = Record {
            tombstone: false,
            version: Version {
                ts: 12345 << 16,
                node: 3,
            },
            deadline_ms: 99,
            data: Bytes::from_static(b"a\r\nb"),
        };
        let enc = r.encode();
        assert_eq!(enc.len(), HEADER_BYTES + 4);
        assert_eq!(Record::take(enc), r);
        let foreign = Record::take(Bytes::from_static(b"plain"));
        assert_eq!(foreign.version, Version::default());
        assert_eq!(&foreign.data[..], b"plain");
        assert!(foreign.live(1));
        assert!(!r.live(99) && r.live(98));
    }
}
