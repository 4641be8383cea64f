//! An in-process store with memcached 1.6's semantics, used when a node has
//! no memcached address.
//!
//! | memcached                                   | here                                            |
//! |---------------------------------------------|-------------------------------------------------|
//! | slab allocator, `-m` megabytes              | byte budget split evenly over [`SHARDS`] shards |
//! | one LRU per slab class                      | one `lru::LruCache` per shard, reads promote    |
//! | item size = header + key + value            | `key + value + ITEM_OVERHEAD`                   |
//! | clock ticks once a second                   | milliseconds on a `tokio::time::Instant` clock  |
//! | expired items reclaimed lazily or by crawler| reclaimed lazily, when found or when evicting   |
//! | `flush_all <delay>` via `oldest_live`       | a store-wide flush moment checked on every read |
//! | CAS unique: global counter from 1           | the same                                        |
//! | slab classes 1-63, `stats items/slabs`      | one class, 1: see [`EmbeddedStore::admin_reply`] |
//! | `cache_memlimit` frees memory as it allocates| evicts down to the new limit at once           |
//!
//! What each command answers and does to its key is decided by
//! [`crate::rules`], the rules the replicated modes use too; this store keeps
//! the items, the LRU, the memory budget (and its `out of memory` replies),
//! the CAS counter, the clock and the flush moments, and carries out each
//! [`Effect`].
//!
//! Every request is handled synchronously under one shard's lock; no lock is
//! held across an `.await`.

mod meta;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use lru::LruCache;
use tokio::time::Instant;

use super::{Backend, BackendError, BoxFuture};
use crate::protocol::{
    AdminRequest, ArithOp, ErrorReply, Exptime, Request, Response, StoreOp, StoreStats, Value,
};
use crate::rules::{self, Clock, Effect};

/// How many independently locked shards the store has.
pub const SHARDS: usize = 16;

/// Bytes charged per item on top of its key and value, standing in for
/// memcached's item header and hash-table slot.
pub const ITEM_OVERHEAD: usize = 64;

/// The slab class `stats items`, `stats slabs` and `stats cachedump` show
/// the store as.
const CLASS: u32 = 1;

/// The most bytes of a `stats cachedump` reply, as memcached's.
const CACHEDUMP_MAX_BYTES: usize = 2 * 1024 * 1024;

/// What the store counts of its items' ends, for `stats items` (names as
/// memcached's).
#[derive(Debug, Default)]
struct Tally {
    /// Live items evicted to make room.
    evicted: AtomicU64,
    /// ... of which had an expiry.
    evicted_nonzero: AtomicU64,
    /// ... of which were never read.
    evicted_unfetched: AtomicU64,
    /// ... of which were read twice or more (memcached's active).
    evicted_active: AtomicU64,
    /// Seconds since the last access of the last item evicted.
    evicted_time: AtomicU64,
    /// Expired items dropped (when found, or when making room).
    reclaimed: AtomicU64,
    /// ... of which were never read.
    expired_unfetched: AtomicU64,
    /// Stores refused for want of memory.
    outofmemory: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// `entry`, dropped to make room or found dead, ends.
    fn ended(&self, entry: &Entry, view: View) {
        if view.visible(entry) {
            Self::add(&self.evicted, 1);
            Self::add(
                &self.evicted_nonzero,
                u64::from(entry.item.deadline.is_some()),
            );
            Self::add(&self.evicted_unfetched, u64::from(!entry.meta.fetched));
            Self::add(&self.evicted_active, u64::from(entry.meta.active));
            let idle = view.clock.now_ms.saturating_sub(entry.meta.accessed_at) / 1000;
            self.evicted_time.store(idle, Ordering::Relaxed);
        } else if view.clock.expired(entry.item.deadline) {
            Self::add(&self.reclaimed, 1);
            Self::add(&self.expired_unfetched, u64::from(!entry.meta.fetched));
        }
    }
}

/// `flush_at` when no delayed flush is pending.
const NO_FLUSH: u64 = u64::MAX;

/// The memory an item is charged for.
fn cost(key_len: usize, data_len: usize) -> usize {
    key_len
        .saturating_add(data_len)
        .saturating_add(ITEM_OVERHEAD)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; if something ever did, the
    // shard's data is still a valid cache, so keep serving it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn out_of_memory() -> Response {
    Response::server_error("out of memory storing object")
}

/// One stored value: what the rules see (its deadline is on the store
/// clock), and when it was stored.
#[derive(Debug, Clone)]
struct Entry {
    item: rules::Item,
    /// Store-clock milliseconds of the last store, for delayed `flush_all`.
    stored_at: u64,
    /// What only the meta protocol shows.
    meta: EntryMeta,
}

/// Per-item metadata the meta protocol reads (`h`, `l`, `X`, `Z`, `W`, a
/// base64 key); kept by this node alone.
#[derive(Debug, Clone, Copy, Default)]
struct EntryMeta {
    marks: rules::meta::Marks,
    /// Read before (memcached's `ITEM_FETCHED`).
    fetched: bool,
    /// Read twice (memcached's `ITEM_ACTIVE`).
    active: bool,
    /// Stored through a base64 (`b`) meta request.
    key_binary: bool,
    /// Store-clock milliseconds of the last access, as memcached's
    /// segmented LRU keeps it: the store, then the second read.
    accessed_at: u64,
}

impl EntryMeta {
    fn new(now_ms: u64) -> EntryMeta {
        EntryMeta {
            accessed_at: now_ms,
            ..EntryMeta::default()
        }
    }

    /// A read that bumps the item, as memcached 1.6's segmented LRU does:
    /// the first read marks it fetched, the second marks it active and
    /// moves its access time, later ones change nothing.
    fn bump(&mut self, now_ms: u64) {
        if self.active {
            return;
        }
        if self.fetched {
            self.active = true;
            self.accessed_at = now_ms;
        } else {
            self.fetched = true;
        }
    }
}

/// What is visible at one moment: the clock and the pending flush.
#[derive(Debug, Clone, Copy)]
struct View {
    clock: Clock,
    /// Items stored before this moment vanish once it is reached.
    flush_at: u64,
}

impl View {
    fn visible(self, entry: &Entry) -> bool {
        let now = self.clock.now_ms;
        let flushed = self.flush_at <= now && entry.stored_at < self.flush_at;
        !self.clock.expired(entry.item.deadline) && !flushed
    }
}

struct Shard {
    items: LruCache<Bytes, Entry>,
    /// Bytes charged for the items held, live or not yet reclaimed.
    used: usize,
    limit: usize,
}

