//! The replicated state machine of the ordered modes: it applies committed
//! [`Command`]s to the node's store (memcached or the embedded store) with
//! the shared command rules, and answers reads from it.
//!
//! Every outcome is decided from replicated state only: a key's current
//! value is its [`Record`] (CAS token, deadline and the meta protocol's
//! marks included; meta commands in `meta.rs`), `flush_all`
//! is a [`Flush`] in the state, and the clock is the log's own: each entry
//! carries its proposer's clock, and the state's clock is the highest
//! applied so far ([`Meta::clock_ms`]), so it never goes back when the
//! leader changes. Reads judge expiry by that clock too, so a replica at
//! a given index answers exactly what the log says; the leader proposes
//! an empty entry when the log has been quiet for a while
//! (`mod.rs`, [`super::RaftMode`]), so time moves on while nothing is
//! written.
//!
//! Applying is idempotent: an entry is skipped for a key whose record
//! already carries its index or a later one. That makes two things safe:
//! a restart that replays entries the store already has (the applied index
//! on disk lags the store by up to [`PERSIST_EVERY`]), and a snapshot taken
//! while entries are applied (it names the applied index at its start,
//! and entries after it are replayed on top).
//!
//! The store drops a value on its own clock, not the log's. So a value is
//! stored to live [`StateMachine::kept`] past its deadline, and an entry
//! is decided from the store only while it is fresh (proposed less than
//! half of that ago). A replica further behind (down, cut off, or
//! catching up) keeps its whole state in memory, rebuilt from its last
//! snapshot and its log, and decides there until it has caught up, so no
//! value the store dropped early can change an outcome. A store that lost
//! its data is rebuilt the same way.
//!
//! A store that lost its data (memcached restarted, or flushed behind
//! memdial's back) is found by its mark: the key [`MARK_KEY`], written
//! when the state machine last filled the store, read with every read and
//! every apply. Without it nothing is read from the store or applied to
//! it until it is rebuilt.
//!
//! What is kept in the data directory: `state` (the applied log id, the
//! membership, the flush state, the clock, and the mark of the store they
//! belong to) and `snapshot` (the last snapshot, meta and body). Both are
//! written to a temporary file and renamed; the snapshot is fsynced first.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::RaftLogReader;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::TypeConfig;
use super::command::{Applied, Command, held_back};
use super::log_store::LogReader;
use super::meta::{self, Change, Stored};
use super::record::{HEADER_BYTES, MetaMarks, Record};
use crate::backend::{Backend, BackendError};
use crate::consistency::store_exptime;
use crate::protocol::{
    ClientError, ErrorReply, MetaCmd, MetaCode, MetaReply, MetaRequest, Request, Response, StoreOp,
    Value,
};
use crate::rules::{self, Clock, Effect, Item};
use crate::time::unix_ms;

/// The applied log id is written to disk at most this often (and at every
/// snapshot); a restart replays what it lags by.
const PERSIST_EVERY: Duration = Duration::from_millis(100);

/// The data directory's format, kept in its `state` file: a directory
/// written in another one (its log's entries are shaped differently) is
/// refused, never half read. 3: a [`Command`] carries a ticket and its
/// batches' writes alone.
const DATA_FORMAT: u32 = 3;

/// Keys per `get` or per write batch sent to the store.
const CHUNK: usize = 128;

/// The answer to a write found already applied during a replay. Nobody
/// waits for it: replays happen at start and while rebuilding a store.
const REPLAYED: &str = "outcome unknown (entry replayed)";

/// The key that marks the store as the one this state machine filled. Its
/// value is [`Meta::mark`]. Clients cannot write it in these modes.
pub const MARK_KEY: &[u8] = b"memdial:raft:mark";

/// The answer to a client write of [`MARK_KEY`].
const RESERVED: &str = "key reserved by memdial";

/// `flush_all` as replicated state. A record written at a log index below
/// `floor_index` is gone (a flush at once); so is one written, by the
/// log's clock, before `floor_ms`, or before `delayed_ms` once that time
/// has come (a flush with a delay, which memcached applies to everything
/// stored before that moment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flush {
    pub floor_index: u64,
    pub floor_ms: u64,
    pub delayed_ms: Option<u64>,
}

impl Flush {
    pub fn visible(&self, r: &Record, now_ms: u64) -> bool {
        let floor_ms = match self.delayed_ms {
            Some(at) if at <= now_ms => self.floor_ms.max(at),
            _ => self.floor_ms,
        };
        r.index >= self.floor_index && r.written_ms >= floor_ms && !r.expired(now_ms)
    }

    /// A `flush_all` at log index `index`, proposed at `now_ms`, to take
    /// effect at `at_ms` (`None`: at once). memcached keeps one flush
    /// moment, so a new flush replaces one still pending; one already past
    /// stays in force.
    fn apply(&mut self, index: u64, at_ms: Option<u64>, now_ms: u64) {
        if let Some(at) = self.delayed_ms.filter(|&at| at <= now_ms) {
            self.floor_ms = self.floor_ms.max(at);
        }
        self.delayed_ms = None;
        match at_ms {
            None => self.floor_index = index,
            Some(at) => self.delayed_ms = Some(at),
        }
    }
}

/// What the state machine keeps on disk beside the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    flush: Flush,
    /// The log's clock: the highest proposer clock applied (unix ms).
    clock_ms: u64,
    /// The mark ([`MARK_KEY`]) of the store this state describes.
    mark: String,
    /// [`DATA_FORMAT`] when written (last: a `state` file written before
    /// there was one ends early and does not decode).
    format: u32,
}

/// A snapshot's body: the flush state, the clock and every record, as
/// stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Body {
    flush: Flush,
    clock_ms: u64,
    /// (key, client flags, the stored bytes: record header and data)
    items: Vec<(Bytes, u32, Bytes)>,
}

/// The snapshot file: meta and body.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    body: Vec<u8>,
}

/// Counts for `stats cluster` and `/metrics`.
#[derive(Debug, Default)]
pub struct SmCounts {
    pub snapshots_built: AtomicU64,
    pub snapshots_installed: AtomicU64,
    pub store_rebuilds: AtomicU64,
    /// Times this replica fell behind and began deciding in memory.
    pub behind: AtomicU64,
}

/// Every key's state, absent keys as `None`.
type State = HashMap<Bytes, Option<Current>>;

/// The batches this node proposed whose reads it held back from the log
/// (`command.rs`), by ticket, until their proposal ends: applying the
/// entry here answers those reads at their place among the writes.
#[derive(Debug, Default)]
pub struct Held {
    batches: Mutex<HashMap<u64, Arc<[Request]>>>,
}

/// A ticket of [`Held`]: the batch is let go when it is dropped.
pub struct Ticket {
    pub id: u64,
    held: Arc<Held>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.held.batches).remove(&self.id);
    }
}

impl Held {
    /// Holds `requests` (the proposal's batches, reads and writes) until
    /// the ticket is dropped.
    pub fn hold(self: &Arc<Self>, requests: Arc<[Request]>) -> Ticket {
        let mut batches = lock(&self.batches);
        let id = loop {
            // Random, so no other node's ticket, nor one of this node's
            // from before a restart, names a batch held here.
            let id = rand::random::<u64>();
            if id != 0 && !batches.contains_key(&id) {
                break id;
            }
        };
        batches.insert(id, requests);
        Ticket {
            id,
            held: self.clone(),
        }
    }

    /// What applying `cmd` here runs: the batches held under its ticket if
    /// this node proposed it (and still waits for it), else its writes.
    fn requests(&self, cmd: &Command) -> Option<Arc<[Request]>> {
        if cmd.ticket == 0 {
            return None;
        }
        let all = lock(&self.batches).get(&cmd.ticket).cloned()?;
        // Checked, though a ticket is random: a batch whose writes are
        // not the entry's is not this entry's.
        let same = all.iter().filter(|r| !held_back(r)).eq(cmd.writes.iter());
        same.then_some(all)
    }
}

pub struct StateMachine {
    backend: Arc<dyn Backend>,
    dir: PathBuf,
    /// The log beside Raft, to rebuild the state from.
    log: tokio::sync::Mutex<LogReader<TypeConfig>>,
    /// How long the store keeps a value past its deadline.
    kept: Duration,
    /// The largest item the store takes (memcached's `-I`, as
    /// `limits.item_size_max`), header and key included.
    item_size_max: usize,
    meta: Mutex<Meta>,
    persisted: Mutex<Instant>,
    /// The whole state, while this replica is behind (see the module
    /// doc); `None` otherwise.
    memory: Mutex<Option<State>>,
    /// Taken for reading by client reads, for writing while the store is
    /// replaced by a snapshot, so no read sees it half written.
    install: tokio::sync::RwLock<()>,
    /// Held while entries are applied, and while a store that lost its
    /// data is rebuilt, so the two never interleave.
    applying: tokio::sync::Mutex<()>,
    /// Set while the store is rebuilt, and left set if a rebuild failed
    /// half way: reads fail and entries wait until a rebuild succeeds.
    broken: AtomicBool,
    /// Woken when a read or an apply found the store without its mark.
    pub lost: tokio::sync::Notify,
    snapshot_seq: AtomicU64,
    pub counts: SmCounts,
    /// Reads of this node's proposals, held back from the log.
    pub held: Arc<Held>,
    /// Observes how long each apply of committed entries took, once set.
    apply_seconds: std::sync::OnceLock<prometheus::Histogram>,
}

