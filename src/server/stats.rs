//! `stats` on the client port, answered like memcached so that its tools
//! (memcached_exporter, memcached-tool, client libraries) work against a
//! memdial node. Counters come from the node's Prometheus metrics.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::Shared;
use crate::metrics::{Counts, Verdict};
use crate::protocol::{ClientError, Command, Response};

/// Counter values at the last `stats reset`, subtracted from what `stats`
/// shows (the Prometheus counters themselves never go backwards).
#[derive(Default)]
pub(crate) struct Baseline(Mutex<HashMap<&'static str, u64>>);

/// The answer to `stats [group ...]`.
pub(super) fn answer(shared: &Shared, args: &[Bytes]) -> Response {
    match args.first().map(|a| &a[..]) {
        None => Response::Stats(general(shared)),
        Some(b"settings") => Response::Stats(settings(shared)),
        Some(b"cluster") => Response::Stats(cluster(shared)),
        Some(b"reset") => {
            let counters = counters(shared);
            if let Ok(mut base) = shared.stats_baseline.0.lock() {
                *base = counters.into_iter().collect();
            }
            Response::Reset
        }
        // `stats items|slabs|sizes|cachedump` are the store's: the parser
        // sends them to it (`AdminRequest`). memdial does not list its
        // connections.
        Some(b"conns") => Response::Stats(Vec::new()),
        Some(b"detail") => match args.get(1).map(|a| &a[..]) {
            Some(b"on" | b"off") => Response::Ok,
            Some(b"dump") => Response::Stats(Vec::new()),
            _ => ClientError::StatsDetailUsage.into(),
        },
        Some(_) => ClientError::UnknownCommand.into(),
    }
}

/// Counters, in memcached's names, before the reset baseline is applied.
/// Read without creating series for what was never counted.
fn counters(shared: &Shared) -> Vec<(&'static str, u64)> {
    let m = &shared.metrics;
    let counted = Counts::of(&m.requests);
    let requests = |command: Command, outcomes: &[&str]| -> u64 {
        outcomes
            .iter()
            .map(|o| counted.get(&[("command", command.as_str()), ("outcome", o)]))
            .sum()
    };
    let keys = Counts::of(&m.get_keys);
    let also = Counts::of(&m.counted_as);
    let counted_as = |counter: &str| also.get(&[("counter", counter)]);
    // Each key of a gat, and an `mg` with `T` that hits, is a touch and
    // not a get (the get counts above include them).
    let (touch_hits, touch_misses) = (counted_as("touch_hits"), counted_as("touch_misses"));
    // mg counts as a get, as memcached counts it; a hidden (`q`) mg reply
    // is a miss.
    let hits = (keys.get(&[("result", "hit")]) + requests(Command::MetaGet, &["ok"]))
        .saturating_sub(touch_hits);
    let misses = (keys.get(&[("result", "miss")]) + requests(Command::MetaGet, &["miss", "quiet"]))
        .saturating_sub(touch_misses);
    let stores = [
        Command::Set,
        Command::Add,
        Command::Replace,
        Command::Append,
        Command::Prepend,
        Command::Cas,
    ];
    let all = [
        "stored",
        "not_stored",
        "exists",
        "not_found",
        "server_error",
        "client_error",
        "error",
    ];
    let meta_set = ["ok", "not_stored", "exists", "not_found", "quiet"];
    let cmd_set: u64 = stores.iter().map(|&c| requests(c, &all)).sum::<u64>()
        + requests(Command::MetaSet, &meta_set);
    let md = |o: &[&str]| requests(Command::MetaDelete, o);
    let touch = |o: &[&str]| requests(Command::Touch, o);
    vec![
        ("total_connections", m.connections_total.get()),
        ("rejected_connections", m.connections_rejected.get()),
        ("cmd_get", hits + misses),
        ("cmd_set", cmd_set),
        ("cmd_flush", requests(Command::FlushAll, &["ok"])),
        (
            "cmd_touch",
            touch(&["touched", "not_found"]) + touch_hits + touch_misses,
        ),
        // memcached 1.6.18 counts only `me` here.
        ("cmd_meta", requests(Command::MetaDebug, &["ok", "miss"])),
        ("get_hits", hits),
        ("get_misses", misses),
        (
            "delete_misses",
            requests(Command::Delete, &["not_found"]) + md(&["not_found", "exists"]),
        ),
        (
            "delete_hits",
            requests(Command::Delete, &["deleted"]) + md(&["ok", "quiet"]),
        ),
        (
            "incr_misses",
            requests(Command::Incr, &["not_found"]) + counted_as("incr_misses"),
        ),
        (
            "incr_hits",
            requests(Command::Incr, &["ok"]) + counted_as("incr_hits"),
        ),
        (
            "decr_misses",
            requests(Command::Decr, &["not_found"]) + counted_as("decr_misses"),
        ),
        (
            "decr_hits",
            requests(Command::Decr, &["ok"]) + counted_as("decr_hits"),
        ),
        ("cas_misses", requests(Command::Cas, &["not_found"])),
        ("cas_hits", requests(Command::Cas, &["stored"])),
        ("cas_badval", requests(Command::Cas, &["exists"])),
        ("touch_hits", touch(&["touched"]) + touch_hits),
        ("touch_misses", touch(&["not_found"]) + touch_misses),
        ("bytes_read", m.bytes_read.get()),
        ("bytes_written", m.bytes_written.get()),
    ]
}

fn general(shared: &Shared) -> Vec<(String, String)> {
    let now = crate::time::unix_ms() / 1000;
    let s = &shared.settings;
    let mut out: Vec<(String, String)> = vec![
        ("pid".into(), std::process::id().to_string()),
        (
            "uptime".into(),
            shared.metrics.started.elapsed().as_secs().to_string(),
        ),
        ("time".into(), now.to_string()),
        ("version".into(), super::version()),
        ("pointer_size".into(), (usize::BITS).to_string()),
        ("max_connections".into(), s.max_connections.to_string()),
        (
            "curr_connections".into(),
            shared.metrics.connections_current.get().to_string(),
        ),
    ];
    let base = shared
        .stats_baseline
        .0
        .lock()
        .map(|b| b.clone())
        .unwrap_or_default();
    for (name, v) in counters(shared) {
        let v = v.saturating_sub(base.get(name).copied().unwrap_or(0));
        out.push((name.into(), v.to_string()));
    }
    out.push(("threads".into(), worker_threads().to_string()));
    let store = shared.pipeline.store_status();
    out.extend(store.stats);
    out.push(("memdial_node_id".into(), s.node_id.to_string()));
    out.push(("memdial_consistency".into(), s.consistency.into()));
    out.push(("memdial_backend".into(), store.kind.into()));
    let ready = shared.metrics.verdict();
    out.extend(readiness_lines("memdial_", &ready));
    if let Some(p) = store.pool {
        out.push(("memdial_backend_pool_max".into(), p.max_size.to_string()));
        out.push(("memdial_backend_pool_open".into(), p.size.to_string()));
        out.push(("memdial_backend_pool_idle".into(), p.available.to_string()));
    }
    out
}

/// `<prefix>ready 1|0`, then `<prefix>ready_reason` (the reasons, `; `
/// between them) when not ready and `<prefix>ready_note` when there are
/// notes: what `/ready` says, one line each.
fn readiness_lines(prefix: &str, v: &Verdict) -> Vec<(String, String)> {
    let mut out = vec![(format!("{prefix}ready"), u8::from(v.is_ready()).to_string())];
    if !v.reasons.is_empty() {
        out.push((format!("{prefix}ready_reason"), v.reasons.join("; ")));
    }
    if !v.notes.is_empty() {
        out.push((format!("{prefix}ready_note"), v.notes.join("; ")));
    }
    out
}

/// `stats cluster`: this node and what it knows of its peers, then the
/// node's readiness (`ready`, `ready_reason`, `ready_note`).
fn cluster(shared: &Shared) -> Vec<(String, String)> {
    let mut lines = shared.pipeline.cluster_stats();
    if lines.is_empty() {
        lines = vec![
            ("node_id".into(), shared.settings.node_id.to_string()),
            ("mode".into(), "single".into()),
            ("peers".into(), "0".into()),
        ];
    }
    lines.extend(readiness_lines("", &shared.metrics.verdict()));
    lines
}

fn settings(shared: &Shared) -> Vec<(String, String)> {
    let s = &shared.settings;
    let idle = s.idle_timeout.map(|d| d.as_secs()).unwrap_or(0);
    // The store's limit as it is now (`cache_memlimit` changes it).
    let maxbytes = shared
        .pipeline
        .store_status()
        .stats
        .into_iter()
        .find(|(name, _)| name == "limit_maxbytes")
        .map_or_else(|| s.embedded_memory_bytes.to_string(), |(_, v)| v);
    [
        ("maxbytes", maxbytes),
        ("maxconns", s.max_connections.to_string()),
        ("tcpport", shared.local_addr.port().to_string()),
        ("udpport", "0".into()),
        ("inter", shared.local_addr.ip().to_string()),
        (
            "verbosity",
            shared.verbosity.load(Ordering::Relaxed).to_string(),
        ),
        ("evictions", "on".into()),
        ("num_threads", worker_threads().to_string()),
        ("cas_enabled", "yes".into()),
        ("binding_protocol", "ascii".into()),
        ("item_size_max", s.limits.item_size_max.to_string()),
        ("idle_timeout", idle.to_string()),
        (
            "memdial_max_line_bytes",
            s.limits.max_line_bytes.to_string(),
        ),
        (
            "memdial_max_get_line_bytes",
            s.limits.max_get_line_bytes.to_string(),
        ),
        (
            "memdial_max_keys_per_get",
            s.limits.max_keys_per_get.to_string(),
        ),
        (
            "memdial_max_pipeline_depth",
            s.max_pipeline_depth.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn worker_threads() -> usize {
    tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or(1)
}