impl Shard {
    fn new(limit: usize) -> Shard {
        Shard {
            items: LruCache::unbounded(),
            used: 0,
            limit,
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let entry = self.items.pop(key)?;
        self.used = self
            .used
            .saturating_sub(cost(key.len(), entry.item.data.len()));
        Some(entry)
    }

    /// The live item under `key`, promoted in the LRU. A dead one (expired
    /// or flushed) is removed and reported missing.
    fn live(&mut self, key: &[u8], view: View, tally: &Tally) -> Option<&mut Entry> {
        let visible = view.visible(self.items.peek(key)?);
        if !visible {
            if let Some(dead) = self.remove(key) {
                tally.ended(&dead, view);
            }
            return None;
        }
        self.items.get_mut(key)
    }

    /// Stores `entry` (which must fit in `limit` and be live: the rules
    /// turn a store already expired into a removal), replacing any item
    /// under `key`, then evicts least-recently-used items until the shard is
    /// within its budget.
    fn insert(&mut self, key: Bytes, entry: Entry, view: View, tally: &Tally) {
        let charged = cost(key.len(), entry.item.data.len());
        if let Some((old_key, old)) = self.items.push(key, entry) {
            self.used = self
                .used
                .saturating_sub(cost(old_key.len(), old.item.data.len()));
        }
        self.used = self.used.saturating_add(charged);
        // The new item is the most recently used and fits on its own, so it
        // is never the one evicted.
        self.evict_to_limit(view, tally);
    }

    /// Evicts least-recently-used items until the shard is within its
    /// budget.
    fn evict_to_limit(&mut self, view: View, tally: &Tally) {
        while self.used > self.limit {
            let Some((k, old)) = self.items.pop_lru() else {
                break;
            };
            self.used = self.used.saturating_sub(cost(k.len(), old.item.data.len()));
            tally.ended(&old, view);
        }
    }

    fn clear(&mut self) {
        self.items.clear();
        self.used = 0;
    }
}

/// An in-process, memory-bounded store with memcached 1.6's semantics.
pub struct EmbeddedStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Bytes; `cache_memlimit` changes it.
    memory_limit: AtomicUsize,
    /// The store clock's zero.
    start: Instant,
    /// Unix time in milliseconds at `start`, for absolute exptimes.
    start_unix_ms: u64,
    /// The next CAS unique to hand out.
    next_cas: AtomicU64,
    /// Store-clock milliseconds of the pending or passed delayed flush.
    flush_at: AtomicU64,
    /// Serialises `flush_all` commands.
    flush_lock: Mutex<()>,
    tally: Tally,
    /// `false`: a store that does not fit is refused instead
    /// ([`Backend::never_evict`]), as memcached `-M` refuses it.
    evicts: std::sync::atomic::AtomicBool,
    total_items: AtomicU64,
    /// Random name of this store's lifetime.
    instance: u64,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("shards", &self.shards.len())
            .field("memory_limit", &self.memory_limit.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// A store that holds at most about `memory_limit_bytes` of items
    /// (keys, values and [`ITEM_OVERHEAD`] each), evicting the least
    /// recently used beyond that.
    pub fn new(memory_limit_bytes: usize) -> EmbeddedStore {
        EmbeddedStore::with_shards(memory_limit_bytes, SHARDS)
    }

    fn with_shards(memory_limit_bytes: usize, shards: usize) -> EmbeddedStore {
        let shards = shards.max(1);
        let per_shard = memory_limit_bytes / shards;
        let start_unix_ms = crate::time::unix_ms();
        EmbeddedStore {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            hasher: RandomState::new(),
            memory_limit: AtomicUsize::new(memory_limit_bytes),
            start: Instant::now(),
            start_unix_ms,
            next_cas: AtomicU64::new(1),
            flush_at: AtomicU64::new(NO_FLUSH),
            flush_lock: Mutex::new(()),
            tally: Tally::default(),
            evicts: std::sync::atomic::AtomicBool::new(true),
            total_items: AtomicU64::new(0),
            instance: rand::random(),
        }
    }

    /// Runs one request and returns memcached's answer. A too-large store,
    /// which the pipeline answers itself, is answered `ERROR`.
    pub fn execute(&self, request: &Request) -> Response {
        match request {
            Request::Get { keys, cas } => self.get(keys, *cas, None),
            Request::Gat { exptime, keys, cas } => self.get(keys, *cas, Some(*exptime)),
            Request::Store {
                op,
                key,
                flags,
                exptime,
                data,
                cas_unique,
                ..
            } => self.store(*op, key, *flags, *exptime, data.clone(), *cas_unique),
            Request::Arith { op, key, delta, .. } => self.arith(*op, key, *delta),
            Request::Delete { key, .. } => self.delete(key),
            Request::Touch { key, exptime, .. } => self.touch(key, *exptime),
            Request::FlushAll { delay, .. } => self.flush_all(*delay),
            Request::TooLarge { .. } => Response::Error(ErrorReply::Error),
            Request::Meta(m) => self.meta(m),
            Request::MetaNoop => Response::Meta(crate::protocol::MetaReply::new(
                crate::protocol::MetaCode::Mn,
                "",
            )),
        }
    }

    /// Milliseconds since the store was created.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The store clock now, with its zero placed in unix time so the rules
    /// can read absolute exptimes.
    fn clock(&self) -> Clock {
        Clock {
            now_ms: self.now_ms(),
            unix_ms_at_zero: self.start_unix_ms,
        }
    }

    fn view(&self) -> View {
        View {
            clock: self.clock(),
            flush_at: self.flush_at.load(Ordering::Acquire),
        }
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        // The modulo result is below `shards.len()`, which is a usize.
        let i = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }

    fn next_cas(&self) -> u64 {
        self.next_cas.fetch_add(1, Ordering::Relaxed)
    }

    /// Carries out what the rules decided for `key`; a put gets the next
    /// CAS unique. A put must fit the shard's budget (callers check).
    fn apply(&self, shard: &mut Shard, key: &[u8], effect: Effect, view: View) {
        match effect {
            Effect::Keep => {}
            Effect::Put(value) => {
                let entry = Entry {
                    item: rules::Item {
                        flags: value.flags,
                        data: value.data,
                        deadline: value.deadline,
                        cas: self.next_cas(),
                    },
                    stored_at: view.clock.now_ms,
                    meta: EntryMeta::new(view.clock.now_ms),
                };
                // Copy the key so the item does not pin the connection's
                // read buffer.
                shard.insert(Bytes::copy_from_slice(key), entry, view, &self.tally);
            }
            Effect::Touch { deadline } => {
                if let Some(entry) = shard.items.peek_mut(key) {
                    entry.item.deadline = deadline;
                }
            }
            Effect::Remove => {
                shard.remove(key);
            }
        }
    }

    fn get(&self, keys: &[Bytes], with_cas: bool, touch: Option<Exptime>) -> Response {
        let view = self.view();
        let mut values = Vec::new();
        for key in keys {
            let mut shard = self.shard(key);
            let Some(entry) = shard.live(key, view, &self.tally) else {
                continue;
            };
            entry.meta.bump(view.clock.now_ms);
            let item = &entry.item;
            values.push(Value {
                key: key.clone(),
                flags: item.flags,
                data: item.data.clone(),
                cas: with_cas.then_some(item.cas),
            });
            if let Some(exptime) = touch {
                let effect = rules::gat(Some(item), exptime, view.clock);
                self.apply(&mut shard, key, effect, view);
            }
        }
        Response::Values(values)
    }

    fn store(
        &self,
        op: StoreOp,
        key: &[u8],
        flags: u32,
        exptime: Exptime,
        data: Bytes,
        cas_unique: u64,
    ) -> Response {
        let view = self.view();
        let mut shard = self.shard(key);
        let limit = shard.limit;
        let joins = matches!(op, StoreOp::Append | StoreOp::Prepend);
        if !joins && cost(key.len(), data.len()) > limit {
            // memcached allocates the new item before it looks at the key.
            if op == StoreOp::Set {
                // As memcached does: a failed set must not leave the old
                // value readable.
                shard.remove(key);
            }
            Tally::add(&self.tally.outofmemory, 1);
            return out_of_memory();
        }
        let current = shard.live(key, view, &self.tally).map(|entry| &entry.item);
        let rules::Outcome { reply, mut effect } =
            rules::store(op, current, flags, exptime, data, cas_unique, view.clock);
        let old_cost = current.map_or(0, |item| cost(key.len(), item.data.len()));
        match &mut effect {
            Effect::Put(value) => {
                let new_cost = cost(key.len(), value.data.len());
                if new_cost > limit {
                    Tally::add(&self.tally.outofmemory, 1);
                    return out_of_memory();
                }
                if !self.evicts.load(Ordering::Relaxed)
                    && shard.used - old_cost.min(shard.used) + new_cost > limit
                {
                    // memcached -M: the write is refused, and a set does
                    // not leave the old value readable.
                    if op == StoreOp::Set {
                        shard.remove(key);
                    }
                    Tally::add(&self.tally.outofmemory, 1);
                    return out_of_memory();
                }
                if !joins {
                    // The request's own bytes: keep a copy of just the value.
                    value.data = Bytes::copy_from_slice(&value.data);
                }
            }
            // Stored already expired: memcached links it, under a CAS
            // unique, and never shows it.
            Effect::Remove => {
                self.next_cas();
            }
            Effect::Keep | Effect::Touch { .. } => {}
        }
        self.apply(&mut shard, key, effect, view);
        if reply == Response::Stored {
            self.total_items.fetch_add(1, Ordering::Relaxed);
        }
        reply
    }

    fn arith(&self, op: ArithOp, key: &[u8], delta: u64) -> Response {
        let view = self.view();
        let mut shard = self.shard(key);
        let limit = shard.limit;
        let entry = shard.live(key, view, &self.tally);
        let kept = entry.as_ref().map(|e| (e.meta, e.item.data.len()));
        let current = entry.map(|entry| &entry.item);
        let rules::Outcome { reply, effect } = rules::arith(op, current, delta);
        let in_place = match (&effect, kept) {
            (Effect::Put(value), Some((meta, old_len))) if value.data.len() <= old_len => {
                Some(meta)
            }
            _ => None,
        };
        if let Effect::Put(value) = &effect
            && cost(key.len(), value.data.len()) > limit
        {
            Tally::add(&self.tally.outofmemory, 1);
            return Response::server_error("out of memory");
        }
        self.apply(&mut shard, key, effect, view);
        // memcached rewrites a number that fits in place, and the item keeps
        // what the meta protocol shows of it; a longer one is a new item.
        if let Some(meta) = in_place
            && let Some(entry) = shard.items.peek_mut(key)
        {
            entry.meta = meta;
        }
        reply
    }

    fn delete(&self, key: &[u8]) -> Response {
        let view = self.view();
        let mut shard = self.shard(key);
        let current = shard.live(key, view, &self.tally).map(|entry| &entry.item);
        let rules::Outcome { reply, effect } = rules::delete(current);
        self.apply(&mut shard, key, effect, view);
        reply
    }

    fn touch(&self, key: &[u8], exptime: Exptime) -> Response {
        let view = self.view();
        let mut shard = self.shard(key);
        // memcached's touch fetches the item with a bump.
        let current = shard.live(key, view, &self.tally).map(|entry| {
            entry.meta.bump(view.clock.now_ms);
            &entry.item
        });
        let rules::Outcome { reply, effect } = rules::touch(current, exptime, view.clock);
        self.apply(&mut shard, key, effect, view);
        reply
    }

    fn flush_all(&self, delay: Option<Exptime>) -> Response {
        let _serial = lock(&self.flush_lock);
        let clock = self.clock();
        match rules::flush_at(delay, clock) {
            Some(at) => {
                let previous = self.flush_at.load(Ordering::Acquire);
                if previous <= clock.now_ms {
                    // That flush has happened; make it permanent before
                    // replacing it, or its victims would reappear.
                    self.sweep(previous);
                }
                self.flush_at.store(at, Ordering::Release);
            }
            None => {
                for shard in self.shards.iter() {
                    lock(shard).clear();
                }
                self.flush_at.store(NO_FLUSH, Ordering::Release);
            }
        }
        Response::Ok
    }

    /// Sets the memory limit (`cache_memlimit`) and evicts least recently
    /// used items until every shard is within its share of it; a store
    /// that never evicts ([`Backend::never_evict`]) keeps them and refuses
    /// writes until it is within it, as memcached `-M` does.
    pub fn set_memory_limit(&self, bytes: usize) {
        self.memory_limit.store(bytes, Ordering::Relaxed);
        let per_shard = bytes / self.shards.len();
        let view = self.view();
        let evicts = self.evicts.load(Ordering::Relaxed);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.limit = per_shard;
            if evicts {
                shard.evict_to_limit(view, &self.tally);
            }
        }
    }

