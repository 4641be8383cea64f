//! The client-facing server of one node, end to end: connection and request
//! limits, idle timeout, graceful shutdown, backend outages, `stats`,
//! `/metrics`, config loading, and bad input. Every test runs real memdial
//! processes (and real memcached where a backend is needed) on free ports.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::{Client, http_get, metric, text};
use common::procs::{
    Memcached, Memdial, NodePorts, Proc, TempFile, WAIT, free_port, memdial_bin, proc_status_kb,
    proxy_yaml, start_with_retry,
};

/// A config file of one node on free local ports, followed by `sections`
/// (top-level YAML).
fn one_node_config(sections: &str) -> TempFile {
    TempFile::new("server-test", &format!("{}{sections}", one_node_yaml()))
}

fn one_node_yaml() -> String {
    proxy_yaml("", &[(NodePorts::pick(1)[0], None)])
}

/// An embedded-store node with `sections` of config.
fn node_with(sections: &str) -> Memdial {
    let config = one_node_config(sections);
    // The file is read before the client port listens, so it may go after.
    Memdial::serve_with_config(
        Some(config.path()),
        &["--node", "1", "--backend", "embedded"],
    )
}

fn version_line() -> String {
    format!("VERSION 1.6.18-memdial-{}\r\n", env!("CARGO_PKG_VERSION"))
}

/// Polls `check` until it is true; panics with `what` after `WAIT`.
fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new connection to `port` if it is served: it answers `version`.
/// A refused connection (an error line, EOF or a reset) is `None`.
fn served_connection(port: u16) -> Option<Client> {
    let mut conn = Client::try_connect(port).ok()?;
    let got = conn.try_call(b"version\r\n").ok()?;
    (text(&got) == version_line()).then_some(conn)
}

fn new_connection_served(port: u16) -> bool {
    served_connection(port).is_some()
}

/// `stats [args]` as name → value, checking the framing.
fn stats(conn: &mut Client, args: &str) -> BTreeMap<String, String> {
    conn.stats(args)
        .unwrap_or_else(|e| panic!("stats {args}: {e}"))
}

fn stat<'a>(stats: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    stats
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no STAT {name} in {stats:?}"))
}

fn stat_u64(stats: &BTreeMap<String, String>, name: &str) -> u64 {
    let v = stat(stats, name);
    v.parse()
        .unwrap_or_else(|_| panic!("STAT {name} {v} is not a number"))
}

