//! Cluster harness: N memdial processes started from one config file per
//! node, an optional real memcached behind each, optional TCP relays between
//! every directed pair of peers (for partitions), replica dumps taken
//! straight from each memcached, and a convergence check that compares them.
//!
//! Declared from a test file next to `mod common;` as
//! `#[path = "common/cluster.rs"] mod cluster_harness;`.
#![allow(dead_code)] // each test uses part of the harness

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::common::record::{HEADER_BYTES, Header};
use crate::common::{Memcached, free_port, memdial_bin, wait_for_port};

/// How long a cluster may take to come up (every peer `up` on every node).
pub const UP_WAIT: Duration = Duration::from_secs(20);
/// The longest a test accepts for replicas to converge.
pub const CONVERGE_WAIT: Duration = Duration::from_secs(15);
/// Read timeout of every harness connection.
const IO_WAIT: Duration = Duration::from_secs(10);

/// Sleeps between polls. Never used to wait for readiness by itself: every
/// caller re-checks a condition and has a deadline.
pub fn poll_pause() {
    std::thread::sleep(Duration::from_millis(50));
}

// ---------------------------------------------------------------------------
// A memcached text-protocol client that frames replies properly.

pub type Values = BTreeMap<Vec<u8>, (u32, Vec<u8>)>;

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl Client {
    pub fn connect(port: u16) -> Client {
        Client::try_connect(port).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"))
    }

    pub fn try_connect(port: u16) -> io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(IO_WAIT))?;
        stream.set_write_timeout(Some(IO_WAIT))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed; have {:?}", String::from_utf8_lossy(&self.buf)),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One line without its `\r\n`.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends a request answered by one line; returns that line.
    pub fn one_line(&mut self, request: &[u8]) -> io::Result<String> {
        self.send(request)?;
        Ok(String::from_utf8_lossy(&self.line()?).into_owned())
    }

    pub fn set(&mut self, key: &str, flags: u32, exptime: i64, value: &[u8]) -> io::Result<String> {
        let mut req = format!("set {key} {flags} {exptime} {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        self.one_line(&req)
    }

    pub fn delete(&mut self, key: &str) -> io::Result<String> {
        self.one_line(format!("delete {key}\r\n").as_bytes())
    }

    pub fn incr(&mut self, key: &str, delta: u64) -> io::Result<String> {
        self.one_line(format!("incr {key} {delta}\r\n").as_bytes())
    }

    /// `get` of many keys in batches; returns what was found.
    pub fn get_many<K: AsRef<[u8]>>(&mut self, keys: &[K]) -> io::Result<Values> {
        let mut out = BTreeMap::new();
        for batch in keys.chunks(50) {
            let mut req = b"get".to_vec();
            for k in batch {
                req.push(b' ');
                req.extend_from_slice(k.as_ref());
            }
            req.extend_from_slice(b"\r\n");
            self.send(&req)?;
            loop {
                let line = self.line()?;
                if line == b"END" {
                    break;
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                let parts: Vec<&str> = text.split(' ').collect();
                if parts.len() < 4 || parts[0] != "VALUE" {
                    return Err(other(format!("unexpected get reply line {text:?}")));
                }
                let flags: u32 = parts[2].parse().map_err(|_| other(text.clone()))?;
                let len: usize = parts[3].parse().map_err(|_| other(text.clone()))?;
                let mut data = self.take(len + 2)?;
                if !data.ends_with(b"\r\n") {
                    return Err(other(format!("value of {} not followed by CRLF", parts[1])));
                }
                data.truncate(len);
                out.insert(parts[1].as_bytes().to_vec(), (flags, data));
            }
        }
        Ok(out)
    }

    pub fn get(&mut self, key: &str) -> io::Result<Option<(u32, Vec<u8>)>> {
        Ok(self.get_many(&[key])?.remove(key.as_bytes()))
    }

    /// Lines up to `END` (exclusive), for `stats`.
    /// Stops early at a line starting with one of `early`.
    fn lines_until_end(&mut self, request: &[u8], early: &[&str]) -> io::Result<Vec<String>> {
        self.send(request)?;
        let mut out = Vec::new();
        loop {
            let line = String::from_utf8_lossy(&self.line()?).into_owned();
            if line == "END" {
                return Ok(out);
            }
            let stop = early.iter().any(|e| line.starts_with(e));
            out.push(line);
            if stop {
                return Ok(out);
            }
        }
    }

    /// `lru_crawler metadump <what>` (`all`, `hash`): its lines end in a
    /// bare `\n`, only the final `END` in `\r\n`. Returns the lines (without
    /// `END`), or the one line of a refusal (`BUSY ...`, `ERROR ...`).
    pub fn metadump(&mut self, what: &str) -> io::Result<Vec<String>> {
        self.send(format!("lru_crawler metadump {what}\r\n").as_bytes())?;
        loop {
            let refusal = ["BUSY", "ERROR", "CLIENT_ERROR", "SERVER_ERROR"]
                .iter()
                .any(|r| self.buf.starts_with(r.as_bytes()));
            if refusal && let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(vec![line]);
            }
            if self.buf == b"END\r\n" || self.buf.ends_with(b"\nEND\r\n") {
                let all = std::mem::take(&mut self.buf);
                return Ok(all[..all.len() - 5]
                    .split(|&b| b == b'\n')
                    .map(|l| {
                        String::from_utf8_lossy(l.strip_suffix(b"\r").unwrap_or(l)).into_owned()
                    })
                    .filter(|l| !l.is_empty())
                    .collect());
            }
            self.fill()?;
        }
    }

    /// `stats <section>` as name → value.
    pub fn stats(&mut self, section: &str) -> io::Result<BTreeMap<String, String>> {
        let req = if section.is_empty() {
            "stats\r\n".to_string()
        } else {
            format!("stats {section}\r\n")
        };
        let lines =
            self.lines_until_end(req.as_bytes(), &["ERROR", "CLIENT_ERROR", "SERVER_ERROR"])?;
        let mut out = BTreeMap::new();
        for l in lines {
            let Some(rest) = l.strip_prefix("STAT ") else {
                return Err(other(format!("unexpected stats line {l:?}")));
            };
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            out.insert(name.to_string(), value.to_string());
        }
        Ok(out)
    }
}

