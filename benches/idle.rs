//! Memory per idle connection (issue 9, goal 6): how much resident memory
//! a server holds for each open, idle client connection, and how much of
//! it comes back when the connections close.
//!
//! Run: `cargo bench --bench idle -- [options]` (cargo builds the memdial
//! binary it starts; `MEMDIAL_BIN=path` measures another build).
//!
//! Targets, each a fresh process started by the test harness
//! (`tests/common/procs.rs`): memdial with its embedded store, memdial in
//! front of memcached, memcached direct and (when `nutcracker` is on PATH)
//! twemproxy in front of memcached. For a proxy the proxy's memory is
//! measured, not the memcached behind it.
//!
//! For each target: `VmRSS` (from `/proc/PID/status`) of the fresh process
//! (the idle node) and its `RssAnon` (the part that is not the program's
//! and libraries' pages), then after a prefill over one control
//! connection that stays open (the base), then two cases, each opening
//! `--conns` client connections one after another, leaving them open and
//! idle, then closing them all:
//!   small  each connection sends `get idle:small` (a 32-byte value) and
//!          reads the reply, so the buffers of a connection have been used;
//!   grown  each connection sets a `--large`-byte value and gets 100 keys of
//!          `--large`/100 bytes in one request, so a server that keeps what
//!          a connection once needed keeps a grown read and write buffer.
//! "per conn" is (RSS with the connections open - RSS before) / conns,
//! read `--settle-ms` after the last one opened ("open"), and again once
//! they have been idle `--idle-ms` more ("idle": memdial gives back a
//! connection's buffers after 1 s without a request);
//! "after close" is the RSS once the server counts the connections closed
//! (`curr_connections` of `stats`, or twemproxy's stats port) and
//! `--closed-ms` more have passed (memdial's allocator, jemalloc, gives
//! freed pages back on a timer, about a second after they are freed:
//! `.cargo/config.toml`).
//!
//! Options (defaults in brackets; `--name value` or `--name=value`):
//!   --conns N [1000]      client connections per case
//!   --large BYTES [102400] value moved per connection in the grown case
//!   --settle-ms MS [500]  wait before each RSS reading
//!   --idle-ms MS [3000]   wait after the "open" reading before the "idle" one
//!   --closed-ms MS [5000] wait before the RSS reading after the close
//!   --only LIST           targets by name: embedded,over,memcached,twemproxy
//!
//! Every read and connect has a deadline; only 127.0.0.1 is used.

#[path = "../tests/common/procs.rs"]
mod procs;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use procs::{Memcached, Memdial, Twemproxy};

/// Longest wait for a connect, a read or a write.
const STALL: Duration = Duration::from_secs(10);
/// Longest wait for the server to count the connections closed.
const CLOSE_WAIT: Duration = Duration::from_secs(20);
/// Keys of the grown case's multi-key get.
const GET_KEYS: usize = 100;

struct Opts {
    conns: usize,
    large: usize,
    settle: Duration,
    idle: Duration,
    closed: Duration,
    only: Option<Vec<String>>,
}

fn opts() -> Opts {
    let mut o = Opts {
        conns: 1000,
        large: 100 * 1024,
        settle: Duration::from_millis(500),
        idle: Duration::from_millis(3_000),
        closed: Duration::from_millis(5_000),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        if ![
            "--conns",
            "--large",
            "--settle-ms",
            "--idle-ms",
            "--closed-ms",
            "--only",
        ]
        .contains(&name.as_str())
        {
            // cargo passes `--bench`.
            continue;
        }
        let value = inline
            .or_else(|| args.next())
            .unwrap_or_else(|| panic!("{name} needs a value"));
        let number = || -> usize {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}: expected a number, got {value:?}"))
        };
        match name.as_str() {
            "--conns" => o.conns = number().max(1),
            "--large" => o.large = number().max(GET_KEYS),
            "--settle-ms" => o.settle = Duration::from_millis(number() as u64),
            "--idle-ms" => o.idle = Duration::from_millis(number() as u64),
            "--closed-ms" => o.closed = Duration::from_millis(number() as u64),
            _ => o.only = Some(value.split(',').map(str::to_string).collect()),
        }
    }
    o
}

/// Resident memory of `pid` in KB.
fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS")
}

/// A kB figure of `/proc/PID/status`, by its field name.
fn status_kb(pid: u32, field: &str) -> u64 {
    procs::proc_status_kb(pid, field).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The fresh process: all its resident memory, and the part of it that is
/// its own (`RssAnon`: heap and stacks, not the pages of its program and
/// libraries, which the page cache shares).
#[derive(Clone, Copy)]
struct Fresh {
    rss: u64,
    anon: u64,
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s =
        TcpStream::connect_timeout(&addr, STALL).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(STALL)).expect("read timeout");
    s.set_write_timeout(Some(STALL)).expect("write timeout");
    let _ = s.set_nodelay(true);
    s
}