/// GET `path` on the node's admin port; the body of its 200 answer.
fn admin_get(node: &Memdial, path: &str) -> String {
    http_get(node.admin_port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The sum of every sample of metric `name`, whatever its labels.
fn sum_samples(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

// 1. Connection limit.

#[test]
fn connection_limit_refuses_the_extra_connection_until_one_closes() {
    let node = node_with("limits:\n  max_connections: 2\n");
    // The harness's readiness probe may hold a place until memdial sees it
    // closed, so the second connection is polled for.
    let mut a = Client::connect(node.port);
    assert_eq!(text(&a.call(b"version\r\n")), version_line());
    let mut b = None;
    poll_until("a second connection served", || {
        b = served_connection(node.port);
        b.is_some()
    });
    let mut b = b.unwrap();

    let mut third = Client::connect(node.port);
    assert_eq!(
        text(&third.read_to_eof()),
        "ERROR Too many open connections\r\n"
    );
    // The refusal did not disturb the two served connections.
    assert_eq!(text(&a.call(b"version\r\n")), version_line());
    assert_eq!(text(&b.call(b"set k 0 0 1\r\nv\r\n")), "STORED\r\n");

    drop(b);
    poll_until("a new connection served after one closed", || {
        new_connection_served(node.port)
    });
    let s = stats(&mut a, "");
    assert!(stat_u64(&s, "rejected_connections") >= 1, "{s:?}");
    assert_eq!(stat(&s, "max_connections"), "2");
}

// 2. Line length.

#[test]
fn overlong_line_without_newline_is_refused_and_closed() {
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    // Longer than max_line_bytes (16,382) and no `\n`: memdial must not
    // wait for the rest of the line.
    let mut line = b"set ".to_vec();
    line.extend(std::iter::repeat_n(b'k', 16_500));
    conn.send(&line);
    assert_eq!(text(&conn.read_to_eof()), "CLIENT_ERROR line too long\r\n");
    // Only that connection was closed.
    assert!(new_connection_served(node.port));
}

#[test]
fn long_get_line_is_answered() {
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    let keys: Vec<String> = (0..300).map(|i| format!("key-{i:016}")).collect();
    assert!(keys.iter().all(|k| k.len() == 20));
    for k in [&keys[7], &keys[250]] {
        let set = format!("set {k} 3 0 2\r\nok\r\n");
        assert_eq!(text(&conn.call(set.as_bytes())), "STORED\r\n");
    }
    let get = format!("get {}\r\n", keys.join(" "));
    assert!(get.len() > 6000, "{}", get.len());
    let reply = text(&conn.call(get.as_bytes()));
    assert_eq!(
        reply,
        format!(
            "VALUE {} 3 2\r\nok\r\nVALUE {} 3 2\r\nok\r\nEND\r\n",
            keys[7], keys[250]
        )
    );
    assert_eq!(text(&conn.call(b"version\r\n")), version_line());
}

// 3. Value size.

#[test]
fn value_over_item_size_max_is_refused_and_the_connection_survives() {
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    let mut req = b"set k 0 0 2000000\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'x', 2_000_000));
    req.extend_from_slice(b"\r\n");
    conn.send(&req);
    assert_eq!(
        text(&conn.read_reply().expect("reply")),
        "SERVER_ERROR object too large for cache\r\n"
    );
    // The 2 MB data block was skipped, not parsed as commands.
    assert_eq!(text(&conn.call(b"get k\r\n")), "END\r\n");
    assert_eq!(text(&conn.call(b"set k 0 0 3\r\nabc\r\n")), "STORED\r\n");
    assert_eq!(
        text(&conn.call(b"get k\r\n")),
        "VALUE k 0 3\r\nabc\r\nEND\r\n"
    );
}

#[test]
fn item_size_max_is_configurable() {
    let node = node_with("limits:\n  item_size_max: 1000\n");
    let mut conn = Client::connect(node.port);
    assert_eq!(stat(&stats(&mut conn, "settings"), "item_size_max"), "1000");

    let fits = "a".repeat(1000);
    let set = format!("set k 0 0 1000\r\n{fits}\r\n");
    assert_eq!(text(&conn.call(set.as_bytes())), "STORED\r\n");
    let over = "b".repeat(1001);
    let set = format!("set k2 0 0 1001\r\n{over}\r\n");
    assert_eq!(
        text(&conn.call(set.as_bytes())),
        "SERVER_ERROR object too large for cache\r\n"
    );
    assert_eq!(
        text(&conn.call(b"get k k2\r\n")),
        format!("VALUE k 0 1000\r\n{fits}\r\nEND\r\n")
    );
}

// 4. Pipeline depth.

#[test]
fn pipelined_requests_beyond_the_depth_are_all_answered_in_order() {
    let node = node_with("limits:\n  max_pipeline_depth: 4\n");
    let mut conn = Client::connect(node.port);
    let (mut request, mut expected) = (String::new(), String::new());
    // 50 set/get pairs = 100 requests; each get also asks for the previous
    // key, so a reply out of order or from the wrong batch shows.
    let value = |i: usize| format!("value-{i}");
    for i in 0..50 {
        let v = value(i);
        request += &format!("set p{i} {i} 0 {}\r\n{v}\r\n", v.len());
        request += &format!("get p{i} p{}\r\n", i.wrapping_sub(1));
        expected += "STORED\r\n";
        expected += &format!("VALUE p{i} {i} {}\r\n{v}\r\n", v.len());
        if i > 0 {
            let prev = value(i - 1);
            expected += &format!("VALUE p{} {} {}\r\n{prev}\r\n", i - 1, i - 1, prev.len());
        }
        expected += "END\r\n";
    }
    conn.send(request.as_bytes());
    let got = text(&conn.read_exact_len(expected.len()));
    for (n, (g, e)) in got.split("\r\n").zip(expected.split("\r\n")).enumerate() {
        assert_eq!(g, e, "reply line {n}");
    }
    assert_eq!(got, expected);
    // Nothing more was sent than those replies.
    assert_eq!(text(&conn.call(b"version\r\n")), version_line());
}

/// Large values (16 KiB and more) leave from where the store put them,
/// gathered with the small replies around them into one write: in a
/// pipeline of gets that mix large values, small ones and misses, every
/// byte is in its place, on either backend and on memcached itself.
#[test]
fn pipelined_gets_of_large_and_small_values_come_back_in_place() {
    let memcached = Memcached::start();
    let direct = Memcached::start();
    let value = |key: &str, len: usize| -> String {
        key.bytes()
            .chain((0..).map(|i: u32| b'a' + (i % 26) as u8))
            .take(len)
            .map(char::from)
            .collect()
    };
    let sizes = [
        ("L1", 16 * 1024),
        ("s1", 10),
        ("L2", 20_000),
        ("s2", 1),
        ("L3", 100_000),
    ];
    let gets = [
        "get L1",
        "get s1 L2 nope L3 s2",
        "get nope",
        "get L1 L1 s1",
        "get L3",
        "get s2 nope L2",
    ];
    let (mut request, mut expected) = (String::new(), String::new());
    for (flags, (key, len)) in sizes.iter().enumerate() {
        request += &format!(
            "set {key} {flags} 0 {len} noreply\r\n{}\r\n",
            value(key, *len)
        );
    }
    for get in gets {
        request += &format!("{get}\r\n");
        for key in get.split(' ').skip(1) {
            if let Some(flags) = sizes.iter().position(|(k, _)| *k == key) {
                let v = value(key, sizes[flags].1);
                expected += &format!("VALUE {key} {flags} {}\r\n{v}\r\n", v.len());
            }
        }
        expected += "END\r\n";
    }
    let embedded = Memdial::embedded();
    let over = Memdial::over(&memcached);
    for (what, port) in [
        ("memcached", direct.port),
        ("embedded", embedded.port),
        ("over memcached", over.port),
    ] {
        let mut conn = Client::connect(port);
        conn.send(request.as_bytes());
        let got = conn.read_exact_len(expected.len());
        assert!(got == expected.as_bytes(), "{what}: the replies differ");
        assert!(
            text(&conn.call(b"version\r\n")).starts_with("VERSION "),
            "{what}: more was sent than the replies"
        );
    }
}

/// Many clients pipelining gets over memcached at once: the node joins
/// their gets into shared multi-key lines (`backend/mux.rs`) and splits the
/// replies back. Each client reads and writes keys of its own, sometimes the
/// same key twice in one batch, and deletes some, so every reply is known:
/// a value given to the wrong request, or a miss taken for a hit, shows.
#[test]
fn many_clients_pipelining_gets_over_memcached_each_get_their_own_replies() {
    let memcached = Memcached::start();
    let node = Memdial::over(&memcached);
    pipeline_own_keys_from_many_clients(node.port);
    let body = admin_get(&node, "/metrics");
    let joined = metric(&body, "memdial_backend_joined_gets_total").unwrap_or(0.0);
    assert!(joined > 0.0, "no get joined another's line:\n{body}");
}

/// `backend.join_gets: false` sends every get as its own line: the same
/// load as above, the same replies, and no get joined another's.
#[test]
fn gets_are_not_joined_when_the_config_says_so() {
    let memcached = Memcached::start();
    let config = one_node_config("backend:\n  join_gets: false\n");
    let node = Memdial::serve_with_config(
        Some(config.path()),
        &["--node", "1", "--backend", &memcached.addr()],
    );
    pipeline_own_keys_from_many_clients(node.port);
    let body = admin_get(&node, "/metrics");
    let joined = metric(&body, "memdial_backend_joined_gets_total");
    assert_eq!(joined, Some(0.0), "{body}");
}

/// Twelve clients each pipeline 150 batches of sets, deletes and gets of
/// keys of their own through the node on `port`, and each must read back
/// exactly the replies those requests earn.
fn pipeline_own_keys_from_many_clients(port: u16) {
    let clients: Vec<_> = (0..12)
        .map(|c| {
            std::thread::spawn(move || {
                let mut conn = Client::connect(port);
                let key = |i: usize| format!("c{c}-k{}", i % 6);
                let mut stored: [Option<String>; 6] = Default::default();
                let hit = |stored: &[Option<String>; 6], i: usize| {
                    stored[i % 6]
                        .as_ref()
                        .map(|v| format!("VALUE {} 3 {}\r\n{v}\r\n", key(i), v.len()))
                        .unwrap_or_default()
                };
                for round in 0..150 {
                    let i = round % 6;
                    let v = format!("{c}.{round}");
                    let (mut request, mut expected) = (String::new(), String::new());
                    request += &format!("set {} 3 0 {}\r\n{v}\r\n", key(i), v.len());
                    stored[i] = Some(v);
                    expected += "STORED\r\n";
                    if round % 5 == 0 {
                        request += &format!("delete {}\r\n", key(i + 3));
                        expected += if stored[(i + 3) % 6].take().is_some() {
                            "DELETED\r\n"
                        } else {
                            "NOT_FOUND\r\n"
                        };
                    }
                    // The same key twice, on one line and on two.
                    for keys in [
                        vec![i],
                        vec![i + 1, i + 2],
                        vec![i, i + 3],
                        vec![i + 4, i + 4],
                    ] {
                        let names: Vec<String> = keys.iter().map(|&k| key(k)).collect();
                        request += &format!("get {}\r\n", names.join(" "));
                        for &k in &keys {
                            expected += &hit(&stored, k);
                        }
                        expected += "END\r\n";
                    }
                    conn.send(request.as_bytes());
                    let got = text(&conn.read_exact_len(expected.len()));
                    assert_eq!(got, expected, "client {c}, round {round}");
                }
                // Nothing more was sent than those replies.
                assert_eq!(text(&conn.call(b"version\r\n")), version_line());
            })
        })
        .collect();
    for client in clients {
        client.join().expect("every client got its own replies");
    }
}

// 5. Keys per get.

#[test]
fn get_with_more_keys_than_the_limit_is_refused() {
    let node = node_with("limits:\n  max_keys_per_get: 3\n");
    let mut conn = Client::connect(node.port);
    assert_eq!(text(&conn.call(b"set a 0 0 1\r\n1\r\n")), "STORED\r\n");
    assert_eq!(
        text(&conn.call(b"get a b c d\r\n")),
        "CLIENT_ERROR bad command line format\r\n"
    );
    assert_eq!(
        text(&conn.call(b"get a b c\r\n")),
        "VALUE a 0 1\r\n1\r\nEND\r\n"
    );
}

// 6. Idle timeout.

#[test]
fn idle_connection_is_closed_and_a_busy_one_is_not() {
    let node = node_with("timeouts:\n  idle_timeout_ms: 300\n");
    let mut idle = Client::connect(node.port);
    let mut busy = Client::connect(node.port);
    assert_eq!(text(&idle.call(b"version\r\n")), version_line());
    let idle_since = Instant::now();
    let idle_thread = std::thread::spawn(move || {
        let rest = idle.read_to_eof();
        (rest, idle_since.elapsed())
    });
    // Four times the timeout, never silent for more than a third of it.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        assert_eq!(text(&busy.call(b"version\r\n")), version_line());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rest, closed_after) = idle_thread.join().unwrap();
    assert_eq!(text(&rest), "", "nothing was sent before closing");
    assert!(
        closed_after >= Duration::from_millis(250) && closed_after < Duration::from_secs(5),
        "idle connection closed after {closed_after:?}"
    );
    assert_eq!(text(&busy.call(b"version\r\n")), version_line());
}

#[test]
fn the_idle_timeout_counts_from_the_last_request_through_buffer_releases() {
    // An idle connection wakes after one and two seconds to give back its
    // buffers (connection.rs, `IDLE_RELEASE`); those wake-ups must not
    // restart the idle timeout, which would then close it after 4.5 s.
    let node = node_with("timeouts:\n  idle_timeout_ms: 2500\n");
    let mut idle = Client::connect(node.port);
    assert_eq!(text(&idle.call(b"version\r\n")), version_line());
    let idle_since = Instant::now();
    let rest = idle.read_to_eof();
    let closed_after = idle_since.elapsed();
    assert_eq!(text(&rest), "", "nothing was sent before closing");
    assert!(
        closed_after >= Duration::from_millis(2_400) && closed_after < Duration::from_millis(4_000),
        "idle connection closed after {closed_after:?}"
    );
}

// 7. Graceful shutdown.

#[test]
fn sigterm_closes_idle_clients_stops_accepting_and_exits_cleanly() {
    let mut node = Memdial::embedded();
    let port = node.port;
    let mut conn = Client::connect(port);
    assert_eq!(text(&conn.call(b"version\r\n")), version_line());
    node.signal("TERM");
    assert_eq!(text(&conn.read_to_eof()), "", "idle client sees EOF");
    // The port stops accepting: a connect fails, or is closed unserved.
    poll_until("client port refusing connections after SIGTERM", || {
        !new_connection_served(port)
    });
    let status = node.wait_exit();
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts after exit"
    );
}

#[test]
fn requests_sent_before_sigterm_are_answered() {
    // Over memcached, so that afterwards the backend shows how many of the
    // requests memdial executed.
    let memcached = Memcached::start();
    let mut node = Memdial::over(&memcached);
    let stream = Client::connect(node.port).stream;
    // Large enough to be read in many chunks, so SIGTERM is likely to come
    // while part of it is still unread in the socket.
    const N: usize = 20_000;
    let value = "v".repeat(200);
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend_from_slice(format!("set s{i} 0 0 200\r\n{value}\r\n").as_bytes());
    }
    batch.extend_from_slice(b"get s0\r\n");
    let expected = format!(
        "{}VALUE s0 0 200\r\n{value}\r\nEND\r\n",
        "STORED\r\n".repeat(N)
    );

    // Read concurrently, so neither side blocks on a full socket buffer.
    let mut reader = stream.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let r = reader.read_to_end(&mut got);
        (got, r.map_err(|e| e.to_string()))
    });
    let mut writer = stream;
    writer.write_all(&batch).expect("write batch");
    node.signal("TERM");
    let (got, read) = reader.join().unwrap();
    let status = node.wait_exit();

    let replies = got.windows(8).filter(|w| *w == b"STORED\r\n").count();
    let mut direct = Client::connect(memcached.port);
    let executed: usize = (0..N)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| {
            let keys: Vec<String> = chunk.iter().map(|i| format!("s{i}")).collect();
            let get = format!("get {}\r\n", keys.join(" "));
            text(&direct.call(get.as_bytes())).matches("VALUE ").count()
        })
        .sum();
    assert!(
        read.is_ok() && got == expected.as_bytes(),
        "{N} sets sent before SIGTERM: memdial stored {executed} in memcached, \
         the client got {replies} STORED ({} of {} bytes), then {read:?}",
        got.len(),
        expected.len(),
    );
    assert!(status.success(), "exit status {status}");
}