/// GET on an HTTP port; returns the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(IO_WAIT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| other("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(other(format!("HTTP answer {head:?}")));
    }
    Ok(body.to_string())
}

/// The value of one sample in Prometheus text, e.g.
/// `metric(text, "memdial_peer_up{peer=\"2\"}")`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------
// A TCP relay that can cut (partition) and heal.

pub struct Relay {
    pub port: u16,
    shared: Arc<RelayShared>,
}

struct RelayShared {
    target: SocketAddr,
    stop: AtomicBool,
    state: Mutex<RelayState>,
}

#[derive(Default)]
struct RelayState {
    cut: bool,
    next_id: u64,
    /// Both sockets of every forwarded connection, to close them on `cut`.
    conns: BTreeMap<u64, (TcpStream, TcpStream)>,
}

impl RelayShared {
    fn state(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Relay {
    /// Listens on a fresh port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let shared = Arc::new(RelayShared {
            target,
            stop: AtomicBool::new(false),
            state: Mutex::new(RelayState::default()),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(listener, s));
        Relay { port, shared }
    }

    /// Closes every forwarded connection and closes new ones at once.
    pub fn cut(&self) {
        let mut st = self.shared.state();
        st.cut = true;
        for (_, (a, b)) in std::mem::take(&mut st.conns) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.shared.state().cut = false;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<RelayShared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if shared.state().cut {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(1))
        else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
            client.try_clone(),
            upstream.try_clone(),
            client.try_clone(),
            upstream.try_clone(),
        ) else {
            continue;
        };
        let id = {
            let mut st = shared.state();
            if st.cut {
                let _ = client.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
                continue;
            }
            st.next_id += 1;
            let id = st.next_id;
            st.conns.insert(id, (c3, u3));
            id
        };
        let s1 = shared.clone();
        let s2 = shared.clone();
        std::thread::spawn(move || pump(client, upstream, id, s1));
        std::thread::spawn(move || pump(u2, c2, id, s2));
    }
}

