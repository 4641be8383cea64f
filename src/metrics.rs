//! Prometheus metrics for one node, the node's readiness, and the admin
//! HTTP endpoint that serves them (`/metrics`, `/health`, `/ready`). A leaf
//! module.
//!
//! What each latency histogram measures:
//!
//! - `memdial_request_duration_seconds{command}`: one request that was
//!   alone in its batch (the client sent nothing more before it), from
//!   handing it to the consistency pipeline until its response is ready:
//!   memdial plus backend time, excluding reading the request and writing
//!   the reply. A get of more than 64 keys is fetched in parts and written
//!   part by part, so its time includes writing all but the last part.
//! - `memdial_batch_duration_seconds`: a pipelined batch of two or more
//!   requests, once per batch, over the same span. The pipeline runs a
//!   batch as a whole, so the time of each request in it is not known and
//!   is not guessed.
//!
//! Buckets reach at least 10 s, and past the slowest a request can be by
//! the configured timeouts (see [`Metrics::with_slowest`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// Every metric a node exports, registered once in its own registry.
pub struct Metrics {
    pub registry: Registry,
    pub started: Instant,
    /// Requests by command and outcome (`hit`, `miss`, `stored`, …).
    pub requests: IntCounterVec,
    /// Latency of requests alone in their batch, by command; see the
    /// module doc.
    pub latency: HistogramVec,
    /// Latency of batches of two or more requests; see the module doc.
    pub batch_latency: Histogram,
    /// Keys looked up by the get family, by `hit` / `miss`.
    pub get_keys: IntCounterVec,
    /// What memcached counts under another command's counters, by that
    /// counter: `ma` as `incr_hits`, `incr_misses`, `decr_hits`,
    /// `decr_misses`; an `mg` with `T` that hits, and each key of
    /// `gat`/`gats`, as `touch_hits` or `touch_misses` (and not as a get).
    pub counted_as: IntCounterVec,
    /// Requests refused by the parser, by error line kind.
    pub client_errors: IntCounterVec,
    /// Open client connections, exported as `memdial_connections_open`.
    pub connections_current: IntGauge,
    pub connections_total: IntCounter,
    pub connections_rejected: IntCounter,
    pub bytes_read: IntCounter,
    pub bytes_written: IntCounter,
    /// Backend failures by kind (`unavailable`, `timeout`, `io`, `protocol`).
    pub backend_errors: IntCounterVec,
    /// Backend pool occupancy (`max`, `open`, `idle`), read at scrape time.
    pub backend_pool: IntGaugeVec,
    /// Requests whose `get` joined another's line, read at scrape time.
    pub backend_joined_gets: IntCounter,
    /// 1 when the node is ready, as of the last time anyone asked.
    pub ready: IntGauge,
    /// What makes the node ready or not; see [`Readiness`].
    pub readiness: Readiness,
}