// 8. Backend outage.

#[test]
fn backend_outage_answers_server_error_and_the_same_connection_recovers() {
    let mut memcached = Memcached::start();
    let backend_port = memcached.port;
    let node = Memdial::over(&memcached);
    let mut conn = Client::connect(node.port);
    assert_eq!(text(&conn.call(b"set k 0 0 1\r\na\r\n")), "STORED\r\n");

    memcached.kill();
    let reply = text(&conn.call(b"get k\r\n"));
    assert!(reply.starts_with("SERVER_ERROR"), "{reply:?}");
    // Still open and still parsing.
    assert_eq!(text(&conn.call(b"version\r\n")), version_line());
    let reply = text(&conn.call(b"set k 0 0 1\r\nb\r\n"));
    assert!(reply.starts_with("SERVER_ERROR"), "{reply:?}");

    let _memcached = Memcached::start_on(backend_port);
    poll_until("set through memdial after memcached restarted", || {
        let reply = text(&conn.call(b"set k 0 0 1\r\nc\r\n"));
        assert!(
            reply == "STORED\r\n" || reply.starts_with("SERVER_ERROR"),
            "{reply:?}"
        );
        reply == "STORED\r\n"
    });
    assert_eq!(
        text(&conn.call(b"get k\r\n")),
        "VALUE k 0 1\r\nc\r\nEND\r\n"
    );
}