/// Copies `from` → `to` until either side ends, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, shared: Arc<RelayShared>) {
    let mut buf = [0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    shared.state().conns.remove(&id);
}

// ---------------------------------------------------------------------------
// Replica dumps.

/// One stored item as memcached holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub flags: u32,
    /// The stored bytes, memdial's header included.
    pub raw: Vec<u8>,
    /// `exp` from `lru_crawler metadump` (absolute unix seconds, -1 never).
    pub exp: i64,
}

impl Item {
    /// memdial's header in front of the data; `None` without one.
    pub fn header(&self) -> Option<Header> {
        Header::decode(&self.raw)
    }

    /// The client's data (after the header).
    pub fn data(&self) -> &[u8] {
        self.raw.get(HEADER_BYTES..).unwrap_or(&[])
    }

    pub fn is_tombstone(&self) -> bool {
        self.header().is_some_and(|h| h.tombstone)
    }

    fn describe(&self) -> String {
        let data = String::from_utf8_lossy(&self.data()[..self.data().len().min(24)]).into_owned();
        match self.header() {
            Some(h) => format!(
                "{} v={}.{}@{} deadline_ms={} flags={} exp={} data={:?} ({} B)",
                if h.tombstone { "TOMBSTONE" } else { "live" },
                h.ts >> 16,
                h.ts & 0xffff,
                h.node,
                h.deadline_ms,
                self.flags,
                self.exp,
                data,
                self.data().len()
            ),
            None => format!(
                "NO HEADER flags={} exp={} raw={:?}",
                self.flags,
                self.exp,
                String::from_utf8_lossy(&self.raw)
            ),
        }
    }
}

pub type Dump = BTreeMap<Vec<u8>, Item>;

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Every item of the memcached on `port`: keys from `lru_crawler metadump
/// hash`, values from `get`.
///
/// Not `metadump all`: memcached 1.6.18 walks its LRU lists for that, and
/// while clients read (items move between the segmented LRU's lists) it
/// lists anywhere from none to all of the keys (measured: 300 items, a
/// reader running, 38 of 300 listings complete, 31 empty). `metadump hash`
/// walks the hash table and listed all 300 keys every time.
pub fn dump_memcached(port: u16) -> Dump {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut c = Client::connect(port);
    let listing = loop {
        let lines = c.metadump("hash").expect("lru_crawler metadump hash");
        match lines.last() {
            Some(l) if l.starts_with("BUSY") => {
                assert!(
                    Instant::now() < deadline,
                    "lru_crawler stays busy on {port}"
                );
                poll_pause();
            }
            Some(l) if !l.starts_with("key=") => panic!("lru_crawler metadump on {port}: {l}"),
            _ => break lines,
        }
    };
    let mut exps = BTreeMap::new();
    for l in &listing {
        let mut key = None;
        let mut exp = None;
        for field in l.split(' ') {
            if let Some(k) = field.strip_prefix("key=") {
                key = Some(percent_decode(k));
            } else if let Some(e) = field.strip_prefix("exp=") {
                exp = e.parse::<i64>().ok();
            }
        }
        let (Some(k), Some(e)) = (key, exp) else {
            panic!("unexpected metadump line on {port}: {l:?}");
        };
        exps.insert(k, e);
    }
    let keys: Vec<Vec<u8>> = exps.keys().cloned().collect();
    let values = c.get_many(&keys).expect("get from memcached");
    values
        .into_iter()
        .map(|(k, (flags, raw))| {
            let exp = exps[&k];
            (k, Item { flags, raw, exp })
        })
        .collect()
}

