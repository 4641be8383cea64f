//! Eventual mode's messages between peers, carried by the cluster
//! transport as opaque bodies tagged with [`TAG`].
//!
//! The sender of a log (the pusher, `push.rs`) first asks the receiver
//! where it stands ([`Ask::Cursor`], a request), then sends `Entries` from
//! there, or a full resync (`Snapshot` frames, then `SnapshotDone`) when the
//! receiver has no usable cursor. The receiver (`receive.rs`) answers
//! `Entries` and `SnapshotDone` with `Ack` over its own link back, and asks
//! for a full resync with `ResyncMe` when its store lost its data. For
//! anti-entropy the pusher sends `Digest`; the receiver answers
//! `DigestDiff`, and the pusher sends its entries of those buckets as
//! `Snapshot` frames.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cluster::ModeTag;

/// Names eventual's messages on the wire; bump the version whenever a
/// message changes shape.
pub const TAG: ModeTag = ModeTag {
    name: "eventual",
    version: 1,
};

/// Entries are packed into messages of about this many bytes at most.
pub const FRAME_BUDGET: usize = 4 * 1024 * 1024;

/// A write's version: a hybrid logical clock reading and the node that made
/// it. Versions are totally ordered; the node id breaks ties.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Version {
    /// Unix milliseconds << 16 | logical counter.
    pub ts: u64,
    pub node: u32,
}

/// What a replicated write leaves behind: the key's whole new state, so
/// applying it twice, or out of order under last-writer-wins, is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        flags: u32,
        /// Absolute unix milliseconds; 0 never expires.
        deadline_ms: u64,
        data: Bytes,
    },
    /// A tombstone: the key was deleted at `version`.
    Delete,
    /// `flush_all`: every write older than `version` is gone; `at_ms` is the
    /// absolute unix time it takes effect (0 = at once).
    Flush { at_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: Bytes,
    pub version: Version,
    pub op: Op,
}

/// How far a receiver has applied a sender's log. `incarnation` names the
/// sender's log (its process lifetime); a cursor of another is void.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub incarnation: u64,
    pub seq: u64,
}

/// Names one request for a full resync: the asking node's log incarnation
/// (its process lifetime) and a count within it, so a restarted node's
/// requests are never taken for old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Epoch {
    pub incarnation: u64,
    pub n: u64,
}

/// One-way messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Log entries with their sequence numbers, in order.
    Entries {
        incarnation: u64,
        entries: Vec<(u64, Entry)>,
    },
    /// Part of a full resync or of a repair: the sender's current state,
    /// unordered.
    Snapshot { entries: Vec<Entry> },
    /// The full resync is complete; its state includes the log up to `seq`.
    /// `epoch` is the newest request the sender had seen when the resync
    /// started: a receiver waiting for a resync trusts it only if that is
    /// its own latest request.
    SnapshotDone {
        incarnation: u64,
        seq: u64,
        epoch: Epoch,
    },
    /// How far the sender of this ack has applied the receiver's log.
    Ack { cursor: Cursor },
    /// Anti-entropy: the sender's replica summarised (see `digest.rs`), one
    /// value per bucket, sent after every log entry it had then.
    Digest { buckets: Vec<u64> },
    /// The answer to `Digest`: the buckets where this replica differs.
    DigestDiff { buckets: Vec<u16> },
    /// This node needs a full resync (its store lost its data, or entries
    /// did not follow on).
    ResyncMe { epoch: Epoch },
}

/// Requests; each has its own answer type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ask {
    /// How far have you applied my log? Answered `(Option<Cursor>, Epoch)`:
    /// the cursor, and the newest full resync asked for.
    Cursor,
}

/// `Msg::Entries` as the pusher sends it, borrowed from the backlog so that
/// no entry is cloned to be encoded. It encodes to the same bytes as
/// `Msg::Entries`: postcard names a variant by its index, and `Entries` is
/// `Msg`'s first.
#[derive(Serialize)]
enum EntriesRef<'a> {
    Entries {
        incarnation: u64,
        entries: &'a [(u64, &'a Entry)],
    },
}

/// Encodes `Msg::Entries { incarnation, entries }` from borrowed entries.
pub fn encode_entries(incarnation: u64, entries: &[(u64, &Entry)]) -> Bytes {
    // Sized up front: grown from empty, the buffer was reallocated about
    // log2(size / 8) times, on the thread that also serves the clients.
    let size = 16 + entries.iter().map(|(_, e)| entry_bytes(e)).sum::<usize>();
    let m = EntriesRef::Entries {
        incarnation,
        entries,
    };
    Bytes::from(postcard::to_io(&m, Vec::with_capacity(size)).unwrap_or_default())
}

