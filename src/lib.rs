//! memdial: a cluster of memcached proxy nodes with a pluggable consistency
//! pipeline.
//!
//! # Layout
//!
//! ```text
//!              server ──────────▶ consistency ─────────▶ cluster
//!        (connections)      (Pipeline, Session;       (transport: peers,
//!                            eventual/, later raft/)   handshake, links)
//!                                 │        │
//!                                 ▼        ▼
//!                             backend ──▶ rules ──▶ protocol
//!
//!   config, metrics, time, outage: leaves, used by any of the above
//! ```
//!
//! - [`protocol`]: request/response types (data requests for the pipeline,
//!   connection requests for the server), limits, parser, encoders. No I/O.
//! - [`rules`]: memcached's command rules (store, incr/decr, touch, gat,
//!   delete, exptime, flush) as pure functions, shared by the embedded store
//!   and the replicated modes.
//! - [`backend`]: the `Backend` trait; memcached (pooled) and embedded stores.
//! - [`cluster`]: the transport between nodes, mode-neutral: handshake,
//!   links, heartbeats, failure detector; carries each mode's messages.
//! - [`consistency`]: the [`consistency::Pipeline`] every data request
//!   passes through, per-connection [`consistency::Session`]s, and the
//!   modes: [`consistency::Local`] for one node, [`consistency::eventual`].
//! - [`server`]: listener, connections, shutdown. Never calls a backend itself.
//! - [`config`]: `proxy.yaml`. [`metrics`]: Prometheus registry and
//!   endpoint. [`time`]: wall-clock readings. [`outage`]: one log line per
//!   outage, not per failure.
//! - [`node`]: wires one node from its config; `main.rs` runs nodes.
#![forbid(unsafe_code)]

/// A boxed, sendable future: the return type of the seams used as trait
/// objects (`Backend`, `Pipeline`, `cluster::Handler`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub mod backend;
pub mod cluster;
pub mod config;
pub mod consistency;
pub mod metrics;
pub mod node;
pub mod outage;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod time;