/// A readable account of how dumps differ (empty when they are equal).
pub fn diff_summary(dumps: &[(usize, Dump)]) -> String {
    let mut out = String::new();
    for (node, d) in dumps {
        let tombs = d.values().filter(|i| i.is_tombstone()).count();
        out += &format!(
            "node {node}: {} keys ({} live, {} tombstones)\n",
            d.len(),
            d.len() - tombs,
            tombs
        );
    }
    let all: BTreeSet<&Vec<u8>> = dumps.iter().flat_map(|(_, d)| d.keys()).collect();
    let (mut missing, mut tomb_deadline_only, mut differ) = (0, 0, 0);
    let mut shown = Vec::new();
    for key in all {
        let items: Vec<Option<&Item>> = dumps.iter().map(|(_, d)| d.get(key)).collect();
        if items.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        let kind = if items.iter().any(|i| i.is_none()) {
            missing += 1;
            "missing on some node"
        } else {
            let hs: Vec<Option<Header>> = items.iter().map(|i| i.and_then(Item::header)).collect();
            let same_but_deadline = hs.iter().all(|h| h.is_some_and(|h| h.tombstone))
                && hs
                    .windows(2)
                    .all(|w| w[0].map(|h| (h.ts, h.node)) == w[1].map(|h| (h.ts, h.node)));
            if same_but_deadline {
                tomb_deadline_only += 1;
                "same tombstone version, different tombstone deadline/exp"
            } else {
                differ += 1;
                "different items"
            }
        };
        if shown.len() < 8 {
            let mut s = format!("  key {:?}: {kind}\n", String::from_utf8_lossy(key));
            for ((node, _), item) in dumps.iter().zip(&items) {
                s += &format!(
                    "    node {node}: {}\n",
                    item.map_or("absent".to_string(), Item::describe)
                );
            }
            shown.push(s);
        }
    }
    if missing + tomb_deadline_only + differ == 0 {
        return String::new();
    }
    out += &format!(
        "{} differing keys: {missing} missing on some node, {differ} with different items, \
         {tomb_deadline_only} tombstones equal but for their deadline\nfirst ones:\n",
        missing + tomb_deadline_only + differ
    );
    for s in shown {
        out += &s;
    }
    out
}

// ---------------------------------------------------------------------------
// The cluster.

#[derive(Debug, Clone, Default)]
pub struct ClusterOpts {
    /// One real memcached per node (otherwise the embedded store).
    pub memcached: bool,
    /// A relay in front of every directed peer pair.
    pub relays: bool,
    /// Per-node `cluster.secret` overrides: (node id, secret).
    pub secrets: Vec<(usize, String)>,
    /// `cluster.anti_entropy_interval_ms`; `None` leaves it out of the
    /// config (the production default).
    pub anti_entropy_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    pub client: u16,
    pub internal: u16,
    pub admin: u16,
}

pub struct TestCluster {
    pub n: usize,
    dir: PathBuf,
    ports: Vec<NodePorts>,
    configs: Vec<PathBuf>,
    procs: Vec<Option<Child>>,
    memcacheds: Vec<Option<Memcached>>,
    /// (from, to) → the relay `from` dials to reach `to`.
    relays: BTreeMap<(usize, usize), Relay>,
    anti_entropy_interval_ms: Option<u64>,
}

pub const SECRET: &str = "test-secret-0123456789";

static CLUSTERS: AtomicU64 = AtomicU64::new(0);

impl TestCluster {
    /// Starts `n` nodes and waits until every node has every peer `up`.
    pub fn start(n: usize, opts: ClusterOpts) -> TestCluster {
        let c = TestCluster::start_unchecked(n, opts);
        c.wait_all_up(UP_WAIT);
        c
    }

