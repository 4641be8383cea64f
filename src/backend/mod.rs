//! Where values live: the [`Backend`] trait and its two implementations, a
//! pool of connections to a real memcached ([`memcached`]) and an in-process
//! store with memcached's semantics ([`embedded`]), the default when a node
//! has no memcached address.
//!
//! May use: `protocol`, `config`.

pub mod embedded;
pub mod memcached;
mod mux;

use crate::protocol::{AdminRequest, Request, Response};

pub use embedded::EmbeddedStore;
pub use memcached::{MemcachedBackend, MemcachedOptions};

pub use crate::BoxFuture;

/// Why a backend could not answer. Every variant means the outcome of the
/// requests in the batch is unknown: some may have been applied.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No connection could be had (connect refused, pool exhausted).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time.
    #[error("backend timed out")]
    Timeout,
    /// The connection broke mid-request.
    #[error("backend connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The backend's reply could not be framed against its request.
    #[error("backend protocol error: {0}")]
    Protocol(String),
}

impl BackendError {
    /// A short, closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Unavailable(_) => "unavailable",
            BackendError::Timeout => "timeout",
            BackendError::Io(_) => "io",
            BackendError::Protocol(_) => "protocol",
        }
    }

    /// The reply a client sees; the one place backend errors meet the wire.
    pub fn to_response(&self) -> Response {
        Response::server_error(match self {
            BackendError::Unavailable(_) => "backend unavailable",
            BackendError::Timeout => "backend timeout",
            BackendError::Io(_) | BackendError::Protocol(_) => "backend error",
        })
    }
}

/// A key with its expiry as the store keeps it (absolute unix seconds;
/// `None` never).
pub type KeyExpiry = (bytes::Bytes, Option<u64>);

/// Pool occupancy, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    pub max_size: usize,
    /// Connections open now (idle and in use).
    pub size: usize,
    /// Idle connections ready for use.
    pub available: usize,
    /// `get`s sent on a line another request's `get` began, since start
    /// (multiplexed, `backend.join_gets`).
    pub joined_gets: u64,
}

/// A store that executes data requests (`get gets gat gats set add replace
/// append prepend cas incr decr delete touch flush_all`).
pub trait Backend: Send + Sync + 'static {
    /// Runs `requests` in order, as one client would see them on one
    /// connection, and returns one response per request. An `Err` leaves the
    /// outcome of every request in the batch unknown.
    ///
    /// A too-large store (answered by the pipeline, never by a store) is
    /// answered `ERROR`.
    fn call<'a>(
        &'a self,
        requests: &'a [Request],
    ) -> BoxFuture<'a, Result<Vec<Response>, BackendError>>;

    /// Answers an administrative request about the store itself (`stats
    /// items|slabs|sizes|cachedump`, `cache_memlimit`, `slabs automove`)
    /// as memcached 1.6.18 would, for this store: a memcached relays its
    /// own answer, the embedded store answers from its own figures.
    fn admin<'a>(
        &'a self,
        request: &'a AdminRequest,
    ) -> BoxFuture<'a, Result<Response, BackendError>>;

    /// A short name for logs and `stats`: `embedded` or `memcached`.
    fn kind(&self) -> &'static str;

    /// Pool occupancy, where the backend has a pool.
    fn pool_status(&self) -> Option<PoolStatus> {
        None
    }

    /// Extra `stats` lines describing the store (items, bytes, evictions).
    fn stats(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Every key the store holds now (for a full resync between replicas).
    fn keys(&self) -> BoxFuture<'_, Result<Vec<bytes::Bytes>, BackendError>>;

    /// Every key the store holds now with its expiry as the store keeps it
    /// (absolute unix seconds; `None` never), for adopting values that
    /// something other than memdial wrote. A store that only memdial
    /// writes answers its keys with `None`.
    fn keys_with_expiry(&self) -> BoxFuture<'_, Result<Vec<KeyExpiry>, BackendError>> {
        Box::pin(async move {
            let keys = self.keys().await?;
            Ok(keys.into_iter().map(|k| (k, None)).collect())
        })
    }

    /// Names this store's lifetime: it changes when the store restarts (and
    /// so lost its data).
    fn instance(&self) -> BoxFuture<'_, Result<String, BackendError>>;

    /// Makes sure the store never evicts a value to make room: a full
    /// store refuses the write instead (`SERVER_ERROR out of memory`). The
    /// ordered modes need it, since an eviction on one replica would make
    /// it differ from the others. An error says why it cannot be made so.
    fn never_evict(&self) -> BoxFuture<'_, Result<(), BackendError>>;
}
