//! `memdial cluster` (the README's run command) runs every node of a config
//! in one process: a write on one node shows on the others, and Ctrl-C
//! (SIGINT) stops all of it cleanly.

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::{Conn, WAIT, free_port, memdial_bin, text, wait_for_port};

/// Kills the process if the test fails before it stopped it.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cluster_subcommand_replicates_and_stops_on_ctrl_c() {
    let ports: Vec<[u16; 3]> = (0..3)
        .map(|_| [free_port(), free_port(), free_port()])
        .collect();
    let mut yaml = String::from(
        "cluster:\n  name: cmd\n  secret: s3cret\n  heartbeat_interval_ms: 100\n  suspect_after_ms: 500\n  down_after_ms: 1500\nnodes:\n",
    );
    for (i, [c, p, a]) in ports.iter().enumerate() {
        yaml.push_str(&format!(
            "  - id: {}\n    client: 127.0.0.1:{c}\n    internal: 127.0.0.1:{p}\n    admin: 127.0.0.1:{a}\n    memcached: 127.0.0.1:1\n",
            i + 1
        ));
    }
    let path =
        std::env::temp_dir().join(format!("memdial-cluster-cmd-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();

    // Without --memcached the configured memcached addresses are ignored:
    // port 1 has nothing, and the embedded stores serve.
    let mut guard = Guard(
        Command::new(memdial_bin())
            .args(["cluster", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn memdial cluster"),
    );
    let child = &mut guard.0;
    for [c, _, _] in &ports {
        wait_for_port(*c, child);
    }

    let mut one = Conn::open(ports[0][0]);
    assert_eq!(
        text(&one.call(b"set greeting 0 0 5\r\nhello\r\n", b"\r\n")),
        "STORED\r\n"
    );
    for [c, _, _] in &ports[1..] {
        let mut other = Conn::open(*c);
        let deadline = Instant::now() + WAIT;
        loop {
            let reply = text(&other.call(b"get greeting\r\n", b"END\r\n"));
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

    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "memdial cluster did not stop on SIGINT"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    for [c, _, _] in &ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *c)).is_err(),
            "port {c} still accepts after the cluster stopped"
        );
    }
    let _ = std::fs::remove_file(&path);
}
