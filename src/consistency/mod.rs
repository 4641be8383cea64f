//! The consistency pipeline: every data request passes through a
//! [`Pipeline`] between the parser and the backend. This is the seam where
//! the cluster modes plug in (`eventual`, and the Raft-backed `sequential`
//! and `linearizable` in `raft`); [`Local`] is the single-node path.
//!
//! May use: `protocol`, `backend`, `cluster`, `config`, `metrics`. Never `server`.

pub mod eventual;
pub mod raft;

use std::sync::Arc;

use crate::BoxFuture;
use crate::backend::{Backend, PoolStatus};
use crate::metrics::{Metrics, Verdict};
use crate::protocol::{AdminRequest, ClientError, Exptime, Request, Response, StoreOp};

/// What the pipeline keeps for one client connection, across its batches.
/// A mode with per-client guarantees keeps them here (sequential mode: the
/// newest log position the client has written or read).
#[derive(Debug)]
pub struct Session {
    conn_id: u64,
    /// The newest log index this client has written or read (sequential
    /// mode); its reads wait until the local replica has applied it.
    seen: u64,
}

impl Session {
    pub fn new(conn_id: u64) -> Session {
        Session { conn_id, seen: 0 }
    }

    /// The connection's id, as in its log span.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The newest log index the client has seen.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The client has seen the state as of log index `index`.
    pub fn saw(&mut self, index: u64) {
        self.seen = self.seen.max(index);
    }
}

/// The exptime to give a store for a replicated deadline (unix ms; 0
/// never): absolute seconds, rounded up and one more, so the store never
/// drops a value memdial still shows.
pub fn store_exptime(deadline_ms: u64) -> Exptime {
    if deadline_ms == 0 {
        0
    } else {
        (deadline_ms.div_ceil(1000) + 1) as Exptime
    }
}

/// The node's store as `stats` shows it.
#[derive(Debug, Clone, Default)]
pub struct StoreStatus {
    /// `embedded` or `memcached`.
    pub kind: &'static str,
    /// The store's own `stats` lines (items, bytes, evictions).
    pub stats: Vec<(String, String)>,
    /// Pool occupancy, where the store is reached through a pool.
    pub pool: Option<PoolStatus>,
}

impl StoreStatus {
    pub fn of(backend: &dyn Backend) -> StoreStatus {
        StoreStatus {
            kind: backend.kind(),
            stats: backend.stats(),
            pool: backend.pool_status(),
        }
    }
}

/// Executes the data requests of client connections: the one seam between
/// the server and the stores. A new consistency mode implements this trait
/// and is chosen in `node.rs`.
pub trait Pipeline: Send + Sync + 'static {
    /// Runs `requests`, read from the connection of `session`, in order and
    /// returns one response per request. Failures become `SERVER_ERROR`
    /// responses in their slots; the batch always gets an answer.
    fn execute<'a>(
        &'a self,
        session: &'a mut Session,
        requests: Vec<Request>,
    ) -> BoxFuture<'a, Vec<Response>>;

    /// The local store, for `stats`.
    fn store_status(&self) -> StoreStatus;

    /// Runs an administrative request on this node's own store (see
    /// [`AdminRequest`]): never replicated, in every mode.
    fn admin<'a>(&'a self, request: &'a AdminRequest) -> BoxFuture<'a, Response>;

    /// `stats cluster` lines; empty for a single node.
    fn cluster_stats(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The mode's own condition for taking client traffic (a quorum, for
    /// an ordered mode): reasons it cannot, and notes that do not stop it.
    /// The node adds the backend and listener conditions itself. Ready
    /// with no notes unless a mode says otherwise.
    fn readiness(&self) -> Verdict {
        Verdict::default()
    }
}

/// The single-node path: requests go straight to the local backend.
pub struct Local {
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
}

impl Local {
    pub fn new(backend: Arc<dyn Backend>, metrics: Arc<Metrics>) -> Local {
        Local { backend, metrics }
    }
}

impl Pipeline for Local {
    fn execute<'a>(
        &'a self,
        _session: &'a mut Session,
        requests: Vec<Request>,
    ) -> BoxFuture<'a, Vec<Response>> {
        Box::pin(async move {
            let (requests, too_large) = stand_in_for_too_large(requests);
            let mut responses = match self.backend.call(&requests).await {
                Ok(responses) if responses.len() == requests.len() => responses,
                Ok(responses) => {
                    tracing::error!(
                        sent = requests.len(),
                        got = responses.len(),
                        "backend answered a batch short"
                    );
                    self.metrics
                        .backend_errors
                        .with_label_values(&["protocol"])
                        .inc();
                    vec![Response::server_error("backend error"); requests.len()]
                }
                Err(e) => {
                    // The backend logs its outages, once each.
                    tracing::debug!(error = %e, batch = requests.len(), "backend call failed");
                    self.metrics
                        .backend_errors
                        .with_label_values(&[e.kind()])
                        .inc();
                    vec![e.to_response(); requests.len()]
                }
            };
            for i in too_large {
                responses[i] = ClientError::TooLarge.into();
            }
            responses
        })
    }

    fn store_status(&self) -> StoreStatus {
        StoreStatus::of(&*self.backend)
    }

    fn admin<'a>(&'a self, request: &'a AdminRequest) -> BoxFuture<'a, Response> {
        admin_on(&*self.backend, request)
    }
}

/// Runs `request` on `backend`; a failure is answered as a data request's
/// would be.
pub fn admin_on<'a>(
    backend: &'a dyn Backend,
    request: &'a AdminRequest,
) -> BoxFuture<'a, Response> {
    Box::pin(async move {
        backend.admin(request).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, command = request.command().as_str(), "admin request failed");
            e.to_response()
        })
    })
}

/// A `set` whose value was too large removes the key (memcached does, so
/// stale data does not outlive a failed overwrite): it is sent as a
/// `delete`. Returns the requests to send and the slots whose client answer
/// is `SERVER_ERROR object too large for cache` whatever the backend says.
fn stand_in_for_too_large(requests: Vec<Request>) -> (Vec<Request>, Vec<usize>) {
    let mut too_large = Vec::new();
    let sent = requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Request::TooLarge {
                op: StoreOp::Set,
                key,
                noreply,
            } => {
                too_large.push(i);
                Request::Delete { key, noreply }
            }
            r @ Request::TooLarge { .. } => {
                too_large.push(i);
                r
            }
            other => other,
        })
        .collect();
    (sent, too_large)
}