/// Latency bucket bounds, in seconds: 25 µs to 10 s, then `slowest`
/// rounded up to a whole second when it is beyond 10 s.
pub fn latency_buckets(slowest: Duration) -> Vec<f64> {
    let mut b = vec![
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let top = slowest.as_secs_f64().ceil();
    if top > 10.0 {
        b.push(top);
    }
    b
}

impl Metrics {
    /// Metrics whose latency buckets stop at 10 s.
    pub fn new() -> Metrics {
        Self::with_slowest(Duration::ZERO)
    }

    /// Metrics whose latency buckets also cover `slowest`, the longest a
    /// request can take by the configured timeouts.
    pub fn with_slowest(slowest: Duration) -> Metrics {
        let registry = Registry::new_custom(Some("memdial".into()), None)
            .expect("static registry prefix is valid");
        Self::register(registry, latency_buckets(slowest))
            .expect("metric names are unique and valid")
    }

    fn register(registry: Registry, buckets: Vec<f64>) -> prometheus::Result<Metrics> {
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let r = &registry;
        Ok(Metrics {
            started: Instant::now(),
            requests: reg(
                r,
                counter_vec(
                    "requests_total",
                    "Client requests by command and outcome",
                    &["command", "outcome"],
                )?,
            )?,
            latency: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "request_duration_seconds",
                        "Requests alone in their batch: from dispatch to the consistency \
                         pipeline until the response is ready",
                    )
                    .buckets(buckets.clone()),
                    &["command"],
                )?,
            )?,
            batch_latency: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "batch_duration_seconds",
                        "Pipelined batches of two or more requests, once per batch: from \
                         dispatch to the consistency pipeline until every response is ready",
                    )
                    .buckets(buckets),
                )?,
            )?,
            get_keys: reg(
                r,
                counter_vec(
                    "get_keys_total",
                    "Keys looked up by get/gets/gat/gats",
                    &["result"],
                )?,
            )?,
            counted_as: reg(
                r,
                counter_vec(
                    "counted_as_total",
                    "Requests memcached counts under another command's counters (ma as \
                     incr/decr hits and misses; gat keys, and mg with T that hits, as touches)",
                    &["counter"],
                )?,
            )?,
            client_errors: reg(
                r,
                counter_vec(
                    "client_errors_total",
                    "Requests refused as malformed",
                    &["reply"],
                )?,
            )?,
            connections_current: reg(
                r,
                IntGauge::new("connections_open", "Open client connections")?,
            )?,
            connections_total: reg(
                r,
                counter("connections_total", "Client connections accepted")?,
            )?,
            connections_rejected: reg(
                r,
                counter(
                    "connections_rejected_total",
                    "Client connections refused at the connection limit",
                )?,
            )?,
            bytes_read: reg(
                r,
                counter("client_received_bytes_total", "Bytes read from clients")?,
            )?,
            bytes_written: reg(
                r,
                counter("client_sent_bytes_total", "Bytes written to clients")?,
            )?,
            backend_errors: reg(
                r,
                counter_vec(
                    "backend_errors_total",
                    "Backend failures by kind",
                    &["kind"],
                )?,
            )?,
            backend_joined_gets: reg(
                r,
                counter(
                    "backend_joined_gets_total",
                    "gets sent to memcached on a line another request's get began",
                )?,
            )?,
            backend_pool: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "backend_pool_connections",
                        "Backend connections by state (a multiplexed one is idle while open)",
                    ),
                    &["state"],
                )?,
            )?,
            ready: reg(
                r,
                IntGauge::new(
                    "ready",
                    "1 if the node is ready (what /ready answers 200 to)",
                )?,
            )?,
            readiness: Readiness::default(),
            registry,
        })
    }

    /// Whether the node is ready now, and why not; keeps `memdial_ready`
    /// in step.
    pub fn verdict(&self) -> Verdict {
        let v = self.readiness.verdict();
        self.ready.set(i64::from(v.is_ready()));
        v
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Registers `m` in `r` and hands it back, for building metric structs.
pub fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: T,
) -> prometheus::Result<T> {
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Whether a node is ready to take client traffic: the reasons it is not
/// (none when ready), and notes that do not make it unready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// One line per failing condition, naming the part (`backend: …`).
    pub reasons: Vec<String>,
    /// Worth knowing, not a reason (a peer down in eventual mode).
    pub notes: Vec<String>,
}

impl Verdict {
    pub fn is_ready(&self) -> bool {
        self.reasons.is_empty()
    }

    /// The body `/ready` answers: `ready` and the notes, or one line per
    /// reason.
    pub fn body(&self) -> String {
        let lines: Vec<String> = if self.is_ready() {
            std::iter::once("ready".to_string())
                .chain(self.notes.iter().map(|n| format!("note: {n}")))
                .collect()
        } else {
            self.reasons.clone()
        };
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

type Source = Box<dyn Fn() -> Verdict + Send + Sync>;

/// The conditions of a node's readiness, from the parts that own them:
/// a part either sets its condition when it changes ([`Readiness::set`]:
/// the backend probe, the listener) or hands a function read on every
/// question ([`Readiness::add_source`]: the consistency mode, the
/// connection limit). `/ready`, `stats` and `stats cluster` all ask
/// [`Metrics::verdict`].
#[derive(Default)]
pub struct Readiness {
    failing: Mutex<BTreeMap<&'static str, String>>,
    sources: Mutex<Vec<Source>>,
}

impl Readiness {
    /// Sets condition `check`: `Err(reason)` makes the node unready until
    /// the same check is set `Ok`.
    pub fn set(&self, check: &'static str, state: Result<(), String>) {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        match state {
            Ok(()) => failing.remove(check),
            Err(reason) => failing.insert(check, reason),
        };
    }

    /// Adds conditions read each time readiness is asked. `source` must
    /// not hold what holds these metrics (use a `Weak`).
    pub fn add_source(&self, source: impl Fn() -> Verdict + Send + Sync + 'static) {
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(source));
    }

    fn verdict(&self) -> Verdict {
        let mut v = Verdict {
            reasons: self
                .failing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(check, reason)| format!("{check}: {reason}"))
                .collect(),
            notes: Vec::new(),
        };
        for source in self
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let more = source();
            v.reasons.extend(more.reasons);
            v.notes.extend(more.notes);
        }
        v
    }
}

