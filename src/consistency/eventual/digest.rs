//! Anti-entropy digests: a replica summarised as [`BUCKETS`] 64-bit values,
//! so two nodes can find where their replicas differ by exchanging well
//! under a megabyte, then repair only those buckets.
//!
//! A key's bucket and an entry's hash are FNV-1a 64 over fixed byte layouts,
//! then a fixed mixer: the same on every node, every build and every
//! platform (never a `RandomState`). A bucket's value is the XOR of the
//! hashes of its entries, so the order keys are listed in does not matter,
//! and a version names a write, so the value's bytes are not read into it.

use std::time::Duration;

use bytes::Bytes;

use super::Replica;
use super::messages::{Entry, Op, Version};

/// Buckets of a digest: every index fits the `u16` of a `DigestDiff`.
/// Many small buckets keep a repair small: writes in flight while a round
/// runs make their buckets differ for nothing, and a differing bucket is
/// resent whole. A digest is 512 KiB while computed.
pub const BUCKETS: usize = 1 << 16;

/// Keys read per batch while computing a digest or a repair.
pub const CHUNK: usize = 256;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 over the concatenation of `parts`.
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    }
    h
}

/// MurmurHash3's 64-bit finaliser: FNV-1a alone mixes the last bytes of a
/// short key poorly into its high bits (keys `k0`..`k19999` fell into 161
/// of 256 buckets by FNV's top byte), so both hashes below go through it.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The bucket of a key.
pub fn bucket(key: &[u8]) -> usize {
    (mix(fnv64(&[key])) >> 48) as usize % BUCKETS
}

/// One entry's contribution to its bucket: key, version and kind.
fn entry_hash(e: &Entry) -> u64 {
    let kind: u8 = match e.op {
        Op::Put { .. } => 0,
        Op::Delete => 1,
        Op::Flush { .. } => 2,
    };
    mix(fnv64(&[
        &e.key,
        &e.version.ts.to_be_bytes(),
        &e.version.node.to_be_bytes(),
        &[kind],
    ]))
}

/// Whether an entry read from a replica takes part in anti-entropy, at
/// `now_ms`. Left out:
/// - tombstones past their grace (`version + tombstone_grace`): the stores
///   drop them about a second later, not at the same instant on every node,
///   and a dead tombstone needs no repair;
/// - values without memdial's header (version zero, written by something
///   else): replication cannot carry them, so they would differ forever.
///
/// Expired values are already left out by [`Replica::read`].
pub fn compared(e: &Entry, now_ms: u64, tombstone_grace: Duration) -> bool {
    if e.version == Version::default() {
        return false;
    }
    match e.op {
        Op::Put { .. } => true,
        Op::Delete => {
            let deadline = (e.version.ts >> 16).saturating_add(tombstone_grace.as_millis() as u64);
            deadline > now_ms
        }
        Op::Flush { .. } => false,
    }
}

/// A replica's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    buckets: Vec<u64>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            buckets: vec![0; BUCKETS],
        }
    }
}

impl Digest {
    pub fn add(&mut self, e: &Entry) {
        self.buckets[bucket(&e.key)] ^= entry_hash(e);
    }

    pub fn into_buckets(self) -> Vec<u64> {
        self.buckets
    }

