//! What an operator reads: logs go to stderr (nothing to stdout), with no
//! colour codes when stderr is not a terminal, one line says the node is
//! ready, and a memcached outage under load is logged as one line when it
//! goes down and one when it is back, not a line per failed request.

mod common;

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::client::Client;
use common::procs::{Memcached, Proc, free_port, memdial_bin, start_with_retry};

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memdial-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn read(path: &PathBuf) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

#[test]
fn a_memcached_outage_under_load_is_logged_once_not_per_request() {
    let mut memcached = Memcached::start();
    let mc_port = memcached.port;
    let dir = scratch("logs");
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let (mut node, port) = start_with_retry("memdial", || {
        let (port, admin) = (free_port(), free_port());
        let mut cmd = Command::new(memdial_bin());
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--backend", &memcached.addr()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(File::create(&out).expect("stdout file")))
            .stderr(Stdio::from(File::create(&err).expect("stderr file")));
        let mut p = Proc::spawn(format!("memdial :{port}"), &mut cmd);
        p.wait_ready(&[port, admin])?;
        Ok((p, port))
    });

    // Clients keep sending while memcached is away.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, failed) = (stop.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut cl = Client::connect(port);
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let reply = cl.try_call(format!("set k{c}-{i} 0 0 1\r\nx\r\n").as_bytes());
                    match reply {
                        Ok(r) if r.starts_with(b"SERVER_ERROR") => {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(_) => cl = Client::connect(port),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    memcached.kill();
    std::thread::sleep(Duration::from_millis(1500));
    memcached = Memcached::start_on(mc_port);
    let back = Instant::now();
    let mut probe = Client::connect(port);
    while probe.set("probe", 0, 0, b"v").as_deref().ok() != Some("STORED") {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "memdial did not use memcached again within 15 s of its restart"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client thread");
    }
    node.signal("TERM");
    node.wait_exit();
    drop(memcached);

    let log = read(&err);
    let failed = failed.load(Ordering::SeqCst);
    assert!(
        failed >= 100,
        "only {failed} requests failed: the outage was not under load"
    );
    assert_eq!(read(&out), "", "nothing is logged to stdout");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log that is not a terminal"
    );
    let ready = log.lines().filter(|l| l.contains("node ready")).count();
    assert_eq!(ready, 1, "one line says the node is ready:\n{log}");
    let warns: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warns.len() <= 4,
        "{failed} failed requests wrote {} WARN lines:\n{}",
        warns.len(),
        warns.join("\n")
    );
    let name = format!("memcached 127.0.0.1:{mc_port}");
    assert!(
        warns.iter().any(|l| l.contains(&format!("{name} is down"))),
        "no line says {name} is down:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(&format!("{name} is back"))),
        "no line says {name} is back:\n{log}"
    );
    eprintln!(
        "{failed} failed requests, {} WARN lines:\n{}",
        warns.len(),
        warns.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