// 9. stats and version.

#[test]
fn stats_count_like_memcached_and_reset() {
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    assert_eq!(text(&conn.call(b"set a 0 0 1\r\n1\r\n")), "STORED\r\n");
    assert_eq!(
        text(&conn.call(b"get a b\r\n")),
        "VALUE a 0 1\r\n1\r\nEND\r\n"
    );

    let s = stats(&mut conn, "");
    assert_eq!(stat_u64(&s, "pid"), u64::from(node.pid()));
    let _ = stat_u64(&s, "uptime");
    assert!(stat_u64(&s, "curr_connections") >= 1, "{s:?}");
    assert_eq!(stat_u64(&s, "cmd_get"), 2, "counted per key");
    assert_eq!(stat_u64(&s, "get_hits"), 1);
    assert_eq!(stat_u64(&s, "get_misses"), 1);
    assert_eq!(stat_u64(&s, "cmd_set"), 1);
    assert_eq!(stat(&s, "version"), version_line()[8..].trim_end());

    let settings = stats(&mut conn, "settings");
    assert_eq!(stat(&settings, "item_size_max"), "1048576");

    assert_eq!(text(&conn.call(b"stats reset\r\n")), "RESET\r\n");
    let s = stats(&mut conn, "");
    for name in ["cmd_get", "get_hits", "get_misses", "cmd_set"] {
        assert_eq!(stat_u64(&s, name), 0, "{name} after stats reset");
    }
    assert!(stat_u64(&s, "curr_connections") >= 1, "a gauge, not reset");
    // Counting goes on from the reset.
    assert_eq!(
        text(&conn.call(b"get a\r\n")),
        "VALUE a 0 1\r\n1\r\nEND\r\n"
    );
    let s = stats(&mut conn, "");
    assert_eq!(stat_u64(&s, "cmd_get"), 1);
    assert_eq!(stat_u64(&s, "get_hits"), 1);
    assert_eq!(stat_u64(&s, "get_misses"), 0);
}

#[test]
fn stats_count_meta_commands_as_memcached_does() {
    // memcached 1.6.18: `mg` counts as a get, `ms` as a set, `md` as a
    // delete, and `cmd_meta` counts only `me`.
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    conn.send(b"mg a\r\nms a 1\r\nx\r\nmg a v\r\nmg b q\r\nmd a\r\nmd a\r\nme a\r\nmn\r\n");
    let reply = conn.read_until(b"MN\r\n");
    assert_eq!(
        text(&reply),
        "EN\r\nHD\r\nVA 1\r\nx\r\nHD\r\nNF\r\nEN\r\nMN\r\n"
    );
    let s = stats(&mut conn, "");
    assert_eq!(stat_u64(&s, "cmd_get"), 3, "{s:?}");
    assert_eq!(stat_u64(&s, "get_hits"), 1);
    assert_eq!(stat_u64(&s, "get_misses"), 2);
    assert_eq!(stat_u64(&s, "cmd_set"), 1);
    assert_eq!(stat_u64(&s, "delete_hits"), 1);
    assert_eq!(stat_u64(&s, "delete_misses"), 1);
    assert_eq!(stat_u64(&s, "cmd_meta"), 1);
}

#[test]
fn stats_bogus_is_an_error_and_version_names_memdial() {
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    assert_eq!(text(&conn.call(b"stats bogus\r\n")), "ERROR\r\n");
    assert_eq!(text(&conn.call(b"version\r\n")), version_line());
}

// 10. /metrics and /health.