    /// Starts `n` nodes and waits only for their client ports.
    pub fn start_unchecked(n: usize, opts: ClusterOpts) -> TestCluster {
        assert!(n >= 2, "a cluster has at least 2 nodes");
        let unique = format!(
            "memdial-cluster-{}-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let dir = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let mut taken = BTreeSet::new();
        let mut port = || loop {
            let p = free_port();
            if taken.insert(p) {
                return p;
            }
        };
        let ports: Vec<NodePorts> = (0..n)
            .map(|_| NodePorts {
                client: port(),
                internal: port(),
                admin: port(),
            })
            .collect();
        let memcacheds: Vec<Option<Memcached>> = (0..n)
            .map(|_| opts.memcached.then(Memcached::start))
            .collect();
        let mut relays = BTreeMap::new();
        if opts.relays {
            for from in 1..=n {
                for to in 1..=n {
                    if from != to {
                        let target = SocketAddr::from(([127, 0, 0, 1], ports[to - 1].internal));
                        relays.insert((from, to), Relay::start(target));
                    }
                }
            }
        }
        let mut c = TestCluster {
            n,
            dir,
            ports,
            configs: Vec::new(),
            procs: (0..n).map(|_| None).collect(),
            memcacheds,
            relays,
            anti_entropy_interval_ms: opts.anti_entropy_interval_ms,
        };
        for me in 1..=n {
            let secret = opts
                .secrets
                .iter()
                .find(|(id, _)| *id == me)
                .map_or(SECRET, |(_, s)| s.as_str());
            let path = c.dir.join(format!("node{me}.yaml"));
            std::fs::write(&path, c.config_yaml(me, secret)).expect("write config");
            c.configs.push(path);
        }
        for i in 1..=n {
            c.spawn(i);
        }
        c
    }

    fn config_yaml(&self, me: usize, secret: &str) -> String {
        let mut s = format!(
            "cluster:\n  name: memdial-test\n  secret: \"{secret}\"\n  consistency: eventual\n  \
             heartbeat_interval_ms: 100\n  suspect_after_ms: 500\n  down_after_ms: 1500\n  \
             reconnect_max_ms: 300\n  store_check_interval_ms: 300\n"
        );
        if let Some(ms) = self.anti_entropy_interval_ms {
            s += &format!("  anti_entropy_interval_ms: {ms}\n");
        }
        s += "nodes:\n";
        for j in 1..=self.n {
            let p = self.ports[j - 1];
            let internal = match self.relays.get(&(me, j)) {
                Some(r) => r.port,
                None => p.internal,
            };
            s += &format!(
                "  - id: {j}\n    client: 127.0.0.1:{}\n    internal: 127.0.0.1:{internal}\n    \
                 admin: 127.0.0.1:{}\n",
                p.client, p.admin
            );
            if let Some(m) = &self.memcacheds[j - 1] {
                s += &format!("    memcached: {}\n", m.addr());
            }
        }
        s
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.procs[i - 1].is_none(), "node {i} is already running");
        let mut child = Command::new(memdial_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.configs[i - 1])
            .args(["--node", &i.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn memdial");
        wait_for_port(self.ports[i - 1].client, &mut child);
        self.procs[i - 1] = Some(child);
    }

    pub fn ports(&self, i: usize) -> NodePorts {
        self.ports[i - 1]
    }

    pub fn client(&self, i: usize) -> Client {
        Client::connect(self.ports[i - 1].client)
    }

    pub fn memcached_port(&self, i: usize) -> u16 {
        self.memcacheds[i - 1]
            .as_ref()
            .expect("this cluster has no memcached")
            .port
    }

    /// SIGKILL node `i`.
    pub fn kill9(&mut self, i: usize) {
        let mut child = self.procs[i - 1].take().expect("node is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts node `i` again with the same config and ports.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Kills node `i`'s memcached and starts an empty one on the same port.
    pub fn memcached_restart(&mut self, i: usize) {
        let mut old = self.memcacheds[i - 1]
            .take()
            .expect("this cluster has no memcached");
        let port = old.port;
        old.kill();
        drop(old);
        self.memcacheds[i - 1] = Some(Memcached::start_on(port));
    }

    pub fn relay(&self, from: usize, to: usize) -> &Relay {
        &self.relays[&(from, to)]
    }

    /// Cuts every relay to and from node `i`.
    pub fn partition(&self, i: usize) {
        for ((from, to), r) in &self.relays {
            if *from == i || *to == i {
                r.cut();
            }
        }
    }

    pub fn heal_all(&self) {
        for r in self.relays.values() {
            r.heal();
        }
    }

    pub fn stats_cluster(&self, i: usize) -> io::Result<BTreeMap<String, String>> {
        Client::try_connect(self.ports[i - 1].client)?.stats("cluster")
    }

    /// `peer:<j>:state` for every other node, as node `i` reports them.
    pub fn peer_states(&self, i: usize) -> io::Result<BTreeMap<usize, String>> {
        let stats = self.stats_cluster(i)?;
        Ok((1..=self.n)
            .filter(|&j| j != i)
            .map(|j| {
                let s = stats
                    .get(&format!("peer:{j}:state"))
                    .cloned()
                    .unwrap_or_else(|| "<absent>".into());
                (j, s)
            })
            .collect())
    }

    pub fn metrics(&self, i: usize) -> io::Result<String> {
        http_get(self.ports[i - 1].admin, "/metrics")
    }

    /// Polls until `ok(node's peer states)` holds for node `i`; returns the
    /// states seen then. Panics with the last `stats cluster` on timeout.
    pub fn wait_peer_states(
        &self,
        i: usize,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&BTreeMap<usize, String>) -> bool,
    ) -> BTreeMap<usize, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let states = self.peer_states(i);
            if let Ok(s) = &states
                && ok(s)
            {
                return s.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "node {i}: {what} not seen within {timeout:?}; last stats cluster: {:#?}",
                    self.stats_cluster(i)
                );
            }
            poll_pause();
        }
    }

