//! What a node says about itself, end to end with real processes:
//! `/health` (liveness) and `/ready` (readiness) on the admin port as a
//! load balancer sees them, the same state in `stats`, `stats cluster` and
//! `memdial cli show`, and `/metrics` read by Prometheus's reference text
//! parser (Python `prometheus_client`, which the README's test command
//! installs).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::{Client, http_status, metric, text};
use common::cluster::{ClusterOpts, TestCluster};
use common::procs::{Memcached, Memdial, NodePorts, TempFile, WAIT, proxy_yaml, run_cli};

/// Polls `check` until it gives `Some`; panics with `what` after `WAIT`.
fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(Instant::now() < deadline, "{what}: not after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get(port: u16, path: &str) -> (u16, String) {
    http_status(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Waits until `/ready` answers `status`; returns the body.
fn wait_ready_status(admin: u16, status: u16) -> String {
    poll(&format!("/ready answering {status}"), || {
        let (s, body) = get(admin, "/ready");
        (s == status).then_some(body)
    })
}

/// `memdial cli --port PORT` running `show`; its stdout.
fn cli_show(port: u16) -> String {
    let out = run_cli(port, "show\n");
    assert!(out.status.success(), "cli: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn ready_follows_the_backend_while_health_stays_ok() {
    let mut memcached = Memcached::start();
    let port = memcached.port;
    let node = Memdial::over(&memcached);
    assert_eq!(wait_ready_status(node.admin_port, 200), "ready\n");
    let mut conn = Client::connect(node.port);
    let s = conn.stats("").expect("stats");
    assert_eq!(s["memdial_ready"], "1", "{s:?}");
    assert!(!s.contains_key("memdial_ready_reason"), "{s:?}");

    memcached.kill();
    let body = wait_ready_status(node.admin_port, 503);
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(body.lines().count(), 1, "one line per reason: {body:?}");
    assert!(
        body.starts_with("backend: ") && body.contains(&addr),
        "{body:?}"
    );
    assert_eq!(get(node.admin_port, "/health"), (200, "ok\n".into()));
    let m = get(node.admin_port, "/metrics").1;
    assert_eq!(metric(&m, "memdial_ready"), Some(0.0), "{m}");
    // The same state in `stats`, `stats cluster` and `show`.
    let s = conn.stats("").expect("stats");
    assert_eq!(s["memdial_ready"], "0", "{s:?}");
    assert!(s["memdial_ready_reason"].contains(&addr), "{s:?}");
    let c = conn.stats("cluster").expect("stats cluster");
    assert_eq!(c["ready"], "0", "{c:?}");
    assert_eq!(format!("{}\n", c["ready_reason"]), body, "{c:?}");
    let shown = cli_show(node.port);
    assert!(
        shown.contains(&format!("NOT READY: {}", body.trim_end())),
        "{shown}"
    );

    let _memcached = Memcached::start_on(port);
    assert_eq!(wait_ready_status(node.admin_port, 200), "ready\n");
    assert_eq!(conn.stats("").expect("stats")["memdial_ready"], "1");
    assert!(cli_show(node.port).lines().any(|l| l == "ready"));
    let m = get(node.admin_port, "/metrics").1;
    assert_eq!(metric(&m, "memdial_ready"), Some(1.0), "{m}");
}

#[test]
fn not_ready_while_every_connection_slot_is_taken() {
    let config = TempFile::new(
        "observe-test",
        &format!(
            "{}limits:\n  max_connections: 2\n",
            proxy_yaml("", &[(NodePorts::pick(1)[0], None)])
        ),
    );
    let node = Memdial::serve_with_config(
        Some(config.path()),
        &["--node", "1", "--backend", "embedded"],
    );
    assert_eq!(wait_ready_status(node.admin_port, 200), "ready\n");
    let mut a = Client::connect(node.port);
    let mut b = Client::connect(node.port);
    a.call(b"version\r\n");
    b.call(b"version\r\n");
    let body = wait_ready_status(node.admin_port, 503);
    assert_eq!(body, "connections: all 2 in use; new ones are refused\n");
    drop(b);
    assert_eq!(wait_ready_status(node.admin_port, 200), "ready\n");
}

#[test]
fn eventual_mode_is_ready_with_a_peer_down_and_says_so() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let admin = c.ports(1).admin;
    assert_eq!(get(admin, "/ready"), (200, "ready\n".into()));
    c.kill9(3);
    let body = poll("node 1 noting peer 3 down", || {
        let (status, body) = get(admin, "/ready");
        assert_eq!(status, 200, "{body}");
        body.contains("note: peer 3 is down").then_some(body)
    });
    assert!(body.starts_with("ready\n"), "{body:?}");
    let s = c.stats_cluster(1).expect("stats cluster");
    assert_eq!(s["ready"], "1", "{s:?}");
    assert!(s["ready_note"].contains("peer 3 is"), "{s:?}");
    // Writes are still taken.
    assert_eq!(c.client(1).set("k", 0, 0, b"v").unwrap(), "STORED");
    // The transport's and eventual mode's metrics follow the conventions too.
    check_metrics(&c.metrics(1).expect("/metrics"), "set");
}

/// Runs `tests/observe/check_metrics.py` on `body`, a node's `/metrics`
/// after the data commands `sent` (comma-separated); panics with its
/// findings.
fn check_metrics(body: &str, sent: &str) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/observe/check_metrics.py"
    );
    let mut child = Command::new("python3")
        .args([script, sent])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (the README's test command installs prometheus-client)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("python3 output");
    assert!(
        out.status.success() && text(&out.stdout).contains("all checks passed"),
        "check_metrics.py failed:\n{}\n{}\n/metrics:\n{body}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The data commands this test sends, for the parser check.
const SENT: &str = "set,get,delete";

#[test]
fn metrics_parse_with_the_reference_parser_and_follow_conventions() {
    let memcached = Memcached::start();
    let node = Memdial::over(&memcached);
    let mut conn = Client::connect(node.port);
    assert_eq!(conn.set("a", 0, 0, b"1").unwrap(), "STORED");
    assert_eq!(conn.get("a").unwrap(), Some((0, b"1".to_vec())));
    assert_eq!(conn.get("nope").unwrap(), None);
    // One pipelined batch of three requests, written at once.
    conn.send(b"set b 0 0 1\r\n2\r\nget b\r\ndelete b\r\n");
    assert_eq!(
        text(&conn.read_until(b"DELETED\r\n")),
        "STORED\r\nVALUE b 0 1\r\n2\r\nEND\r\nDELETED\r\n"
    );
    // Answered without the pipeline, and a malformed line: no command series.
    conn.call(b"version\r\n");
    conn.stats("").expect("stats");
    conn.stats("cluster").expect("stats cluster");
    assert_eq!(text(&conn.call(b"bogus\r\n")), "ERROR\r\n");

    let (status, body) = get(node.admin_port, "/metrics");
    assert_eq!(status, 200);
    check_metrics(&body, SENT);

    // Renamed: the gauge no longer shares a family with the counter.
    assert!(metric(&body, "memdial_connections_open").unwrap() >= 1.0);
    assert!(metric(&body, "memdial_connections").is_none(), "{body}");
    assert!(metric(&body, "memdial_connections_total").unwrap() >= 1.0);
    // Gets alone in their batch are timed one by one; the batch once.
    let gets = "memdial_request_duration_seconds_count{command=\"get\"}";
    let batches = metric(&body, "memdial_batch_duration_seconds_count").unwrap();
    assert!(batches >= 1.0, "{body}");
    assert_eq!(metric(&body, gets), Some(2.0), "{body}");
    assert_eq!(
        metric(
            &body,
            "memdial_requests_total{command=\"get\",outcome=\"hit\"}"
        ),
        Some(2.0),
        "{body}"
    );
    assert!(
        body.contains("memdial_request_duration_seconds_bucket{command=\"get\",le=\"10\"}"),
        "{body}"
    );
}