    /// The buckets where `theirs` differs from this digest (`None` when it
    /// is not a digest: wrong length).
    pub fn differing(&self, theirs: &[u64]) -> Option<Vec<u16>> {
        if theirs.len() != BUCKETS {
            return None;
        }
        Some(
            self.buckets
                .iter()
                .zip(theirs)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i as u16)
                .collect(),
        )
    }

    /// The digest of what `replica` holds now under `keys` (all of its
    /// keys). Memory beyond the key list is one chunk of entries and the
    /// buckets.
    pub async fn of(
        replica: &dyn Replica,
        keys: &[Bytes],
        tombstone_grace: Duration,
    ) -> Result<Digest, String> {
        let mut digest = Digest::default();
        for chunk in keys.chunks(CHUNK) {
            let entries = replica.read(chunk).await?;
            let now = crate::time::unix_ms();
            for e in entries.iter().filter(|e| compared(e, now, tombstone_grace)) {
                digest.add(e);
            }
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxFuture;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    fn put(key: &str, ts: u64, node: u32) -> Entry {
        Entry {
            key: Bytes::copy_from_slice(key.as_bytes()),
            version: Version { ts, node },
            op: Op::Put {
                flags: 0,
                deadline_ms: 0,
                data: Bytes::from_static(b"v"),
            },
        }
    }

    fn digest(entries: &[Entry]) -> Digest {
        let mut d = Digest::default();
        for e in entries {
            d.add(e);
        }
        d
    }

    #[test]
    fn fnv_is_the_standard_fnv1a_64() {
        // Published FNV-1a 64 test vectors: the hash must never change.
        assert_eq!(fnv64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64(&[b"foobar"]), 0x8594_4171_f739_67e8);
        assert_eq!(fnv64(&[b"foo", b"bar"]), fnv64(&[b"foobar"]));
        // And the bucket of a key with it.
        assert_eq!(mix(0), 0);
        assert_eq!(bucket(b"a"), (mix(0xaf63_dc4c_8601_ec8c) >> 48) as usize);
    }

    #[test]
    fn similar_keys_spread_over_the_buckets() {
        let n = 200_000;
        let mut counts = vec![0u32; BUCKETS];
        for i in 0..n {
            counts[bucket(format!("k{i}").as_bytes())] += 1;
        }
        let used = counts.iter().filter(|&&c| c > 0).count();
        // 200k keys in 65536 buckets: a uniform hash leaves e^-3 (5%) empty.
        assert!(used > BUCKETS * 93 / 100, "{used} buckets used");
        assert!(*counts.iter().max().unwrap() < 20);
    }

    #[test]
    fn same_entries_in_any_order_give_the_same_digest() {
        let entries: Vec<Entry> = (0..500)
            .map(|i| put(&format!("key-{i}"), 1000 + i, 1 + (i % 3) as u32))
            .collect();
        let mut reversed = entries.clone();
        reversed.reverse();
        let mut shuffled = entries.clone();
        shuffled.sort_by_key(|e| fnv64(&[&e.key, b"shuffle"]));
        let d = digest(&entries);
        assert_eq!(d, digest(&reversed));
        assert_eq!(d, digest(&shuffled));
        assert_eq!(d.differing(&digest(&shuffled).into_buckets()), Some(vec![]));
        assert_ne!(d, Digest::default());
    }

    #[test]
    fn one_different_entry_changes_one_bucket() {
        let entries: Vec<Entry> = (0..500)
            .map(|i| put(&format!("key-{i}"), 1000 + i, 1))
            .collect();
        let d = digest(&entries);
        let b = bucket(b"key-42") as u16;
        for changed in [
            put("key-42", 1042, 2),
            put("key-42", 1043, 1),
            Entry {
                op: Op::Delete,
                ..put("key-42", 1042, 1)
            },
        ] {
            let mut other = entries.clone();
            other[42] = changed;
            assert_eq!(
                d.differing(&digest(&other).into_buckets()),
                Some(vec![b]),
                "{:?}",
                other[42]
            );
        }
        // A missing entry too.
        let mut fewer = entries.clone();
        fewer.remove(42);
        assert_eq!(d.differing(&digest(&fewer).into_buckets()), Some(vec![b]));
        assert_eq!(d.differing(&[0; 3]), None, "not a digest");
    }

    #[test]
    fn dead_tombstones_and_foreign_values_are_not_compared() {
        let grace = Duration::from_secs(10);
        let now = 1_000_000u64;
        let tomb = |ms: u64| Entry {
            op: Op::Delete,
            ..put("k", ms << 16, 1)
        };
        assert!(compared(&tomb(now - 9_000), now, grace));
        assert!(!compared(&tomb(now - 10_000), now, grace));
        assert!(compared(&put("k", 5, 1), now, grace));
        assert!(!compared(&put("k", 0, 0), now, grace));
    }

    /// A replica in a map, listing its keys in a shuffled order.
    struct Fake(Mutex<BTreeMap<Bytes, Entry>>);

    impl Fake {
        async fn keys(&self) -> Result<Vec<Bytes>, String> {
            let mut keys: Vec<Bytes> = self.0.lock().unwrap().keys().cloned().collect();
            keys.sort_by_key(|k| fnv64(&[k]));
            Ok(keys)
        }
    }

    impl Replica for Fake {
        fn read<'a>(&'a self, keys: &'a [Bytes]) -> BoxFuture<'a, Result<Vec<Entry>, String>> {
            let m = self.0.lock().unwrap();
            let out = keys.iter().filter_map(|k| m.get(k).cloned()).collect();
            Box::pin(async move { Ok(out) })
        }
    }

    #[tokio::test]
    async fn a_replica_digest_covers_every_chunk() {
        let entries: Vec<Entry> = (0..1000)
            .map(|i| put(&format!("key-{i}"), 1000 + i, 1))
            .collect();
        let fake = Fake(Mutex::new(
            entries.iter().map(|e| (e.key.clone(), e.clone())).collect(),
        ));
        let grace = Duration::from_secs(600);
        let keys = fake.keys().await.unwrap();
        let d = Digest::of(&fake, &keys, grace).await.unwrap();
        assert_eq!(d, digest(&entries));
        fake.0
            .lock()
            .unwrap()
            .remove(&Bytes::from_static(b"key-999"));
        let keys = fake.keys().await.unwrap();
        assert_eq!(keys.len(), 999);
        let after = Digest::of(&fake, &keys, grace).await.unwrap();
        assert_eq!(
            d.differing(&after.into_buckets()),
            Some(vec![bucket(b"key-999") as u16])
        );
    }
}
