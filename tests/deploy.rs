//! What the container deployment relies on, without Docker: `memdial
//! probe` (the container health check) against a real node and against
//! answers it must refuse.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::procs::{Memdial, free_port, memdial_bin};

fn probe(url: &str, timeout_ms: u64) -> Output {
    Command::new(memdial_bin())
        .args([
            "probe",
            "--url",
            url,
            "--timeout-ms",
            &timeout_ms.to_string(),
        ])
        .output()
        .expect("run memdial probe")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A one-connection HTTP server on a fresh port that answers `reply` (or
/// nothing, holding the connection, when `reply` is empty) to the first
/// request; returns its port and the request it read.
fn one_shot_server(reply: &'static str) -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 512];
        while !req.ends_with(b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        if reply.is_empty() {
            // Silent: hold the connection until the prober gives up.
            let _ = s.read(&mut buf);
        } else {
            let _ = s.write_all(reply.as_bytes());
        }
        String::from_utf8_lossy(&req).into_owned()
    });
    (port, handle)
}

#[test]
fn probe_passes_on_200_and_fails_on_anything_else() {
    let node = Memdial::embedded();
    let base = format!("http://127.0.0.1:{}", node.admin_port);

    let ok = probe(&format!("{base}/health"), 2000);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let missing = probe(&format!("{base}/no-such-path"), 2000);
    assert_eq!(missing.status.code(), Some(1), "404 is not healthy");
    assert!(
        stderr(&missing).contains("HTTP 404"),
        "{}",
        stderr(&missing)
    );

    // A name works where an IP does.
    let named = probe(
        &format!("http://localhost:{}/health", node.admin_port),
        2000,
    );
    assert_eq!(named.status.code(), Some(0), "{}", stderr(&named));

    let closed = probe(&format!("http://127.0.0.1:{}/ready", free_port()), 2000);
    assert_eq!(closed.status.code(), Some(1));
    assert!(
        stderr(&closed).contains("connecting"),
        "{}",
        stderr(&closed)
    );
}

#[test]
fn probe_fails_on_503_and_sends_a_plain_get() {
    let (port, server) =
        one_shot_server("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready");
    let o = probe(&format!("http://127.0.0.1:{port}/ready"), 2000);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("HTTP 503"), "{}", stderr(&o));
    let request = server.join().expect("server thread");
    assert!(
        request.starts_with("GET /ready HTTP/1.0\r\n"),
        "{request:?}"
    );
    assert!(
        request.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
        "{request:?}"
    );

    let (port, _server) = one_shot_server("HTTP/1.0 200 OK\r\n\r\nready");
    let o = probe(&format!("http://127.0.0.1:{port}/ready"), 2000);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn probe_gives_up_on_a_silent_server_within_its_timeout() {
    let (port, _server) = one_shot_server("");
    let started = Instant::now();
    let o = probe(&format!("http://127.0.0.1:{port}/ready"), 300);
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no answer within 300 ms"),
        "{}",
        stderr(&o)
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