/// Sends `request` and reads until the reply ends with `end`.
fn call(s: &mut TcpStream, request: &[u8], end: &[u8]) -> Vec<u8> {
    s.write_all(request).expect("write request");
    let mut reply = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let deadline = Instant::now() + STALL;
    while !reply.ends_with(end) {
        assert!(Instant::now() < deadline, "no whole reply within {STALL:?}");
        let n = s.read(&mut chunk).expect("read reply");
        assert!(n > 0, "closed before the reply ended: {:?}", tail(&reply));
        reply.extend_from_slice(&chunk[..n]);
        assert!(
            !reply.starts_with(b"SERVER_ERROR") && !reply.starts_with(b"CLIENT_ERROR"),
            "error reply: {:?}",
            tail(&reply)
        );
    }
    reply
}

fn tail(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[b.len().saturating_sub(200)..]).into_owned()
}

fn set(key: &str, len: usize) -> Vec<u8> {
    let mut r = format!("set {key} 0 0 {len}\r\n").into_bytes();
    r.resize(r.len() + len, b'v');
    r.extend_from_slice(b"\r\n");
    r
}

fn multi_get() -> Vec<u8> {
    let keys: Vec<String> = (0..GET_KEYS).map(|j| format!("idle:k{j}")).collect();
    format!("get {}\r\n", keys.join(" ")).into_bytes()
}

/// One server under measurement.
struct Target<'a> {
    name: &'static str,
    pid: u32,
    addr: SocketAddr,
    /// The server's count of its client connections.
    connections: Box<dyn Fn() -> u64 + 'a>,
}