pub fn encode<T: Serialize>(m: &T) -> Bytes {
    // Encoding plain data structures into a Vec cannot fail.
    Bytes::from(postcard::to_stdvec(m).unwrap_or_default())
}

pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(body).map_err(|e| format!("undecodable eventual message: {e}"))
}

/// Decodes a [`Msg`] whose entries (`Entries`, `Snapshot`) keep their keys
/// and values as slices of `body` rather than copies of them: a replica
/// applies tens of thousands of entries a second, and each copy was an
/// allocation (and another at the key's first clone). An entry keeps the
/// whole message alive while it lives; applying one copies what the store
/// keeps (the embedded store copies keys and values, memcached receives
/// them over a socket), so a message lives as long as its apply.
pub fn decode_msg(body: &Bytes) -> Result<Msg, String> {
    // Postcard names a variant by its index, a varint: 0 and 1 are the
    // variants that carry entries.
    if !matches!(body.first(), Some(0 | 1)) {
        return decode(body);
    }
    let shared = |b: &[u8]| body.slice_ref(b);
    let entry = |e: EntryRef<'_>| Entry {
        key: shared(e.key),
        version: e.version,
        op: match e.op {
            OpRef::Put {
                flags,
                deadline_ms,
                data,
            } => Op::Put {
                flags,
                deadline_ms,
                data: shared(data),
            },
            OpRef::Delete => Op::Delete,
            OpRef::Flush { at_ms } => Op::Flush { at_ms },
        },
    };
    Ok(match decode::<WithEntries>(body)? {
        WithEntries::Entries {
            incarnation,
            entries,
        } => Msg::Entries {
            incarnation,
            entries: entries.into_iter().map(|(s, e)| (s, entry(e))).collect(),
        },
        WithEntries::Snapshot { entries } => Msg::Snapshot {
            entries: entries.into_iter().map(entry).collect(),
        },
    })
}

/// `Msg`'s first two variants with their entries borrowed from the encoded
/// message; they decode from the same bytes as `Msg`'s.
#[derive(Deserialize)]
enum WithEntries<'a> {
    Entries {
        incarnation: u64,
        #[serde(borrow)]
        entries: Vec<(u64, EntryRef<'a>)>,
    },
    Snapshot {
        #[serde(borrow)]
        entries: Vec<EntryRef<'a>>,
    },
}

/// [`Entry`] borrowed from an encoded message.
#[derive(Deserialize)]
struct EntryRef<'a> {
    key: &'a [u8],
    version: Version,
    #[serde(borrow)]
    op: OpRef<'a>,
}

/// [`Op`] borrowed from an encoded message.
#[derive(Deserialize)]
enum OpRef<'a> {
    Put {
        flags: u32,
        deadline_ms: u64,
        data: &'a [u8],
    },
    Delete,
    Flush {
        at_ms: u64,
    },
}

/// About how many bytes an entry takes in a message.
pub fn entry_bytes(e: &Entry) -> usize {
    let data = match &e.op {
        Op::Put { data, .. } => data.len(),
        _ => 0,
    };
    e.key.len() + data + 32
}

/// Splits entries into runs that each fit a message (a run holds at least
/// one entry).
pub fn frame_runs<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    runs(items, usize::MAX, FRAME_BUDGET, size)
}

