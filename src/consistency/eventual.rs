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

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::{Bytes, BytesMut};

use super::Pipeline;
use super::hlc::{Hlc, unix_ms};
use super::record::Record;
use crate::BoxFuture;
use crate::backend::{Backend, BackendError};
use crate::cluster::{Backlog, Cluster, Entry, Op, Replica, Version};
use crate::metrics::Metrics;
use crate::protocol::{
    ClientError, ErrorReply, Exptime, REALTIME_MAXDELTA, Request, Response, StoreOp, Value,
};
use crate::rules::apply_delta;

const STRIPES: usize = 1024;

pub struct Eventual {
    me: Weak<Eventual>,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    cluster: Arc<Cluster>,
    hlc: Hlc,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    /// Writes at or below this version were flushed.
    flushed: Mutex<Version>,
    tombstone_grace_ms: u64,
}

/// A key's current state in the local store.
struct Current {
    record: Record,
    flags: u32,
    cas: Option<u64>,
}

impl Eventual {
    pub fn new(
        backend: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
        cluster: Arc<Cluster>,
        tombstone_grace_ms: u64,
    ) -> Arc<Eventual> {
        Arc::new_cyclic(|me| Eventual {
            me: me.clone(),
            hlc: Hlc::new(cluster.node_id()),
            backend,
            metrics,
            cluster,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
            flushed: Mutex::new(Version::default()),
            tombstone_grace_ms,
        })
    }

    fn backlog(&self) -> &Backlog {
        self.cluster.backlog()
    }

    fn stripe(&self, key: &[u8]) -> &tokio::sync::Mutex<()> {
        &self.stripes[(self.hasher.hash_one(key) as usize) % STRIPES]
    }

