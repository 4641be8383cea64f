//! `memdial cluster` (the README's run command) runs every node of a config
//! in one process: a write on one node shows on the others, and Ctrl-C
//! (SIGINT) stops all of it cleanly.

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::client::{Client, text};
use common::procs::{NodePorts, Proc, TempFile, WAIT, memdial_bin, proxy_yaml, start_with_retry};

#[test]
fn cluster_subcommand_replicates_and_stops_on_ctrl_c() {
    // Without --memcached the configured memcached addresses are ignored:
    // port 1 has nothing, and the embedded stores serve.
    let (mut node, ports, _config) = start_with_retry("memdial cluster", || {
        let ports = NodePorts::pick(3);
        let nodes: Vec<_> = ports
            .iter()
            .map(|p| (*p, Some("127.0.0.1:1".to_string())))
            .collect();
        let config = TempFile::new(
            "cluster-cmd",
            &proxy_yaml(
                "  name: cmd\n  secret: s3cret\n  heartbeat_interval_ms: 100\n  \
                 suspect_after_ms: 500\n  down_after_ms: 1500\n",
                &nodes,
            ),
        );
        let mut node = Proc::spawn(
            "memdial cluster",
            Command::new(memdial_bin())
                .args(["cluster", "--config"])
                .arg(config.path())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null()),
        );
        let all: Vec<u16> = ports.iter().flat_map(NodePorts::all).collect();
        node.wait_ready(&all)?;
        Ok((node, ports, config))
    });

    let mut one = Client::connect(ports[0].client);
    assert_eq!(
        text(&one.call(b"set greeting 0 0 5\r\nhello\r\n")),
        "STORED\r\n"
    );
    for p in &ports[1..] {
        let c = p.client;
        let mut other = Client::connect(c);
        let deadline = Instant::now() + WAIT;
        loop {
            let reply = text(&other.call(b"get greeting\r\n"));
            if reply == "VALUE greeting 0 5\r\nhello\r\nEND\r\n" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node on {c} never saw the write: {reply:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    node.signal("INT");
    let status = node.wait_exit();
    assert!(status.success(), "exit status {status}");
    for c in ports.iter().map(|p| p.client) {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", c)).is_err(),
            "port {c} still accepts after the cluster stopped"
        );
    }
}