#[test]
fn metrics_count_requests_and_health_answers_ok() {
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    assert_eq!(text(&conn.call(b"set a 0 0 1\r\n1\r\n")), "STORED\r\n");
    for _ in 0..3 {
        assert_eq!(
            text(&conn.call(b"get a\r\n")),
            "VALUE a 0 1\r\n1\r\nEND\r\n"
        );
    }
    for _ in 0..2 {
        assert_eq!(text(&conn.call(b"get nope\r\n")), "END\r\n");
    }

    let body = admin_get(&node, "/metrics");
    let series = |s: &str| metric(&body, s).unwrap_or_else(|| panic!("no {s} in\n{body}"));
    assert_eq!(
        series("memdial_requests_total{command=\"get\",outcome=\"hit\"}"),
        3.0
    );
    assert_eq!(
        series("memdial_requests_total{command=\"get\",outcome=\"miss\"}"),
        2.0
    );
    assert_eq!(
        series("memdial_requests_total{command=\"set\",outcome=\"stored\"}"),
        1.0
    );
    assert!(series("memdial_connections_open") >= 1.0, "{body}");
    assert_eq!(
        series("memdial_request_duration_seconds_bucket{command=\"get\",le=\"+Inf\"}"),
        5.0
    );
    assert!(
        body.contains("memdial_request_duration_seconds_bucket{command=\"get\",le=\"0.001\"}"),
        "{body}"
    );
    assert_eq!(admin_get(&node, "/health").trim(), "ok");
}

#[test]
fn metrics_show_backend_errors_and_pool_after_an_outage() {
    let mut memcached = Memcached::start();
    let node = Memdial::over(&memcached);
    let mut conn = Client::connect(node.port);
    assert_eq!(text(&conn.call(b"set k 0 0 1\r\na\r\n")), "STORED\r\n");
    let before = admin_get(&node, "/metrics");
    assert_eq!(
        sum_samples(&before, "memdial_backend_errors_total"),
        0.0,
        "{before}"
    );

    memcached.kill();
    let reply = text(&conn.call(b"get k\r\n"));
    assert!(reply.starts_with("SERVER_ERROR"), "{reply:?}");

    let body = admin_get(&node, "/metrics");
    assert!(
        sum_samples(&body, "memdial_backend_errors_total") > 0.0,
        "{body}"
    );
    assert_eq!(
        // The two multiplexed connections (backend.multiplexed_connections).
        metric(&body, "memdial_backend_pool_connections{state=\"max\"}"),
        Some(2.0),
        "{body}"
    );
}

// 11. Config files.

#[test]
fn repo_proxy_yaml_serves_node_2() {
    let memcached = Memcached::start();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml");
    let node = Memdial::serve_with_config(
        Some(&config),
        &[
            "--node",
            "2",
            "--backend",
            &memcached.addr(),
            "--internal",
            &format!("127.0.0.1:{}", free_port()),
        ],
    );
    let mut conn = Client::connect(node.port);
    assert_eq!(
        text(&conn.call(b"set from-proxy 0 0 2\r\nhi\r\n")),
        "STORED\r\n"
    );
    assert_eq!(
        text(&conn.call(b"get from-proxy\r\n")),
        "VALUE from-proxy 0 2\r\nhi\r\nEND\r\n"
    );
    // It is node 2, and the data is in the memcached given by --backend.
    let s = stats(&mut conn, "");
    assert_eq!(stat(&s, "memdial_node_id"), "2");
    assert_eq!(stat(&s, "memdial_backend"), "memcached");
    // With three nodes the eventual pipeline stores a versioned record
    // (src/consistency/record.rs) whose data ends with the value.
    let mut direct = Client::connect(memcached.port);
    let raw = text(&direct.call(b"get from-proxy\r\n"));
    assert!(
        raw.starts_with("VALUE from-proxy ") && raw.ends_with("hi\r\nEND\r\n"),
        "{raw:?}"
    );
}

