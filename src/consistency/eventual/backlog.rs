//! The replication backlog: this node's own writes, numbered, kept up to a
//! fixed count and a fixed number of bytes. Peers resume from their cursor while it is in the window;
//! a peer further behind gets a full resync instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use super::messages::Entry;

pub struct Backlog {
    /// Names this process lifetime: cursors from another are void.
    pub incarnation: u64,
    capacity: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
    /// The newest sequence number, stored under `inner`'s lock so that it
    /// never goes back.
    head: AtomicU64,
    /// Woken on every append, for pushers waiting for entries (one lock
    /// per append; a `watch` channel took nine).
    appended: Notify,
}

struct Inner {
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    entries: VecDeque<Arc<Entry>>,
    /// Key and value bytes held.
    bytes: usize,
}

fn size(e: &Entry) -> usize {
    let data = match &e.op {
        super::messages::Op::Put { data, .. } => data.len(),
        _ => 0,
    };
    e.key.len() + data + 48
}

/// What a reader asked for is no longer held.
#[derive(Debug, PartialEq, Eq)]
pub struct TooOld;

impl Backlog {
    /// Holds at most `capacity` entries and `max_bytes` of keys and values
    /// (always at least the newest entry).
    pub fn new(incarnation: u64, capacity: usize, max_bytes: usize) -> Backlog {
        Backlog {
            incarnation,
            capacity: capacity.max(1),
            max_bytes,
            inner: Mutex::new(Inner {
                first_seq: 1,
                entries: VecDeque::new(),
                bytes: 0,
            }),
            head: AtomicU64::new(0),
            appended: Notify::new(),
        }
    }

    /// Appends an entry; returns its sequence number.
    pub fn append(&self, entry: Entry) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.bytes += size(&entry);
        inner.entries.push_back(Arc::new(entry));
        while inner.entries.len() > self.capacity
            || (inner.bytes > self.max_bytes && inner.entries.len() > 1)
        {
            if let Some(old) = inner.entries.pop_front() {
                inner.bytes -= size(&old);
                inner.first_seq += 1;
            }
        }
        let seq = inner.first_seq + inner.entries.len() as u64 - 1;
        self.head.store(seq, Ordering::Release);
        drop(inner);
        self.appended.notify_waiters();
        seq
    }

    /// The newest sequence number (0 when nothing was written yet).
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Returns once the newest sequence number is beyond `seq`.
    pub async fn beyond(&self, seq: u64) {
        loop {
            // Registered before the check, so an append between the two
            // still wakes this waiter.
            let appended = self.appended.notified();
            let mut appended = std::pin::pin!(appended);
            appended.as_mut().enable();
            if self.head() > seq {
                return;
            }
            appended.await;
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }

    /// Key and value bytes held.
    pub fn bytes(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry held, oldest first.
    pub fn all(&self) -> Vec<(u64, Arc<Entry>)> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (inner.first_seq..)
            .zip(inner.entries.iter().cloned())
            .collect()
    }

    /// Up to `max` entries after `after`, or `TooOld` if some of them have
    /// left the window.
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Arc<Entry>)>, TooOld> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let next = after.saturating_add(1);
        if next < inner.first_seq {
            return Err(TooOld);
        }
        let skip = usize::try_from(next - inner.first_seq).unwrap_or(usize::MAX);
        Ok(inner
            .entries
            .iter()
            .enumerate()
            .skip(skip)
            .take(max)
            .map(|(i, e)| (inner.first_seq + i as u64, e.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::messages::{Op, Version};
    use super::*;
    use bytes::Bytes;

    fn entry(i: u64) -> Entry {
        Entry {
            key: Bytes::from(format!("k{i}")),
            version: Version { ts: i, node: 1 },
            op: Op::Delete,
        }
    }

    #[test]
    fn reads_resume_after_a_cursor_within_the_window() {
        let b = Backlog::new(1, 3, usize::MAX);
        assert_eq!(b.read_after(0, 10).unwrap(), vec![]);
        for i in 1..=5 {
            assert_eq!(b.append(entry(i)), i);
        }
        assert_eq!(b.head(), 5);
        assert_eq!(b.len(), 3, "bounded by its capacity");
        let seqs = |v: Vec<(u64, Arc<Entry>)>| v.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(seqs(b.read_after(2, 10).unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(b.read_after(3, 1).unwrap()), vec![4]);
        assert_eq!(seqs(b.read_after(5, 10).unwrap()), Vec::<u64>::new());
        assert_eq!(b.read_after(1, 10), Err(TooOld));
    }

    #[tokio::test]
    async fn a_waiter_wakes_on_the_append_beyond_its_entry() {
        let b = Arc::new(Backlog::new(1, 10, usize::MAX));
        b.append(entry(1));
        // Beyond what is there: returns at once.
        b.beyond(0).await;
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.beyond(1).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing beyond entry 1 yet");
        b.append(entry(2));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the append wakes the waiter")
            .unwrap();
    }

    #[test]
    fn bounded_by_bytes_too() {
        let b = Backlog::new(1, 1000, 200);
        let put = |n: usize| Entry {
            key: Bytes::from_static(b"k"),
            version: Version::default(),
            op: Op::Put {
                flags: 0,
                deadline_ms: 0,
                data: Bytes::from(vec![b'v'; n]),
            },
        };
        b.append(put(100));
        b.append(put(100));
        assert_eq!(b.len(), 1, "the older entry left to stay within 200 bytes");
        assert!(b.bytes() <= 200);
        b.append(put(1000));
        assert_eq!(
            b.len(),
            1,
            "the newest entry is kept even when larger than the bound"
        );
        assert_eq!(b.read_after(2, 10).unwrap().len(), 1);
    }
}
