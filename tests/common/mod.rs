//! The test harness every test binary (`mod common;`) and `benches/load.rs`
//! (procs.rs alone, through `#[path]`) share:
//!
//! - `procs`: free ports, temp files, memcached, one memdial node and a
//!   memdial cluster from a generated proxy.yaml; ready when listening
//!   (polled), started again on fresh ports when a port was taken, killed on
//!   drop.
//! - `client`: the blocking client that reads whole memcached replies;
//!   HTTP GET and Prometheus samples of the admin port.
//! - `record`: memdial's 25-byte record header, decoded and encoded.
//! - `cluster`: `TestCluster` (nodes over memcached, TCP relays for
//!   partitions, replica dumps, the convergence check).
//! - `history`: recorded operation histories and their checkers
//!   (linearizability, per key; sequential order and session guarantees).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod client;
pub mod cluster;
pub mod history;
pub mod procs;
pub mod record;
