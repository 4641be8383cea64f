//! Prometheus metrics for one node, and the admin HTTP endpoint that serves
//! them (`/metrics`, `/health`). A leaf module.
//!
//! What the latency histogram measures: from the moment a batch of requests
//! read from one connection is handed to the consistency pipeline until its
//! responses are ready, i.e. memdial plus backend time, excluding the time to
//! read the request and write the reply.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// Every metric a node exports, registered once in its own registry.
pub struct Metrics {
    pub registry: Registry,
    pub started: Instant,
    /// Requests by command and outcome (`hit`, `miss`, `stored`, …).
    pub requests: IntCounterVec,
    /// Request latency by command; see the module doc for what it covers.
    pub latency: HistogramVec,
    /// Keys looked up by the get family, by `hit` / `miss`.
    pub get_keys: IntCounterVec,
    /// Requests refused by the parser, by error line kind.
    pub client_errors: IntCounterVec,
    pub connections_current: IntGauge,
    pub connections_total: IntCounter,
    pub connections_rejected: IntCounter,
    pub bytes_read: IntCounter,
    pub bytes_written: IntCounter,
    /// Backend failures by kind (`unavailable`, `timeout`, `io`, `protocol`).
    pub backend_errors: IntCounterVec,
    /// Backend pool occupancy (`max`, `open`, `idle`), read at scrape time.
    pub backend_pool: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("memdial".into()), None)
            .expect("static registry prefix is valid");
        Self::register(registry).expect("metric names are unique and valid")
    }

    fn register(registry: Registry) -> prometheus::Result<Metrics> {
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let r = &registry;
        Ok(Metrics {
            started: Instant::now(),
            requests: reg(
                r,
                counter_vec("requests_total", "Client requests by command and outcome", &[
                    "command", "outcome",
                ])?,
            )?,
            latency: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "request_duration_seconds",
                        "Time from dispatch to the consistency pipeline until the response is ready",
                    )
                    .buckets(vec![
                        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                        0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                    &["command"],
                )?,
            )?,
            get_keys: reg(
                r,
                counter_vec("get_keys_total", "Keys looked up by get/gets/gat/gats", &["result"])?,
            )?,
            client_errors: reg(
                r,
                counter_vec("client_errors_total", "Requests refused as malformed", &["reply"])?,
            )?,
            connections_current: reg(r, IntGauge::new("connections", "Open client connections")?)?,
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
            bytes_read: reg(r, counter("bytes_read_total", "Bytes read from clients")?)?,
            bytes_written: reg(r, counter("bytes_written_total", "Bytes written to clients")?)?,
            backend_errors: reg(
                r,
                counter_vec("backend_errors_total", "Backend failures by kind", &["kind"])?,
            )?,
            backend_pool: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("backend_pool_connections", "Backend pool connections by state"),
                    &["state"],
                )?,
            )?,
            registry,
        })
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

/// Serves `/metrics` and `/health` on `addr` until `shutdown`. `refresh` runs
/// before each scrape to update gauges that are read, not pushed.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::{Router, http::header, routing::get};
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                let refresh = refresh.clone();
                async move {
                    refresh();
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/health", get(|| async { "ok\n" }));
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
        let text = m.render();
        assert!(
            text.contains("memdial_requests_total{command=\"get\",outcome=\"hit\"} 1"),
            "{text}"
        );
    }
}