    /// memcached's answer to an admin request, for this store. The store
    /// is shown as one slab class, [`CLASS`], holding every item:
    ///
    /// - `stats items`: `number` is every item held (as `curr_items`), all
    ///   in the one LRU, shown as cold (the LRU memcached evicts from and
    ///   `cachedump` lists); `age` is the idle time of the least recently
    ///   used item; `mem_requested` is the bytes charged (as `bytes`); the
    ///   `evicted*`, `reclaimed`, `expired_unfetched` and `outofmemory`
    ///   counts are the store's own (an item is reclaimed when found
    ///   expired or dropped expired to make room); what a single LRU has no
    ///   counterpart for (hot and warm LRUs, LRU moves, crawler, tail
    ///   repairs, per-LRU hits) is 0.
    /// - `stats slabs`: a page is a shard and a chunk is a byte (the store
    ///   allocates per item, not in chunks): `chunk_size` 1,
    ///   `chunks_per_page` a shard's budget, `total_pages` the shards,
    ///   `used_chunks` the bytes charged; `total_malloced` the bytes
    ///   charged. The per-class command counts are not kept (0; `stats`
    ///   has the node's).
    /// - `stats sizes`: disabled, as memcached's default.
    /// - `stats cachedump 1 <limit>`: every live item with a printable key
    ///   (memcached leaves out binary keys too), shard by shard, most
    ///   recently used first within a shard; other classes are empty.
    /// - `cache_memlimit`: see [`EmbeddedStore::set_memory_limit`].
    /// - `slabs automove`: accepted, and has no effect (there are no slabs
    ///   to move).
    pub fn admin_reply(&self, request: &AdminRequest) -> Response {
        match request {
            AdminRequest::Stats(StoreStats::Items) => Response::Stats(self.items_stats()),
            AdminRequest::Stats(StoreStats::Slabs) => Response::Stats(self.slabs_stats()),
            AdminRequest::Stats(StoreStats::Sizes) => {
                Response::Stats(vec![("sizes_status".into(), "disabled".into())])
            }
            AdminRequest::CacheDump { class, limit } => {
                Response::Raw(self.cachedump(*class, *limit))
            }
            AdminRequest::MemLimit { megabytes, .. } => {
                let bytes = usize::try_from(*megabytes)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(1024 * 1024);
                self.set_memory_limit(bytes);
                Response::Ok
            }
            AdminRequest::SlabsAutomove { .. } => Response::Ok,
        }
    }

