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
//! ```
//!
//! - [`protocol`]: request/response types, limits, parser, encoders. No I/O.
//! - [`backend`]: the `Backend` trait; memcached (pooled) and embedded stores.
//! - [`consistency`]: the pipeline every command passes through.
//! - [`server`]: listener, connections, shutdown. Never calls a backend itself.
//! - [`config`]: `proxy.yaml`. [`metrics`]: Prometheus registry and endpoint.
//! - [`node`]: wires one node from its config; `main.rs` runs nodes.
#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod consistency;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod server;
