//! How long the Raft log store takes to make an append durable (until
//! openraft's `LogFlushed` fires): 1000 appends of 1 and of 64 small
//! entries, in each sync mode, p50 and p99.
//!
//! `cargo bench --bench raftlog` (`RAFT_LOG_DIR=/some/disk` to measure a
//! disk other than the current directory's).

use std::time::{Duration, Instant};

use bytes::Bytes;
use memdial::consistency::raft::TypeConfig;
use memdial::consistency::raft::command::Command;
use memdial::consistency::raft::log_store::{LogStore, LogStoreOptions, SyncMode};
use memdial::protocol::{Request, StoreOp};
use openraft::storage::RaftLogStorageExt;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

fn entry(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command {
            now_ms: 0,
            ticket: 0,
            writes: vec![Request::Store {
                op: StoreOp::Set,
                key: Bytes::from(format!("key:{index}")),
                flags: 0,
                exptime: 0,
                data: Bytes::from_static(&[b'v'; 64]),
                cas_unique: 0,
                noreply: false,
            }],
        }),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let base = std::env::var("RAFT_LOG_DIR").unwrap_or_else(|_| ".".into());
    println!("raft log append latency until durable, 1000 appends each, dir {base}");
    for sync in [SyncMode::Inline, SyncMode::Thread] {
        let dir = tempfile::TempDir::new_in(&base).expect("a temporary directory");
        let options = LogStoreOptions {
            sync,
            ..LogStoreOptions::default()
        };
        let mut store = LogStore::<TypeConfig>::open_with(dir.path(), options).expect("open");
        let mut next = 1;
        for batch in [1u64, 64] {
            let mut latencies = Vec::with_capacity(1000);
            rt.block_on(async {
                for _ in 0..1000 {
                    let start = Instant::now();
                    store
                        .blocking_append((next..next + batch).map(entry))
                        .await
                        .expect("append");
                    latencies.push(start.elapsed());
                    next += batch;
                }
            });
            latencies.sort();
            println!(
                "{sync:?} batch {batch:>2}: p50 {:?}, p99 {:?}",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99)
            );
        }
    }
}
