//! memdial: a cluster of memcached proxy nodes with a pluggable consistency
//! pipeline.
//!
//! # Layout
//!
//! ```text
//! server ──▶ consistency ──▶ backend ──▶ protocol
//!    │            │              │
//!    └──────┬─────┴──────────────┘
//!           ▼
//!   config, metrics (leaves)
//!
//! consistency, backend ──▶ rules ──▶ protocol
//! ```
//!
//! - [`protocol`]: request/response types, limits, parser, encoders. No I/O.
//! - [`rules`]: memcached's command rules (store, incr/decr, touch, exptime,
//!   flush) as pure functions, shared by the embedded store and the
//!   replicated modes. Depends only on `protocol`.
//! - [`backend`]: the `Backend` trait; memcached (pooled) and embedded stores.
//! - [`cluster`]: peers on the internal port: handshake, heartbeats, failure
//!   detector, replication transport.
//! - [`consistency`]: the pipeline every command passes through.
//! - [`server`]: listener, connections, shutdown. Never calls a backend itself.
//! - [`config`]: `proxy.yaml`. [`metrics`]: Prometheus registry and endpoint.
//! - [`node`]: wires one node from its config; `main.rs` runs nodes.
#![forbid(unsafe_code)]

/// A boxed, sendable future: the return type of the seams used as trait
/// objects (`Backend`, `Pipeline`, `cluster::Replica`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub mod backend;
pub mod cluster;
pub mod config;
pub mod consistency;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod time;