/// Splits items, in order, into runs of at most `max_items` items and
/// `max_bytes` bytes by `size`; an item larger than `max_bytes` is a run of
/// its own.
pub fn runs<T>(
    items: Vec<T>,
    max_items: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        if !run.is_empty() && (bytes + n > max_bytes || run.len() >= max_items) {
            runs.push(std::mem::take(&mut run));
            bytes = 0;
        }
        bytes += n;
        run.push(item);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let entry = Entry {
            key: Bytes::from_static(b"k"),
            version: Version {
                ts: 1 << 20,
                node: 2,
            },
            op: Op::Put {
                flags: 3,
                deadline_ms: 0,
                data: Bytes::from_static(b"v\r\n"),
            },
        };
        for m in [
            Msg::Entries {
                incarnation: 9,
                entries: vec![(7, entry.clone())],
            },
            Msg::Snapshot {
                entries: vec![entry],
            },
            Msg::Digest {
                buckets: vec![u64::MAX; 1 << 16],
            },
            Msg::DigestDiff {
                buckets: vec![0, 255, u16::MAX],
            },
            Msg::ResyncMe {
                epoch: Epoch {
                    incarnation: 9,
                    n: 3,
                },
            },
        ] {
            let body = encode(&m);
            assert_eq!(decode::<Msg>(&body), Ok(m.clone()));
            assert_eq!(decode_msg(&body), Ok(m));
        }
        let cursor = Some(Cursor {
            incarnation: 1,
            seq: 2,
        });
        assert_eq!(decode::<Option<Cursor>>(&encode(&cursor)), Ok(cursor));
        assert!(decode::<Msg>(b"\xff\xff").is_err());
    }

    #[test]
    fn decoded_entries_share_the_message_bytes() {
        let put = |k: &'static [u8], data: &'static [u8]| Entry {
            key: Bytes::from_static(k),
            version: Version { ts: 1, node: 1 },
            op: Op::Put {
                flags: 0,
                deadline_ms: 0,
                data: Bytes::from_static(data),
            },
        };
        let flush = Entry {
            key: Bytes::new(),
            version: Version { ts: 2, node: 1 },
            op: Op::Flush { at_ms: 9 },
        };
        let within = |body: &Bytes, b: &Bytes| {
            let at = b.as_ptr() as usize;
            let start = body.as_ptr() as usize;
            at >= start && at + b.len() <= start + body.len()
        };
        let entries = vec![put(b"key-a", b"value a\r\n"), flush, put(b"b", b"")];
        let body = encode(&Msg::Entries {
            incarnation: 3,
            entries: entries
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, e)| (i as u64, e))
                .collect(),
        });
        let Ok(Msg::Entries { entries: got, .. }) = decode_msg(&body) else {
            panic!("not decoded as entries");
        };
        assert_eq!(
            got.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            entries
        );
        let Op::Put { data, .. } = &got[0].1.op else {
            panic!("not a put");
        };
        assert!(within(&body, &got[0].1.key) && within(&body, data));
        let body = encode(&Msg::Snapshot {
            entries: entries.clone(),
        });
        let Ok(Msg::Snapshot { entries: got }) = decode_msg(&body) else {
            panic!("not decoded as a snapshot");
        };
        assert_eq!(got, entries);
        assert!(within(&body, &got[0].key));
        assert!(decode_msg(&Bytes::from_static(b"\x00\xff")).is_err());
    }

    #[test]
    fn borrowed_entries_encode_as_msg_entries() {
        let entry = |n: u8| Entry {
            key: Bytes::from(vec![b'k', n]),
            version: Version {
                ts: u64::from(n) << 16,
                node: 1,
            },
            op: Op::Put {
                flags: u32::from(n),
                deadline_ms: 5,
                data: Bytes::from(vec![n; usize::from(n)]),
            },
        };
        let owned: Vec<(u64, Entry)> = (1..4).map(|n| (u64::from(n) + 10, entry(n))).collect();
        let borrowed: Vec<(u64, &Entry)> = owned.iter().map(|(s, e)| (*s, e)).collect();
        let msg = Msg::Entries {
            incarnation: 77,
            entries: owned.clone(),
        };
        assert_eq!(encode_entries(77, &borrowed), encode(&msg));
        assert_eq!(decode::<Msg>(&encode_entries(77, &borrowed)), Ok(msg));
    }

    #[test]
    fn frame_runs_stay_within_the_budget() {
        let runs = frame_runs(vec![FRAME_BUDGET / 2; 5], |n| *n);
        assert_eq!(runs.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        let runs = frame_runs(vec![FRAME_BUDGET * 3, 1], |n| *n);
        assert_eq!(
            runs.len(),
            2,
            "an entry larger than the budget travels alone"
        );
        assert!(frame_runs(Vec::<usize>::new(), |n| *n).is_empty());
    }

    #[test]
    fn runs_stay_within_a_count_and_a_size() {
        let lens = |runs: Vec<Vec<usize>>| runs.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(lens(runs(vec![1; 7], 3, 100, |n| *n)), vec![3, 3, 1]);
        assert_eq!(lens(runs(vec![40; 7], 3, 100, |n| *n)), vec![2, 2, 2, 1]);
        assert_eq!(lens(runs(vec![1, 500, 1], 3, 100, |n| *n)), vec![1, 1, 1]);
    }

    #[test]
    fn versions_order_by_clock_then_node() {
        let v = |ts, node| Version { ts, node };
        assert!(v(2, 1) > v(1, 9));
        assert!(v(1, 2) > v(1, 1));
    }
}