fn io_error(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::<u64>::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A key's state while entries are applied.
#[derive(Debug, Clone)]
struct Current {
    flags: u32,
    record: Record,
    /// Written by this batch (not read from the store): an entry that
    /// writes a key twice sees its own first write, not a replay.
    fresh: bool,
}

impl Current {
    /// The value as the meta rules see it.
    fn stored(&self) -> Stored {
        Stored {
            item: self.record.item(self.flags),
            meta: self.record.meta,
        }
    }
}

/// The answer to a meta request refused whatever the state: a key the
/// store cannot hold, or the reserved mark.
fn refuse_meta(req: &MetaRequest) -> Option<Response> {
    if !meta::storable_key(&req.key) {
        return Some(ClientError::BadCommandLine.into());
    }
    // The parser lets no bad mode through; a request from the log is
    // answered as memcached would all the same.
    match req.cmd {
        MetaCmd::Set if req.set_mode().is_none() => {
            return Some(ClientError::MetaInvalidSetMode.into());
        }
        MetaCmd::Arith if req.increments().is_none() => {
            return Some(ClientError::MetaInvalidArithMode.into());
        }
        _ => {}
    }
    (req.key == MARK_KEY).then(|| Response::Error(ErrorReply::Client(RESERVED.into())))
}

/// Why entries could not be applied.
enum NotApplied {
    /// The store lost its mark: wait for the rebuild, then try again.
    Lost,
    Failed(Box<StorageError<u64>>),
}

/// A state with the records of a snapshot body.
fn state_of(body: Body) -> State {
    body.items
        .into_iter()
        .filter_map(|(key, flags, stored)| {
            let record = Record::decode(&stored)?;
            Some((
                key,
                Some(Current {
                    flags,
                    record,
                    fresh: false,
                }),
            ))
        })
        .collect()
}

impl StateMachine {
    /// Opens the state machine of the store `backend`, with its files in
    /// `dir` and the node's log in `log`, each value kept in the store
    /// `kept` past its deadline. When the store is not the one the files
    /// describe (a first start, or memcached restarted and lost its data),
    /// it is rebuilt from the last snapshot and the log.
    pub async fn open(
        backend: Arc<dyn Backend>,
        dir: &Path,
        log: LogReader<TypeConfig>,
        kept: Duration,
        item_size_max: usize,
    ) -> anyhow::Result<Arc<StateMachine>> {
        std::fs::create_dir_all(dir)?;
        let sm = Arc::new(StateMachine {
            backend,
            dir: dir.to_path_buf(),
            log: tokio::sync::Mutex::new(log),
            kept,
            item_size_max,
            meta: Mutex::new(Meta::default()),
            persisted: Mutex::new(Instant::now()),
            memory: Mutex::new(None),
            install: tokio::sync::RwLock::new(()),
            applying: tokio::sync::Mutex::new(()),
            broken: AtomicBool::new(false),
            lost: tokio::sync::Notify::new(),
            snapshot_seq: AtomicU64::new(0),
            counts: SmCounts::default(),
            held: Arc::default(),
            apply_seconds: std::sync::OnceLock::new(),
        });
        let saved: Option<Meta> = read_file(&dir.join("state"))?;
        if let Some(m) = &saved
            && m.format != DATA_FORMAT
        {
            anyhow::bail!(
                "{}: written in data format {}, this build reads {DATA_FORMAT}; \
                 move the directory away to start over",
                dir.display(),
                m.format
            );
        }
        let snapshot: Option<SnapshotFile> = read_file(&dir.join("snapshot"))?;
        let mark = sm.store_mark().await?;
        match saved {
            Some(saved) if Some(&saved.mark) == mark.as_ref() => {
                let mut meta = saved;
                // The store holds at least what any snapshot taken from it
                // holds, so the log need not go back further than that.
                if let Some(s) = &snapshot
                    && s.meta.last_log_id > meta.last_applied
                {
                    let body: Body = decode(&s.body)?;
                    meta.last_applied = s.meta.last_log_id;
                    meta.membership = s.meta.last_membership.clone();
                    meta.flush = body.flush;
                    meta.clock_ms = meta.clock_ms.max(body.clock_ms);
                }
                *lock(&sm.meta) = meta;
            }
            saved => {
                if saved.is_some() {
                    tracing::warn!(
                        "the store is not the one this node applied the log to (it restarted \
                         and lost its data): rebuilding it from the last snapshot and the log"
                    );
                    sm.counts.store_rebuilds.fetch_add(1, Ordering::Relaxed);
                }
                let upto = saved.and_then(|m| m.last_applied);
                let _applying = sm.applying.lock().await;
                let _writing = sm.install.write().await;
                sm.rebuild(upto).await?;
            }
        }
        Ok(sm)
    }

    /// From now on, observes the time of every apply of committed entries
    /// in `h` (the first histogram given stays).
    pub fn observe_applies(&self, h: prometheus::Histogram) {
        let _ = self.apply_seconds.set(h);
    }

    /// Decides from `state` in memory from now on, until this replica has
    /// caught up with the log's clock (at `clock_ms` now).
    fn keep_in_memory(&self, state: State, clock_ms: u64) {
        tracing::warn!(
            behind_ms = unix_ms().saturating_sub(clock_ms),
            "this replica is behind the log's clock: deciding in memory until it catches up"
        );
        self.counts.behind.fetch_add(1, Ordering::Relaxed);
        *lock(&self.memory) = Some(state);
    }

    /// The log index applied so far (0 before any).
    pub fn applied_index(&self) -> u64 {
        lock(&self.meta).last_applied.map_or(0, |l| l.index)
    }

    /// The log's clock (unix ms): the latest proposer clock applied.
    pub fn clock_ms(&self) -> u64 {
        lock(&self.meta).clock_ms
    }

    /// An entry proposed at `clock_ms` is decided from the store only if it
    /// is this fresh: a value is kept `kept` past its deadline, so every
    /// value still live at its clock is still in the store.
    fn fresh(&self, clock_ms: u64) -> bool {
        unix_ms() < clock_ms.saturating_add(self.kept.as_millis() as u64 / 2)
    }

    async fn call(&self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        let responses = self.backend.call(requests).await?;
        if responses.len() != requests.len() {
            return Err(BackendError::Protocol("short batch".into()));
        }
        Ok(responses)
    }

    /// Writes the state to disk if `now` or it is due.
    fn persist(&self, now: bool) -> std::io::Result<()> {
        let mut last = lock(&self.persisted);
        if !now && last.elapsed() < PERSIST_EVERY {
            return Ok(());
        }
        let mut meta = lock(&self.meta).clone();
        meta.format = DATA_FORMAT;
        write_file(&self.dir.join("state"), &meta, false)?;
        *last = Instant::now();
        Ok(())
    }

    /// The store's mark, if it has one.
    async fn store_mark(&self) -> Result<Option<String>, BackendError> {
        let (_, mark) = self.fetch(&[]).await?;
        Ok(mark)
    }

    /// The records of `keys` as stored, with their flags (absent keys and
    /// values this mode did not write are left out), and the store's mark.
    async fn fetch(
        &self,
        keys: &[Bytes],
    ) -> Result<(HashMap<Bytes, Current>, Option<String>), BackendError> {
        let mark_key = Bytes::from_static(MARK_KEY);
        // The mark rides in the first `get`: no extra request per read.
        let mut all = Vec::with_capacity(keys.len() + 1);
        all.push(mark_key.clone());
        all.extend_from_slice(keys);
        let requests: Vec<Request> = all
            .chunks(CHUNK)
            .map(|c| Request::Get {
                keys: c.to_vec(),
                cas: false,
            })
            .collect();
        let mut found = HashMap::new();
        let mut mark = None;
        for response in self.call(&requests).await? {
            let Response::Values(values) = response else {
                return Err(BackendError::Protocol(format!(
                    "expected values, got {response:?}"
                )));
            };
            for v in values {
                if v.key == mark_key {
                    mark = Some(String::from_utf8_lossy(&v.data).into_owned());
                } else if let Some(record) = Record::decode(&v.data) {
                    found.insert(
                        v.key,
                        Current {
                            flags: v.flags,
                            record,
                            fresh: false,
                        },
                    );
                }
            }
        }
        Ok((found, mark))
    }

    /// [`Self::fetch`], for a store that must carry this state's mark.
    async fn fetch_marked(&self, keys: &[Bytes]) -> Result<HashMap<Bytes, Current>, BackendError> {
        let (found, mark) = self.fetch(keys).await?;
        if mark.as_deref() != Some(lock(&self.meta).mark.as_str()) {
            self.lost.notify_one();
            return Err(BackendError::Unavailable(
                "the store lost its data; it is being rebuilt".into(),
            ));
        }
        Ok(found)
    }

    /// A client read: the live values of `keys`, in order, as memcached
    /// answers `get`/`gets`, by the log's clock.
    pub async fn read(&self, keys: &[Bytes], cas: bool) -> Result<Response, BackendError> {
        let get = Request::Get {
            keys: keys.to_vec(),
            cas,
        };
        let answer = self
            .reads(std::slice::from_ref(&get))
            .await?
            .pop()
            .flatten();
        Ok(answer.unwrap_or_else(|| Response::server_error("not a read")))
    }

    /// A client's meta read (`mg`, `me`) from this replica: its answer, or
    /// `None` when it must go through the log ([`Self::reads`]).
    pub async fn read_meta(&self, req: &MetaRequest) -> Result<Option<Response>, BackendError> {
        let r = Request::Meta(Box::new(req.clone()));
        Ok(self.reads(std::slice::from_ref(&r)).await?.pop().flatten())
    }

    /// A client's batch of reads (`get`/`gets`, `mg`, `me`, `mn`) from this
    /// replica, in one look at the store (a meta client's multi-get is many
    /// `mg`s), by the log's clock: each answer, in order, or `None` for an
    /// `mg` whose answer changes the key (a recache token won): it must go
    /// through the log, where the state machine decides it again.
    pub async fn reads(&self, reads: &[Request]) -> Result<Vec<Option<Response>>, BackendError> {
        let mut keys: Vec<Bytes> = Vec::new();
        for r in reads {
            match r {
                Request::Get { keys: k, .. } => keys.extend(k.iter().cloned()),
                Request::Meta(m) => keys.push(m.key.clone()),
                _ => {}
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let (found, flush, now) = self.lookup(&keys).await?;
        let live = |k: &Bytes| found.get(k).filter(|c| flush.visible(&c.record, now));
        let clock = Clock::unix(now);
        let answer = |r: &Request| match r {
            Request::Get { keys, cas } => Some(Response::Values(
                keys.iter()
                    .filter_map(|k| {
                        let c = live(k)?;
                        Some(Value {
                            key: k.clone(),
                            flags: c.flags,
                            data: c.record.data.clone(),
                            cas: cas.then_some(c.record.cas),
                        })
                    })
                    .collect(),
            )),
            Request::Meta(m) => {
                if let Some(refused) = refuse_meta(m) {
                    return Some(refused);
                }
                let stored = live(&m.key).map(Current::stored);
                let decided = meta::decide(m, stored.as_ref(), clock);
                decided
                    .reads_only()
                    .then(|| meta::answer(m, &decided, stored.as_ref(), 0, clock))
            }
            Request::MetaNoop => Some(Response::Meta(MetaReply::new(MetaCode::Mn, ""))),
            _ => Some(Response::server_error("not a read")),
        };
        Ok(reads.iter().map(answer).collect())
    }

    /// The records of `keys` (from memory while this replica is behind,
    /// else from the store), with the flush state and the log's clock to
    /// judge them by.
    async fn lookup(
        &self,
        keys: &[Bytes],
    ) -> Result<(HashMap<Bytes, Current>, Flush, u64), BackendError> {
        let _reading = self.install.read().await;
        if self.broken.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable(
                "the store is being rebuilt".into(),
            ));
        }
        let in_memory: Option<HashMap<Bytes, Current>> = lock(&self.memory).as_ref().map(|m| {
            keys.iter()
                .filter_map(|k| Some((k.clone(), m.get(k)?.clone()?)))
                .collect()
        });
        let found = match in_memory {
            Some(found) => found,
            None => self.fetch_marked(keys).await?,
        };
        let (flush, now) = {
            let m = lock(&self.meta);
            (m.flush, m.clock_ms)
        };
        Ok((found, flush, now))
    }

    /// Applies a batch of committed entries, in order; one answer each.
    async fn apply_entries(
        &self,
        entries: Vec<Entry<TypeConfig>>,
    ) -> Result<Vec<Applied>, StorageError<u64>> {
        loop {
            let applying = self.applying.lock().await;
            if !self.broken.load(Ordering::SeqCst) {
                match self.apply_unlocked(&entries).await {
                    Ok(answers) => return Ok(answers),
                    Err(NotApplied::Failed(e)) => return Err(*e),
                    Err(NotApplied::Lost) => {}
                }
            }
            // The store lost its data, or a rebuild failed half way: wait
            // for a rebuild to succeed.
            drop(applying);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn apply_unlocked(
        &self,
        entries: &[Entry<TypeConfig>],
    ) -> Result<Vec<Applied>, NotApplied> {
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let mut meta = lock(&self.meta).clone();
        // The clock the first write is decided at (entries without writes
        // decide nothing by it).
        let first_clock = entries.iter().find_map(|e| match &e.payload {
            EntryPayload::Normal(cmd) if !cmd.writes.is_empty() => {
                Some(cmd.now_ms.max(meta.clock_ms))
            }
            _ => None,
        });
        let behind = lock(&self.memory).is_some();
        match first_clock.map(|c| (c, self.fresh(c))) {
            Some((clock, false)) if !behind => {
                let (state, _) = self
                    .replay(meta.last_applied)
                    .await
                    .map_err(|e| NotApplied::Failed(Box::new(io_error(e))))?;
                self.keep_in_memory(state, clock);
            }
            Some((_, true)) if behind => {
                tracing::info!(
                    "this replica caught up with the log's clock; deciding from the store"
                );
                *lock(&self.memory) = None;
            }
            _ => {}
        }
        let answers = self.apply_on(entries, &mut meta).await?;
        meta.last_applied = Some(last);
        *lock(&self.meta) = meta;
        self.persist(false)
            .map_err(|e| NotApplied::Failed(Box::new(io_error(e))))?;
        Ok(answers)
    }

    /// Decides `entries` over the state in memory, if this replica keeps
    /// it, or else over the store's records, and writes what changed to
    /// the store.
    async fn apply_on(
        &self,
        entries: &[Entry<TypeConfig>],
        meta: &mut Meta,
    ) -> Result<Vec<Applied>, NotApplied> {
        let marked = |e| match e {
            BackendError::Unavailable(_) => NotApplied::Lost,
            e => NotApplied::Failed(Box::new(io_error(e))),
        };
        // This node's own proposals run with their reads held back.
        let runs: Vec<Option<Arc<[Request]>>> = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(cmd) => self.held.requests(cmd),
                _ => None,
            })
            .collect();
        let in_memory = lock(&self.memory).is_some();
        let (decided, changed) = if in_memory {
            // Decided in memory; the store must still be ours.
            self.fetch_marked(&[]).await.map_err(marked)?;
            let mut memory = lock(&self.memory);
            let Some(state) = memory.as_mut() else {
                return Err(NotApplied::Failed(Box::new(io_error(
                    "the state in memory vanished",
                ))));
            };
            let decided = decide(entries, &runs, state, meta, self.item_size_max);
            let changed: State = decided
                .dirty
                .iter()
                .map(|k| (k.clone(), state.get(k).cloned().flatten()))
                .collect();
            (decided, changed)
        } else {
            let mut state: State = self
                .fetch_marked(&entries_keys(entries, &runs))
                .await
                .map_err(marked)?
                .into_iter()
                .map(|(k, c)| (k, Some(c)))
                .collect();
            let decided = decide(entries, &runs, &mut state, meta, self.item_size_max);
            (decided, state)
        };
        self.write_back(&changed, decided.flush_store, decided.dirty)
            .await
            .map_err(|e| NotApplied::Failed(Box::new(e)))?;
        Ok(decided.answers)
    }

    /// Writes the keys `dirty` from `state` to the store, after a flush
    /// of everything if `flush_store`.
    async fn write_back(
        &self,
        state: &State,
        flush_store: bool,
        mut dirty: Vec<Bytes>,
    ) -> Result<(), StorageError<u64>> {
        let mut requests = Vec::new();
        if flush_store {
            requests.push(Request::FlushAll {
                delay: None,
                noreply: false,
            });
        }
        dirty.sort_unstable();
        dirty.dedup();
        for key in dirty {
            requests.push(match state.get(&key).cloned().flatten() {
                Some(c) => self.store_request(key, &c),
                None => Request::Delete {
                    key,
                    noreply: false,
                },
            });
        }
        if flush_store {
            // The flush took the mark with everything else.
            requests.push(self.mark_request(&lock(&self.meta).mark));
        }
        for chunk in requests.chunks(CHUNK) {
            let replies = self.call(chunk).await.map_err(io_error)?;
            if let Some(bad) = replies.iter().find(|r| {
                !matches!(
                    r,
                    Response::Stored | Response::Deleted | Response::NotFound | Response::Ok
                )
            }) {
                // The store refused a write every other replica made: this
                // replica can no longer follow the log (memcached out of
                // memory). Raft stops on this node.
                tracing::error!(reply = ?bad, "the store refused a replicated write; this node stops applying the log");
                return Err(io_error(format!("store refused a write: {bad:?}")));
            }
        }
        Ok(())
    }

    /// The store write of a key's record: kept [`Self::kept`] past its
    /// deadline, for entries decided from the store later.
    fn store_request(&self, key: Bytes, c: &Current) -> Request {
        let deadline = c.record.deadline_ms;
        let keep_until = if deadline == 0 {
            0
        } else {
            deadline.saturating_add(self.kept.as_millis() as u64)
        };
        Request::Store {
            op: StoreOp::Set,
            exptime: store_exptime(keep_until),
            flags: c.flags,
            data: c.record.encode(),
            key,
            cas_unique: 0,
            noreply: false,
        }
    }

    fn mark_request(&self, mark: &str) -> Request {
        Request::Store {
            op: StoreOp::Set,
            key: Bytes::from_static(MARK_KEY),
            flags: 0,
            exptime: 0,
            data: Bytes::from(mark.to_string()),
            cas_unique: 0,
            noreply: false,
        }
    }

    /// The state after the entries up to `upto`, in memory: the last
    /// snapshot, then the log after it. Also the meta it belongs to.
    async fn replay(&self, upto: Option<LogId<u64>>) -> anyhow::Result<(State, Meta)> {
        let snapshot: Option<SnapshotFile> = read_file(&self.dir.join("snapshot"))?;
        let mut meta = lock(&self.meta).clone();
        meta.flush = Flush::default();
        meta.clock_ms = 0;
        meta.last_applied = None;
        let mut state = State::new();
        if let Some(s) = snapshot {
            let body: Body = decode(&s.body)?;
            meta.last_applied = s.meta.last_log_id;
            meta.membership = s.meta.last_membership.clone();
            meta.flush = body.flush;
            meta.clock_ms = body.clock_ms;
            state = state_of(body);
        }
        let end = upto.map_or(0, |l| l.index + 1);
        let mut next = meta.last_applied.map_or(0, |l| l.index + 1);
        let mut log = self.log.lock().await;
        while next < end {
            let chunk_end = (next + CHUNK as u64).min(end);
            let entries = log.try_get_log_entries(next..chunk_end).await?;
            let Some(last) = entries.last().map(|e| e.log_id) else {
                anyhow::bail!("the log no longer holds entries {next}..{chunk_end} to replay");
            };
            decide(&entries, &[], &mut state, &mut meta, self.item_size_max);
            meta.last_applied = Some(last);
            next = last.index + 1;
        }
        Ok((state, meta))
    }

    /// Empties the store, writes `state` to it and marks it anew. Values
    /// past their deadline by more than [`Self::kept`] are left out: the
    /// store would drop them at once.
    async fn write_all(&self, state: &State) -> Result<String, BackendError> {
        self.call(&[Request::FlushAll {
            delay: None,
            noreply: false,
        }])
        .await?;
        let now = unix_ms();
        let kept = self.kept.as_millis() as u64;
        let stores: Vec<Request> = state
            .iter()
            .filter_map(|(key, c)| {
                let c = c.as_ref()?;
                let d = c.record.deadline_ms;
                (d == 0 || d.saturating_add(kept) > now).then(|| self.store_request(key.clone(), c))
            })
            .collect();
        for chunk in stores.chunks(CHUNK) {
            for reply in self.call(chunk).await? {
                if reply != Response::Stored {
                    return Err(BackendError::Protocol(format!(
                        "the store refused a value: {reply:?}"
                    )));
                }
            }
        }
        // Marked last: a rebuild cut short leaves the store unmarked.
        let mark = format!("{:016x}", rand::random::<u64>());
        self.call(&[self.mark_request(&mark)]).await?;
        Ok(mark)
    }

    /// Rebuilds the store from the last snapshot and the log up to `upto`
    /// (at least the snapshot), for a caller holding the applying and
    /// install locks. Until it succeeds, reads fail and entries wait.
    async fn rebuild(&self, upto: Option<LogId<u64>>) -> anyhow::Result<()> {
        self.broken.store(true, Ordering::SeqCst);
        let (state, mut meta) = match self.replay(upto).await {
            Ok(replayed) => replayed,
            Err(e) => {
                // The log lost entries (it should not): the snapshot is
                // the most that can be trusted; Raft replays the rest.
                tracing::warn!(error = %e, "rebuilding from the snapshot only");
                self.replay(None).await?
            }
        };
        meta.mark = self.write_all(&state).await?;
        let clock_ms = meta.clock_ms;
        *lock(&self.meta) = meta;
        // (A clock of 0: nothing applied yet, nothing to be behind on.)
        if clock_ms != 0 && !self.fresh(clock_ms) {
            self.keep_in_memory(state, clock_ms);
        } else {
            *lock(&self.memory) = None;
        }
        self.persist(true)?;
        self.broken.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Checks that the store still carries this state's mark; if it lost
    /// it (memcached restarted, or was flushed behind memdial's back),
    /// rebuilds it from the last snapshot and the log, with reads and
    /// applies held meanwhile. Returns whether it rebuilt.
    pub async fn check_store(&self) -> anyhow::Result<bool> {
        let marked = |mark: Option<String>| mark.as_deref() == Some(lock(&self.meta).mark.as_str());
        if marked(self.store_mark().await?) && !self.broken.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let _applying = self.applying.lock().await;
        let _writing = self.install.write().await;
        if marked(self.store_mark().await?) && !self.broken.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let applied = lock(&self.meta).last_applied;
        tracing::warn!(
            applied = applied.map_or(0, |l| l.index),
            "the store lost its data: rebuilding it from the last snapshot and the log; reads wait"
        );
        self.rebuild(applied).await?;
        self.counts.store_rebuilds.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            applied = self.applied_index(),
            "the store is rebuilt; serving again"
        );
        Ok(true)
    }

    /// Reads the whole state into a snapshot body, naming the applied log
    /// id at its start (entries applied meanwhile are replayed on top).
    async fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let in_memory = {
            // Taken with the meta it belongs to: entries are applied to
            // the state in memory under the applying lock.
            let _applying = self.applying.lock().await;
            let items: Option<Vec<_>> = lock(&self.memory).as_ref().map(|m| {
                m.iter()
                    .filter_map(|(k, c)| {
                        let c = c.as_ref()?;
                        Some((k.clone(), c.flags, c.record.encode()))
                    })
                    .collect()
            });
            items.map(|items| (items, lock(&self.meta).clone()))
        };
        let (items, meta) = match in_memory {
            Some(taken) => taken,
            None => loop {
                match self.scan_store().await {
                    Ok(scanned) => break scanned,
                    // The store lost its data: wait for its rebuild (the
                    // install lock is not held meanwhile), then scan again.
                    Err(BackendError::Unavailable(e)) => {
                        tracing::info!(error = %e, "snapshot waits for the store's rebuild");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(io_error(e)),
                }
            },
        };
        let body = postcard::to_stdvec(&Body {
            flush: meta.flush,
            clock_ms: meta.clock_ms,
            items,
        })
        .map_err(io_error)?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_meta = SnapshotMeta {
            last_log_id: meta.last_applied,
            last_membership: meta.membership,
            snapshot_id: format!("{}-{seq}", meta.last_applied.map_or(0, |l| l.index)),
        };
        self.save_snapshot(&snapshot_meta, &body)?;
        self.counts.snapshots_built.fetch_add(1, Ordering::Relaxed);
        tracing::info!(id = %snapshot_meta.snapshot_id, bytes = body.len(), "built a snapshot");
        Ok(Snapshot {
            meta: snapshot_meta,
            snapshot: Box::new(Cursor::new(body)),
        })
    }

    /// Every record in the store, with the meta it belongs to (the applied
    /// index at the scan's start: entries applied meanwhile are replayed
    /// on top of a snapshot of it).
    async fn scan_store(&self) -> Result<(Vec<(Bytes, u32, Bytes)>, Meta), BackendError> {
        // Never while the store is being replaced (a snapshot installed or
        // a rebuild): it would be half filled under the old index.
        let _reading = self.install.read().await;
        let meta = lock(&self.meta).clone();
        let keys = self.backend.keys().await?;
        // Marked after the listing: an empty listing is of this store too.
        self.fetch_marked(&[]).await?;
        let mut items = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(CHUNK) {
            for (key, c) in self.fetch_marked(chunk).await? {
                items.push((key, c.flags, c.record.encode()));
            }
        }
        Ok((items, meta))
    }

    /// Replaces the store's content with a snapshot's (from the leader).
    async fn install_body(
        &self,
        meta: &SnapshotMeta<u64, BasicNode>,
        body: Body,
    ) -> Result<(), BackendError> {
        let _applying = self.applying.lock().await;
        let _writing = self.install.write().await;
        let (flush, clock_ms) = (body.flush, body.clock_ms);
        let state = state_of(body);
        let mark = self.write_all(&state).await?;
        {
            let mut m = lock(&self.meta);
            m.last_applied = meta.last_log_id;
            m.membership = meta.last_membership.clone();
            m.flush = flush;
            m.clock_ms = m.clock_ms.max(clock_ms);
            m.mark = mark;
        }
        if clock_ms != 0 && !self.fresh(clock_ms) {
            self.keep_in_memory(state, clock_ms);
        } else {
            *lock(&self.memory) = None;
        }
        Ok(())
    }

    fn save_snapshot(
        &self,
        meta: &SnapshotMeta<u64, BasicNode>,
        body: &[u8],
    ) -> Result<(), StorageError<u64>> {
        let file = SnapshotFile {
            meta: meta.clone(),
            body: body.to_vec(),
        };
        write_file(&self.dir.join("snapshot"), &file, true).map_err(io_error)?;
        // The state on disk is never behind the snapshot: the log before it
        // may be purged now.
        self.persist(true).map_err(io_error)
    }
}

/// The keys the writes of `entries` touch, each once.
fn entries_keys(entries: &[Entry<TypeConfig>], runs: &[Option<Arc<[Request]>>]) -> Vec<Bytes> {
    let mut keys: Vec<Bytes> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if let EntryPayload::Normal(cmd) = &e.payload {
            let held = runs.get(i).and_then(Option::as_deref);
            for w in held.unwrap_or(&cmd.writes) {
                keys.extend(write_keys(w).iter().cloned());
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// What deciding a run of entries gave.
struct Decided {
    /// One per entry.
    answers: Vec<Applied>,
    /// The keys whose state changed since the last flush at once.
    dirty: Vec<Bytes>,
    /// A flush at once emptied everything before `dirty`.
    flush_store: bool,
}

/// Decides `entries` in order over `state` (which holds, for every key
/// they write, its record or `None`; a key missing counts as absent) and
/// `meta`'s flush state and clock, updating both. An entry with a run in
/// `runs` (its requests with the reads held back, on the node that
/// proposed it) runs that instead of its writes: the same changes, and an
/// answer for every request.
fn decide(
    entries: &[Entry<TypeConfig>],
    runs: &[Option<Arc<[Request]>>],
    state: &mut State,
    meta: &mut Meta,
    item_size_max: usize,
) -> Decided {
    let mut dirty: Vec<Bytes> = Vec::new();
    let mut flush_store = false;
    let mut answers = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let index = e.log_id.index;
        let mut written = 0;
        match &e.payload {
            EntryPayload::Blank => answers.push(Applied::default()),
            EntryPayload::Membership(m) => {
                meta.membership = StoredMembership::new(Some(e.log_id), m.clone());
                answers.push(Applied::default());
            }
            EntryPayload::Normal(cmd) => {
                meta.clock_ms = meta.clock_ms.max(cmd.now_ms);
                let mut batch = Batch {
                    index,
                    item_size_max,
                    written: &mut written,
                    clock: Clock::unix(meta.clock_ms),
                    flush: &mut meta.flush,
                    state,
                    dirty: &mut dirty,
                    flushed_at_once: false,
                };
                let held = runs.get(i).and_then(Option::as_deref);
                let replies = held
                    .unwrap_or(&cmd.writes)
                    .iter()
                    .map(|w| batch.apply(w.clone()))
                    .collect();
                if batch.flushed_at_once {
                    flush_store = true;
                }
                answers.push(Applied { replies });
            }
        }
    }
    Decided {
        answers,
        dirty,
        flush_store,
    }
}

/// The CAS token of the `n`th value written by the entry at `index`: the
/// same on every replica, and never shared by two values (an entry holds
/// far fewer than 2^20 writes; `batch.rs` caps it near 1,200).
pub fn cas_token(index: u64, n: u64) -> u64 {
    (index << 20) | (n & 0xF_FFFF)
}

/// The keys a write touches.
fn write_keys(w: &Request) -> &[Bytes] {
    match w {
        Request::Store { key, .. }
        | Request::TooLarge { key, .. }
        | Request::Arith { key, .. }
        | Request::Delete { key, .. }
        | Request::Touch { key, .. } => std::slice::from_ref(key),
        Request::Gat { keys, .. } | Request::Get { keys, .. } => keys,
        Request::Meta(m) => std::slice::from_ref(&m.key),
        Request::FlushAll { .. } | Request::MetaNoop => &[],
    }
}

/// One entry being applied over the batch's view of the keys.
struct Batch<'a> {
    index: u64,
    /// The store's item limit: a value whose record would not fit is
    /// refused here, the same on every replica, not by the store.
    item_size_max: usize,
    /// Values written so far in this entry: with the index, the CAS token
    /// of the next one, so two writes of one entry never share a token.
    written: &'a mut u64,
    clock: Clock,
    flush: &'a mut Flush,
    state: &'a mut State,
    dirty: &'a mut Vec<Bytes>,
    flushed_at_once: bool,
}

impl Batch<'_> {
    fn next_value(&mut self) -> u64 {
        let n = *self.written;
        *self.written += 1;
        n
    }

    /// The key's live value as the rules see it, or `Err` when this entry
    /// was already applied to it.
    fn item(&self, key: &Bytes) -> Result<Option<Item>, ()> {
        let Some(Some(c)) = self.state.get(key) else {
            return Ok(None);
        };
        if !c.fresh && c.record.index >= self.index {
            return Err(());
        }
        Ok(self
            .flush
            .visible(&c.record, self.clock.now_ms)
            .then(|| c.record.item(c.flags)))
    }

    /// [`Self::item`] with the marks the meta protocol shows.
    fn stored(&self, key: &Bytes) -> Result<Option<Stored>, ()> {
        let marks = match self.state.get(key) {
            Some(Some(c)) => c.record.meta,
            _ => MetaMarks::default(),
        };
        Ok(self.item(key)?.map(|item| Stored { item, meta: marks }))
    }

    fn effect(&mut self, key: &Bytes, effect: Effect) {
        self.effect_marked(key, effect, MetaMarks::default());
    }

    /// [`Self::effect`], a new value carrying `marks`.
    fn effect_marked(&mut self, key: &Bytes, effect: Effect, marks: MetaMarks) {
        let now = self.clock.now_ms;
        let next = match effect {
            Effect::Keep => return,
            Effect::Remove => None,
            Effect::Put(v) => Some(Current {
                fresh: true,
                flags: v.flags,
                record: Record {
                    index: self.index,
                    cas: cas_token(self.index, self.next_value()),
                    written_ms: now,
                    deadline_ms: v.deadline.unwrap_or(0),
                    meta: marks,
                    data: v.data,
                },
            }),
            Effect::Touch { deadline } => {
                let Some(Some(c)) = self.state.get(key) else {
                    return;
                };
                let mut c = c.clone();
                c.fresh = true;
                c.record.index = self.index;
                c.record.written_ms = now;
                c.record.deadline_ms = deadline.unwrap_or(0);
                Some(c)
            }
        };
        self.state.insert(key.clone(), next);
        self.dirty.push(key.clone());
    }

    /// Carries out a meta command's change; returns the CAS of the value
    /// it leaves under the key (0 when it leaves none). A value stored
    /// already expired still takes a CAS, as memcached links it under one.
    fn change(&mut self, key: &Bytes, change: Change, stored: bool) -> u64 {
        let now = self.clock.now_ms;
        let (next, cas) = match change {
            Change::Keep => return 0,
            Change::Remove => {
                let cas = if stored {
                    cas_token(self.index, self.next_value())
                } else {
                    0
                };
                (None, cas)
            }
            Change::Put { value, meta } => {
                let cas = cas_token(self.index, self.next_value());
                let c = Current {
                    fresh: true,
                    flags: value.flags,
                    record: Record {
                        index: self.index,
                        cas,
                        written_ms: now,
                        deadline_ms: value.deadline.unwrap_or(0),
                        meta,
                        data: value.data,
                    },
                };
                (Some(c), cas)
            }
            Change::Mark { deadline, meta } | Change::Invalidate { deadline, meta } => {
                let new_cas = matches!(change, Change::Invalidate { .. });
                let Some(Some(c)) = self.state.get(key) else {
                    return 0;
                };
                let mut c = c.clone();
                if new_cas {
                    c.record.cas = cas_token(self.index, self.next_value());
                }
                c.fresh = true;
                c.record.index = self.index;
                c.record.written_ms = now;
                c.record.deadline_ms = deadline.unwrap_or(0);
                c.record.meta = meta;
                let cas = c.record.cas;
                (Some(c), cas)
            }
        };
        self.state.insert(key.clone(), next);
        self.dirty.push(key.clone());
        cas
    }

    /// A meta command at its place in the log.
    /// Whether a value of `len` bytes under `key` fits in the store once
    /// its record header is added (memcached's item size rule).
    fn fits(&self, key: &[u8], len: usize, flags: u32) -> bool {
        let stored = len + HEADER_BYTES + 1;
        rules::meta::memcached_item_size(key.len(), stored, flags) <= self.item_size_max
    }

    fn meta(&mut self, req: MetaRequest) -> Response {
        if let Some(refused) = refuse_meta(&req) {
            return refused;
        }
        if req.cmd == MetaCmd::Set
            && !self.fits(
                &req.key,
                req.data.len(),
                req.flags.client_flags.unwrap_or(0),
            )
        {
            // Refused before any change, as the store would refuse it.
            return ClientError::TooLarge.into();
        }
        let Ok(current) = self.stored(&req.key) else {
            return Response::server_error(REPLAYED);
        };
        let decided = meta::decide(&req, current.as_ref(), self.clock);
        let stored = req.cmd == MetaCmd::Set && decided.stored();
        let new_cas = self.change(&req.key, decided.change.clone(), stored);
        meta::answer(&req, &decided, current.as_ref(), new_cas, self.clock)
    }

    fn apply(&mut self, w: Request) -> Response {
        let replayed = || Response::server_error(REPLAYED);
        // A `get` of the mark finds no value; a meta request checks it
        // itself (`refuse_meta`).
        let checked = matches!(w, Request::Get { .. } | Request::Meta(_));
        if !checked && write_keys(&w).iter().any(|k| k == MARK_KEY) {
            return Response::Error(ErrorReply::Client(RESERVED.into()));
        }
        let clock = self.clock;
        match w {
            Request::Store {
                op,
                key,
                flags,
                exptime,
                data,
                cas_unique,
                ..
            } => {
                let Ok(item) = self.item(&key) else {
                    return replayed();
                };
                let mut out =
                    rules::store(op, item.as_ref(), flags, exptime, data, cas_unique, clock);
                if let Effect::Put(v) = &out.effect
                    && !self.fits(&key, v.data.len(), v.flags)
                {
                    out = if matches!(op, StoreOp::Append | StoreOp::Prepend) {
                        rules::Outcome {
                            reply: Response::server_error("out of memory storing object"),
                            effect: Effect::Keep,
                        }
                    } else {
                        rules::too_large(op, item.as_ref())
                    };
                }
                self.effect(&key, out.effect);
                out.reply
            }
            Request::TooLarge { op, key, .. } => {
                let Ok(item) = self.item(&key) else {
                    return replayed();
                };
                let out = rules::too_large(op, item.as_ref());
                self.effect(&key, out.effect);
                out.reply
            }
            Request::Arith { op, key, delta, .. } => {
                let Ok(current) = self.stored(&key) else {
                    return replayed();
                };
                let out = rules::arith(op, current.as_ref().map(|s| &s.item), delta);
                // memcached rewrites a number that fits in place, and the
                // item keeps what the meta protocol shows of it; a longer
                // one is a new item.
                let marks = match (&out.effect, &current) {
                    (Effect::Put(v), Some(s)) if v.data.len() <= s.item.data.len() => s.meta,
                    _ => MetaMarks::default(),
                };
                self.effect_marked(&key, out.effect, marks);
                out.reply
            }
            Request::Delete { key, .. } => {
                let Ok(item) = self.item(&key) else {
                    return replayed();
                };
                let out = rules::delete(item.as_ref());
                self.effect(&key, out.effect);
                out.reply
            }
            Request::Touch { key, exptime, .. } => {
                let Ok(item) = self.item(&key) else {
                    return replayed();
                };
                let out = rules::touch(item.as_ref(), exptime, clock);
                self.effect(&key, out.effect);
                out.reply
            }
            Request::Gat { exptime, keys, cas } => {
                let mut values = Vec::new();
                for key in keys {
                    let Ok(item) = self.item(&key) else {
                        return replayed();
                    };
                    let Some(item) = item else { continue };
                    let effect = rules::gat(Some(&item), exptime, clock);
                    values.push(Value {
                        key: key.clone(),
                        flags: item.flags,
                        data: item.data,
                        cas: cas.then_some(item.cas),
                    });
                    self.effect(&key, effect);
                }
                Response::Values(values)
            }
            Request::Meta(m) => self.meta(*m),
            Request::MetaNoop => Response::Meta(MetaReply::new(MetaCode::Mn, "")),
            Request::FlushAll { delay, .. } => {
                let at = rules::flush_at(delay, clock);
                self.flush.apply(self.index, at, clock.now_ms);
                if at.is_none() {
                    // Every record written so far is gone, in the store too.
                    self.state.clear();
                    self.dirty.clear();
                    self.flushed_at_once = true;
                }
                Response::Ok
            }
            // A read in a batch that also writes: the state at its place
            // in the log.
            Request::Get { keys, cas } => {
                let mut values = Vec::new();
                for key in keys {
                    let Ok(item) = self.item(&key) else {
                        return replayed();
                    };
                    if let Some(item) = item {
                        values.push(Value {
                            key,
                            flags: item.flags,
                            data: item.data,
                            cas: cas.then_some(item.cas),
                        });
                    }
                }
                Response::Values(values)
            }
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> anyhow::Result<T> {
    Ok(postcard::from_bytes(bytes)?)
}

fn read_file<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(decode(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: unreadable ({e}); move it away to start over",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes `value` to `path` through a temporary file and a rename, so a
/// crash leaves the old file or the new one; `sync` makes the new one
/// durable before it replaces the old.
fn write_file<T: Serialize>(path: &Path, value: &T, sync: bool) -> std::io::Result<()> {
    let bytes = postcard::to_stdvec(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    if sync && let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for Arc<StateMachine> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        self.build().await
    }
}

impl RaftStateMachine<TypeConfig> for Arc<StateMachine> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let m = lock(&self.meta);
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let _timer = self.apply_seconds.get().map(|h| h.start_timer());
        self.apply_entries(entries.into_iter().collect()).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let body: Body = decode(&bytes).map_err(io_error)?;
        self.install_body(meta, body).await.map_err(io_error)?;
        self.save_snapshot(meta, &bytes)?;
        self.counts
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(id = %meta.snapshot_id, bytes = bytes.len(), "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let file: Option<SnapshotFile> = read_file(&self.dir.join("snapshot")).map_err(io_error)?;
        Ok(file.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.body)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::backend::EmbeddedStore;
    use crate::consistency::raft::log_store::LogStore;
    use crate::protocol::ArithOp;

    fn record(index: u64, written_ms: u64, deadline_ms: u64) -> Record {
        Record {
            index,
            cas: index,
            written_ms,
            deadline_ms,
            meta: MetaMarks::default(),
            data: Bytes::new(),
        }
    }

    #[test]
    fn a_flush_at_once_hides_what_was_written_before_it() {
        let mut f = Flush::default();
        f.apply(10, None, 1_000);
        assert!(!f.visible(&record(9, 999, 0), 2_000));
        assert!(f.visible(&record(11, 999, 0), 2_000));
    }

    #[test]
    fn a_delayed_flush_hides_what_was_written_before_its_moment_once_it_comes() {
        let mut f = Flush::default();
        f.apply(10, Some(5_000), 1_000);
        let old = record(9, 1_000, 0);
        let later = record(12, 4_000, 0);
        let after = record(13, 5_000, 0);
        assert!(f.visible(&old, 4_999) && f.visible(&later, 4_999));
        assert!(!f.visible(&old, 5_000) && !f.visible(&later, 5_000));
        assert!(f.visible(&after, 6_000));
    }

    #[test]
    fn a_new_flush_replaces_a_pending_one_but_not_one_in_force() {
        let mut f = Flush::default();
        f.apply(10, Some(5_000), 1_000);
        // Replaced before its moment: never takes effect.
        f.apply(11, Some(9_000), 2_000);
        assert!(f.visible(&record(9, 3_000, 0), 8_000));
        // In force at 9 000, then another pending flush: the first stays.
        f.apply(12, Some(20_000), 10_000);
        assert!(!f.visible(&record(9, 3_000, 0), 10_000));
        assert!(f.visible(&record(13, 10_000, 0), 10_000));
    }

    #[test]
    fn expired_records_are_not_visible() {
        let f = Flush::default();
        assert!(f.visible(&record(1, 0, 0), u64::MAX));
        assert!(!f.visible(&record(1, 0, 100), 100));
    }

    fn entry(index: u64, now_ms: u64, writes: Vec<Request>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command {
                now_ms,
                ticket: 0,
                writes,
            }),
        }
    }

    fn set(key: &str, data: &str) -> Request {
        Request::Store {
            op: StoreOp::Set,
            key: Bytes::from(key.to_string()),
            flags: 3,
            exptime: 0,
            data: Bytes::from(data.to_string()),
            cas_unique: 0,
            noreply: false,
        }
    }

    fn incr(key: &str, delta: u64) -> Request {
        Request::Arith {
            op: ArithOp::Incr,
            key: Bytes::from(key.to_string()),
            delta,
            noreply: false,
        }
    }

    fn cas(key: &str, data: &str, token: u64) -> Request {
        match set(key, data) {
            Request::Store {
                key, flags, data, ..
            } => Request::Store {
                op: StoreOp::Cas,
                key,
                flags,
                exptime: 0,
                data,
                cas_unique: token,
                noreply: false,
            },
            _ => unreachable!(),
        }
    }

    /// How long the tests' stores keep a value past its deadline.
    const KEPT: Duration = Duration::from_secs(60);

    async fn open(store: &Arc<EmbeddedStore>, dir: &Path) -> Arc<StateMachine> {
        let log = LogStore::<TypeConfig>::open(dir.join("log")).unwrap();
        StateMachine::open(store.clone(), dir, log.reader(), KEPT, 1 << 20)
            .await
            .unwrap()
    }

    /// A state machine whose log the test writes: `apply_logged` appends
    /// entries to it before applying them, as Raft does.
    async fn open_logged(
        store: &Arc<EmbeddedStore>,
        dir: &Path,
    ) -> (Arc<StateMachine>, LogStore<TypeConfig>) {
        let log = LogStore::<TypeConfig>::open(dir.join("log")).unwrap();
        let sm = StateMachine::open(store.clone(), dir, log.reader(), KEPT, 1 << 20)
            .await
            .unwrap();
        (sm, log)
    }

    async fn apply_logged(
        sm: &Arc<StateMachine>,
        log: &mut LogStore<TypeConfig>,
        entries: Vec<Entry<TypeConfig>>,
    ) -> Vec<Vec<Response>> {
        log.append_durable(entries.clone()).await.unwrap();
        apply(sm, entries).await
    }

    fn with_ttl(r: Request, ttl: i64) -> Request {
        match r {
            Request::Store {
                op,
                key,
                flags,
                data,
                cas_unique,
                noreply,
                ..
            } => Request::Store {
                op,
                key,
                flags,
                exptime: ttl,
                data,
                cas_unique,
                noreply,
            },
            other => other,
        }
    }

    fn add(key: &str, data: &str) -> Request {
        match set(key, data) {
            Request::Store {
                key, flags, data, ..
            } => Request::Store {
                op: StoreOp::Add,
                key,
                flags,
                exptime: 0,
                data,
                cas_unique: 0,
                noreply: false,
            },
            _ => unreachable!(),
        }
    }

    async fn get(sm: &StateMachine, key: &str) -> Option<(Bytes, u64)> {
        match sm
            .read(&[Bytes::from(key.to_string())], true)
            .await
            .unwrap()
        {
            Response::Values(mut v) => v.pop().map(|v| (v.data, v.cas.unwrap())),
            other => panic!("{other:?}"),
        }
    }

    async fn apply(sm: &Arc<StateMachine>, entries: Vec<Entry<TypeConfig>>) -> Vec<Vec<Response>> {
        let mut sm = sm.clone();
        RaftStateMachine::apply(&mut sm, entries)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.replies)
            .collect()
    }

    #[tokio::test]
    async fn applies_with_the_rules_and_log_indexes_as_cas() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let now = unix_ms();
        let replies = apply(
            &sm,
            vec![
                entry(1, now, vec![set("n", "5"), incr("n", 10)]),
                entry(
                    2,
                    now,
                    vec![
                        // The token of the set: the incr after it in the
                        // same entry made a new one.
                        cas("n", "x", cas_token(1, 0)),
                        cas("n", "y", cas_token(1, 1)),
                    ],
                ),
            ],
        )
        .await;
        assert_eq!(replies[0], vec![Response::Stored, Response::Number(15)]);
        assert_eq!(replies[1], vec![Response::Exists, Response::Stored]);
        assert_eq!(
            get(&sm, "n").await,
            Some((Bytes::from_static(b"y"), cas_token(2, 0)))
        );
        assert_eq!(sm.applied_index(), 2);
    }

    /// The reads of a proposal stay on the proposer: applying the entry
    /// there answers every request at its place among the writes; another
    /// replica applies the writes alone, to the same state.
    #[tokio::test]
    async fn reads_held_back_are_answered_at_their_place_on_the_proposer_only() {
        let read = || Request::Get {
            keys: vec![Bytes::from_static(b"k")],
            cas: false,
        };
        let batch: Vec<Request> = vec![
            read(),
            set("k", "one"),
            read(),
            Request::MetaNoop,
            set("k", "two"),
            read(),
        ];
        let writes: Vec<Request> = batch.iter().filter(|r| !held_back(r)).cloned().collect();
        assert_eq!(writes, vec![set("k", "one"), set("k", "two")]);
        let now = unix_ms();
        let mut replies = Vec::new();
        let mut stores = Vec::new();
        for proposer in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(EmbeddedStore::new(1 << 20));
            let sm = open(&store, dir.path()).await;
            let ticket = sm.held.hold(batch.clone().into());
            // On another replica the ticket names nothing held there.
            let id = if proposer { ticket.id } else { ticket.id ^ 1 };
            let e = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
                payload: EntryPayload::Normal(Command {
                    now_ms: now,
                    ticket: id,
                    writes: writes.clone(),
                }),
            };
            replies.push(apply(&sm, vec![e]).await.remove(0));
            drop(ticket);
            assert!(lock(&sm.held.batches).is_empty(), "let go with its ticket");
            stores.push(get(&sm, "k").await);
            drop(dir);
        }
        let value = |d: &str| {
            Response::Values(vec![Value {
                key: Bytes::from_static(b"k"),
                flags: 3,
                data: Bytes::from(d.to_string()),
                cas: None,
            }])
        };
        assert_eq!(
            replies[0],
            vec![
                Response::Values(Vec::new()),
                Response::Stored,
                value("one"),
                Response::Meta(MetaReply::new(MetaCode::Mn, "")),
                Response::Stored,
                value("two"),
            ]
        );
        assert_eq!(replies[1], vec![Response::Stored, Response::Stored]);
        assert_eq!(stores[0], stores[1]);
        assert_eq!(
            stores[0],
            Some((Bytes::from_static(b"two"), cas_token(1, 1)))
        );
    }

    /// A data directory written in another format is refused at open,
    /// naming what to do; one of this format opens.
    #[tokio::test]
    async fn a_data_dir_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        sm.persist(true).unwrap();
        drop(sm);
        let log = || LogStore::<TypeConfig>::open(dir.path().join("log")).unwrap();
        let reopened = StateMachine::open(store.clone(), dir.path(), log().reader(), KEPT, 1 << 20);
        assert!(reopened.await.is_ok());
        let mut meta: Meta = read_file(&dir.path().join("state")).unwrap().unwrap();
        assert_eq!(meta.format, DATA_FORMAT);
        meta.format = DATA_FORMAT - 1;
        write_file(&dir.path().join("state"), &meta, true).unwrap();
        let refused = StateMachine::open(store.clone(), dir.path(), log().reader(), KEPT, 1 << 20)
            .await
            .err()
            .expect("refused");
        assert!(
            refused.to_string().contains("move the directory away"),
            "{refused}"
        );
        // A state file from before the format was kept ends early.
        let old = postcard::to_stdvec(&meta).unwrap();
        std::fs::write(dir.path().join("state"), &old[..old.len() - 1]).unwrap();
        let refused = StateMachine::open(store, dir.path(), log().reader(), KEPT, 1 << 20)
            .await
            .err()
            .expect("refused");
        assert!(refused.to_string().contains("unreadable"), "{refused}");
    }

    /// A ticket held here whose writes are not the entry's is not used.
    #[tokio::test]
    async fn a_held_batch_whose_writes_differ_is_not_the_entrys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let held = vec![
            Request::Get {
                keys: vec![Bytes::from_static(b"k")],
                cas: false,
            },
            set("k", "held"),
        ];
        let ticket = sm.held.hold(held.into());
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Command {
                now_ms: unix_ms(),
                ticket: ticket.id,
                writes: vec![set("k", "logged")],
            }),
        };
        assert_eq!(apply(&sm, vec![e]).await[0], vec![Response::Stored]);
        assert_eq!(
            get(&sm, "k").await.map(|(v, _)| v),
            Some(Bytes::from_static(b"logged"))
        );
    }

    #[tokio::test]
    async fn two_writes_in_one_entry_never_share_a_cas_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let now = unix_ms();
        let gets = Request::Get {
            keys: vec![Bytes::from_static(b"k")],
            cas: true,
        };
        let append = Request::Store {
            op: StoreOp::Append,
            key: Bytes::from_static(b"k"),
            flags: 0,
            exptime: 0,
            data: Bytes::from_static(b"!"),
            cas_unique: 0,
            noreply: false,
        };
        // One client's set and gets, and another's append, grouped in one
        // entry: the token the first client saw is stale after the append.
        let replies = apply(&sm, vec![entry(1, now, vec![set("k", "v"), gets, append])]).await;
        let Response::Values(seen) = &replies[0][1] else {
            panic!("{:?}", replies[0]);
        };
        let token = seen[0].cas.unwrap();
        let replies = apply(&sm, vec![entry(2, now, vec![cas("k", "x", token)])]).await;
        assert_eq!(replies[0], vec![Response::Exists]);
        assert_eq!(
            get(&sm, "k").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"v!"))
        );
    }

    #[tokio::test]
    async fn an_entry_applied_again_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let now = unix_ms();
        let log = vec![
            entry(1, now, vec![set("n", "1")]),
            entry(2, now, vec![incr("n", 1)]),
            entry(3, now, vec![incr("n", 1)]),
        ];
        apply(&sm, log.clone()).await;
        // A replay of the whole log (a restart whose applied index on disk
        // lagged the store) leaves the counter where it was.
        let replies = apply(&sm, log).await;
        assert!(
            replies
                .iter()
                .flatten()
                .all(|r| *r == Response::server_error(REPLAYED))
        );
        assert_eq!(
            get(&sm, "n").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"3"))
        );
    }

    #[tokio::test]
    async fn a_flush_at_once_empties_the_store_and_later_writes_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let now = unix_ms();
        let flush = Request::FlushAll {
            delay: None,
            noreply: false,
        };
        let replies = apply(
            &sm,
            vec![
                entry(1, now, vec![set("a", "1"), set("b", "1")]),
                entry(2, now, vec![flush, set("b", "2")]),
            ],
        )
        .await;
        assert_eq!(replies[1], vec![Response::Ok, Response::Stored]);
        assert_eq!(get(&sm, "a").await, None);
        assert_eq!(
            get(&sm, "b").await,
            Some((Bytes::from_static(b"2"), cas_token(2, 0)))
        );
        let mut keys = store.keys().await.unwrap();
        keys.retain(|k| k != MARK_KEY);
        assert_eq!(
            keys,
            vec![Bytes::from_static(b"b")],
            "the flushed key is gone from the store"
        );
    }

    #[tokio::test]
    async fn a_snapshot_rebuilds_a_store_that_lost_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let now = unix_ms();
        apply(&sm, vec![entry(1, now, vec![set("a", "1"), set("b", "2")])]).await;
        let mut builder = sm.clone();
        let snapshot = builder.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(1));
        apply(&sm, vec![entry(2, now, vec![incr("a", 5)])]).await;

        // The same store after a restart of this node: nothing is lost.
        // The index on disk may lag the store (it is written every
        // PERSIST_EVERY); the log's replay of what it lags changes nothing.
        let again = open(&store, dir.path()).await;
        assert!((1..=2).contains(&again.applied_index()));
        apply(&again, vec![entry(2, now, vec![incr("a", 5)])]).await;
        assert_eq!(
            get(&again, "a").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"6"))
        );

        // A new, empty store (memcached restarted): the snapshot is put back
        // and the applied index goes back to it, for the log to replay.
        let fresh = Arc::new(EmbeddedStore::new(1 << 20));
        let rebuilt = open(&fresh, dir.path()).await;
        assert_eq!(rebuilt.applied_index(), 1);
        assert_eq!(
            get(&rebuilt, "a").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"1"))
        );
        assert_eq!(
            get(&rebuilt, "b").await,
            Some((Bytes::from_static(b"2"), cas_token(1, 1)))
        );
        apply(&rebuilt, vec![entry(2, now, vec![incr("a", 5)])]).await;
        assert_eq!(
            get(&rebuilt, "a").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"6"))
        );
    }

    #[tokio::test]
    async fn a_snapshot_installed_on_another_node_gives_the_same_reads() {
        let now = unix_ms();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(&Arc::new(EmbeddedStore::new(1 << 20)), d1.path()).await;
        apply(
            &leader,
            vec![entry(1, now, vec![set("a", "1"), set("gone", "x")])],
        )
        .await;
        let mut b = leader.clone();
        let snapshot = b.build_snapshot().await.unwrap();
        let follower_store = Arc::new(EmbeddedStore::new(1 << 20));
        let mut follower = open(&follower_store, d2.path()).await;
        // Something the snapshot does not hold is not kept.
        apply(&follower, vec![entry(1, now, vec![set("stray", "s")])]).await;
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(get(&follower, "a").await, get(&leader, "a").await);
        assert_eq!(get(&follower, "gone").await, get(&leader, "gone").await);
        assert_eq!(get(&follower, "stray").await, None);
        assert_eq!(follower.applied_index(), 1);
        assert!(follower.get_current_snapshot().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn reads_judge_expiry_by_the_log_clock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let t0 = unix_ms() - 5_000;
        apply(&sm, vec![entry(1, t0, vec![with_ttl(set("k", "v"), 2)])]).await;
        // Past its deadline by this machine's clock, not by the log's.
        assert!(get(&sm, "k").await.is_some());
        // The leader's empty entry moves the log's clock on.
        apply(&sm, vec![entry(2, unix_ms(), vec![])]).await;
        assert_eq!(get(&sm, "k").await, None);
    }

    #[tokio::test]
    async fn the_log_clock_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let now = unix_ms();
        apply(&sm, vec![entry(1, now, vec![set("a", "1")])]).await;
        // A new leader whose clock is 10 s behind: its 5 s value is not
        // born expired, it lives 5 s from the log's clock.
        apply(
            &sm,
            vec![entry(2, now - 10_000, vec![with_ttl(set("k", "v"), 5)])],
        )
        .await;
        assert_eq!(sm.clock_ms(), now);
        assert!(get(&sm, "k").await.is_some());
    }

    #[tokio::test]
    async fn a_replica_far_behind_decides_by_what_the_store_already_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let (sm, mut log) = open_logged(&store, dir.path()).await;
        // Entries proposed 10 minutes ago, applied only now: the 2 s value
        // of entry 1 was live when entry 2 was proposed, though the store
        // drops it (its deadline and the kept time are long past).
        let t0 = unix_ms() - 600_000;
        let replies = apply_logged(
            &sm,
            &mut log,
            vec![entry(1, t0, vec![with_ttl(set("k", "short"), 2)])],
        )
        .await;
        assert_eq!(replies[0], vec![Response::Stored]);
        assert!(store.keys().await.unwrap().iter().all(|k| k != "k"));
        let replies = apply_logged(
            &sm,
            &mut log,
            vec![entry(2, t0 + 1_000, vec![add("k", "late")])],
        )
        .await;
        assert_eq!(
            replies[0],
            vec![Response::NotStored],
            "decided as the leader did"
        );
        assert_eq!(sm.counts.behind.load(Ordering::Relaxed), 1);
        // Caught up: decided from the store again, and the value is gone.
        apply_logged(
            &sm,
            &mut log,
            vec![entry(3, unix_ms(), vec![set("a", "1")])],
        )
        .await;
        assert!(lock(&sm.memory).is_none());
        assert_eq!(get(&sm, "k").await, None);

        // The store restarted empty: rebuilt from the log, the same
        // decisions again (the add does not bring the key back).
        sm.persist(true).unwrap();
        drop(sm);
        let fresh = Arc::new(EmbeddedStore::new(1 << 20));
        let rebuilt = StateMachine::open(fresh.clone(), dir.path(), log.reader(), KEPT, 1 << 20)
            .await
            .unwrap();
        assert_eq!(rebuilt.applied_index(), 3);
        assert_eq!(get(&rebuilt, "k").await, None);
        assert!(fresh.keys().await.unwrap().iter().all(|k| k != "k"));
        assert_eq!(
            get(&rebuilt, "a").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"1"))
        );
    }

    #[tokio::test]
    async fn a_store_that_lost_its_mark_is_not_read_until_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let (sm, mut log) = open_logged(&store, dir.path()).await;
        let now = unix_ms();
        apply_logged(&sm, &mut log, vec![entry(1, now, vec![set("a", "1")])]).await;
        // Flushed behind memdial's back, as a memcached restart would.
        store
            .call(&[Request::FlushAll {
                delay: None,
                noreply: false,
            }])
            .await
            .unwrap();
        assert!(matches!(
            sm.read(&[Bytes::from_static(b"a")], false).await,
            Err(BackendError::Unavailable(_))
        ));
        assert!(sm.check_store().await.unwrap());
        assert_eq!(
            get(&sm, "a").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"1"))
        );
        assert!(!sm.check_store().await.unwrap(), "once is enough");
    }

    /// A request as a client sends it, parsed.
    fn wire(line: &str) -> Request {
        use crate::protocol::{Incoming, Limits, Parsed, parse_request};
        match parse_request(line.as_bytes(), &Limits::default()) {
            Parsed::Request {
                request: Incoming::Data(r),
                ..
            } => r,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    /// Replies as a client reads them.
    fn text(replies: &[Response]) -> Vec<String> {
        replies
            .iter()
            .map(|r| {
                let mut b = bytes::BytesMut::new();
                crate::protocol::encode_response(r, &mut b);
                String::from_utf8_lossy(&b).into_owned()
            })
            .collect()
    }

    /// Applies one entry of client lines at `index`; the replies as text.
    async fn run(sm: &Arc<StateMachine>, index: u64, lines: &[&str]) -> Vec<String> {
        let writes = lines.iter().map(|l| wire(l)).collect();
        let replies = apply(sm, vec![entry(index, unix_ms(), writes)]).await;
        text(&replies[0])
    }

    /// A meta read from the replica, as the read path serves it: `None`
    /// when it must go through the log.
    async fn read_meta(sm: &StateMachine, line: &str) -> Option<String> {
        let Request::Meta(m) = wire(line) else {
            panic!("{line:?}")
        };
        sm.read_meta(&m)
            .await
            .unwrap()
            .map(|r| text(&[r]).remove(0))
    }

    #[tokio::test]
    async fn meta_and_text_cas_tokens_are_one() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(&Arc::new(EmbeddedStore::new(1 << 20)), dir.path()).await;
        assert_eq!(run(&sm, 1, &["set k 0 0 1\r\na\r\n"]).await, ["STORED\r\n"]);
        let (_, token) = get(&sm, "k").await.unwrap();
        // The `gets` token is the one `mg c` shows, and `ms C` honours it.
        assert_eq!(
            read_meta(&sm, "mg k c v\r\n").await.unwrap(),
            format!("VA 1 c{token}\r\na\r\n")
        );
        let replies = run(
            &sm,
            2,
            &[
                &format!("ms k 1 C{} c\r\nx\r\n", token + 1),
                &format!("ms k 1 C{token} c\r\nb\r\n"),
            ],
        )
        .await;
        let meta_token = cas_token(2, 0);
        assert_eq!(
            replies,
            ["EX c0\r\n".to_string(), format!("HD c{meta_token}\r\n")]
        );
        // The token `ms` handed back is the one `gets` shows, and `cas`
        // honours it; the old one is refused by both.
        assert_eq!(
            get(&sm, "k").await,
            Some((Bytes::from_static(b"b"), meta_token))
        );
        let replies = run(
            &sm,
            3,
            &[
                &format!("cas k 0 0 1 {token}\r\nc\r\n"),
                &format!("cas k 0 0 1 {meta_token}\r\nd\r\n"),
                &format!("md k C{meta_token}\r\n"),
                "mg k c v\r\n",
            ],
        )
        .await;
        let after = cas_token(3, 0);
        assert_eq!(
            replies,
            [
                "EXISTS\r\n".to_string(),
                "STORED\r\n".to_string(),
                "EX\r\n".to_string(),
                format!("VA 1 c{after}\r\nd\r\n"),
            ]
        );
        assert_eq!(
            run(&sm, 4, &[&format!("md k C{after} q\r\n"), "mn\r\n"]).await,
            ["", "MN\r\n"]
        );
        assert_eq!(get(&sm, "k").await, None);
    }

    #[tokio::test]
    async fn ma_on_a_missing_key_creates_it_only_with_n() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(&Arc::new(EmbeddedStore::new(1 << 20)), dir.path()).await;
        let replies = run(
            &sm,
            1,
            &[
                "ma c v\r\n",
                "ma c q\r\n",
                "ma c N0 J5 v c\r\n",
                "ma c v D10\r\n",
                "ma c MD D100 v\r\n",
                "incr c 7\r\n",
            ],
        )
        .await;
        let created = cas_token(1, 0);
        assert_eq!(
            replies,
            [
                "NF\r\n".to_string(),
                "NF\r\n".to_string(),
                format!("VA 1 c{created}\r\n5\r\n"),
                "VA 2\r\n15\r\n".to_string(),
                "VA 1\r\n0\r\n".to_string(),
                "7\r\n".to_string(),
            ]
        );
        // `N` with a TTL gives the counter a deadline by the log's clock.
        run(&sm, 2, &["ma t N100 J1\r\n"]).await;
        assert_eq!(
            read_meta(&sm, "mg t t v\r\n").await.unwrap(),
            "VA 1 t100\r\n1\r\n"
        );
    }

    #[tokio::test]
    async fn an_invalidated_item_hands_its_recache_token_out_once() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(&Arc::new(EmbeddedStore::new(1 << 20)), dir.path()).await;
        run(&sm, 1, &["ms k 1 T100\r\nv\r\n"]).await;
        let replies = run(&sm, 2, &["md k I T30\r\n", "mg k c v t\r\n"]).await;
        // `md I` kept the value under a new CAS; the first `mg` wins.
        assert_eq!(
            replies,
            [
                "HD\r\n".to_string(),
                format!("VA 1 c{} t30 X W\r\nv\r\n", cas_token(2, 0)),
            ]
        );
        // From any replica's read path: it changes nothing, so no log.
        assert_eq!(
            read_meta(&sm, "mg k v\r\n").await.unwrap(),
            "VA 1 Z X\r\nv\r\n"
        );
        // Replicated with the value: it survives a snapshot and a rebuild
        // into a store that lost its data.
        let mut builder = sm.clone();
        builder.build_snapshot().await.unwrap();
        let fresh = Arc::new(EmbeddedStore::new(1 << 20));
        let rebuilt = open(&fresh, dir.path()).await;
        assert_eq!(
            read_meta(&rebuilt, "mg k v\r\n").await.unwrap(),
            "VA 1 Z X\r\nv\r\n"
        );
        // A stale item not yet handed out: the read path cannot answer it.
        run(&rebuilt, 3, &["ms s 1\r\ns\r\n", "md s I\r\n"]).await;
        assert_eq!(read_meta(&rebuilt, "mg s v\r\n").await, None);
        // `ms I` with an older CAS stores, stale; a fresh `ms` clears it.
        let replies = run(
            &rebuilt,
            4,
            &[
                &format!("ms s 1 I C{}\r\nt\r\n", cas_token(1, 0)),
                "mg s v\r\n",
                "mg s v\r\n",
                "ms s 1\r\nu\r\n",
                "mg s v\r\n",
            ],
        )
        .await;
        assert_eq!(
            replies,
            [
                "HD\r\n",
                "VA 1 X W\r\nt\r\n",
                "VA 1 Z X\r\nt\r\n",
                "HD\r\n",
                "VA 1\r\nu\r\n"
            ]
        );
        // `N` on a miss wins once too.
        let replies = run(&rebuilt, 5, &["mg viv N30 v\r\n", "mg viv v\r\n"]).await;
        assert_eq!(replies, ["VA 0 W\r\n\r\n", "VA 0 Z\r\n\r\n"]);
    }

    #[tokio::test]
    async fn a_batch_of_reads_is_answered_from_one_look_unless_it_would_write() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(&Arc::new(EmbeddedStore::new(1 << 20)), dir.path()).await;
        run(
            &sm,
            1,
            &["ms a 1 F2\r\nx\r\n", "ms s 1\r\ny\r\n", "md s I\r\n"],
        )
        .await;
        let batch: Vec<Request> = [
            "get a b\r\n",
            "mg a v f\r\n",
            "mg b q\r\n",
            "me a\r\n",
            "mn\r\n",
        ]
        .iter()
        .map(|l| wire(l))
        .collect();
        let answers: Vec<Response> = sm
            .reads(&batch)
            .await
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        assert_eq!(
            text(&answers),
            [
                "VALUE a 2 1\r\nx\r\nEND\r\n".to_string(),
                "VA 1 f2\r\nx\r\n".to_string(),
                String::new(),
                format!(
                    "ME a exp=-1 la=0 cas={} fetch=no cls=1 size=65\r\n",
                    cas_token(1, 0)
                ),
                "MN\r\n".to_string(),
            ]
        );
        // The first read of the invalidated item wins its token: not a read.
        let with_win = vec![wire("get a\r\n"), wire("mg s v\r\n")];
        let answers = sm.reads(&with_win).await.unwrap();
        assert!(answers[0].is_some() && answers[1].is_none());
    }

    #[tokio::test]
    async fn ms_modes_answer_as_memcached() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(&Arc::new(EmbeddedStore::new(1 << 20)), dir.path()).await;
        let replies = run(
            &sm,
            1,
            &[
                "ms k 1 ME\r\na\r\n",
                "ms k 1 ME\r\nb\r\n",
                "ms k 1 MA\r\nc\r\n",
                "ms k 1 MP\r\nd\r\n",
                "ms nope 1 MA\r\nz\r\n",
                "ms nope 1 MR\r\nz\r\n",
                "ms k 1 MR q\r\nr\r\n",
                "ms k 1 MS k Oo\r\ns\r\n",
                "get k nope\r\n",
            ],
        )
        .await;
        assert_eq!(
            replies,
            [
                "HD\r\n",
                "NS\r\n",
                "HD\r\n",
                "HD\r\n",
                "NS\r\n",
                "NS\r\n",
                "",
                "HD kk Oo\r\n",
                "VALUE k 0 1\r\ns\r\nEND\r\n",
            ]
        );
        // An invalid mode never passes the parser; one that came through
        // the log anyway earns memcached's line and changes nothing.
        let mut bad = match wire("ms k 1 MS\r\nx\r\n") {
            Request::Meta(m) => m,
            other => panic!("{other:?}"),
        };
        bad.flags.mode = Some(b'X');
        let replies = apply(&sm, vec![entry(2, unix_ms(), vec![Request::Meta(bad)])]).await;
        assert_eq!(
            text(&replies[0]),
            ["CLIENT_ERROR invalid mode for ms M token\r\n"]
        );
        assert_eq!(
            get(&sm, "k").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"s"))
        );
    }

    #[tokio::test]
    async fn clients_cannot_write_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let sm = open(&store, dir.path()).await;
        let mark = std::str::from_utf8(MARK_KEY).unwrap();
        let replies = apply(&sm, vec![entry(1, unix_ms(), vec![set(mark, "x")])]).await;
        assert_eq!(
            replies[0],
            vec![Response::Error(ErrorReply::Client(RESERVED.into()))]
        );
        assert_eq!(get(&sm, mark).await, None);
        // Nor through the meta protocol, which does not read it either.
        let reserved = format!("CLIENT_ERROR {RESERVED}\r\n");
        let lines = [
            format!("ms {mark} 1\r\nx\r\n"),
            format!("mg {mark} N30 v\r\n"),
            format!("ma {mark} N0\r\n"),
            format!("md {mark}\r\n"),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert!(run(&sm, 2, &lines).await.iter().all(|r| *r == reserved));
        assert_eq!(
            read_meta(&sm, &format!("mg {mark} v\r\n")).await,
            Some(reserved)
        );
        assert!(!sm.check_store().await.unwrap());
    }

    #[tokio::test]
    async fn a_value_whose_record_would_not_fit_is_refused_on_every_replica() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(64 << 20));
        let sm = open(&store, dir.path()).await;
        // memcached alone would take this value (item size under 1 MiB),
        // but not with the record header in front of it.
        let len = (1 << 20) - rules::meta::memcached_item_size(1, 0, 3) - 10;
        let big = set("k", &"x".repeat(len));
        let replies = apply(
            &sm,
            vec![entry(
                1,
                unix_ms(),
                vec![set("k", "old"), big, set("a", "12345")],
            )],
        )
        .await;
        assert_eq!(
            replies[0],
            vec![
                Response::Stored,
                ClientError::TooLarge.into(),
                Response::Stored
            ]
        );
        // A failed set leaves no old value behind, as in memcached.
        assert_eq!(get(&sm, "k").await, None);
        // An append that would grow past the limit changes nothing.
        let grow = Request::Store {
            op: StoreOp::Append,
            key: Bytes::from_static(b"a"),
            flags: 3,
            exptime: 0,
            data: Bytes::from("y".repeat(len)),
            cas_unique: 0,
            noreply: false,
        };
        let replies = apply(&sm, vec![entry(2, unix_ms(), vec![grow])]).await;
        assert_eq!(
            replies[0],
            vec![Response::server_error("out of memory storing object")]
        );
        assert_eq!(
            get(&sm, "a").await.map(|(d, _)| d),
            Some(Bytes::from_static(b"12345"))
        );
    }

    #[tokio::test]
    async fn a_snapshot_waits_for_the_rebuild_of_a_store_that_lost_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::new(1 << 20));
        let (sm, mut log) = open_logged(&store, dir.path()).await;
        apply_logged(
            &sm,
            &mut log,
            vec![entry(1, unix_ms(), vec![set("a", "1")])],
        )
        .await;
        store
            .call(&[Request::FlushAll {
                delay: None,
                noreply: false,
            }])
            .await
            .unwrap();
        let mut builder = sm.clone();
        let building = tokio::spawn(async move { builder.build_snapshot().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!building.is_finished(), "a snapshot of the emptied store");
        assert!(sm.check_store().await.unwrap());
        let snapshot = building.await.unwrap().unwrap();
        let body: Body = decode(&snapshot.snapshot.into_inner()).unwrap();
        assert_eq!(body.items.len(), 1);
        assert_eq!(body.items[0].0, Bytes::from_static(b"a"));
    }
}