/// `curr_connections` from a memcached-style `stats` on `control`.
fn stats_connections(control: &std::cell::RefCell<TcpStream>) -> u64 {
    let reply = call(&mut control.borrow_mut(), b"stats\r\n", b"END\r\n");
    String::from_utf8_lossy(&reply)
        .lines()
        .find_map(|l| l.strip_prefix("STAT curr_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("stats without curr_connections")
}

/// `curr_connections` from twemproxy's stats port (JSON, sent on connect).
fn twemproxy_connections(stats_port: u16) -> u64 {
    let mut s = connect(SocketAddr::from(([127, 0, 0, 1], stats_port)));
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read twemproxy stats");
    let key = "\"curr_connections\":";
    let at = text
        .find(key)
        .expect("twemproxy stats without curr_connections")
        + key.len();
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("twemproxy curr_connections")
}

struct Row {
    target: &'static str,
    case: &'static str,
    fresh: Fresh,
    before: u64,
    open: u64,
    idle: u64,
    after: u64,
    conns: usize,
}

/// Opens `o.conns` connections, each sending `requests` (with their reply
/// ends), measures, closes them and measures again.
fn case(
    t: &Target,
    o: &Opts,
    case: &'static str,
    fresh: Fresh,
    requests: &[(Vec<u8>, &[u8])],
) -> Row {
    let started = Instant::now();
    let idle = (t.connections)();
    std::thread::sleep(o.settle);
    let before = rss_kb(t.pid);
    let mut open = Vec::with_capacity(o.conns);
    for _ in 0..o.conns {
        let mut s = connect(t.addr);
        for (request, end) in requests {
            call(&mut s, request, end);
        }
        open.push(s);
    }
    eprintln!("{} {case}: opened in {:?}", t.name, started.elapsed());
    std::thread::sleep(o.settle);
    let with_open = rss_kb(t.pid);
    std::thread::sleep(o.idle);
    let idle_open = rss_kb(t.pid);
    drop(open);
    let deadline = Instant::now() + CLOSE_WAIT;
    while (t.connections)() > idle {
        assert!(
            Instant::now() < deadline,
            "{}: connections not counted closed within {CLOSE_WAIT:?}",
            t.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{} {case}: closed in {:?}", t.name, started.elapsed());
    std::thread::sleep(o.closed);
    Row {
        target: t.name,
        case,
        fresh,
        before,
        open: with_open,
        idle: idle_open,
        after: rss_kb(t.pid),
        conns: o.conns,
    }
}

fn measure(
    t: &Target,
    control: &std::cell::RefCell<TcpStream>,
    o: &Opts,
    fresh: Fresh,
) -> Vec<Row> {
    {
        let mut c = control.borrow_mut();
        call(&mut c, &set("idle:small", 32), b"STORED\r\n");
        call(&mut c, &set("idle:big", o.large), b"STORED\r\n");
        for j in 0..GET_KEYS {
            call(
                &mut c,
                &set(&format!("idle:k{j}"), o.large / GET_KEYS),
                b"STORED\r\n",
            );
        }
    }
    let small: &[(Vec<u8>, &[u8])] = &[(b"get idle:small\r\n".to_vec(), b"END\r\n")];
    let grown: &[(Vec<u8>, &[u8])] = &[
        (set("idle:big", o.large), b"STORED\r\n"),
        (multi_get(), b"END\r\n"),
    ];
    vec![
        case(t, o, "small", fresh, small),
        case(t, o, "grown", fresh, grown),
    ]
}

fn wanted(o: &Opts, name: &str) -> bool {
    o.only.as_ref().is_none_or(|l| l.iter().any(|n| n == name))
}

fn print(rows: &[Row]) {
    println!(
        "{:<22} {:<6} {:>9} {:>8} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8}",
        "target",
        "case",
        "fresh KB",
        "anon KB",
        "before KB",
        "open KB",
        "idle KB",
        "closed KB",
        "KB/c open",
        "KB/c idle",
        "kept KB"
    );
    for r in rows {
        let per = |kb: u64| (kb as f64 - r.before as f64) / r.conns as f64;
        println!(
            "{:<22} {:<6} {:>9} {:>8} {:>10} {:>9} {:>9} {:>10} {:>9.2} {:>9.2} {:>8}",
            r.target,
            r.case,
            r.fresh.rss,
            r.fresh.anon,
            r.before,
            r.open,
            r.idle,
            r.after,
            per(r.open),
            per(r.idle),
            r.after as i64 - r.before as i64
        );
    }
}

fn main() {
    let o = opts();
    // Each open connection is a descriptor here.
    if let Err(e) = rlimit::increase_nofile_limit(o.conns as u64 + 256) {
        println!("could not raise the descriptor limit: {e}");
    }
    println!(
        "memdial: {}; {} connections per case; grown: {}-byte set + get of {GET_KEYS} x {} bytes",
        procs::memdial_bin().display(),
        o.conns,
        o.large,
        o.large / GET_KEYS
    );
    let mut rows = Vec::new();
    let settle_fresh = |pid| {
        std::thread::sleep(o.settle);
        Fresh {
            rss: rss_kb(pid),
            anon: status_kb(pid, "RssAnon"),
        }
    };
    if wanted(&o, "embedded") {
        let m = Memdial::start(None, &["--backend", "embedded"], "error");
        let fresh = settle_fresh(m.pid());
        let control = std::cell::RefCell::new(connect(m.addr()));
        let t = Target {
            name: "memdial embedded",
            pid: m.pid(),
            addr: m.addr(),
            connections: Box::new(|| stats_connections(&control)),
        };
        rows.extend(measure(&t, &control, &o, fresh));
    }
    if wanted(&o, "over") {
        let mc = Memcached::start_with_memory_mb(256);
        let m = Memdial::start(None, &["--backend", &mc.addr()], "error");
        let fresh = settle_fresh(m.pid());
        let control = std::cell::RefCell::new(connect(m.addr()));
        let t = Target {
            name: "memdial -> memcached",
            pid: m.pid(),
            addr: m.addr(),
            connections: Box::new(|| stats_connections(&control)),
        };
        rows.extend(measure(&t, &control, &o, fresh));
    }
    if wanted(&o, "memcached") {
        let mc = Memcached::start_with_memory_mb(256);
        let fresh = settle_fresh(mc.pid());
        let addr: SocketAddr = mc.addr().parse().expect("memcached addr");
        let control = std::cell::RefCell::new(connect(addr));
        let t = Target {
            name: "memcached",
            pid: mc.pid(),
            addr,
            connections: Box::new(|| stats_connections(&control)),
        };
        rows.extend(measure(&t, &control, &o, fresh));
    }
    if wanted(&o, "twemproxy") {
        match Twemproxy::version() {
            None => println!("twemproxy: nutcracker not on PATH; skipped"),
            Some(v) => {
                println!("twemproxy: {v}");
                let mc = Memcached::start_with_memory_mb(256);
                let tp = Twemproxy::start(&mc);
                let fresh = settle_fresh(tp.pid());
                let addr = SocketAddr::from(([127, 0, 0, 1], tp.port));
                let control = std::cell::RefCell::new(connect(addr));
                let stats_port = tp.stats_port;
                let t = Target {
                    name: "twemproxy",
                    pid: tp.pid(),
                    addr,
                    connections: Box::new(move || twemproxy_connections(stats_port)),
                };
                rows.extend(measure(&t, &control, &o, fresh));
            }
        }
    }
    print(&rows);
}
