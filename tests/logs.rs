//! What an operator reads: logs go to stderr (nothing to stdout), with no
//! colour codes when stderr is not a terminal, one line says the node is
//! ready, and a memcached outage under load is logged as one line when it
//! goes down and one when it is back, not a line per failed request.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::client::Client;
use common::procs::{
    Memcached, NodePorts, Proc, TempFile, free_port, memdial_bin, proxy_yaml, start_with_retry,
};

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

/// One `memdial serve` node over `backend`, logging at info to `err`
/// (stdout to `out`, or nowhere); its client port.
fn serve_logging_to(backend: &str, out: Option<&PathBuf>, err: &PathBuf) -> (Proc, u16) {
    start_with_retry("memdial", || {
        let (port, admin) = (free_port(), free_port());
        let stdout = match out {
            Some(path) => Stdio::from(File::create(path).expect("stdout file")),
            None => Stdio::null(),
        };
        let mut cmd = Command::new(memdial_bin());
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--backend", backend])
            .env("RUST_LOG", "info")
            .stdout(stdout)
            .stderr(Stdio::from(File::create(err).expect("stderr file")));
        let mut p = Proc::spawn(format!("memdial :{port}"), &mut cmd);
        p.wait_ready(&[port, admin])?;
        Ok((p, port))
    })
}