    /// (items held, bytes charged, seconds the least recently used item
    /// has been idle).
    fn occupancy(&self) -> (usize, usize, u64) {
        let now = self.now_ms();
        let (mut items, mut bytes, mut age) = (0, 0, 0);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            items += shard.items.len();
            bytes += shard.used;
            if let Some((_, oldest)) = shard.items.peek_lru() {
                age = age.max(now.saturating_sub(oldest.meta.accessed_at) / 1000);
            }
        }
        (items, bytes, age)
    }

    fn items_stats(&self) -> Vec<(String, String)> {
        let (items, bytes, age) = self.occupancy();
        if items == 0 {
            return Vec::new();
        }
        let t = &self.tally;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        let values = [
            ("number", items.to_string()),
            ("number_hot", "0".into()),
            ("number_warm", "0".into()),
            ("number_cold", items.to_string()),
            ("age_hot", "0".into()),
            ("age_warm", "0".into()),
            ("age", age.to_string()),
            ("mem_requested", bytes.to_string()),
            ("evicted", n(&t.evicted)),
            ("evicted_nonzero", n(&t.evicted_nonzero)),
            ("evicted_time", n(&t.evicted_time)),
            ("outofmemory", n(&t.outofmemory)),
            ("tailrepairs", "0".into()),
            ("reclaimed", n(&t.reclaimed)),
            ("expired_unfetched", n(&t.expired_unfetched)),
            ("evicted_unfetched", n(&t.evicted_unfetched)),
            ("evicted_active", n(&t.evicted_active)),
            ("crawler_reclaimed", "0".into()),
            ("crawler_items_checked", "0".into()),
            ("lrutail_reflocked", "0".into()),
            ("moves_to_cold", "0".into()),
            ("moves_to_warm", "0".into()),
            ("moves_within_lru", "0".into()),
            ("direct_reclaims", "0".into()),
            ("hits_to_hot", "0".into()),
            ("hits_to_warm", "0".into()),
            ("hits_to_cold", "0".into()),
            ("hits_to_temp", "0".into()),
        ];
        values
            .into_iter()
            .map(|(name, v)| (format!("items:{CLASS}:{name}"), v))
            .collect()
    }

    fn slabs_stats(&self) -> Vec<(String, String)> {
        let (items, bytes, _) = self.occupancy();
        let limit = self.memory_limit.load(Ordering::Relaxed);
        let pages = self.shards.len();
        let mut out = Vec::new();
        if items > 0 {
            let values = [
                ("chunk_size", "1".to_string()),
                ("chunks_per_page", (limit / pages).to_string()),
                ("total_pages", pages.to_string()),
                ("total_chunks", limit.to_string()),
                ("used_chunks", bytes.to_string()),
                ("free_chunks", limit.saturating_sub(bytes).to_string()),
                ("free_chunks_end", "0".into()),
                ("get_hits", "0".into()),
                ("cmd_set", "0".into()),
                ("delete_hits", "0".into()),
                ("incr_hits", "0".into()),
                ("decr_hits", "0".into()),
                ("cas_hits", "0".into()),
                ("cas_badval", "0".into()),
                ("touch_hits", "0".into()),
            ];
            out.extend(
                values
                    .into_iter()
                    .map(|(name, v)| (format!("{CLASS}:{name}"), v)),
            );
        }
        out.push(("active_slabs".into(), u8::from(items > 0).to_string()));
        out.push(("total_malloced".into(), bytes.to_string()));
        out
    }

    /// `ITEM <key> [<bytes> b; <expiry unix seconds, 0 never> s]` lines
    /// and `END`, at most [`CACHEDUMP_MAX_BYTES`] of them.
    fn cachedump(&self, class: u32, limit: u32) -> Bytes {
        let mut out = Vec::new();
        let view = self.view();
        let mut shown = 0u32;
        'shards: for shard in self.shards.iter().filter(|_| class == CLASS) {
            let shard = lock(shard);
            for (key, entry) in shard.items.iter() {
                if limit != 0 && shown >= limit {
                    break 'shards;
                }
                if !view.visible(entry) || entry.meta.key_binary {
                    continue;
                }
                let expiry = entry.item.deadline.map_or(0, |d| {
                    view.clock.unix_ms_at_zero.saturating_add(d).div_ceil(1000)
                });
                let mut line = b"ITEM ".to_vec();
                line.extend_from_slice(key);
                line.extend_from_slice(
                    format!(" [{} b; {expiry} s]\r\n", entry.item.data.len()).as_bytes(),
                );
                if out.len() + line.len() + 5 > CACHEDUMP_MAX_BYTES {
                    break 'shards;
                }
                out.extend_from_slice(&line);
                shown += 1;
            }
        }
        out.extend_from_slice(b"END\r\n");
        out.into()
    }

    /// Removes every item stored before `flush_at`.
    fn sweep(&self, flush_at: u64) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let doomed: Vec<Bytes> = shard
                .items
                .iter()
                .filter(|(_, entry)| entry.stored_at < flush_at)
                .map(|(key, _)| key.clone())
                .collect();
            for key in doomed {
                shard.remove(&key);
            }
        }
    }
}

