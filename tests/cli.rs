//! `memdial cli` driven through a pipe against real nodes: one embedded
//! node, and a three-node cluster for `show`.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::procs::{Memdial, MemdialCluster, WAIT, free_port, proxy_yaml, run_cli as cli};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn friendly_set_then_get() {
    let node = Memdial::embedded();
    let out = cli(node.port, "set greeting hello\nget greeting\nquit\n");
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("STORED"), "{}", describe(&out));
    assert!(
        text.contains("VALUE greeting 0 5\nhello\nEND"),
        "{}",
        describe(&out)
    );
}

#[test]
fn raw_storage_command_takes_the_next_line_as_data() {
    let node = Memdial::embedded();
    // The second set's data does not match its length: refused locally, and
    // the connection stays in step.
    let out = cli(node.port, "set k 0 0 3\nabc\nset k 0 0 3\nabcd\nget k\n");
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("STORED"), "{}", describe(&out));
    assert!(text.contains("not sent"), "{}", describe(&out));
    assert!(text.contains("VALUE k 0 3\nabc\nEND"), "{}", describe(&out));
    assert!(!text.contains("ERROR"), "{}", describe(&out));
}

#[test]
fn meta_replies_are_printed_whole() {
    let node = Memdial::embedded();
    let out = cli(
        node.port,
        "ms mk 5 T0 F3\nhello\nmg mk v f\nmg nope v q\nmd mk q\nmg mk v\nmn\n",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("HD\n"), "{}", describe(&out));
    assert!(text.contains("VA 5 f3\nhello\n"), "{}", describe(&out));
    // Quiet requests: mn follows them, and their replies end at its MN.
    assert!(text.contains("EN\nMN"), "{}", describe(&out));
    assert!(!text.contains("ERROR"), "{}", describe(&out));
}

#[test]
fn show_on_a_single_node() {
    let node = Memdial::embedded();
    let out = cli(node.port, "show\n");
    assert!(out.status.success(), "{}", describe(&out));
    let rows = table(&stdout(&out)).unwrap_or_else(|| panic!("{}", describe(&out)));
    assert_eq!(rows.len(), 1, "{}", describe(&out));
    assert_eq!(
        rows[0][..4],
        ["1", &node.addr().to_string(), "self", "single"]
    );
}

#[test]
fn closed_port_is_an_error() {
    let port = free_port();
    let out = cli(port, "get k\n");
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{}",
        describe(&out)
    );
    assert!(!err.contains("panicked"), "{}", describe(&out));
}

/// The rows of `show`'s table (each split on whitespace; the first four
/// columns are single words), after checking its header.
fn table(text: &str) -> Option<Vec<Vec<String>>> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("NODE"));
    let header = lines.next()?;
    for column in [
        "NODE",
        "ADDR",
        "STATE",
        "MODE",
        "LAG",
        "LAST HEARTBEAT",
        "RTT",
        "REQ/S",
    ] {
        assert!(header.contains(column), "header {header:?} lacks {column}");
    }
    Some(
        lines
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(String::from).collect())
            .collect(),
    )
}

/// Three `memdial serve` processes of one config, killed when dropped.
fn cluster() -> MemdialCluster {
    let cluster = "  name: cli-test\n  secret: cli-test-secret\n  consistency: eventual\n  \
                   heartbeat_interval_ms: 100\n  suspect_after_ms: 500\n  down_after_ms: 1500\n";
    MemdialCluster::start(3, "error", |ports| {
        let nodes: Vec<_> = ports.iter().map(|p| (*p, None)).collect();
        vec![proxy_yaml(cluster, &nodes); 3]
    })
}

#[test]
fn show_lists_the_cluster() {
    let cluster = cluster();
    let port = cluster.ports(1).client;
    let deadline = Instant::now() + WAIT;
    let (out, rows) = loop {
        let out = cli(port, "show\nquit\n");
        assert!(out.status.success(), "{}", describe(&out));
        let rows = table(&stdout(&out)).unwrap_or_else(|| panic!("{}", describe(&out)));
        let up = rows.iter().filter(|r| r.get(2).is_some_and(|s| s == "up"));
        if up.count() == 2 {
            break (out, rows);
        }
        assert!(
            Instant::now() < deadline,
            "peers not up after {WAIT:?}:\n{}",
            describe(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = describe(&out);
    assert_eq!(rows.len(), 3, "{text}");
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids, ["1", "2", "3"], "{text}");
    assert_eq!(rows[0][1], format!("127.0.0.1:{port}"), "{text}");
    let states: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(states, ["self", "up", "up"], "{text}");
    assert!(rows.iter().all(|r| r[3] == "eventual"), "{text}");
    // An up peer has been heard from.
    for r in &rows[1..] {
        assert!(r.join(" ").contains("ms ago"), "{text}");
    }
    assert!(stdout(&out).contains("mode eventual"), "{text}");
}