    fn flushed(&self) -> Version {
        *self.flushed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A client's exptime as an absolute deadline (0 never expires).
    fn deadline(exptime: Exptime, now_ms: u64) -> u64 {
        match exptime {
            0 => 0,
            e if e < 0 => 1,
            e if e <= REALTIME_MAXDELTA => now_ms + e as u64 * 1000,
            e => (e as u64).saturating_mul(1000),
        }
    }

    /// The exptime to give the store for a deadline: absolute seconds,
    /// rounded up so the store never drops a value memdial still shows.
    fn store_exptime(deadline_ms: u64) -> Exptime {
        if deadline_ms == 0 {
            0
        } else {
            (deadline_ms.div_ceil(1000) + 1) as Exptime
        }
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
                record: Record::decode(&v.data),
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
                exptime: Self::store_exptime(deadline_ms),
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
        // Derived from the delete's version, not this node's clock, so every
        // replica keeps the tombstone until the same moment and catch-up
        // never extends it.
        let deadline_ms = (version.ts >> 16) + self.tombstone_grace_ms;
        let record = Record {
            tombstone: true,
            version,
            deadline_ms,
            data: Bytes::new(),
        };
        self.call_one(Request::Store {
            op: StoreOp::Set,
            key: key.clone(),
            flags: 0,
            exptime: Self::store_exptime(deadline_ms),
            data: record.encode(),
            cas_unique: 0,
            noreply: false,
        })
        .await
        .map(drop)
    }

    /// A run of `get`/`gets`, sent to the store as one batch.
    async fn gets(&self, run: &[Request]) -> Vec<Response> {
        match self.call(run).await {
            Ok(responses) => {
                let now = unix_ms();
                let flushed = self.flushed();
                responses
                    .into_iter()
                    .map(|r| match r {
                        Response::Values(values) => Response::Values(
                            values
                                .into_iter()
                                .filter_map(|v| {
                                    let rec = Record::decode(&v.data);
                                    (rec.live(now) && rec.version >= flushed).then_some(Value {
                                        data: rec.data,
                                        ..v
                                    })
                                })
                                .collect(),
                        ),
                        other => other,
                    })
                    .collect()
            }
            Err(e) => vec![self.failed(e); run.len()],
        }
    }

    fn failed(&self, e: BackendError) -> Response {
        tracing::warn!(error = %e, "backend call failed");
        self.metrics
            .backend_errors
            .with_label_values(&[e.kind()])
            .inc();
        e.to_response()
    }

    async fn one(&self, request: Request) -> Result<Response, BackendError> {
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
                let deadline = Self::deadline(exptime, unix_ms());
                match op {
                    StoreOp::Set => self.put(&key, flags, deadline, data, None).await,
                    StoreOp::Add | StoreOp::Replace => {
                        let exists = self.live(&key, false).await?.is_some();
                        if exists == (op == StoreOp::Add) {
                            return Ok(Response::NotStored);
                        }
                        self.put(&key, flags, deadline, data, None).await
                    }
                    StoreOp::Append | StoreOp::Prepend => {
                        let Some(cur) = self.live(&key, false).await? else {
                            return Ok(Response::NotStored);
                        };
                        let mut joined =
                            BytesMut::with_capacity(cur.record.data.len() + data.len());
                        let (first, second) = if op == StoreOp::Append {
                            (&cur.record.data, &data)
                        } else {
                            (&data, &cur.record.data)
                        };
                        joined.extend_from_slice(first);
                        joined.extend_from_slice(second);
                        self.put(
                            &key,
                            cur.flags,
                            cur.record.deadline_ms,
                            joined.freeze(),
                            None,
                        )
                        .await
                    }
                    StoreOp::Cas => {
                        let Some(cur) = self.live(&key, true).await? else {
                            return Ok(Response::NotFound);
                        };
                        if cur.cas != Some(cas_unique) {
                            return Ok(Response::Exists);
                        }
                        self.put(&key, flags, deadline, data, Some(cas_unique))
                            .await
                    }
                }
            }
            Request::TooLarge { op, key, .. } => {
                if op == StoreOp::Set {
                    let _g = self.stripe(&key).lock().await;
                    if self.live(&key, false).await?.is_some() {
                        self.tombstone(&key).await?;
                    }
                }
                Ok(ClientError::TooLarge.into())
            }
            Request::Arith { op, key, delta, .. } => {
                let _g = self.stripe(&key).lock().await;
                let Some(cur) = self.live(&key, false).await? else {
                    return Ok(Response::NotFound);
                };
                let Some((n, data)) = apply_delta(&cur.record.data, op, delta) else {
                    return Ok(ClientError::NonNumeric.into());
                };
                match self
                    .put(&key, cur.flags, cur.record.deadline_ms, data, None)
                    .await?
                {
                    Response::Stored => Ok(Response::Number(n)),
                    other => Ok(other),
                }
            }
            Request::Delete { key, .. } => {
                let _g = self.stripe(&key).lock().await;
                if self.live(&key, false).await?.is_none() {
                    return Ok(Response::NotFound);
                }
                self.tombstone(&key).await?;
                Ok(Response::Deleted)
            }
            Request::Touch { key, exptime, .. } => {
                let _g = self.stripe(&key).lock().await;
                let Some(cur) = self.live(&key, false).await? else {
                    return Ok(Response::NotFound);
                };
                let deadline = Self::deadline(exptime, unix_ms());
                match self
                    .put(&key, cur.flags, deadline, cur.record.data, None)
                    .await?
                {
                    Response::Stored => Ok(Response::Touched),
                    other => Ok(other),
                }
            }
            Request::Gat { exptime, keys, cas } => {
                let deadline = Self::deadline(exptime, unix_ms());
                for key in &keys {
                    let _g = self.stripe(key).lock().await;
                    if let Some(cur) = self.live(key, false).await? {
                        self.put(key, cur.flags, deadline, cur.record.data, None)
                            .await?;
                    }
                }
                let mut r = self.gets(&[Request::Get { keys, cas }]).await;
                Ok(r.pop()
                    .unwrap_or_else(|| Response::server_error("no reply")))
            }
            Request::FlushAll { delay, .. } => self.flush_all(delay).await,
            Request::Get { .. } => {
                let mut r = self.gets(std::slice::from_ref(&request)).await;
                Ok(r.pop()
                    .unwrap_or_else(|| Response::server_error("no reply")))
            }
            Request::Version
            | Request::Verbosity { .. }
            | Request::Stats { .. }
            | Request::Quit => Ok(Response::Error(ErrorReply::Error)),
        }
    }

    /// `flush_all [delay]`: every write older than the flush moment goes, on
    /// every replica. The flush's version is that moment, so a replica
    /// applies it by removing what is older and refusing older writes that
    /// arrive late.
    async fn flush_all(&self, delay: Option<Exptime>) -> Result<Response, BackendError> {
        let now = unix_ms();
        let at_ms = match delay {
            None => now,
            Some(d) if d <= 0 => now,
            Some(d) => Self::deadline(d, now),
        };
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
        let keys = self.backend.keys().await?;
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

    /// Applies one replicated entry; true when it changed this replica.
    async fn apply_one(&self, entry: Entry) -> Result<bool, BackendError> {
        self.hlc.observe(entry.version.ts);
        let Entry { key, version, op } = entry;
        let deadline_ms = match op {
            Op::Flush { at_ms } => {
                if at_ms <= unix_ms() {
                    self.remove_older_than(version).await?;
                } else {
                    self.schedule_flush(version, at_ms);
                }
                return Ok(true);
            }
            Op::Put { deadline_ms, .. } => deadline_ms,
            Op::Delete => 0,
        };
        if version <= self.flushed() {
            return Ok(false);
        }
        let _g = self.stripe(&key).lock().await;
        let newer_here = self
            .current(&key, false)
            .await?
            .is_some_and(|c| c.record.version >= version);
        if newer_here {
            return Ok(false);
        }
        match op {
            Op::Put { flags, data, .. } if deadline_ms == 0 || deadline_ms > unix_ms() => {
                let record = Record {
                    tombstone: false,
                    version,
                    deadline_ms,
                    data,
                };
                self.call_one(Request::Store {
                    op: StoreOp::Set,
                    key,
                    flags,
                    exptime: Self::store_exptime(deadline_ms),
                    data: record.encode(),
                    cas_unique: 0,
                    noreply: false,
                })
                .await?;
            }
            // A delete, or a value that has expired in transit: either way
            // the key holds nothing newer than `version`.
            _ => self.write_tombstone(&key, version).await?,
        }
        Ok(true)
    }
}