#[test]
fn a_memcached_outage_under_load_is_logged_once_not_per_request() {
    let mut memcached = Memcached::start();
    let mc_port = memcached.port;
    let dir = scratch("logs");
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let (mut node, port) = serve_logging_to(&memcached.addr(), Some(&out), &err);

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

/// A node whose own memcached is down cannot apply what its peer sends:
/// it closes each connection, saying why, and the peer reconnects. The
/// peer logs that as one outage of the link naming the failing store, not
/// a line (or a down/back pair) per reconnect.
#[test]
fn a_peer_whose_store_is_down_is_one_outage_in_the_log() {
    let mut stores = [Memcached::start(), Memcached::start()];
    let store2 = stores[1].port;
    let dir = scratch("flap");
    let logs = [dir.join("node1"), dir.join("node2")];
    let (mut nodes, node1) = start_with_retry("memdial cluster", || {
        let ports = NodePorts::pick(2);
        let cluster = "  name: flap\n  secret: s3cret\n  consistency: eventual\n";
        let nodes: Vec<_> = ports
            .iter()
            .zip(&stores)
            .map(|(p, m)| (*p, Some(m.addr())))
            .collect();
        let config = TempFile::new("flap.yaml", &proxy_yaml(cluster, &nodes));
        let mut procs = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let mut cmd = Command::new(memdial_bin());
            cmd.args(["serve", "--node", &(i + 1).to_string(), "--config"])
                .arg(config.path())
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::from(File::create(&logs[i]).expect("log file")));
            let mut proc = Proc::spawn(format!("memdial node {}", i + 1), &mut cmd);
            proc.wait_ready(&p.all())?;
            procs.push(proc);
        }
        Ok(((procs, config), ports[0].client))
    });
    let mut cl = Client::connect(node1);
    // Both links up: node 2 has what node 1 wrote.
    assert_eq!(cl.set("first", 0, 0, b"v").unwrap(), "STORED");
    let writes = |cl: &mut Client, n: usize| {
        for i in 0..n {
            assert_eq!(cl.set(&format!("k{i}"), 0, 0, b"x").unwrap(), "STORED");
        }
    };
    writes(&mut cl, 200);
    stores[1].kill();
    // Node 1 goes on writing while node 2 cannot store what it is sent.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        writes(&mut cl, 200);
    }
    stores[1] = Memcached::start_on(store2);
    // Back once a reconnect (its backoff grows to `reconnect_max_ms`, 2 s)
    // has held for a second: up to about 3 s, more on a busy machine. A
    // fixed 2.5 s wait missed it in a CI run.
    let back = |log: &str| {
        log.lines()
            .any(|l| l.contains("link to peer 2") && l.contains("is back"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !back(&read(&logs[0])) {
        assert!(
            Instant::now() < deadline,
            "link to peer 2 not back 20 s after its store returned:\n{}",
            read(&logs[0])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in nodes.0.iter_mut() {
        p.signal("TERM");
        p.wait_exit();
    }
    let log1 = read(&logs[0]);
    let link: Vec<&str> = log1
        .lines()
        .filter(|l| l.contains("link to peer 2"))
        .collect();
    let down: Vec<&&str> = link.iter().filter(|l| l.contains("is down")).collect();
    assert!(
        !down.is_empty(),
        "node 1 never saw its link to node 2 fail:\n{log1}"
    );
    assert!(
        down[0].contains("node 2 could not take the message")
            && down[0].contains(&format!("127.0.0.1:{store2}")),
        "the line does not say whose store failed: {}",
        down[0]
    );
    // One outage while the store is down; the shutdown may end the link
    // once more at the very end.
    assert!(
        down.len() <= 2,
        "{} 'down' lines for one outage:\n{}",
        down.len(),
        link.join("\n")
    );
    let backs = link.iter().filter(|l| l.contains("is back")).count();
    assert_eq!(backs, 1, "one 'back' line:\n{}", link.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The lines a connection logs at the default level name its client and
/// connection id (its span is at debug, so they say it themselves).
#[test]
fn a_connections_own_lines_name_its_client() {
    let dir = scratch("conn-lines");
    let err = dir.join("stderr");
    let (mut node, port) = serve_logging_to("embedded", None, &err);
    // An HTTP request line: the node hangs up without a word.
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let client = http.local_addr().expect("local address");
    http.write_all(b"GET / HTTP/1.1\r\n").expect("write");
    http.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    http.read_to_end(&mut rest)
        .expect("the node closes the connection");
    assert!(rest.is_empty(), "{rest:?}");
    node.signal("TERM");
    node.wait_exit();
    let log = read(&err);
    let line = log
        .lines()
        .find(|l| l.contains("closing connection after an HTTP request line"))
        .unwrap_or_else(|| panic!("no line about the HTTP request:\n{log}"));
    assert!(
        line.contains(&format!("peer={client}")) && line.contains("conn_id="),
        "the line does not name its client {client}: {line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that takes none of its replies is closed after
/// `write_stall_timeout_ms`, and the line saying so names it.
#[test]
fn a_client_closed_for_taking_no_replies_is_named() {
    let dir = scratch("stall-line");
    let err = dir.join("stderr");
    let (mut node, (port, _config)) = start_with_retry("memdial", || {
        let ports = NodePorts::pick(1)[0];
        let yaml = format!(
            "{}timeouts:\n  write_stall_timeout_ms: 500\n",
            proxy_yaml("", &[(ports, None)])
        );
        let config = TempFile::new("stall.yaml", &yaml);
        let mut cmd = Command::new(memdial_bin());
        cmd.args(["serve", "--node", "1", "--backend", "embedded", "--config"])
            .arg(config.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&err).expect("stderr file")));
        let mut p = Proc::spawn(format!("memdial :{}", ports.client), &mut cmd);
        // One node alone opens no internal port.
        p.wait_ready(&[ports.client, ports.admin])?;
        Ok((p, (ports.client, config)))
    });
    let mut setter = Client::connect(port);
    assert_eq!(
        setter.set("big", 0, 0, &vec![b'x'; 512 * 1024]).unwrap(),
        "STORED"
    );
    // 50 MB of replies asked for, none read: more than the sockets hold.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let client = stalled.local_addr().expect("local address");
    stalled
        .write_all(&b"get big\r\n".repeat(100))
        .expect("write");
    let line = |log: &str| {
        log.lines()
            .find(|l| l.contains("client takes none of its replies; closed"))
            .map(str::to_string)
    };
    let until = Instant::now() + Duration::from_secs(15);
    let found = loop {
        if let Some(l) = line(&read(&err)) {
            break l;
        }
        assert!(
            Instant::now() < until,
            "no line about the stalled client within 15 s:\n{}",
            read(&err)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        found.contains(&format!("peer={client}")) && found.contains("conn_id="),
        "the line does not name its client {client}: {found}"
    );
    drop(stalled);
    node.signal("TERM");
    node.wait_exit();
    let _ = std::fs::remove_dir_all(&dir);
}