impl Backend for EmbeddedStore {
    fn call<'a>(
        &'a self,
        requests: &'a [Request],
    ) -> BoxFuture<'a, Result<Vec<Response>, BackendError>> {
        let responses = requests.iter().map(|r| self.execute(r)).collect();
        Box::pin(std::future::ready(Ok(responses)))
    }

    fn admin<'a>(
        &'a self,
        request: &'a AdminRequest,
    ) -> BoxFuture<'a, Result<Response, BackendError>> {
        Box::pin(std::future::ready(Ok(self.admin_reply(request))))
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn keys(&self) -> BoxFuture<'_, Result<Vec<Bytes>, BackendError>> {
        let view = self.view();
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            keys.extend(
                shard
                    .items
                    .iter()
                    .filter(|(_, entry)| view.visible(entry))
                    .map(|(k, _)| k.clone()),
            );
        }
        Box::pin(std::future::ready(Ok(keys)))
    }

    fn never_evict(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        self.evicts.store(false, Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(())))
    }

    fn instance(&self) -> BoxFuture<'_, Result<String, BackendError>> {
        Box::pin(std::future::ready(Ok(format!(
            "embedded-{}",
            self.instance
        ))))
    }

    fn stats(&self) -> Vec<(String, String)> {
        let (mut items, mut bytes) = (0usize, 0usize);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            items += shard.items.len();
            bytes += shard.used;
        }
        let line = |name: &str, value: String| (name.to_string(), value);
        vec![
            line("curr_items", items.to_string()),
            line("bytes", bytes.to_string()),
            line(
                "evictions",
                self.tally.evicted.load(Ordering::Relaxed).to_string(),
            ),
            line(
                "limit_maxbytes",
                self.memory_limit.load(Ordering::Relaxed).to_string(),
            ),
            line(
                "total_items",
                self.total_items.load(Ordering::Relaxed).to_string(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::{ClientError, REALTIME_MAXDELTA};

    const BIG: usize = 64 * 1024 * 1024;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn store(op: StoreOp, key: &str, flags: u32, exptime: Exptime, data: &str) -> Request {
        Request::Store {
            op,
            key: b(key),
            flags,
            exptime,
            data: b(data),
            cas_unique: 0,
            noreply: false,
        }
    }

    fn set(key: &str, data: &str) -> Request {
        store(StoreOp::Set, key, 0, 0, data)
    }

    fn cas(key: &str, data: &str, cas_unique: u64) -> Request {
        Request::Store {
            op: StoreOp::Cas,
            key: b(key),
            flags: 0,
            exptime: 0,
            data: b(data),
            cas_unique,
            noreply: false,
        }
    }

    fn gets(keys: &[&str]) -> Request {
        Request::Get {
            keys: keys.iter().map(|k| b(k)).collect(),
            cas: true,
        }
    }

    fn arith(op: ArithOp, key: &str, delta: u64) -> Request {
        Request::Arith {
            op,
            key: b(key),
            delta,
            noreply: false,
        }
    }

    fn flush(delay: Option<Exptime>) -> Request {
        Request::FlushAll {
            delay,
            noreply: false,
        }
    }

    async fn run(s: &EmbeddedStore, r: Request) -> Response {
        let mut out = s
            .call(std::slice::from_ref(&r))
            .await
            .expect("embedded never fails");
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    /// The item under `key`, if visible: (flags, data, cas).
    async fn fetch(s: &EmbeddedStore, key: &str) -> Option<(u32, Bytes, u64)> {
        match run(s, gets(&[key])).await {
            Response::Values(mut v) if v.len() == 1 => {
                let v = v.remove(0);
                Some((v.flags, v.data, v.cas.expect("gets returns cas")))
            }
            Response::Values(v) if v.is_empty() => None,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn data(s: &EmbeddedStore, key: &str) -> Option<Bytes> {
        fetch(s, key).await.map(|(_, d, _)| d)
    }

    fn stat(s: &EmbeddedStore, name: &str) -> String {
        s.stats()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .expect("stat present")
    }

    #[tokio::test]
    async fn get_answers_in_request_order_skipping_misses() {
        let s = EmbeddedStore::new(BIG);
        assert_eq!(
            run(&s, store(StoreOp::Set, "a", 5, 0, "1")).await,
            Response::Stored
        );
        assert_eq!(run(&s, set("b", "2")).await, Response::Stored);
        let got = run(
            &s,
            Request::Get {
                keys: vec![b("b"), b("x"), b("a"), b("b")],
                cas: false,
            },
        )
        .await;
        let Response::Values(values) = got else {
            panic!("not values: {got:?}");
        };
        let summary: Vec<_> = values
            .iter()
            .map(|v| (v.key.clone(), v.flags, v.data.clone(), v.cas))
            .collect();
        assert_eq!(
            summary,
            vec![
                (b("b"), 0, b("2"), None),
                (b("a"), 5, b("1"), None),
                (b("b"), 0, b("2"), None),
            ]
        );
        let Response::Values(values) = run(&s, gets(&["a"])).await else {
            panic!("not values");
        };
        assert!(values[0].cas.is_some());
        assert_eq!(run(&s, gets(&["nope"])).await, Response::Values(vec![]));
    }

    #[tokio::test]
    async fn batch_runs_in_order() {
        let s = EmbeddedStore::new(BIG);
        let out = s
            .call(&[
                set("k", "v"),
                gets(&["k"]),
                Request::Delete {
                    key: b("k"),
                    noreply: true,
                },
                gets(&["k"]),
            ])
            .await
            .expect("ok");
        assert_eq!(out.len(), 4);
        assert_eq!(out[0], Response::Stored);
        assert_eq!(out[1].outcome(), "hit");
        assert_eq!(out[2], Response::Deleted);
        assert_eq!(out[3], Response::Values(vec![]));
    }

    #[tokio::test]
    async fn set_add_replace() {
        let s = EmbeddedStore::new(BIG);
        assert_eq!(
            run(&s, store(StoreOp::Replace, "k", 0, 0, "r")).await,
            Response::NotStored
        );
        assert_eq!(
            run(&s, store(StoreOp::Add, "k", 1, 0, "a")).await,
            Response::Stored
        );
        assert_eq!(
            run(&s, store(StoreOp::Add, "k", 2, 0, "b")).await,
            Response::NotStored
        );
        assert_eq!(
            fetch(&s, "k").await.map(|(f, d, _)| (f, d)),
            Some((1, b("a")))
        );
        assert_eq!(
            run(&s, store(StoreOp::Replace, "k", 3, 0, "c")).await,
            Response::Stored
        );
        assert_eq!(
            fetch(&s, "k").await.map(|(f, d, _)| (f, d)),
            Some((3, b("c")))
        );
        assert_eq!(
            run(&s, store(StoreOp::Set, "k", 4, 0, "d")).await,
            Response::Stored
        );
        assert_eq!(
            fetch(&s, "k").await.map(|(f, d, _)| (f, d)),
            Some((4, b("d")))
        );
        assert_eq!(stat(&s, "total_items"), "3");
        assert_eq!(stat(&s, "curr_items"), "1");
    }

    #[tokio::test]
    async fn append_prepend_keep_flags_and_need_the_item() {
        let s = EmbeddedStore::new(BIG);
        assert_eq!(
            run(&s, store(StoreOp::Append, "k", 0, 0, "x")).await,
            Response::NotStored
        );
        assert_eq!(
            run(&s, store(StoreOp::Prepend, "k", 0, 0, "x")).await,
            Response::NotStored
        );
        assert_eq!(data(&s, "k").await, None);
        run(&s, store(StoreOp::Set, "k", 42, 0, "mid")).await;
        let (_, _, cas0) = fetch(&s, "k").await.expect("present");
        assert_eq!(
            run(&s, store(StoreOp::Append, "k", 7, 0, "-end")).await,
            Response::Stored
        );
        assert_eq!(
            run(&s, store(StoreOp::Prepend, "k", 9, 0, "start-")).await,
            Response::Stored
        );
        let (flags, d, cas1) = fetch(&s, "k").await.expect("present");
        assert_eq!((flags, d), (42, b("start-mid-end")));
        assert_ne!(cas0, cas1);
    }

    #[tokio::test(start_paused = true)]
    async fn append_keeps_exptime() {
        let s = EmbeddedStore::new(BIG);
        run(&s, store(StoreOp::Set, "k", 0, 10, "a")).await;
        // A request exptime of 0 would make it immortal; it is ignored.
        run(&s, store(StoreOp::Append, "k", 0, 0, "b")).await;
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(data(&s, "k").await, None);
    }

    #[tokio::test]
    async fn cas_outcomes_and_unique_changes() {
        let s = EmbeddedStore::new(BIG);
        assert_eq!(run(&s, cas("k", "v", 1)).await, Response::NotFound);
        run(&s, set("k", "v1")).await;
        let (_, _, c1) = fetch(&s, "k").await.expect("present");
        assert_eq!(run(&s, cas("k", "v2", c1 + 1000)).await, Response::Exists);
        assert_eq!(data(&s, "k").await, Some(b("v1")));
        assert_eq!(run(&s, cas("k", "v2", c1)).await, Response::Stored);
        let (_, d, c2) = fetch(&s, "k").await.expect("present");
        assert_eq!(d, b("v2"));
        assert!(c2 > c1);
        // The old unique no longer matches.
        assert_eq!(run(&s, cas("k", "v3", c1)).await, Response::Exists);
        // touch and gat keep the unique.
        let touch = Request::Touch {
            key: b("k"),
            exptime: 100,
            noreply: false,
        };
        assert_eq!(run(&s, touch).await, Response::Touched);
        let gat = Request::Gat {
            exptime: 200,
            keys: vec![b("k")],
            cas: true,
        };
        let Response::Values(v) = run(&s, gat).await else {
            panic!("not values");
        };
        assert_eq!(v[0].cas, Some(c2));
        // incr gives a new one.
        run(&s, set("n", "1")).await;
        let (_, _, n1) = fetch(&s, "n").await.expect("present");
        run(&s, arith(ArithOp::Incr, "n", 1)).await;
        let (_, _, n2) = fetch(&s, "n").await.expect("present");
        assert!(n2 > n1);
    }

    #[tokio::test]
    async fn cas_uniques_count_from_one() {
        let s = EmbeddedStore::new(BIG);
        run(&s, set("a", "1")).await;
        run(&s, set("b", "1")).await;
        assert_eq!(fetch(&s, "a").await.map(|(_, _, c)| c), Some(1));
        assert_eq!(fetch(&s, "b").await.map(|(_, _, c)| c), Some(2));
    }

    #[tokio::test]
    async fn incr_decr_basics() {
        let s = EmbeddedStore::new(BIG);
        assert_eq!(
            run(&s, arith(ArithOp::Incr, "n", 1)).await,
            Response::NotFound
        );
        assert_eq!(
            run(&s, arith(ArithOp::Decr, "n", 1)).await,
            Response::NotFound
        );
        run(&s, store(StoreOp::Set, "n", 77, 0, "99")).await;
        assert_eq!(
            run(&s, arith(ArithOp::Incr, "n", 1)).await,
            Response::Number(100)
        );
        assert_eq!(
            fetch(&s, "n").await.map(|(f, d, _)| (f, d)),
            Some((77, b("100")))
        );
        assert_eq!(
            run(&s, arith(ArithOp::Decr, "n", 1)).await,
            Response::Number(99)
        );
        assert_eq!(data(&s, "n").await, Some(b("99 ")));
        assert_eq!(
            run(&s, arith(ArithOp::Decr, "n", 1000)).await,
            Response::Number(0)
        );
        assert_eq!(data(&s, "n").await, Some(b("0  ")));
        run(&s, set("ten", "10")).await;
        assert_eq!(
            run(&s, arith(ArithOp::Decr, "ten", 10)).await,
            Response::Number(0)
        );
        assert_eq!(data(&s, "ten").await, Some(b("0 ")));
    }

    #[tokio::test]
    async fn incr_wraps_at_u64_max_with_padding() {
        let s = EmbeddedStore::new(BIG);
        run(&s, set("n", "18446744073709551615")).await;
        assert_eq!(
            run(&s, arith(ArithOp::Incr, "n", 1)).await,
            Response::Number(0)
        );
        let expected = format!("0{}", " ".repeat(19));
        assert_eq!(data(&s, "n").await, Some(b(&expected)));
        assert_eq!(
            run(&s, arith(ArithOp::Incr, "n", 5)).await,
            Response::Number(5)
        );
    }

    #[tokio::test]
    async fn incr_reads_numbers_as_strtoull() {
        let s = EmbeddedStore::new(BIG);
        run(&s, set("n", " 5")).await;
        assert_eq!(
            run(&s, arith(ArithOp::Incr, "n", 1)).await,
            Response::Number(6)
        );
        assert_eq!(data(&s, "n").await, Some(b("6 ")));
        for ok in ["+5", "5  ", "  +5 ", "007"] {
            run(&s, set("n", ok)).await;
            let expected = if ok == "007" { 8 } else { 6 };
            assert_eq!(
                run(&s, arith(ArithOp::Incr, "n", 1)).await,
                Response::Number(expected),
                "{ok:?}"
            );
        }
        let non_numeric = Response::client_error(ClientError::NonNumeric);
        for bad in [
            " 5a",
            "-5",
            "",
            "   ",
            "+",
            "+ 5",
            "5 5",
            "5\r\n",
            "123456789012345678901",
            "18446744073709551616",
        ] {
            run(&s, set("n", bad)).await;
            assert_eq!(
                run(&s, arith(ArithOp::Incr, "n", 1)).await,
                non_numeric,
                "{bad:?}"
            );
            assert_eq!(
                run(&s, arith(ArithOp::Decr, "n", 1)).await,
                non_numeric,
                "{bad:?}"
            );
            assert_eq!(data(&s, "n").await, Some(b(bad)), "value unchanged");
        }
    }

    #[tokio::test]
    async fn delete_and_touch() {
        let s = EmbeddedStore::new(BIG);
        let delete = || Request::Delete {
            key: b("k"),
            noreply: false,
        };
        let touch = || Request::Touch {
            key: b("k"),
            exptime: 0,
            noreply: false,
        };
        assert_eq!(run(&s, delete()).await, Response::NotFound);
        assert_eq!(run(&s, touch()).await, Response::NotFound);
        run(&s, set("k", "v")).await;
        assert_eq!(run(&s, touch()).await, Response::Touched);
        assert_eq!(run(&s, delete()).await, Response::Deleted);
        assert_eq!(run(&s, delete()).await, Response::NotFound);
        assert_eq!(data(&s, "k").await, None);
        assert_eq!(stat(&s, "curr_items"), "0");
        assert_eq!(stat(&s, "bytes"), "0");
    }

    #[tokio::test(start_paused = true)]
    async fn relative_ttl_expires() {
        let s = EmbeddedStore::new(BIG);
        run(&s, store(StoreOp::Set, "k", 0, 10, "v")).await;
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(data(&s, "k").await, Some(b("v")));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(data(&s, "k").await, None);
        // Expired is missing for every command.
        run(&s, store(StoreOp::Set, "k", 0, 1, "v")).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            run(&s, store(StoreOp::Replace, "k", 0, 0, "w")).await,
            Response::NotStored
        );
        assert_eq!(
            run(&s, store(StoreOp::Append, "k", 0, 0, "w")).await,
            Response::NotStored
        );
        assert_eq!(run(&s, cas("k", "w", 1)).await, Response::NotFound);
        assert_eq!(
            run(&s, arith(ArithOp::Incr, "k", 1)).await,
            Response::NotFound
        );
        assert_eq!(
            run(
                &s,
                Request::Delete {
                    key: b("k"),
                    noreply: false
                }
            )
            .await,
            Response::NotFound
        );
        assert_eq!(
            run(&s, store(StoreOp::Add, "k", 0, 0, "w")).await,
            Response::Stored
        );
        assert_eq!(data(&s, "k").await, Some(b("w")));
    }

    #[tokio::test(start_paused = true)]
    async fn negative_exptime_is_invisible_at_once() {
        let s = EmbeddedStore::new(BIG);
        run(&s, set("k", "old")).await;
        assert_eq!(
            run(&s, store(StoreOp::Set, "k", 0, -1, "new")).await,
            Response::Stored
        );
        assert_eq!(data(&s, "k").await, None);
        assert_eq!(
            run(&s, store(StoreOp::Add, "k", 0, 0, "again")).await,
            Response::Stored
        );
        let touch = Request::Touch {
            key: b("k"),
            exptime: -1,
            noreply: false,
        };
        assert_eq!(run(&s, touch).await, Response::Touched);
        assert_eq!(data(&s, "k").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn absolute_exptime() {
        let s = EmbeddedStore::new(BIG);
        // Just past the relative range: a unix time in 1970.
        run(
            &s,
            store(StoreOp::Set, "past", 0, REALTIME_MAXDELTA + 1, "v"),
        )
        .await;
        assert_eq!(data(&s, "past").await, None);
        let now_unix = i64::try_from(s.start_unix_ms / 1000).expect("fits");
        run(&s, store(StoreOp::Set, "now", 0, now_unix, "v")).await;
        assert_eq!(data(&s, "now").await, None);
        run(&s, store(StoreOp::Set, "future", 0, now_unix + 100, "v")).await;
        tokio::time::advance(Duration::from_secs(99)).await;
        assert_eq!(data(&s, "future").await, Some(b("v")));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(data(&s, "future").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn gat_sets_a_new_ttl() {
        let s = EmbeddedStore::new(BIG);
        run(&s, store(StoreOp::Set, "k", 3, 10, "v")).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        let gat = Request::Gat {
            exptime: 100,
            keys: vec![b("k"), b("missing")],
            cas: false,
        };
        let got = run(&s, gat).await;
        assert_eq!(
            got,
            Response::Values(vec![Value {
                key: b("k"),
                flags: 3,
                data: b("v"),
                cas: None,
            }])
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(data(&s, "k").await, Some(b("v")));
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(data(&s, "k").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn touch_sets_a_new_ttl() {
        let s = EmbeddedStore::new(BIG);
        run(&s, store(StoreOp::Set, "k", 0, 0, "v")).await;
        let touch = Request::Touch {
            key: b("k"),
            exptime: 5,
            noreply: false,
        };
        assert_eq!(run(&s, touch).await, Response::Touched);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(data(&s, "k").await, None);
    }

    #[tokio::test]
    async fn flush_all_now() {
        let s = EmbeddedStore::new(BIG);
        for delay in [None, Some(0), Some(-5)] {
            run(&s, set("a", "1")).await;
            run(&s, set("b", "2")).await;
            assert_eq!(run(&s, flush(delay)).await, Response::Ok);
            assert_eq!(data(&s, "a").await, None, "{delay:?}");
            assert_eq!(data(&s, "b").await, None, "{delay:?}");
            assert_eq!(stat(&s, "bytes"), "0");
            run(&s, set("c", "3")).await;
            assert_eq!(data(&s, "c").await, Some(b("3")));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_flush_hides_only_older_items() {
        let s = EmbeddedStore::new(BIG);
        run(&s, set("old", "1")).await;
        assert_eq!(run(&s, flush(Some(10))).await, Response::Ok);
        tokio::time::advance(Duration::from_secs(5)).await;
        run(&s, set("before", "2")).await;
        assert_eq!(data(&s, "old").await, Some(b("1")));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(data(&s, "old").await, None);
        assert_eq!(data(&s, "before").await, None);
        run(&s, set("after", "3")).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(data(&s, "after").await, Some(b("3")));
        run(&s, set("later", "4")).await;
        assert_eq!(data(&s, "later").await, Some(b("4")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_delayed_flush_does_not_bring_back_flushed_items() {
        let s = EmbeddedStore::with_shards(BIG, 1);
        run(&s, set("old", "1")).await;
        run(&s, flush(Some(1))).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        // "old" is flushed but not yet reclaimed.
        run(&s, set("mid", "2")).await;
        run(&s, flush(Some(60))).await;
        assert_eq!(data(&s, "old").await, None);
        assert_eq!(data(&s, "mid").await, Some(b("2")));
        assert_eq!(stat(&s, "curr_items"), "1");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_flush_with_absolute_time() {
        let s = EmbeddedStore::new(BIG);
        run(&s, set("k", "v")).await;
        let now_unix = i64::try_from(s.start_unix_ms / 1000).expect("fits");
        run(&s, flush(Some(now_unix + 20))).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(data(&s, "k").await, Some(b("v")));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(data(&s, "k").await, None);
        // An absolute time already past flushes at once.
        run(&s, set("k", "v")).await;
        run(&s, flush(Some(REALTIME_MAXDELTA + 1))).await;
        assert_eq!(data(&s, "k").await, None);
    }

    #[tokio::test]
    async fn lru_evicts_the_least_recently_used() {
        // One shard holding exactly three items of one-byte keys and
        // ten-byte values.
        let item = cost(1, 10);
        let s = EmbeddedStore::with_shards(3 * item, 1);
        for k in ["a", "b", "c"] {
            assert_eq!(run(&s, set(k, "0123456789")).await, Response::Stored);
        }
        assert_eq!(stat(&s, "bytes"), (3 * item).to_string());
        // Reading "a" promotes it, leaving "b" the oldest.
        assert!(data(&s, "a").await.is_some());
        run(&s, set("d", "0123456789")).await;
        assert_eq!(data(&s, "b").await, None);
        for k in ["a", "c", "d"] {
            assert!(data(&s, k).await.is_some(), "{k}");
        }
        assert_eq!(stat(&s, "evictions"), "1");
        assert_eq!(stat(&s, "curr_items"), "3");
        // A bigger item evicts as many as it needs.
        run(&s, set("e", &"x".repeat(item + 10))).await;
        assert_eq!(stat(&s, "evictions"), "3");
        assert_eq!(stat(&s, "curr_items"), "2");
        assert!(data(&s, "e").await.is_some());
        assert!(data(&s, "a").await.is_none());
    }

    #[tokio::test]
    async fn a_store_that_never_evicts_refuses_what_does_not_fit() {
        let item = cost(1, 10);
        let s = EmbeddedStore::with_shards(3 * item, 1);
        s.never_evict().await.unwrap();
        for k in ["a", "b", "c"] {
            assert_eq!(run(&s, set(k, "0123456789")).await, Response::Stored);
        }
        // Full: refused as memcached -M refuses it, and nothing evicted.
        assert_eq!(run(&s, set("d", "0123456789")).await, out_of_memory());
        assert_eq!(stat(&s, "evictions"), "0");
        // A lower limit evicts nothing either.
        s.set_memory_limit(2 * item);
        assert_eq!(stat(&s, "evictions"), "0");
        assert_eq!(run(&s, set("d", "0123456789")).await, out_of_memory());
        s.set_memory_limit(3 * item);
        for k in ["a", "b", "c"] {
            assert!(data(&s, k).await.is_some(), "{k}");
        }
        // Replacing a value with one of the same size still fits; a failed
        // set of a key leaves no old value behind.
        assert_eq!(run(&s, set("a", "9876543210")).await, Response::Stored);
        assert_eq!(run(&s, set("b", "01234567890")).await, out_of_memory());
        assert_eq!(data(&s, "b").await, None);
        assert_eq!(run(&s, set("d", "0123456789")).await, Response::Stored);
    }

    #[tokio::test]
    async fn the_default_store_spreads_keys_over_shards() {
        let s = EmbeddedStore::new(BIG);
        for i in 0..1000 {
            run(&s, set(&format!("key{i}"), &i.to_string())).await;
        }
        for i in 0..1000 {
            assert_eq!(data(&s, &format!("key{i}")).await, Some(b(&i.to_string())));
        }
        let busy = s
            .shards
            .iter()
            .filter(|sh| !lock(sh).items.is_empty())
            .count();
        assert!(busy > SHARDS / 2, "only {busy} shards used");
        assert_eq!(stat(&s, "curr_items"), "1000");
        assert_eq!(stat(&s, "evictions"), "0");
    }

    #[tokio::test]
    async fn too_big_for_the_budget_is_refused() {
        let s = EmbeddedStore::with_shards(1000, 1);
        let oom = Response::Error(ErrorReply::Server("out of memory storing object".into()));
        run(&s, set("k", "small")).await;
        let huge = "x".repeat(1000);
        assert_eq!(run(&s, set("k", &huge)).await, oom);
        // A failed set does not leave the stale value behind.
        assert_eq!(data(&s, "k").await, None);
        run(&s, set("k", "small")).await;
        assert_eq!(run(&s, store(StoreOp::Add, "j", 0, 0, &huge)).await, oom);
        assert_eq!(run(&s, store(StoreOp::Append, "k", 0, 0, &huge)).await, oom);
        assert_eq!(data(&s, "k").await, Some(b("small")));
        assert_eq!(stat(&s, "evictions"), "0");
        // With the default sharding the budget is per shard.
        let s = EmbeddedStore::new(16 * 1000);
        assert_eq!(run(&s, set("k", &huge)).await, oom);
        assert_eq!(run(&s, set("k", &"x".repeat(500))).await, Response::Stored);
    }

    #[tokio::test]
    async fn a_too_large_store_is_an_error() {
        let s = EmbeddedStore::new(BIG);
        for r in [Request::TooLarge {
            op: StoreOp::Set,
            key: b("k"),
            noreply: false,
        }] {
            assert_eq!(run(&s, r).await, Response::Error(ErrorReply::Error));
        }
    }

    fn admin_stat(s: &EmbeddedStore, group: StoreStats, name: &str) -> Option<String> {
        let Response::Stats(lines) = s.admin_reply(&AdminRequest::Stats(group)) else {
            panic!("not stats");
        };
        lines.into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    #[tokio::test]
    async fn cache_memlimit_evicts_down_to_the_new_limit() {
        let s = EmbeddedStore::with_shards(BIG, 1);
        let value = "x".repeat(1000);
        for i in 0..100 {
            run(&s, set(&format!("k{i:02}"), &value)).await;
        }
        assert!(
            data(&s, "k00").await.is_some(),
            "k00 is now the most recent"
        );
        let limit = AdminRequest::MemLimit {
            megabytes: 8,
            noreply: false,
        };
        assert_eq!(s.admin_reply(&limit), Response::Ok);
        assert_eq!(stat(&s, "limit_maxbytes"), (8 << 20).to_string());
        assert_eq!(stat(&s, "curr_items"), "100", "all fit in 8 MB");
        // Shrunk below what is held, the least recently used go first.
        s.set_memory_limit(10 * cost(3, 1000));
        assert_eq!(stat(&s, "curr_items"), "10");
        assert_eq!(stat(&s, "evictions"), "90");
        assert!(data(&s, "k00").await.is_some());
        assert!(data(&s, "k01").await.is_none());
        assert!(data(&s, "k99").await.is_some());
        assert_eq!(
            admin_stat(&s, StoreStats::Items, "items:1:evicted").as_deref(),
            Some("90")
        );
        assert_eq!(
            admin_stat(&s, StoreStats::Items, "items:1:evicted_unfetched").as_deref(),
            Some("90"),
            "none of them was read"
        );
    }

    #[tokio::test]
    async fn admin_stats_show_one_class() {
        let s = EmbeddedStore::new(BIG);
        assert_eq!(
            s.admin_reply(&AdminRequest::Stats(StoreStats::Items)),
            Response::Stats(vec![])
        );
        assert_eq!(
            admin_stat(&s, StoreStats::Slabs, "active_slabs").as_deref(),
            Some("0")
        );
        run(&s, set("a", "1")).await;
        run(&s, store(StoreOp::Set, "b", 0, 100, "22")).await;
        assert_eq!(
            admin_stat(&s, StoreStats::Items, "items:1:number").as_deref(),
            Some("2")
        );
        assert_eq!(
            admin_stat(&s, StoreStats::Slabs, "1:used_chunks"),
            Some((cost(1, 1) + cost(1, 2)).to_string())
        );
        assert_eq!(
            admin_stat(&s, StoreStats::Sizes, "sizes_status").as_deref(),
            Some("disabled")
        );
        let dump = |class, limit| match s.admin_reply(&AdminRequest::CacheDump { class, limit }) {
            Response::Raw(b) => String::from_utf8(b.to_vec()).expect("text"),
            other => panic!("{other:?}"),
        };
        let all = dump(1, 0);
        assert!(all.contains("ITEM a [1 b; 0 s]\r\n"), "{all}");
        // The expiry is in unix seconds, rounded up.
        let expiry: u64 = all
            .split("ITEM b [2 b; ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{all}"));
        let start = s.start_unix_ms / 1000;
        assert!((start + 100..=start + 101).contains(&expiry), "{all}");
        assert!(
            all.contains(&format!("ITEM b [2 b; {expiry} s]\r\n")),
            "{all}"
        );
        assert!(all.ends_with("END\r\n"));
        assert_eq!(dump(1, 1).matches("ITEM ").count(), 1);
        assert_eq!(dump(2, 0), "END\r\n");
    }

    #[tokio::test]
    async fn stats_lines() {
        let s = EmbeddedStore::new(BIG);
        run(&s, set("k", "vv")).await;
        run(&s, set("k", "vvv")).await;
        assert_eq!(s.kind(), "embedded");
        let names: Vec<String> = s.stats().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "curr_items",
                "bytes",
                "evictions",
                "limit_maxbytes",
                "total_items"
            ]
        );
        assert_eq!(stat(&s, "curr_items"), "1");
        assert_eq!(stat(&s, "bytes"), cost(1, 3).to_string());
        assert_eq!(stat(&s, "limit_maxbytes"), BIG.to_string());
        assert_eq!(stat(&s, "total_items"), "2");
    }
}