fn unexpected(r: Response) -> BackendError {
    match r {
        Response::Error(e) => BackendError::Protocol(format!("{e:?}")),
        other => BackendError::Protocol(format!("unexpected reply {:?}", other.outcome())),
    }
}

impl Pipeline for Eventual {
    fn execute<'a>(&'a self, requests: Vec<Request>) -> BoxFuture<'a, Vec<Response>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(requests.len());
            let mut pending_gets: Vec<Request> = Vec::new();
            for request in requests {
                if matches!(request, Request::Get { .. }) {
                    pending_gets.push(request);
                    continue;
                }
                if !pending_gets.is_empty() {
                    out.extend(self.gets(&std::mem::take(&mut pending_gets)).await);
                }
                let r = match self.one(request).await {
                    Ok(r) => r,
                    Err(e) => self.failed(e),
                };
                out.push(r);
            }
            if !pending_gets.is_empty() {
                out.extend(self.gets(&pending_gets).await);
            }
            out
        })
    }

    fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    fn cluster_stats(&self) -> Vec<(String, String)> {
        self.cluster.stats("eventual")
    }
}

impl Replica for Eventual {
    fn apply<'a>(&'a self, entries: Vec<Entry>) -> BoxFuture<'a, Result<usize, String>> {
        Box::pin(async move {
            let mut changed = 0;
            for e in entries {
                if self.apply_one(e).await.map_err(|e| e.to_string())? {
                    changed += 1;
                }
            }
            Ok(changed)
        })
    }

    fn keys(&self) -> BoxFuture<'_, Result<Vec<Bytes>, String>> {
        Box::pin(async move { self.backend.keys().await.map_err(|e| e.to_string()) })
    }

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
                .filter_map(|v| {
                    let rec = Record::decode(&v.data);
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

    fn store_instance(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move { self.backend.instance().await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::EmbeddedStore;
    use crate::cluster::ClusterSettings;
    use std::time::Duration;

    fn node() -> (Arc<Eventual>, Arc<dyn Backend>) {
        let backend: Arc<dyn Backend> = Arc::new(EmbeddedStore::new(1 << 24));
        let metrics = Arc::new(Metrics::new());
        let settings = ClusterSettings {
            cluster_name: "t".into(),
            secret: "s".into(),
            node_id: 1,
            peers: vec![],
            heartbeat_interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(500),
            down_after: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(100),
            batch_max: 16,
            store_check_interval: Duration::from_millis(100),
            anti_entropy_interval: None,
            tombstone_grace: Duration::from_secs(60),
        };
        let backlog = Arc::new(Backlog::new(7, 100, 1 << 20));
        let cluster = Cluster::new(settings, backlog, &metrics.registry, Box::new(|| 0)).unwrap();
        (
            Eventual::new(backend.clone(), metrics, cluster, 60_000),
            backend,
        )
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
        match e.execute(vec![get(key)]).await.pop() {
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
        assert_eq!(e.execute(vec![set("k", "v")]).await, vec![Response::Stored]);
        assert_eq!(read(&e, "k").await.as_deref(), Some("v"));
        let raw = backend.call(&[get("k")]).await.unwrap();
        let Response::Values(v) = &raw[0] else {
            panic!()
        };
        assert_eq!(v[0].data.len(), super::super::record::HEADER_BYTES + 1);
        assert_eq!(e.backlog().head(), 1);
        let logged = e.backlog().read_after(0, 10).unwrap();
        assert!(matches!(&logged[0].1.op, Op::Put { flags: 5, .. }));
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
        e.execute(vec![set("k", "local")]).await;
        assert_eq!(e.apply(vec![put("k", "late", now + 10, 9)]).await, Ok(0));
        assert_eq!(read(&e, "k").await.as_deref(), Some("local"));
    }

    #[tokio::test]
    async fn deletes_are_tombstones_that_beat_older_puts() {
        let (e, _) = node();
        e.execute(vec![set("k", "v")]).await;
        let del = Request::Delete {
            key: b("k"),
            noreply: false,
        };
        assert_eq!(e.execute(vec![del.clone()]).await, vec![Response::Deleted]);
        assert_eq!(e.execute(vec![del]).await, vec![Response::NotFound]);
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
            .execute(vec![
                store(StoreOp::Add, "10"),
                store(StoreOp::Add, "x"),
                incr.clone(),
                store(StoreOp::Append, "0"),
                store(StoreOp::Prepend, "1"),
            ])
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
}