/// Runs `memdial serve --config` on `yaml`; returns (exited, success, stderr).
/// A process still running after `WAIT` is killed and reported as not exited.
fn serve_config(yaml: &str) -> (bool, bool, String) {
    let config = TempFile::new("server-test", yaml);
    let mut child = Command::new(memdial_bin())
        .arg("serve")
        .arg("--config")
        .arg(config.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memdial");
    let deadline = Instant::now() + WAIT;
    let exited = loop {
        if child.try_wait().expect("try_wait").is_some() {
            break true;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("wait");
    (exited, out.status.success(), text(&out.stderr))
}

#[test]
fn bad_configs_exit_nonzero_naming_the_field() {
    let node = one_node_yaml();
    let cases = [
        (
            format!("{node}limits:\n  max_conections: 5\n"),
            "max_conections",
        ),
        (format!("{node}retries: 3\n"), "retries"),
        (
            format!("{node}timeouts:\n  idle_timeout_ms: soon\n"),
            "timeouts.idle_timeout_ms",
        ),
        (
            format!("{node}limits:\n  max_pipeline_depth: 0\n"),
            "limits.max_pipeline_depth",
        ),
        (
            format!("{node}limits:\n  max_line_bytes: 100\n"),
            "limits.max_line_bytes",
        ),
        (
            format!("{node}cluster:\n  heartbeat_interval_ms: 5000\n"),
            "cluster.suspect_after_ms",
        ),
        (
            format!("{node}    memcached: nohost\n"),
            "nodes[0].memcached",
        ),
    ];
    for (yaml, field) in cases {
        let (exited, success, stderr) = serve_config(&yaml);
        assert!(exited, "still serving with\n{yaml}");
        assert!(!success, "exited 0 with\n{yaml}");
        assert!(
            stderr.contains(field),
            "stderr does not name {field:?} for\n{yaml}\nstderr: {stderr}"
        );
    }
}

// 12. Bad input.

/// xorshift64*: reproducible bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn garbage_lines_get_error_lines_and_the_connection_stays() {
    let node = Memdial::embedded();
    let mut conn = Client::connect(node.port);
    for seed in [1u64, 0xdead_beef, 0x1234_5678_9abc] {
        let mut rng = Rng(seed);
        let lines = 40;
        let mut burst = Vec::new();
        for _ in 0..lines {
            let len = 1 + (rng.next() % 1000) as usize;
            burst.extend((0..len).map(|_| match rng.next() as u8 {
                b'\n' => b' ',
                b => b,
            }));
            burst.extend_from_slice(b"\r\n");
        }
        burst.extend_from_slice(b"version\r\n");
        conn.send(&burst);
        let mut reply = String::new();
        while !reply.ends_with(&version_line()) {
            reply += &text(&conn.read_reply().expect("reply"));
        }
        let errors: Vec<&str> = reply
            .strip_suffix(&version_line())
            .unwrap()
            .split_terminator("\r\n")
            .collect();
        assert_eq!(errors.len(), lines, "seed {seed:#x}: {reply:?}");
        for e in &errors {
            assert!(
                *e == "ERROR" || e.starts_with("CLIENT_ERROR "),
                "seed {seed:#x}: {e:?}"
            );
        }
    }
    assert_eq!(text(&conn.call(b"set k 0 0 1\r\nv\r\n")), "STORED\r\n");
}

// A get of many keys is answered in parts (memdial holds at most 64 values
// of one reply at a time); the client still sees one reply, in key order.
#[test]
fn a_get_of_many_large_values_is_answered_whole_and_in_order() {
    let memcached = Memcached::start();
    for node in [Memdial::embedded(), Memdial::over(&memcached)] {
        let mut conn = Client::connect(node.port);
        let value = |i: usize| format!("{i:06}").repeat(100_000 / 6);
        let kept: Vec<usize> = (0..200).filter(|i| i % 7 != 0).collect();
        let mut sets = Vec::new();
        for &i in &kept {
            let v = value(i);
            sets.extend_from_slice(format!("set big{i} {i} 0 {}\r\n{v}\r\n", v.len()).as_bytes());
        }
        conn.send(&sets);
        let stored = conn.read_exact_len(kept.len() * b"STORED\r\n".len());
        assert_eq!(text(&stored), "STORED\r\n".repeat(kept.len()));
        let keys: Vec<String> = (0..200).map(|i| format!("big{i}")).collect();
        let mut expected = String::new();
        for &i in &kept {
            let v = value(i);
            expected.push_str(&format!("VALUE big{i} {i} {}\r\n{v}\r\n", v.len()));
        }
        expected.push_str("END\r\n");
        conn.send(format!("get {}\r\n", keys.join(" ")).as_bytes());
        let got = conn.read_exact_len(expected.len());
        assert!(
            got == expected.as_bytes(),
            "the reply differs from the values stored, in order"
        );
        assert!(text(&conn.call(b"version\r\n")).starts_with("VERSION"));
    }
}

/// The client port listens with memcached's backlog (1024), so a burst of
/// clients connecting at once is queued rather than dropped and retried a
/// second later (the kernel's SYN retransmit). `ss` shows a listening
/// socket's backlog as its Send-Q.
#[test]
fn the_client_port_queues_a_burst_of_1024_connections() {
    let node = Memdial::embedded();
    for port in [node.port, node.admin_port] {
        let out = Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs");
        let listing = text(&out.stdout);
        let backlog: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        assert_eq!(backlog, ["1024"], "port {port}: {listing}");
    }
}

// 13. Memory is bounded whatever a client sends.

/// The resident memory of process `pid`, in bytes (VmRSS).
fn rss_bytes(pid: u32) -> u64 {
    rss_kb(pid) * 1024
}

/// The largest RSS of `pid` sampled every 20 ms for `d`.
fn peak_rss(pid: u32, d: Duration) -> u64 {
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < d {
        peak = peak.max(rss_bytes(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    peak
}

const MIB: u64 = 1024 * 1024;

const ITEM: usize = 1_000_000; // a value near item_size_max (1 MiB)

fn big_value(i: usize) -> Vec<u8> {
    vec![b'a' + (i % 26) as u8; ITEM]
}

/// The reply to a `get` of `big{i}` for each of `keys`.
fn big_reply(keys: &[usize]) -> Vec<u8> {
    let mut r = Vec::new();
    for &i in keys {
        r.extend_from_slice(format!("VALUE big{i} 0 {ITEM}\r\n").as_bytes());
        r.extend_from_slice(&big_value(i));
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"END\r\n");
    r
}

/// A node on `backend` holding `big0`..`big{keys-1}`, and its RSS then.
fn node_with_big_values(config: &Path, backend: &str, keys: usize) -> (Memdial, u64) {
    let node = Memdial::serve_with_config(Some(config), &["--node", "1", "--backend", backend]);
    let mut setter = Client::connect(node.port);
    for i in 0..keys {
        let mut req = format!("set big{i} 0 0 {ITEM}\r\n").into_bytes();
        req.extend_from_slice(&big_value(i));
        req.extend_from_slice(b"\r\n");
        assert_eq!(text(&setter.call(&req)), "STORED\r\n", "{backend}");
    }
    let base = peak_rss(node.pid(), Duration::from_millis(200));
    (node, base)
}

// The two reproductions of the "Hardening" issue: a client that pipelines
// gets of large values and never reads made a node hold every reply at
// once (1.3 GB and 1 GB). Replies are now written as they are produced and
// such a connection is not read further, so the node's memory grows by a
// few values per connection at most. The stalled clients then read and get
// every reply, whole and in order.
#[test]
fn clients_that_do_not_read_their_replies_do_not_grow_memory() {
    let memcached = Memcached::start_with_memory_mb(256);
    let config = one_node_config("limits:\n  embedded_memory_bytes: 268435456\n");
    let settle = Duration::from_secs(3);
    // Per connection, twice its reply buffer (4 MiB: one segment's values,
    // and over memcached the backend connection's read buffer), plus
    // allocator slack; before, these grew by 1.2 GB and 1 GB.
    let bound = |conns: u64| conns * 8 * MIB + 32 * MIB;
    for backend in ["embedded".to_string(), memcached.addr()] {
        // Case 1: one connection, 20 pipelined gets of 64 keys (5 KB sent).
        let (node, base) = node_with_big_values(config.path(), &backend, 64);
        let all: Vec<usize> = (0..64).collect();
        let keys: Vec<String> = all.iter().map(|i| format!("big{i}")).collect();
        let mut one = Client::connect(node.port);
        one.send(format!("get {}\r\n", keys.join(" ")).repeat(20).as_bytes());
        let case1 = peak_rss(node.pid(), settle).saturating_sub(base);
        let expected = big_reply(&all);
        for n in 0..20 {
            let got = one.read_reply().expect("case 1 reply");
            assert!(
                got == expected,
                "{backend}: reply {n} of case 1 differs: {:?}",
                text(&got[..got.len().min(100)])
            );
        }
        drop(node);

        // Case 2: 8 connections, each 200 pipelined `get` of one 1 MB value.
        let (node, base) = node_with_big_values(config.path(), &backend, 8);
        let mut eight: Vec<Client> = (0..8).map(|_| Client::connect(node.port)).collect();
        for (c, conn) in eight.iter_mut().enumerate() {
            conn.send(format!("get big{c}\r\n").repeat(200).as_bytes());
        }
        let case2 = peak_rss(node.pid(), settle).saturating_sub(base);
        for (c, conn) in eight.iter_mut().enumerate() {
            let expected = big_reply(&[c]);
            for n in 0..200 {
                let got = conn.read_reply().expect("case 2 reply");
                assert!(
                    got == expected,
                    "{backend}: reply {n} on connection {c} differs: {:?}",
                    text(&got[..got.len().min(100)])
                );
            }
        }
        eprintln!(
            "{backend}: RSS growth case 1 (1 conn): {} MiB, case 2 (8 conns): {} MiB",
            case1 / MIB,
            case2 / MIB
        );
        assert!(
            case1 < bound(1),
            "{backend}: case 1 grew RSS by {case1} bytes"
        );
        assert!(
            case2 < bound(8),
            "{backend}: case 2 grew RSS by {case2} bytes"
        );
    }
}

/// Reads until the peer closes (EOF or a reset); returns how many bytes came.
fn bytes_until_closed(conn: &mut Client) -> usize {
    let mut total = 0;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return total,
            Err(e) => panic!("reading until closed: {e}"),
        }
    }
}

// The node-wide reply budget is one connection's worth here: while a client
// that reads nothing holds it, another client's get waits; the stalled
// client is closed after write_stall_timeout_ms and the other is answered.
#[test]
fn a_client_that_never_reads_is_closed_and_releases_the_node_budget() {
    let config = one_node_config(
        "limits:\n  connection_reply_buffer_bytes: 4194304\n  \
         node_reply_buffer_bytes: 4194304\ntimeouts:\n  write_stall_timeout_ms: 1000\n",
    );
    let (node, _) = node_with_big_values(config.path(), "embedded", 2);
    let mut stalled = Client::connect(node.port);
    stalled.send("get big0\r\n".repeat(200).as_bytes());
    // Give the stalled connection time to take the budget and block.
    poll_until("the node holds the stalled client's replies", || {
        admin_get(&node, "/metrics").contains("memdial_connections_open 1")
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut other = Client::connect(node.port);
    assert_eq!(other.call(b"get big1\r\n"), big_reply(&[1]));
    let got = bytes_until_closed(&mut stalled);
    assert!(
        got < 200 * big_reply(&[0]).len(),
        "the stalled client was sent all {got} bytes, not closed"
    );
    assert_eq!(text(&other.call(b"version\r\n")), version_line());
}

#[test]
fn reply_buffer_settings_are_validated() {
    let node = one_node_yaml();
    for (yaml, field) in [
        (
            format!("{node}limits:\n  connection_reply_buffer_bytes: 0\n"),
            "limits.connection_reply_buffer_bytes",
        ),
        (
            format!(
                "{node}limits:\n  connection_reply_buffer_bytes: 8000000\n  \
                 node_reply_buffer_bytes: 4000000\n"
            ),
            "limits.node_reply_buffer_bytes",
        ),
    ] {
        let (exited, success, stderr) = serve_config(&yaml);
        assert!(exited && !success, "served with\n{yaml}");
        assert!(stderr.contains(field), "{field:?} not in {stderr}");
    }
}

// A config path to something endless or huge is refused at once, naming
// the cap, instead of being read until memory runs out.
#[test]
fn an_endless_or_huge_config_file_is_refused() {
    let huge = format!("{}{}", one_node_yaml(), "# padding\n".repeat(200_000));
    let (exited, success, stderr) = serve_config(&huge);
    assert!(exited && !success, "served a 2 MB config");
    assert!(stderr.contains("larger than 1048576 bytes"), "{stderr}");

    let started = Instant::now();
    let out = Command::new(memdial_bin())
        .args(["serve", "--config", "/dev/zero"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run memdial");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/dev/zero is larger than"), "{stderr}");
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
}

// 14. File descriptors.

/// `memdial serve` of `config` with the embedded store under `prlimit
/// --nofile=SOFT:HARD` (util-linux; it execs memdial, so the pid is
/// memdial's); returns the process, its client and its admin port.
fn serve_under_nofile(soft: u64, hard: u64, config: &Path) -> (Proc, u16, u16) {
    start_with_retry("memdial under prlimit", || {
        let (port, admin) = (free_port(), free_port());
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={soft}:{hard}"))
            .arg("--")
            .arg(memdial_bin())
            .args(["serve", "--node", "1", "--backend", "embedded", "--config"])
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn(format!("memdial :{port} (prlimit on PATH)"), &mut cmd);
        proc.wait_ready(&[port, admin])?;
        Ok((proc, port, admin))
    })
}

/// The soft and hard "Max open files" of process `pid`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

#[test]
fn start_up_raises_the_open_file_soft_limit_to_the_hard_limit() {
    let config = one_node_config("");
    let (proc, port, _) = serve_under_nofile(256, 4096, config.path());
    assert_eq!(open_file_limits(proc.pid()), (4096, 4096));
    assert!(new_connection_served(port));
}

// With the soft and hard limit at 256 and max_connections at its default
// (1024), the node serves what fits and answers the rest memcached's
// refusal: nobody hangs, and connected clients and the admin port go on.
#[test]
fn out_of_descriptors_connected_clients_and_the_admin_port_keep_serving() {
    let config = one_node_config("");
    let (proc, port, admin) = serve_under_nofile(256, 256, config.path());
    assert_eq!(open_file_limits(proc.pid()), (256, 256));
    let mut first = Client::connect(port);
    assert_eq!(text(&first.call(b"set k 0 0 1\r\nv\r\n")), "STORED\r\n");
    let max = stat_u64(&stats(&mut first, ""), "max_connections");
    assert!(
        max < 256,
        "max_connections {max} was not lowered to fit 256 files"
    );

    // Each new client gets an answer: served, or refused with memcached's
    // line (or, past the refusals in flight, closed); none hangs.
    let (mut served, mut refused) = (Vec::new(), 0);
    for n in 0..400 {
        let mut conn = Client::connect(port);
        match conn.try_call(b"version\r\n") {
            Ok(r) if text(&r) == version_line() => served.push(conn),
            Ok(r) if r == b"ERROR Too many open connections\r\n" => refused += 1,
            Ok(r) => panic!("client {n} got {:?}", text(&r)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                refused += 1
            }
            Err(e) => panic!("client {n} got no answer: {e}"),
        }
    }
    assert!(refused > 0, "all 400 served under a 256-file limit");
    assert!(
        served.len() as u64 <= max && served.len() >= 100,
        "{} served, max_connections {max}",
        served.len()
    );
    // The connected clients and the admin port still answer.
    assert_eq!(
        text(&first.call(b"get k\r\n")),
        "VALUE k 0 1\r\nv\r\nEND\r\n"
    );
    for conn in served.iter_mut().step_by(10) {
        assert_eq!(text(&conn.call(b"version\r\n")), version_line());
    }
    let health = http_get(admin, "/health").expect("GET /health at the limit");
    assert_eq!(health.trim(), "ok");
    let metrics = http_get(admin, "/metrics").expect("GET /metrics at the limit");
    assert!(metrics.contains("memdial_connections_rejected_total"));
    // A place freed is served again.
    served.truncate(0);
    poll_until("a new connection served after others closed", || {
        new_connection_served(port)
    });
    drop(proc);
}

/// Resident memory of `pid` in KB.
fn rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS").expect("VmRSS in /proc/PID/status")
}

#[test]
fn idle_connections_give_their_buffers_back() {
    // Each connection runs a set and a get, which gives it a read and a
    // write buffer (16 KiB each, a page of each touched), then stays open
    // and idle. A connection that keeps them holds 11-12 KB; one that gave
    // them back after a second without a request holds its task, about
    // 3 KB (`benches/idle.rs`, docs/BENCHMARKS.md). RSS goes down once
    // the allocator has returned the freed pages, about a second later.
    const CONNS: usize = 400;
    const BOUND_KB: u64 = 6;
    let node = Memdial::embedded();
    let mut control = Client::connect(node.port);
    assert_eq!(control.set("idle", 0, 0, b"value").unwrap(), "STORED");
    let before = rss_kb(node.pid());
    let mut conns = Vec::new();
    for i in 0..CONNS {
        let mut c = Client::connect(node.port);
        assert_eq!(c.set(&format!("idle{i}"), 0, 0, b"x").unwrap(), "STORED");
        assert_eq!(c.get("idle").unwrap(), Some((0, b"value".to_vec())));
        conns.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let per_conn = || rss_kb(node.pid()).saturating_sub(before) / CONNS as u64;
    while per_conn() >= BOUND_KB {
        assert!(
            Instant::now() < deadline,
            "{} KB resident per connection after 20 s idle",
            per_conn()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Given back, not lost: every connection still answers.
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(
            c.get(&format!("idle{i}")).unwrap(),
            Some((0, b"x".to_vec()))
        );
    }
}

#[test]
fn a_request_split_by_an_idle_pause_is_answered_whole() {
    // The start of a request waits in the read buffer while its
    // connection gives back what it keeps between requests (after one to
    // two seconds without a request); the rest then completes it.
    let node = Memdial::embedded();
    let mut c = Client::connect(node.port);
    assert_eq!(c.set("paused", 3, 0, b"value").unwrap(), "STORED");
    c.send(b"get pau");
    std::thread::sleep(Duration::from_millis(2_500));
    c.send(b"sed\r\nset after 0 0 2\r\n");
    std::thread::sleep(Duration::from_millis(2_500));
    c.send(b"ok\r\n");
    assert_eq!(
        text(&c.read_until(b"STORED\r\n")),
        "VALUE paused 3 5\r\nvalue\r\nEND\r\nSTORED\r\n"
    );
    assert_eq!(c.get("after").unwrap(), Some((0, b"ok".to_vec())));
}

#[test]
fn idle_connections_keep_no_grown_buffers() {
    // Each connection sends a 256 KB value (its read buffer grows to hold
    // it) and gets 256 KB of small values (copied into its write buffer),
    // then stays open and idle. Kept buffers would cost each at least
    // 256 KB; an idle connection holds a few KB. The bound sits far from
    // both.
    const CONNS: usize = 200;
    const VALUE: usize = 256 * 1024;
    const SMALL: usize = 4 * 1024;
    let node = Memdial::embedded();
    let mut control = Client::connect(node.port);
    let keys: Vec<String> = (0..VALUE / SMALL).map(|i| format!("small{i}")).collect();
    for k in &keys {
        assert_eq!(control.set(k, 0, 0, &[b's'; SMALL]).unwrap(), "STORED");
    }
    let value = vec![b'v'; VALUE];
    assert_eq!(control.set("big", 0, 0, &value).unwrap(), "STORED");
    let before = rss_kb(node.pid());
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let mut c = Client::connect(node.port);
        assert_eq!(c.set("big", 0, 0, &value).unwrap(), "STORED");
        assert_eq!(c.get_many(&keys).unwrap().len(), keys.len());
        conns.push(c);
    }
    let per_conn = rss_kb(node.pid()).saturating_sub(before) / CONNS as u64;
    assert!(
        per_conn < 64,
        "{per_conn} KB resident per idle connection after moving {} KB each",
        VALUE / 1024
    );
}
