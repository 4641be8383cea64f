//! memdial's record header, as src/consistency/record.rs writes it in front
//! of every value a replicated mode stores, for tests that read or write
//! memcached behind memdial's back. Written out again here on purpose: the
//! tests check the stored bytes against this layout, not against the code
//! under test.
//!
//! ```text
//! "MDv1" | kind u8 (0 live, 1 tombstone) | ts u64 | node u32 | deadline_ms u64 | data
//! ```
//! Integers are big-endian.
#![allow(dead_code)] // each test binary uses a different part of the harness

/// Size of the header in front of the client's data.
pub const HEADER_BYTES: usize = 25;

const MAGIC: &[u8; 4] = b"MDv1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tombstone: bool,
    /// The version's hybrid-logical-clock timestamp (wall ms << 16 | counter).
    pub ts: u64,
    /// The version's node id.
    pub node: u32,
    /// Absolute unix milliseconds; 0 never expires.
    pub deadline_ms: u64,
}

impl Header {
    /// The header at the start of `raw`; `None` without the magic.
    pub fn decode(raw: &[u8]) -> Option<Header> {
        let h = raw.get(..HEADER_BYTES).filter(|h| h.starts_with(MAGIC))?;
        let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        Some(Header {
            tombstone: h[4] == 1,
            ts: u64_at(5),
            node: u32::from_be_bytes(h[13..17].try_into().expect("4 bytes")),
            deadline_ms: u64_at(17),
        })
    }

    /// This header followed by `data`: a value as memdial stores it.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut raw = Vec::with_capacity(HEADER_BYTES + data.len());
        raw.extend_from_slice(MAGIC);
        raw.push(u8::from(self.tombstone));
        raw.extend_from_slice(&self.ts.to_be_bytes());
        raw.extend_from_slice(&self.node.to_be_bytes());
        raw.extend_from_slice(&self.deadline_ms.to_be_bytes());
        raw.extend_from_slice(data);
        raw
    }
}
