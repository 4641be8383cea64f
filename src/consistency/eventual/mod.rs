//! Eventual consistency: a write is applied to the local replica and
//! acknowledged, then pushed to the peers from the replication log.
//! Conflicts resolve last-writer-wins on hybrid logical clock versions (the
//! node id breaks ties); deletes are tombstones kept for a grace period;
//! TTLs travel as absolute deadlines. What a client can rely on is written
//! in `docs/consistency.md`.
//!
//! Values are stored with a [`Record`] header, so the version of every key
//! lives in the store. Writes to one key are serialised on this node by a
//! striped lock, held from reading the current version to writing the new
//! one, for local and replicated writes alike.
//!
//! | file | part |
//! |---|---|
//! | `mod.rs` | the pipeline: client requests on the local replica, logged |
//! | `backlog.rs` | the log of this node's writes, bounded |
//! | `messages.rs` | what peers send each other, tagged [`messages::TAG`] |
//! | `push.rs` | per peer: the log from its cursor, full resyncs, anti-entropy |
//! | `receive.rs` | what peers send, applied; the store-restart watch |
//! | `peers.rs` | cursors and counts per peer; eventual's metrics |
//! | `digest.rs` | replica digests for anti-entropy |
//! | `record.rs`, `hlc.rs` | the stored header; versions |
//! | `meta.rs` | meta commands, carried out like their text twins |

mod backlog;
mod digest;
mod hlc;
pub mod messages;
mod meta;
mod peers;
mod push;
mod receive;
pub mod record;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Pipeline, Session, StoreStatus, store_exptime};
use crate::BoxFuture;
use crate::backend::{Backend, BackendError};
use crate::cluster::Cluster;
use crate::metrics::{Metrics, Verdict};
use crate::protocol::{Exptime, Request, Response, StoreOp, Value};
use crate::rules::{self, Clock, Effect};
use crate::time::unix_ms;
pub use backlog::Backlog;
use hlc::Hlc;
use messages::{Entry, Op, Version, entry_bytes};
use peers::{EventualMetrics, Peers};
pub use record::Record;

const STRIPES: usize = 1024;

/// Keys of replicated entries read and written per store exchange, at
/// most: a peer's message (`replication_batch`, 512 by default) is applied
/// in one exchange that reads the keys' versions and one that writes.
/// Each store exchange costs the replica and its store a few wake-ups:
/// at 64 keys per exchange a replica woke about 2.4 k times a second
/// under 1:10 load, at 512 about 1.5 k (docs/BENCHMARKS.md).
const APPLY_BATCH: usize = 512;

/// Bytes of replicated values per store exchange, at most: the version read
/// returns the keys' whole current values, which are likely about as large
/// as the new ones.
const APPLY_BATCH_BYTES: usize = 1024 * 1024;

/// Eventual mode's settings.
#[derive(Debug, Clone)]
pub struct EventualSettings {
    /// Most entries in one message.
    pub batch_max: usize,
    /// Least time between two messages to a peer, unless the second is
    /// full.
    pub linger: Duration,
    /// How often the backing store is checked for a restart.
    pub store_check_interval: Duration,
    /// How often each pusher compares digests with its peer (±20%);
    /// `None` never does.
    pub anti_entropy_interval: Option<Duration>,
    /// How long a tombstone lives after its delete; anti-entropy leaves
    /// older ones out.
    pub tombstone_grace: Duration,
    /// How often gauges are refreshed, and how long a pusher waits before
    /// trying a replica that failed again.
    pub heartbeat_interval: Duration,
}

pub struct Eventual {
    me: Weak<Eventual>,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    cluster: Arc<Cluster>,
    settings: EventualSettings,
    backlog: Arc<Backlog>,
    peers: Peers,
    replication: EventualMetrics,
    hlc: Hlc,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    /// Writes at or below this version were flushed.
    flushed: Mutex<Version>,
    /// Held while listing the store's keys for a resync or anti-entropy:
    /// memcached runs one key listing (`lru_crawler`) at a time and answers
    /// `BUSY` to a second, so this node's pushers and answers take turns.
    listing: tokio::sync::Mutex<()>,
}

/// A key's current state in the local store.
struct Current {
    record: Record,
    flags: u32,
    cas: Option<u64>,
}

impl Current {
    /// The key as the command rules see it; the CAS is the store's own.
    fn item(&self) -> rules::Item {
        rules::Item {
            flags: self.flags,
            data: self.record.data.clone(),
            deadline: (self.record.deadline_ms != 0).then_some(self.record.deadline_ms),
            cas: self.cas.unwrap_or(0),
        }
    }
}

impl Eventual {
    pub fn new(
        backend: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
        cluster: Arc<Cluster>,
        backlog: Arc<Backlog>,
        settings: EventualSettings,
    ) -> prometheus::Result<Arc<Eventual>> {
        let replication = EventualMetrics::register(&metrics.registry)?;
        Ok(Arc::new_cyclic(|me| Eventual {
            me: me.clone(),
            hlc: Hlc::new(cluster.node_id()),
            peers: Peers::new(&cluster.peer_ids(), backlog.incarnation),
            backend,
            metrics,
            cluster,
            settings,
            backlog,
            replication,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
            flushed: Mutex::new(Version::default()),
            listing: tokio::sync::Mutex::new(()),
        }))
    }

    /// Runs replication until `shutdown`: a pusher per peer, the store
    /// watch, and the gauges. What peers send arrives through the cluster,
    /// which hands it to this mode as its [`crate::cluster::Handler`].
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> std::io::Result<()> {
        let tasks = tokio_util::task::TaskTracker::new();
        for peer in self.cluster.peer_ids() {
            tasks.spawn(self.clone().push_to(peer, shutdown.clone()));
        }
        tasks.spawn(self.clone().watch_store(shutdown.clone()));
        tasks.spawn(self.clone().adopt_foreign_values(shutdown.clone()));
        tasks.spawn(self.clone().refresh_metrics(shutdown));
        tasks.close();
        tasks.wait().await;
        Ok(())
    }