    /// Polls until every node shows every peer `up`.
    pub fn wait_all_up(&self, timeout: Duration) {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let all_up = (1..=self.n).all(|i| {
                self.peer_states(i)
                    .is_ok_and(|s| s.len() == self.n - 1 && s.values().all(|v| v == "up"))
            });
            if all_up {
                eprintln!(
                    "cluster of {}: every peer up after {:?}",
                    self.n,
                    started.elapsed()
                );
                return;
            }
            if Instant::now() >= deadline {
                let mut text = String::new();
                for i in 1..=self.n {
                    text += &format!("node {i}: {:#?}\n", self.stats_cluster(i));
                }
                panic!("not every peer up within {timeout:?}:\n{text}");
            }
            poll_pause();
        }
    }

    /// Node `i`'s memcached content, straight from memcached.
    pub fn dump(&self, i: usize) -> Dump {
        dump_memcached(self.memcached_port(i))
    }

    /// Polls the dumps of every node until they are identical; returns the
    /// common dump and how long it took.
    pub fn wait_converged(&self, timeout: Duration) -> (Dump, Duration) {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let dumps: Vec<(usize, Dump)> = (1..=self.n).map(|i| (i, self.dump(i))).collect();
            if dumps.windows(2).all(|w| w[0].1 == w[1].1) {
                let took = started.elapsed();
                eprintln!(
                    "replicas converged after {took:?} ({} keys each)",
                    dumps[0].1.len()
                );
                return (
                    dumps.into_iter().next().map(|(_, d)| d).unwrap_or_default(),
                    took,
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "replicas did not converge within {timeout:?}:\n{}",
                    diff_summary(&dumps)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for child in self.procs.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