/// The series of a counter vector with their values, read without
/// creating any (`with_label_values(..).get()` would create a zero series
/// for every combination asked about).
pub struct Counts(Vec<(Vec<(String, String)>, u64)>);

impl Counts {
    pub fn of(vec: &IntCounterVec) -> Counts {
        Counts(
            vec.collect()
                .iter()
                .flat_map(|f| f.get_metric())
                .map(|m| {
                    let labels = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name().to_string(), l.value().to_string()))
                        .collect();
                    (labels, m.get_counter().get_value() as u64)
                })
                .collect(),
        )
    }

    /// The sum over the series that have every one of `labels`.
    pub fn get(&self, labels: &[(&str, &str)]) -> u64 {
        self.0
            .iter()
            .filter(|(have, _)| {
                labels
                    .iter()
                    .all(|(n, v)| have.iter().any(|(hn, hv)| hn == n && hv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The sum of every series.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, v)| v).sum()
    }
}

/// Serves `/metrics`, `/health` (liveness: the process answers) and
/// `/ready` (readiness: 200 `ready`, or 503 with one line per reason) on
/// `addr` until `shutdown`. `refresh` runs before each scrape to update gauges that are read, not
/// pushed.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::{Router, http::StatusCode, http::header, routing::get};
    let ready = {
        let metrics = metrics.clone();
        move || {
            let metrics = metrics.clone();
            async move {
                let v = metrics.verdict();
                let status = if v.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, v.body())
            }
        }
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                let refresh = refresh.clone();
                async move {
                    refresh();
                    metrics.verdict();
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        let m = Metrics::new();
        m.requests.with_label_values(&["get", "hit"]).inc();
        m.latency.with_label_values(&["get"]).observe(0.001);
        m.get_keys.with_label_values(&["hit"]).inc();
        m.client_errors.with_label_values(&["error"]).inc();
        m.backend_errors.with_label_values(&["timeout"]).inc();
        m.backend_pool.with_label_values(&["idle"]).set(1);
        let names: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("memdial_")), "{names:?}");
        // A text parser folds a counter `x_total` into family `x`: no
        // other family may be named `x`.
        for n in &names {
            if let Some(base) = n.strip_suffix("_total") {
                assert!(!names.iter().any(|o| o == base), "{n} collides with {base}");
            }
        }
        let text = m.render();
        assert!(
            text.contains("memdial_requests_total{command=\"get\",outcome=\"hit\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn buckets_cover_the_slowest_request() {
        let b = latency_buckets(Duration::ZERO);
        assert_eq!(b.last(), Some(&10.0));
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        assert_eq!(
            latency_buckets(Duration::from_millis(8000)).last(),
            Some(&10.0)
        );
        assert_eq!(
            latency_buckets(Duration::from_millis(12_300)).last(),
            Some(&13.0)
        );
        let m = Metrics::with_slowest(Duration::from_secs(30));
        m.latency.with_label_values(&["get"]).observe(20.0);
        let text = m.render();
        assert!(
            text.contains("memdial_request_duration_seconds_bucket{command=\"get\",le=\"30\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn readiness_combines_set_checks_and_sources() {
        let m = Metrics::new();
        assert!(m.verdict().is_ready());
        assert_eq!(m.ready.get(), 1);
        m.readiness.set("backend", Err("unreachable".into()));
        m.readiness.add_source(|| Verdict {
            reasons: vec![],
            notes: vec!["peer 2 is down".into()],
        });
        let v = m.verdict();
        assert_eq!(v.reasons, ["backend: unreachable"]);
        assert_eq!(v.body(), "backend: unreachable\n");
        assert_eq!(m.ready.get(), 0);
        m.readiness.set("backend", Ok(()));
        let v = m.verdict();
        assert!(v.is_ready());
        assert_eq!(v.body(), "ready\nnote: peer 2 is down\n");
        assert_eq!(m.ready.get(), 1);
    }

    #[test]
    fn counts_read_without_creating_series() {
        let m = Metrics::new();
        m.requests.with_label_values(&["get", "hit"]).inc_by(3);
        m.requests.with_label_values(&["set", "stored"]).inc();
        let c = Counts::of(&m.requests);
        assert_eq!(c.get(&[("command", "get"), ("outcome", "hit")]), 3);
        assert_eq!(c.get(&[("command", "cas"), ("outcome", "exists")]), 0);
        assert_eq!(c.get(&[("outcome", "stored")]), 1);
        assert_eq!(c.total(), 4);
        assert!(!m.render().contains("cas"), "a read made a series");
    }
}
