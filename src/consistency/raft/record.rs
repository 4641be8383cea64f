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
//!
//! A value the meta protocol marked (stale after `md I` or `ms I`, its
//! recache token handed out, stored through a base64 key) carries one byte
//! more, and the magic says so:
//!
//! ```text
//! "MDr2" | index u64 | cas u64 | written_ms u64 | deadline_ms u64 | marks u8 | data
//! ```
//! `marks` bits: 1 stale, 2 token sent, 4 key stored as base64. A value
//! without marks is still written as `MDr1`, byte for byte as before: stores
//! and snapshots written before the meta protocol read as they did, and
//! only a value that carries marks needs the longer header (the second
//! magic, rather than a byte in every header, so nothing already stored
//! changes meaning).

use bytes::{BufMut, Bytes, BytesMut};

use crate::rules::Item;
use crate::rules::meta::Marks;

const MAGIC: &[u8; 4] = b"MDr1";
const MAGIC_MARKED: &[u8; 4] = b"MDr2";
pub const HEADER_BYTES: usize = 4 + 8 * 4;
/// The header of a value with meta marks.
pub const MARKED_HEADER_BYTES: usize = HEADER_BYTES + 1;

const STALE: u8 = 1;
const TOKEN_SENT: u8 = 2;
const KEY_BINARY: u8 = 4;

/// What the meta protocol marks on a value besides it, replicated with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaMarks {
    /// `md I` or `ms I` invalidated it (`mg` shows `X`), and whether its
    /// recache token was handed out (`W` once, then `Z`).
    pub marks: Marks,
    /// Stored by `ms` through a base64 key: `k` and `me` write it base64.
    pub key_binary: bool,
}

impl MetaMarks {
    fn bits(self) -> u8 {
        let bit = |on: bool, b: u8| if on { b } else { 0 };
        bit(self.marks.stale, STALE)
            | bit(self.marks.token_sent, TOKEN_SENT)
            | bit(self.key_binary, KEY_BINARY)
    }

    fn of(bits: u8) -> MetaMarks {
        MetaMarks {
            marks: Marks {
                stale: bits & STALE != 0,
                token_sent: bits & TOKEN_SENT != 0,
            },
            key_binary: bits & KEY_BINARY != 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub index: u64,
    pub cas: u64,
    pub written_ms: u64,
    /// Absolute unix milliseconds; 0 never expires.
    pub deadline_ms: u64,
    pub meta: MetaMarks,
    pub data: Bytes,
}

impl Record {
    pub fn encode(&self) -> Bytes {
        let marked = self.meta != MetaMarks::default();
        let mut b = BytesMut::with_capacity(MARKED_HEADER_BYTES + self.data.len());
        b.put_slice(if marked { MAGIC_MARKED } else { MAGIC });
        b.put_u64(self.index);
        b.put_u64(self.cas);
        b.put_u64(self.written_ms);
        b.put_u64(self.deadline_ms);
        if marked {
            b.put_u8(self.meta.bits());
        }
        b.put_slice(&self.data);
        b.freeze()
    }

    /// `None` for a value this mode did not write.
    pub fn decode(stored: &Bytes) -> Option<Record> {
        let (h, meta, header) = match stored.get(..4)? {
            m if m == MAGIC => (
                stored.get(..HEADER_BYTES)?,
                MetaMarks::default(),
                HEADER_BYTES,
            ),
            m if m == MAGIC_MARKED => {
                let h = stored.get(..MARKED_HEADER_BYTES)?;
                (h, MetaMarks::of(h[HEADER_BYTES]), MARKED_HEADER_BYTES)
            }
            _ => return None,
        };
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
            meta,
            data: stored.slice(header..),
        })
    }

    /// The value as the command rules see it, with the client's `flags`.
    pub fn item(&self, flags: u32) -> Item {
        Item {
            flags,
            data: self.data.clone(),
            deadline: (self.deadline_ms != 0).then_some(self.deadline_ms),
            cas: self.cas,
        }
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
            meta: MetaMarks::default(),
            data: Bytes::from_static(b"hello"),
        };
        let stored = r.encode();
        assert_eq!(stored.len(), HEADER_BYTES + 5);
        assert!(
            stored.starts_with(b"MDr1"),
            "unmarked values keep the old header"
        );
        assert_eq!(Record::decode(&stored), Some(r.clone()));
        assert_eq!(Record::decode(&Bytes::from_static(b"plain value")), None);
        assert_eq!(Record::decode(&Bytes::from_static(b"MDr1short")), None);
        assert_eq!(Record::decode(&Bytes::from_static(b"MDr2short")), None);
        for bits in 1..8u8 {
            let marked = Record {
                meta: MetaMarks::of(bits),
                ..r.clone()
            };
            let stored = marked.encode();
            assert_eq!(stored.len(), MARKED_HEADER_BYTES + 5);
            assert!(stored.starts_with(b"MDr2"));
            assert_eq!(stored[HEADER_BYTES], bits);
            assert_eq!(Record::decode(&stored), Some(marked));
        }
    }

    #[test]
    fn expiry_is_at_the_deadline() {
        let r = |deadline_ms| Record {
            index: 1,
            cas: 1,
            written_ms: 0,
            deadline_ms,
            meta: MetaMarks::default(),
            data: Bytes::new(),
        };
        assert!(!r(0).expired(u64::MAX));
        assert!(!r(10).expired(9));
        assert!(r(10).expired(10));
    }
}