    async fn refresh_metrics(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let m = &self.replication;
            m.backlog_entries.set(self.backlog.len() as i64);
            m.backlog_bytes.set(self.backlog.bytes() as i64);
            for peer in self.cluster.peer_ids() {
                if let Some(lag) = self.peers.lag(peer, self.backlog.head()) {
                    m.peer_lag
                        .with_label_values(&[&peer.to_string()])
                        .set(lag as i64);
                }
            }
        }
    }

    fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    /// Adopts, once at start, the values the store holds that memdial did
    /// not write (no header: put there before memdial ran, or behind its
    /// back): each is rewritten with its flags and expiry under a fresh
    /// version and logged, so every replica gets it like a write made now.
    /// Tried again until the store answers.
    async fn adopt_foreign_values(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            match self.adopt_foreign().await {
                Ok((0, _)) => return,
                Ok((adopted, seen)) => {
                    tracing::info!(
                        adopted,
                        keys = seen,
                        "adopted values found in the store that memdial did not write; \
                         they now replicate"
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list the store to adopt its values yet")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.store_check_interval) => {}
            }
        }
    }

    /// Returns (values adopted, keys looked at).
    async fn adopt_foreign(&self) -> Result<(usize, usize), String> {
        let listing = {
            let _turn = self.listing.lock().await;
            self.backend
                .keys_with_expiry()
                .await
                .map_err(|e| e.to_string())?
        };
        let now = unix_ms();
        let mut adopted = 0;
        for (key, exp) in &listing {
            let deadline_ms = exp.map_or(0, |s| s.saturating_mul(1000));
            if deadline_ms != 0 && deadline_ms <= now {
                continue;
            }
            let _g = self.stripe(key).lock().await;
            let Some(cur) = self.current(key, false).await.map_err(|e| e.to_string())? else {
                continue;
            };
            // memdial's own values always carry a version above zero.
            if cur.record.version != Version::default() {
                continue;
            }
            let stored = self
                .put(key, cur.flags, deadline_ms, cur.record.data, None)
                .await
                .map_err(|e| e.to_string())?;
            adopted += usize::from(stored == Response::Stored);
        }
        Ok((adopted, listing.len()))
    }

    /// Every key of the local replica, one listing at a time.
    async fn list_keys(&self) -> Result<Vec<Bytes>, String> {
        let _turn = self.listing.lock().await;
        self.backend.keys().await.map_err(|e| e.to_string())
    }

    fn stripe_index(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    fn stripe(&self, key: &[u8]) -> &tokio::sync::Mutex<()> {
        &self.stripes[self.stripe_index(key)]
    }

    /// Takes the stripes of all these keys, each once, in index order, so
    /// that two batches never wait for each other in a cycle.
    async fn lock_stripes<'k>(
        &self,
        keys: impl Iterator<Item = &'k Bytes>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys.map(|k| self.stripe_index(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for i in stripes {
            let stripe = &self.stripes[i];
            // Most stripes are free: taken at once, without a future to
            // poll. A free stripe has no waiters (the mutex hands a
            // released stripe to its first waiter), so this is as fair.
            guards.push(match stripe.try_lock() {
                Ok(guard) => guard,
                Err(_) => stripe.lock().await,
            });
        }
        guards
    }

    fn flushed(&self) -> Version {
        *self.flushed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Carries out what the command rules decided for `key` (whose stripe
    /// the caller holds; `cur` is what the rules were given): a new value
    /// or deadline is written under a fresh version and logged, a removal
    /// leaves a tombstone. `cas` makes the write conditional on the store's
    /// CAS still being that one. Returns the rules' reply, or the store's
    /// when it refused the write.
    async fn carry_out(
        &self,
        key: &Bytes,
        cur: Option<Current>,
        out: rules::Outcome,
        cas: Option<u64>,
    ) -> Result<Response, BackendError> {
        let written = match out.effect {
            Effect::Keep => return Ok(out.reply),
            Effect::Remove => {
                self.tombstone(key).await?;
                return Ok(out.reply);
            }
            Effect::Put(v) => {
                self.put(key, v.flags, deadline_ms(v.deadline), v.data, cas)
                    .await?
            }
            Effect::Touch { deadline } => {
                let Some(cur) = cur else {
                    return Ok(out.reply);
                };
                let deadline = deadline_ms(deadline);
                self.put(key, cur.flags, deadline, cur.record.data, None)
                    .await?
            }
        };
        Ok(match written {
            Response::Stored => out.reply,
            refused => refused,
        })
    }

    async fn call(&self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        let responses = self.backend.call(requests).await?;
        if responses.len() != requests.len() {
            return Err(BackendError::Protocol("short batch".into()));
        }
        Ok(responses)
    }

    async fn call_one(&self, request: Request) -> Result<Response, BackendError> {
        let mut r = self.call(std::slice::from_ref(&request)).await?;
        r.pop()
            .ok_or_else(|| BackendError::Protocol("no reply".into()))
    }

    /// What the store holds under `key`, tombstones and expired values too.
    async fn current(&self, key: &Bytes, cas: bool) -> Result<Option<Current>, BackendError> {
        let response = self
            .call_one(Request::Get {
                keys: vec![key.clone()],
                cas,
            })
            .await?;
        Ok(match response {
            Response::Values(mut v) => v.pop().map(|v| Current {
                record: Record::take(v.data),
                flags: v.flags,
                cas: v.cas,
            }),
            other => return Err(unexpected(other)),
        })
    }

    /// The live value under `key`, if any.
    async fn live(&self, key: &Bytes, cas: bool) -> Result<Option<Current>, BackendError> {
        let now = unix_ms();
        let flushed = self.flushed();
        Ok(self
            .current(key, cas)
            .await?
            .filter(|c| c.record.live(now) && c.record.version >= flushed))
    }

    /// Stores a new value under a fresh version and logs it for the peers.
    /// The caller holds the key's stripe.
    async fn put(
        &self,
        key: &Bytes,
        flags: u32,
        deadline_ms: u64,
        data: Bytes,
        cas: Option<u64>,
    ) -> Result<Response, BackendError> {
        if deadline_ms != 0 && deadline_ms <= unix_ms() {
            // memcached stores an already-expired item and never shows it:
            // the key's old value is gone. That is a delete.
            self.tombstone(key).await?;
            return Ok(Response::Stored);
        }
        let version = self.hlc.now();
        let record = Record {
            tombstone: false,
            version,
            deadline_ms,
            data: data.clone(),
        };
        let response = self
            .call_one(Request::Store {
                op: if cas.is_some() {
                    StoreOp::Cas
                } else {
                    StoreOp::Set
                },
                key: key.clone(),
                flags,
                exptime: store_exptime(deadline_ms),
                data: record.encode(),
                cas_unique: cas.unwrap_or(0),
                noreply: false,
            })
            .await?;
        if response == Response::Stored {
            self.backlog().append(Entry {
                key: key.clone(),
                version,
                op: Op::Put {
                    flags,
                    deadline_ms,
                    data,
                },
            });
        }
        Ok(response)
    }

    /// Replaces the key with a tombstone and logs the delete.
    async fn tombstone(&self, key: &Bytes) -> Result<(), BackendError> {
        let version = self.hlc.now();
        self.write_tombstone(key, version).await?;
        self.backlog().append(Entry {
            key: key.clone(),
            version,
            op: Op::Delete,
        });
        Ok(())
    }

    async fn write_tombstone(&self, key: &Bytes, version: Version) -> Result<(), BackendError> {
        self.call_one(self.tombstone_request(key.clone(), version))
            .await
            .map(drop)
    }

    /// The store request that leaves a tombstone of `version` under `key`.
    fn tombstone_request(&self, key: Bytes, version: Version) -> Request {
        // Derived from the delete's version, not this node's clock, so every
        // replica keeps the tombstone until the same moment and catch-up
        // never extends it.
        let deadline_ms = (version.ts >> 16) + self.settings.tombstone_grace.as_millis() as u64;
        let record = Record {
            tombstone: true,
            version,
            deadline_ms,
            data: Bytes::new(),
        };
        Request::Store {
            op: StoreOp::Set,
            key,
            flags: 0,
            exptime: store_exptime(deadline_ms),
            data: record.encode(),
            cas_unique: 0,
            noreply: false,
        }
    }

    /// The store request that writes a replicated entry (not a flush) as
    /// it is: a value, or a tombstone for a delete or for a value that
    /// expired in transit (either way the key holds nothing newer).
    fn replicated_request(&self, entry: Entry, now_ms: u64) -> Request {
        match entry.op {
            Op::Put {
                flags,
                deadline_ms,
                data,
            } if deadline_ms == 0 || deadline_ms > now_ms => {
                let record = Record {
                    tombstone: false,
                    version: entry.version,
                    deadline_ms,
                    data,
                };
                Request::Store {
                    op: StoreOp::Set,
                    key: entry.key,
                    flags,
                    exptime: store_exptime(deadline_ms),
                    data: record.encode(),
                    cas_unique: 0,
                    noreply: false,
                }
            }
            _ => self.tombstone_request(entry.key, entry.version),
        }
    }

    /// A store's answer to a `get`/`gets` as the client sees it: records
    /// unwrapped, tombstones, expired and flushed values left out.
    fn visible(response: Response, now: u64, flushed: Version) -> Response {
        match response {
            Response::Values(values) => Response::Values(
                values
                    .into_iter()
                    .filter_map(|mut v| {
                        let rec = Record::take(std::mem::take(&mut v.data));
                        (rec.live(now) && rec.version >= flushed).then(|| {
                            v.data = rec.data;
                            v
                        })
                    })
                    .collect(),
            ),
            other => other,
        }
    }

    /// A plain `set` as the rules decide it without reading the key (a set
    /// does not depend on its current value): its reply and the new value,
    /// when the value is stored, not removed.
    fn plain_set(request: &Request, now: u64) -> Option<(Response, rules::NewValue)> {
        let Request::Store {
            op: StoreOp::Set,
            flags,
            exptime,
            data,
            ..
        } = request
        else {
            return None;
        };
        let out = rules::store(
            StoreOp::Set,
            None,
            *flags,
            *exptime,
            data.clone(),
            0,
            Clock::unix(now),
        );
        match out.effect {
            Effect::Put(v) if deadline_ms(v.deadline) == 0 || deadline_ms(v.deadline) > now => {
                Some((out.reply, v))
            }
            _ => None,
        }
    }

    /// A run of reads and plain sets, carried out in one exchange with the
    /// store, in order: each set gets its version and is logged as
    /// [`Eventual::put`] does, under the stripes of all the run's set keys
    /// (taken in index order, as [`Eventual::apply_batch`] takes them).
    /// `sets` names the sets by their place in `run`, in order, with what
    /// [`Eventual::plain_set`] decided at `now`; a run of reads alone goes
    /// to the store as it is.
    async fn joined(&self, mut run: Vec<Request>, sets: Vec<PlainSet>, now: u64) -> Vec<Response> {
        fn key(run: &[Request], i: usize) -> &Bytes {
            match &run[i] {
                Request::Store { key, .. } => key,
                _ => unreachable!("a plain set is a store request"),
            }
        }
        let _guards = self
            .lock_stripes(sets.iter().map(|(i, ..)| key(&run, *i)))
            .await;
        // Versions are taken under the stripes, so the store writes a
        // key's sets in version order.
        let logged: Vec<(usize, Response, Entry)> = sets
            .into_iter()
            .map(|(i, reply, v)| {
                let entry = Entry {
                    key: key(&run, i).clone(),
                    version: self.hlc.now(),
                    op: Op::Put {
                        flags: v.flags,
                        deadline_ms: deadline_ms(v.deadline),
                        data: v.data,
                    },
                };
                run[i] = self.replicated_request(entry.clone(), now);
                (i, reply, entry)
            })
            .collect();
        let responses = match self.call(&run).await {
            Ok(r) => r,
            Err(e) => return vec![self.failed(e); run.len()],
        };
        let flushed = self.flushed();
        let mut logged = logged.into_iter().peekable();
        responses
            .into_iter()
            .enumerate()
            .map(|(i, response)| match logged.next_if(|(at, ..)| *at == i) {
                None => Self::visible(response, now, flushed),
                Some((_, reply, entry)) if response == Response::Stored => {
                    self.backlog().append(entry);
                    reply
                }
                Some(_) => response,
            })
            .collect()
    }

    fn failed(&self, e: BackendError) -> Response {
        // The backend logs its outages, once each.
        tracing::debug!(error = %e, "backend call failed");
        self.metrics
            .backend_errors
            .with_label_values(&[e.kind()])
            .inc();
        e.to_response()
    }

    async fn one(&self, request: Request) -> Result<Response, BackendError> {
        let clock = || Clock::unix(unix_ms());
        match request {
            Request::Store {
                op,
                key,
                flags,
                exptime,
                data,
                cas_unique,
                ..
            } => {
                let _g = self.stripe(&key).lock().await;
                // A set does not depend on the current value: no read.
                let cur = match op {
                    StoreOp::Set => None,
                    op => self.live(&key, op == StoreOp::Cas).await?,
                };
                let out = rules::store(
                    op,
                    cur.as_ref().map(Current::item).as_ref(),
                    flags,
                    exptime,
                    data,
                    cas_unique,
                    clock(),
                );
                let guard = (op == StoreOp::Cas).then_some(cas_unique);
                self.carry_out(&key, cur, out, guard).await
            }
            Request::TooLarge { op, key, .. } => {
                if op != StoreOp::Set {
                    return Ok(rules::too_large(op, None).reply);
                }
                let _g = self.stripe(&key).lock().await;
                let cur = self.live(&key, false).await?;
                let out = rules::too_large(op, cur.as_ref().map(Current::item).as_ref());
                self.carry_out(&key, cur, out, None).await
            }
            Request::Arith { op, key, delta, .. } => {
                let _g = self.stripe(&key).lock().await;
                let cur = self.live(&key, false).await?;
                let out = rules::arith(op, cur.as_ref().map(Current::item).as_ref(), delta);
                self.carry_out(&key, cur, out, None).await
            }
            Request::Delete { key, .. } => {
                let _g = self.stripe(&key).lock().await;
                let cur = self.live(&key, false).await?;
                let out = rules::delete(cur.as_ref().map(Current::item).as_ref());
                self.carry_out(&key, cur, out, None).await
            }
            Request::Touch { key, exptime, .. } => {
                let _g = self.stripe(&key).lock().await;
                let cur = self.live(&key, false).await?;
                let out = rules::touch(cur.as_ref().map(Current::item).as_ref(), exptime, clock());
                self.carry_out(&key, cur, out, None).await
            }
            Request::Gat { exptime, keys, cas } => {
                let mut values = Vec::with_capacity(keys.len());
                for key in &keys {
                    let _g = self.stripe(key).lock().await;
                    let cur = self.live(key, cas).await?;
                    let item = cur.as_ref().map(Current::item);
                    let effect = rules::gat(item.as_ref(), exptime, clock());
                    // A deadline already passed still returns the value,
                    // this once (memcached reads, then unlinks).
                    let gone = cur
                        .as_ref()
                        .filter(|_| effect == Effect::Remove)
                        .map(|c| Value {
                            key: key.clone(),
                            flags: c.flags,
                            data: c.record.data.clone(),
                            cas: if cas { c.cas } else { None },
                        });
                    let hit = cur.is_some();
                    let out = rules::Outcome {
                        reply: Response::Touched,
                        effect,
                    };
                    self.carry_out(key, cur, out, None).await?;
                    if let Some(v) = gone {
                        values.push(v);
                    } else if hit && let Some(c) = self.live(key, cas).await? {
                        // Read back: the CAS is the one just written.
                        values.push(Value {
                            key: key.clone(),
                            flags: c.flags,
                            data: c.record.data,
                            cas: if cas { c.cas } else { None },
                        });
                    }
                }
                Ok(Response::Values(values))
            }
            Request::FlushAll { delay, .. } => self.flush_all(delay).await,
            Request::MetaNoop => Ok(Response::Meta(crate::protocol::MetaReply::new(
                crate::protocol::MetaCode::Mn,
                "",
            ))),
            Request::Meta(m) => self.meta(*m).await,
            Request::Get { .. } => {
                let mut r = self.joined(vec![request], Vec::new(), unix_ms()).await;
                Ok(r.pop()
                    .unwrap_or_else(|| Response::server_error("no reply")))
            }
        }
    }

    /// `flush_all [delay]`: every write older than the flush moment goes, on
    /// every replica. The flush's version is that moment, so a replica
    /// applies it by removing what is older and refusing older writes that
    /// arrive late.
    async fn flush_all(&self, delay: Option<Exptime>) -> Result<Response, BackendError> {
        let now = unix_ms();
        let at_ms = rules::flush_at(delay, Clock::unix(now)).unwrap_or(now);
        let fresh = self.hlc.now();
        let version = Version {
            ts: fresh.ts.max(at_ms << 16),
            node: fresh.node,
        };
        if at_ms <= now {
            // Every write this node has made or applied is older than a
            // fresh reading, so flushing the whole store is exact.
            self.raise_flushed(version);
            self.call_one(Request::FlushAll {
                delay: None,
                noreply: false,
            })
            .await?;
        } else {
            self.schedule_flush(version, at_ms);
        }
        self.backlog().append(Entry {
            key: Bytes::new(),
            version,
            op: Op::Flush { at_ms },
        });
        Ok(Response::Ok)
    }

    fn raise_flushed(&self, version: Version) {
        let mut f = self.flushed.lock().unwrap_or_else(PoisonError::into_inner);
        *f = (*f).max(version);
    }

    fn schedule_flush(&self, version: Version, at_ms: u64) {
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let wait = at_ms.saturating_sub(unix_ms());
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            if let Err(e) = me.remove_older_than(version).await {
                tracing::warn!(error = %e, "delayed flush_all failed");
            }
        });
    }

    /// Removes every value older than `version`.
    async fn remove_older_than(&self, version: Version) -> Result<(), BackendError> {
        self.raise_flushed(version);
        // One key listing at a time, as for resyncs and anti-entropy.
        let keys = {
            let _turn = self.listing.lock().await;
            self.backend.keys().await?
        };
        for key in keys {
            let _g = self.stripe(&key).lock().await;
            let older = self
                .current(&key, false)
                .await?
                .is_some_and(|c| c.record.version < version);
            if older {
                self.call_one(Request::Delete {
                    key,
                    noreply: false,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Applies a replicated `flush_all` of `version`, at once or at
    /// `at_ms`.
    async fn apply_flush(&self, version: Version, at_ms: u64) -> Result<(), BackendError> {
        self.hlc.observe(version.ts);
        if at_ms <= unix_ms() {
            self.remove_older_than(version).await
        } else {
            self.schedule_flush(version, at_ms);
            Ok(())
        }
    }

    /// Applies a run of entries without a flush as batches of at most
    /// [`APPLY_BATCH`] keys and [`APPLY_BATCH_BYTES`]: for each, the
    /// current versions are read in one exchange and the winning writes
    /// sent in another, under the stripes of all its keys (taken in index
    /// order, so batches never deadlock).
    /// Returns how many keys changed.
    async fn apply_run(&self, run: Vec<Entry>) -> Result<usize, BackendError> {
        let flushed = self.flushed();
        // Within the run, the newest entry of each key is the one that
        // would win if they were applied in turn.
        let mut newest: HashMap<Bytes, Entry> = HashMap::with_capacity(run.len());
        // The clock takes in the run's newest reading once, not one atomic
        // update per entry.
        self.hlc
            .observe(run.iter().map(|e| e.version.ts).max().unwrap_or(0));
        for e in run {
            if e.version <= flushed {
                continue;
            }
            match newest.get(&e.key) {
                Some(have) if have.version >= e.version => {}
                _ => {
                    newest.insert(e.key.clone(), e);
                }
            }
        }
        let entries: Vec<Entry> = newest.into_values().collect();
        let mut changed = 0;
        for batch in messages::runs(entries, APPLY_BATCH, APPLY_BATCH_BYTES, entry_bytes) {
            changed += self.apply_batch(batch).await?;
        }
        Ok(changed)
    }

    async fn apply_batch(&self, batch: Vec<Entry>) -> Result<usize, BackendError> {
        let _guards = self.lock_stripes(batch.iter().map(|e| &e.key)).await;
        let keys: Vec<Bytes> = batch.iter().map(|e| e.key.clone()).collect();
        let current = match self.call_one(Request::Get { keys, cas: false }).await? {
            Response::Values(values) => stored_versions(&batch, values),
            other => return Err(unexpected(other)),
        };
        let now = unix_ms();
        let writes: Vec<Request> = batch
            .into_iter()
            .zip(current)
            .filter(|(e, have)| have.is_none_or(|have| have < e.version))
            .map(|(e, _)| self.replicated_request(e, now))
            .collect();
        if writes.is_empty() {
            return Ok(0);
        }
        for response in self.call(&writes).await? {
            if response != Response::Stored {
                return Err(unexpected(response));
            }
        }
        Ok(writes.len())
    }
}

/// The stored version of each entry's key, in the batch's order (`None`
/// where the store has nothing), from the values a multi-key get of the
/// batch's keys returned. The store answers hits in the order asked, so
/// each value is matched to the next entry of its key; a value left over
/// (an answer in another order) has them matched by key instead.
fn stored_versions(batch: &[Entry], values: Vec<Value>) -> Vec<Option<Version>> {
    let stored: Vec<(Bytes, Version)> = values
        .into_iter()
        .map(|v| (v.key, Record::take(v.data).version))
        .collect();
    let mut rest = stored.iter().peekable();
    let in_order: Vec<Option<Version>> = batch
        .iter()
        .map(|e| rest.next_if(|(key, _)| *key == e.key).map(|(_, v)| *v))
        .collect();
    if rest.peek().is_none() {
        return in_order;
    }
    let by_key: HashMap<&Bytes, Version> = stored.iter().map(|(k, v)| (k, *v)).collect();
    batch.iter().map(|e| by_key.get(&e.key).copied()).collect()
}

/// A plain set of a run for [`Eventual::joined`]: its place in the run,
/// its reply and its value, as the rules decided them.
type PlainSet = (usize, Response, rules::NewValue);

/// A rules deadline as a record's: 0 never expires.
fn deadline_ms(deadline: Option<u64>) -> u64 {
    // A deadline of 0 has passed already, and the rules remove such values
    // instead of storing them, so 0 is free to mean "never".
    deadline.unwrap_or(0)
}

fn unexpected(r: Response) -> BackendError {
    match r {
        Response::Error(e) => BackendError::Protocol(format!("{e:?}")),
        other => BackendError::Protocol(format!("unexpected reply {:?}", other.outcome())),
    }
}

impl Pipeline for Eventual {
    fn execute<'a>(
        &'a self,
        _session: &'a mut Session,
        requests: Vec<Request>,
    ) -> BoxFuture<'a, Vec<Response>> {
        Box::pin(async move {
            // Made when needed: a batch that is one run needs none.
            let mut out = Vec::new();
            // Reads and plain sets go to the store together, in one
            // exchange; anything else is carried out on its own.
            let mut run: Vec<Request> = Vec::with_capacity(requests.len());
            let mut sets: Vec<PlainSet> = Vec::new();
            let now = unix_ms();
            for request in requests {
                if matches!(request, Request::Get { .. }) {
                    run.push(request);
                    continue;
                }
                if let Some((reply, v)) = Self::plain_set(&request, now) {
                    sets.push((run.len(), reply, v));
                    run.push(request);
                    continue;
                }
                if !run.is_empty() {
                    let (run, sets) = (std::mem::take(&mut run), std::mem::take(&mut sets));
                    out.extend(self.joined(run, sets, now).await);
                }
                // Boxed: its future is large (2.7 KB), and kept inline
                // it made every batch's future that large, reads too.
                let r = match Box::pin(self.one(request)).await {
                    Ok(r) => r,
                    Err(e) => self.failed(e),
                };
                out.push(r);
            }
            if !run.is_empty() {
                if out.is_empty() {
                    // The usual batch: one run, answered as it is.
                    return self.joined(run, sets, now).await;
                }
                out.extend(self.joined(run, sets, now).await);
            }
            out
        })
    }

    fn store_status(&self) -> StoreStatus {
        StoreStatus::of(&*self.backend)
    }

    /// This node's own store alone.
    fn admin<'a>(&'a self, request: &'a crate::protocol::AdminRequest) -> BoxFuture<'a, Response> {
        super::admin_on(&*self.backend, request)
    }

    /// Ready with the local replica alone: writes are accepted whatever
    /// the peers do. Peers not up are notes, not reasons.
    fn readiness(&self) -> Verdict {
        Verdict {
            reasons: Vec::new(),
            notes: self
                .cluster
                .view()
                .iter()
                .filter(|p| p.liveness != crate::cluster::Liveness::Up)
                .map(|p| {
                    format!(
                        "peer {} is {}; eventual mode serves without it",
                        p.id,
                        p.liveness.as_str()
                    )
                })
                .collect(),
        }
    }

    fn cluster_stats(&self) -> Vec<(String, String)> {
        let head = self.backlog.head();
        let node = vec![
            ("log_head".to_string(), head.to_string()),
            (
                "backlog_entries".to_string(),
                self.backlog.len().to_string(),
            ),
        ];
        self.cluster.stats("eventual", node, |peer| {
            let (applied, repaired, repair_sent) = self.peers.counts(peer);
            let lag = self.peers.lag(peer, head);
            vec![
                ("lag".to_string(), lag.map_or("-".into(), |l| l.to_string())),
                ("applied".to_string(), applied.to_string()),
                ("repaired".to_string(), repaired.to_string()),
                ("repair_sent".to_string(), repair_sent.to_string()),
            ]
        })
    }
}

impl Eventual {
    /// Applies entries received from a peer, as if one at a time in order;
    /// returns how many keys changed (a newer version won). Runs between
    /// flushes go to the store in batches.
    async fn apply(&self, entries: Vec<Entry>) -> Result<usize, String> {
        let mut changed = 0;
        let mut run = Vec::new();
        for e in entries {
            if let Op::Flush { at_ms } = e.op {
                let before = std::mem::take(&mut run);
                changed += self.apply_run(before).await.map_err(|e| e.to_string())?;
                self.apply_flush(e.version, at_ms)
                    .await
                    .map_err(|e| e.to_string())?;
                changed += 1;
            } else {
                run.push(e);
            }
        }
        changed += self.apply_run(run).await.map_err(|e| e.to_string())?;
        Ok(changed)
    }
}

/// The local replica as digests read it: a seam for testing them.
pub(crate) trait Replica: Send + Sync {
    /// The current state of these keys; absent and expired keys are left
    /// out, tombstones are kept.
    fn read<'a>(&'a self, keys: &'a [Bytes]) -> BoxFuture<'a, Result<Vec<Entry>, String>>;
}

impl Replica for Eventual {
    fn read<'a>(&'a self, keys: &'a [Bytes]) -> BoxFuture<'a, Result<Vec<Entry>, String>> {
        Box::pin(async move {
            let response = self
                .call_one(Request::Get {
                    keys: keys.to_vec(),
                    cas: false,
                })
                .await
                .map_err(|e| e.to_string())?;
            let Response::Values(values) = response else {
                return Err(format!("unexpected reply {}", response.outcome()));
            };
            let now = unix_ms();
            Ok(values
                .into_iter()
                .filter_map(|mut v| {
                    let rec = Record::take(std::mem::take(&mut v.data));
                    let op = if rec.tombstone {
                        Op::Delete
                    } else if rec.expired(now) {
                        return None;
                    } else {
                        Op::Put {
                            flags: v.flags,
                            deadline_ms: rec.deadline_ms,
                            data: rec.data,
                        }
                    };
                    Some(Entry {
                        key: v.key,
                        version: rec.version,
                        op,
                    })
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::EmbeddedStore;
    use crate::cluster::ClusterSettings;
    use std::time::Duration;

    fn node() -> (Arc<Eventual>, Arc<dyn Backend>) {
        node_with_peers(vec![])
    }

    /// A node whose peers are named but never dialled (nothing starts
    /// the cluster's links).
    fn node_with_peers(
        peers: Vec<(u32, crate::config::HostPort)>,
    ) -> (Arc<Eventual>, Arc<dyn Backend>) {
        let backend: Arc<dyn Backend> = Arc::new(EmbeddedStore::new(1 << 24));
        let metrics = Arc::new(Metrics::new());
        let settings = ClusterSettings {
            cluster_name: "t".into(),
            secret: "s".into(),
            node_id: 1,
            peers,
            heartbeat_interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(500),
            down_after: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(100),
        };
        let eventual = EventualSettings {
            batch_max: 16,
            linger: Duration::ZERO,
            store_check_interval: Duration::from_millis(100),
            anti_entropy_interval: None,
            tombstone_grace: Duration::from_secs(60),
            heartbeat_interval: Duration::from_millis(100),
        };
        let backlog = Arc::new(Backlog::new(7, 100, 1 << 20));
        let cluster =
            Cluster::new(settings, messages::TAG, &metrics.registry, Box::new(|| 0)).unwrap();
        let e = Eventual::new(backend.clone(), metrics, cluster, backlog, eventual).unwrap();
        (e, backend)
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn set(key: &str, data: &str) -> Request {
        Request::Store {
            op: StoreOp::Set,
            key: b(key),
            flags: 5,
            exptime: 0,
            data: b(data),
            cas_unique: 0,
            noreply: false,
        }
    }

    fn get(key: &str) -> Request {
        Request::Get {
            keys: vec![b(key)],
            cas: false,
        }
    }

    async fn read(e: &Eventual, key: &str) -> Option<String> {
        match e.execute(&mut Session::new(0), vec![get(key)]).await.pop() {
            Some(Response::Values(v)) => v
                .first()
                .map(|v| String::from_utf8_lossy(&v.data).into_owned()),
            other => panic!("{other:?}"),
        }
    }

    fn put(key: &str, data: &str, ts: u64, node: u32) -> Entry {
        Entry {
            key: b(key),
            version: Version { ts, node },
            op: Op::Put {
                flags: 0,
                deadline_ms: 0,
                data: b(data),
            },
        }
    }

    #[tokio::test]
    async fn local_writes_are_stored_with_a_header_and_logged() {
        let (e, backend) = node();
        assert_eq!(
            e.execute(&mut Session::new(0), vec![set("k", "v")]).await,
            vec![Response::Stored]
        );
        assert_eq!(read(&e, "k").await.as_deref(), Some("v"));
        let raw = backend.call(&[get("k")]).await.unwrap();
        let Response::Values(v) = &raw[0] else {
            panic!()
        };
        assert_eq!(v[0].data.len(), record::HEADER_BYTES + 1);
        assert_eq!(e.backlog().head(), 1);
        let logged = e.backlog().read_after(0, 10).unwrap();
        assert!(matches!(&logged[0].1.op, Op::Put { flags: 5, .. }));
    }

    /// Reads and plain sets go to the store in one exchange; what they
    /// answer and log is what they would one at a time.
    #[tokio::test]
    async fn a_batch_of_reads_and_sets_answers_as_one_at_a_time() {
        let (e, _) = node();
        let value = |data: &str| {
            Response::Values(vec![Value {
                key: b("k"),
                flags: 5,
                data: b(data),
                cas: None,
            }])
        };
        let mut expired = set("k", "gone");
        if let Request::Store { exptime, .. } = &mut expired {
            *exptime = -1;
        }
        let batch = vec![
            get("k"),
            set("k", "one"),
            get("k"),
            set("k", "two"),
            set("j", "jay"),
            get("k"),
            expired,
            get("k"),
            set("k", "three"),
            get("k"),
        ];
        assert_eq!(
            e.execute(&mut Session::new(0), batch).await,
            vec![
                Response::Values(vec![]),
                Response::Stored,
                value("one"),
                Response::Stored,
                Response::Stored,
                value("two"),
                Response::Stored,
                Response::Values(vec![]),
                Response::Stored,
                value("three"),
            ]
        );
        // Logged in order, versions rising: three puts, the delete the
        // expired set is, the last put; the newest put wins on a replica.
        let logged = e.backlog().read_after(0, 10).unwrap();
        let kinds: Vec<(String, bool)> = logged
            .iter()
            .map(|(_, en)| {
                let key = String::from_utf8_lossy(&en.key).into_owned();
                (key, matches!(en.op, Op::Put { .. }))
            })
            .collect();
        let want = [
            ("k", true),
            ("k", true),
            ("j", true),
            ("k", false),
            ("k", true),
        ];
        assert_eq!(kinds, want.map(|(k, put)| (k.to_string(), put)).to_vec(),);
        assert!(logged.windows(2).all(|w| w[0].1.version < w[1].1.version));
        let (other, _) = node();
        let entries = logged.into_iter().map(|(_, en)| (*en).clone()).collect();
        other.apply(entries).await.unwrap();
        assert_eq!(read(&other, "k").await.as_deref(), Some("three"));
        assert_eq!(read(&other, "j").await.as_deref(), Some("jay"));
    }

    #[tokio::test]
    async fn acks_of_another_incarnation_of_the_log_are_not_counted() {
        use crate::cluster::Handler;
        use messages::{Cursor, Msg};
        let (e, _) = node_with_peers(vec![(2, "127.0.0.1:1".parse().unwrap())]);
        e.execute(&mut Session::new(0), vec![set("k", "v")]).await;
        let head = e.backlog().head();
        assert_eq!(head, 1);
        let ack = |incarnation| {
            messages::encode(&Msg::Ack {
                cursor: Cursor {
                    incarnation,
                    seq: 1,
                },
            })
        };
        // The backlog of `node()` is incarnation 7.
        e.on_message(2, ack(6)).await.unwrap();
        assert_eq!(e.peers.lag(2, head), None, "an ack of incarnation 6");
        e.on_message(2, ack(7)).await.unwrap();
        assert_eq!(e.peers.lag(2, head), Some(0));
    }

    #[tokio::test]
    async fn last_writer_wins_whatever_the_arrival_order() {
        let (e, _) = node();
        let now = unix_ms() << 16;
        assert_eq!(e.apply(vec![put("k", "new", now + 10, 2)]).await, Ok(1));
        assert_eq!(e.apply(vec![put("k", "old", now + 5, 3)]).await, Ok(0));
        assert_eq!(read(&e, "k").await.as_deref(), Some("new"));
        // Same clock reading: the higher node id wins.
        assert_eq!(e.apply(vec![put("k", "tie", now + 10, 3)]).await, Ok(1));
        assert_eq!(read(&e, "k").await.as_deref(), Some("tie"));
        // A local write after observing them is newer still.
        e.execute(&mut Session::new(0), vec![set("k", "local")])
            .await;
        assert_eq!(e.apply(vec![put("k", "late", now + 10, 9)]).await, Ok(0));
        assert_eq!(read(&e, "k").await.as_deref(), Some("local"));
    }

    #[tokio::test]
    async fn a_batch_applies_as_if_one_entry_at_a_time() {
        let (e, _) = node();
        let now = unix_ms() << 16;
        let del = |key: &str, ts| Entry {
            key: b(key),
            version: Version { ts, node: 2 },
            op: Op::Delete,
        };
        let batch = vec![
            put("a", "a1", now + 1, 2),
            put("a", "a3", now + 3, 2),
            put("a", "a2", now + 2, 3),
            put("b", "b1", now + 1, 2),
            del("b", now + 2),
            put("c", "c1", now + 1, 2),
        ];
        assert_eq!(e.apply(batch).await, Ok(3), "one change per key");
        assert_eq!(read(&e, "a").await.as_deref(), Some("a3"));
        assert_eq!(read(&e, "b").await, None);
        assert_eq!(read(&e, "c").await.as_deref(), Some("c1"));
        // Against what is there: an older entry changes nothing.
        let batch = vec![put("a", "old", now, 9), put("c", "c2", now + 5, 2)];
        assert_eq!(e.apply(batch).await, Ok(1));
        assert_eq!(read(&e, "a").await.as_deref(), Some("a3"));
        assert_eq!(read(&e, "c").await.as_deref(), Some("c2"));
        // More keys than one store exchange holds.
        let many: Vec<Entry> = (0..3 * APPLY_BATCH as u64)
            .map(|i| put(&format!("m{i}"), "v", now + 10 + i, 2))
            .collect();
        assert_eq!(e.apply(many).await, Ok(3 * APPLY_BATCH));
        assert_eq!(read(&e, "m0").await.as_deref(), Some("v"));
    }

    #[tokio::test]
    async fn a_batch_waits_for_a_stripe_held_by_a_write() {
        let (e, _) = node();
        let now = unix_ms() << 16;
        let held = e.stripe(b"k").lock().await;
        let applying = tokio::spawn({
            let e = e.clone();
            async move {
                e.apply(vec![put("j", "v", now + 1, 2), put("k", "v", now + 1, 2)])
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!applying.is_finished(), "the batch took a held stripe");
        assert_eq!(read(&e, "k").await, None);
        drop(held);
        assert_eq!(applying.await.expect("apply task"), Ok(2));
        assert_eq!(read(&e, "k").await.as_deref(), Some("v"));
    }

    #[test]
    fn stored_versions_match_values_to_entries_in_any_order() {
        let value = |key: &str, ts| Value {
            key: b(key),
            flags: 0,
            data: Record {
                tombstone: false,
                version: Version { ts, node: 1 },
                deadline_ms: 0,
                data: b("v"),
            }
            .encode(),
            cas: None,
        };
        let batch = vec![
            put("a", "x", 9, 2),
            put("b", "x", 9, 2),
            put("c", "x", 9, 2),
        ];
        let v = |ts| Some(Version { ts, node: 1 });
        assert_eq!(
            stored_versions(&batch, vec![value("a", 1), value("c", 3)]),
            vec![v(1), None, v(3)]
        );
        assert_eq!(
            stored_versions(&batch, vec![value("c", 3), value("b", 2), value("a", 1)]),
            vec![v(1), v(2), v(3)],
            "values in another order are matched by key"
        );
        assert_eq!(stored_versions(&batch, vec![]), vec![None; 3]);
    }

    #[tokio::test]
    async fn deletes_are_tombstones_that_beat_older_puts() {
        let (e, _) = node();
        e.execute(&mut Session::new(0), vec![set("k", "v")]).await;
        let del = Request::Delete {
            key: b("k"),
            noreply: false,
        };
        assert_eq!(
            e.execute(&mut Session::new(0), vec![del.clone()]).await,
            vec![Response::Deleted]
        );
        assert_eq!(
            e.execute(&mut Session::new(0), vec![del]).await,
            vec![Response::NotFound]
        );
        let old = put("k", "resurrected", 1 << 16, 2);
        assert_eq!(e.apply(vec![old]).await, Ok(0));
        assert_eq!(read(&e, "k").await, None);
        let read_back = e.read(&[b("k")]).await.unwrap();
        assert!(
            matches!(read_back[0].op, Op::Delete),
            "the tombstone travels in resyncs"
        );
    }

    #[tokio::test]
    async fn read_modify_write_commands_compute_locally() {
        let (e, _) = node();
        let store = |op, data: &str| Request::Store {
            op,
            key: b("k"),
            flags: 0,
            exptime: 0,
            data: b(data),
            cas_unique: 0,
            noreply: false,
        };
        let incr = Request::Arith {
            op: crate::protocol::ArithOp::Incr,
            key: b("k"),
            delta: 5,
            noreply: false,
        };
        let out = e
            .execute(
                &mut Session::new(0),
                vec![
                    store(StoreOp::Add, "10"),
                    store(StoreOp::Add, "x"),
                    incr.clone(),
                    store(StoreOp::Append, "0"),
                    store(StoreOp::Prepend, "1"),
                ],
            )
            .await;
        assert_eq!(
            out,
            vec![
                Response::Stored,
                Response::NotStored,
                Response::Number(15),
                Response::Stored,
                Response::Stored
            ]
        );
        assert_eq!(read(&e, "k").await.as_deref(), Some("1150"));
        assert_eq!(
            e.backlog().head(),
            4,
            "every change is logged, refusals are not"
        );
    }

    #[tokio::test]
    async fn replicated_flush_removes_only_older_writes() {
        let (e, _) = node();
        let now = unix_ms() << 16;
        e.apply(vec![
            put("old", "o", now - (1000 << 16), 2),
            put("new", "n", now + (60_000 << 16), 2),
        ])
        .await
        .unwrap();
        let flush = Entry {
            key: Bytes::new(),
            version: Version { ts: now, node: 2 },
            op: Op::Flush { at_ms: 0 },
        };
        e.apply(vec![flush]).await.unwrap();
        assert_eq!(read(&e, "old").await, None);
        assert_eq!(read(&e, "new").await.as_deref(), Some("n"));
        assert_eq!(
            e.apply(vec![put("old", "late", now - 1, 3)]).await,
            Ok(0),
            "older than the flush"
        );
    }

    #[tokio::test]
    async fn values_written_by_others_are_readable() {
        let (e, backend) = node();
        backend.call(&[set("plain", "p")]).await.unwrap();
        assert_eq!(read(&e, "plain").await.as_deref(), Some("p"));
    }

    #[tokio::test]
    async fn gat_with_a_past_exptime_returns_the_value_then_expires_it() {
        let (e, _) = node();
        let gat = |exptime, keys: &[&str], cas| Request::Gat {
            exptime,
            keys: keys.iter().map(|k| b(k)).collect(),
            cas,
        };
        let mut session = Session::new(0);
        e.execute(&mut session, vec![set("k", "v"), set("j", "w")])
            .await;
        // As memcached 1.6.18: `gat -1 k` -> VALUE k ..., then `get k` -> END.
        let got = e
            .execute(&mut session, vec![gat(-1, &["k", "nope"], true)])
            .await;
        let Some(Response::Values(v)) = got.first() else {
            panic!("{got:?}")
        };
        assert_eq!(v.len(), 1);
        assert_eq!(
            (&v[0].key[..], &v[0].data[..], v[0].flags),
            (&b"k"[..], &b"v"[..], 5)
        );
        assert!(v[0].cas.is_some(), "gats returns a CAS");
        assert_eq!(read(&e, "k").await, None);
        // A future exptime keeps it, and the CAS returned is the current one.
        let got = e.execute(&mut session, vec![gat(100, &["j"], true)]).await;
        let Some(Response::Values(v)) = got.first() else {
            panic!("{got:?}")
        };
        let cas = v[0].cas;
        let again = e.execute(&mut session, vec![gat(100, &["j"], true)]).await;
        assert!(matches!(&again[0], Response::Values(w) if w.len() == 1 && w[0].cas != cas));
        assert_eq!(read(&e, "j").await.as_deref(), Some("w"));
        // `gat <exptime>` with no keys: a bare END, as memcached answers.
        assert_eq!(
            e.execute(&mut session, vec![gat(0, &[], false)]).await,
            vec![Response::Values(vec![])]
        );
    }

    #[tokio::test]
    async fn meta_writes_are_logged_like_their_text_twins() {
        use crate::protocol::{Incoming, Limits, Parsed, encode_response, parse_request};
        let (e, _) = node();
        let mut session = Session::new(0);
        let mut run = async |line: &str| {
            let Parsed::Request {
                request: Incoming::Data(r),
                ..
            } = parse_request(line.as_bytes(), &Limits::default())
            else {
                panic!("{line:?}")
            };
            let mut out = bytes::BytesMut::new();
            for resp in e.execute(&mut session, vec![r]).await {
                encode_response(&resp, &mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        assert_eq!(run("ms mk 2 F5 T100 q\r\nab\r\n").await, "");
        assert_eq!(run("mg mk v f t s\r\n").await, "VA 2 f5 t100 s2\r\nab\r\n");
        assert_eq!(run("ms mk 1 ME\r\nx\r\n").await, "NS\r\n");
        assert_eq!(run("ms mk 1 MA\r\nc\r\n").await, "HD\r\n");
        assert_eq!(run("ms mk 1 C1\r\nz\r\n").await, "EX\r\n");
        assert_eq!(run("mg mk v k Oo\r\n").await, "VA 3 kmk Oo\r\nabc\r\n");
        assert_eq!(run("ma mn N0 J5 v\r\n").await, "VA 1\r\n5\r\n");
        assert_eq!(run("ma mn D10 v\r\n").await, "VA 2\r\n15\r\n");
        assert_eq!(run("ma mn q\r\n").await, "");
        assert_eq!(run("md mk q\r\n").await, "");
        assert_eq!(run("md mk\r\n").await, "NF\r\n");
        assert_eq!(run("mg mk v\r\n").await, "EN\r\n");
        assert_eq!(run("mg mk v q\r\n").await, "");
        assert_eq!(read(&e, "mn").await.as_deref(), Some("16"));
        // Every write went to the log: the ms, the append, the vivify, two
        // increments, the delete.
        assert_eq!(e.backlog().head(), 6);
    }
}
