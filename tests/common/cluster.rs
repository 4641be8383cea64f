//! Cluster harness: a [`TestCluster`] of memdial nodes started from
//! generated configs ([`MemdialCluster`]), an optional real memcached behind
//! each, optional TCP relays between every directed pair of peers (for
//! partitions), replica dumps taken straight from each memcached, and a
//! convergence check that compares them.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::client::{Client, http_get};
use super::procs::{Memcached, MemdialCluster, NodePorts, proxy_yaml_hosts};
use super::record::{HEADER_BYTES, Header};

/// How long a cluster may take to come up (every peer `up` on every node).
pub const UP_WAIT: Duration = Duration::from_secs(20);
/// The longest a test accepts for replicas to converge.
pub const CONVERGE_WAIT: Duration = Duration::from_secs(15);

/// Sleeps between polls. Never used to wait for readiness by itself: every
/// caller re-checks a condition and has a deadline.
pub fn poll_pause() {
    std::thread::sleep(Duration::from_millis(50));
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
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
    /// Peers and memcached named `localhost:PORT` instead of
    /// `127.0.0.1:PORT` (each node's internal address, which it binds and
    /// its peers dial, and its memcached address).
    pub host_names: bool,
    /// `cluster.consistency`; `None` is `eventual`.
    pub consistency: Option<&'static str>,
    /// More `cluster:` settings, as YAML lines (`"  name: value\n"`).
    pub cluster_yaml: String,
}

pub struct TestCluster {
    pub n: usize,
    nodes: MemdialCluster,
    /// The nodes' data directories (Raft logs and snapshots), removed with
    /// the cluster.
    data: tempfile::TempDir,
    memcacheds: Vec<Option<Memcached>>,
    /// The memcacheds run with `-M` (the ordered modes).
    never_evict: bool,
    /// (from, to) → the relay `from` dials to reach `to`.
    relays: BTreeMap<(usize, usize), Relay>,
}

pub const SECRET: &str = "test-secret-0123456789";

/// A relay for every directed pair of the nodes on `ports`.
fn relays_between(ports: &[NodePorts]) -> BTreeMap<(usize, usize), Relay> {
    let n = ports.len();
    let mut relays = BTreeMap::new();
    for from in 1..=n {
        for to in (1..=n).filter(|&to| to != from) {
            let target = SocketAddr::from(([127, 0, 0, 1], ports[to - 1].internal));
            relays.insert((from, to), Relay::start(target));
        }
    }
    relays
}

/// Node `me`'s config: fast failure detection, and peers reached through
/// their relays when there are relays.
fn config_yaml(
    me: usize,
    ports: &[NodePorts],
    relays: &BTreeMap<(usize, usize), Relay>,
    memcacheds: &[Option<Memcached>],
    data: &std::path::Path,
    opts: &ClusterOpts,
) -> String {
    let secret = opts
        .secrets
        .iter()
        .find(|(id, _)| *id == me)
        .map_or(SECRET, |(_, s)| s.as_str());
    let consistency = opts.consistency.unwrap_or("eventual");
    let mut cluster = format!(
        "  name: memdial-test\n  secret: \"{secret}\"\n  consistency: {consistency}\n  \
         heartbeat_interval_ms: 100\n  suspect_after_ms: 500\n  down_after_ms: 1500\n  \
         reconnect_max_ms: 300\n  store_check_interval_ms: 300\n  data_dir: \"{}\"\n",
        data.display()
    );
    if let Some(ms) = opts.anti_entropy_interval_ms {
        cluster += &format!("  anti_entropy_interval_ms: {ms}\n");
    }
    cluster += &opts.cluster_yaml;
    let nodes: Vec<(NodePorts, Option<String>)> = ports
        .iter()
        .zip(memcacheds)
        .enumerate()
        .map(|(j, (p, m))| {
            let mut p = *p;
            if let Some(r) = relays.get(&(me, j + 1)) {
                p.internal = r.port;
            }
            let memcached = m.as_ref().map(|m| match opts.host_names {
                true => format!("localhost:{}", m.port),
                false => m.addr(),
            });
            (p, memcached)
        })
        .collect();
    let host = if opts.host_names {
        "localhost"
    } else {
        "127.0.0.1"
    };
    proxy_yaml_hosts(&cluster, &nodes, |_| host.to_string())
}

impl TestCluster {
    /// Starts `n` nodes and waits until every node has every peer `up`.
    pub fn start(n: usize, opts: ClusterOpts) -> TestCluster {
        let c = TestCluster::start_unchecked(n, opts);
        c.wait_all_up(UP_WAIT);
        c
    }

    /// Starts `n` nodes and waits only until each listens on its ports.
    pub fn start_unchecked(n: usize, opts: ClusterOpts) -> TestCluster {
        assert!(n >= 2, "a cluster has at least 2 nodes");
        // The ordered modes refuse a memcached that evicts.
        let never_evict = opts.consistency.is_some_and(|c| c != "eventual");
        let memcacheds: Vec<Option<Memcached>> = (0..n)
            .map(|_| {
                opts.memcached
                    .then(|| Memcached::start_evicting(never_evict))
            })
            .collect();
        let mut relays = BTreeMap::new();
        let data = tempfile::tempdir().expect("a data directory");
        let nodes = MemdialCluster::start(n, "warn,openraft=error", |ports| {
            // Each attempt has fresh ports, so fresh relays to them.
            relays = if opts.relays {
                relays_between(ports)
            } else {
                BTreeMap::new()
            };
            (1..=n)
                .map(|me| config_yaml(me, ports, &relays, &memcacheds, data.path(), &opts))
                .collect()
        });
        TestCluster {
            n,
            nodes,
            data,
            memcacheds,
            never_evict,
            relays,
        }
    }

    pub fn ports(&self, i: usize) -> NodePorts {
        self.nodes.ports(i)
    }

    /// Node `i`'s Raft log directory (the ordered modes).
    pub fn raft_log_dir(&self, i: usize) -> std::path::PathBuf {
        self.data.path().join(format!("node-{i}")).join("log")
    }

    /// The node among `candidates` that says it leads (`raft_role` in
    /// `stats cluster`), once one does within `within`.
    pub fn wait_leader(&self, candidates: &[usize], within: Duration) -> usize {
        let start = Instant::now();
        loop {
            for &i in candidates {
                let role = self
                    .stats_cluster(i)
                    .ok()
                    .and_then(|s| s.get("raft_role").cloned());
                if role.as_deref() == Some("leader") {
                    return i;
                }
            }
            assert!(
                start.elapsed() < within,
                "no leader among {candidates:?} within {within:?}"
            );
            poll_pause();
        }
    }

    pub fn client(&self, i: usize) -> Client {
        Client::connect(self.ports(i).client)
    }

    pub fn memcached_port(&self, i: usize) -> u16 {
        self.memcacheds[i - 1]
            .as_ref()
            .expect("this cluster has no memcached")
            .port
    }

    /// SIGKILL node `i`.
    pub fn kill9(&mut self, i: usize) {
        self.nodes.kill9(i);
    }

    /// Starts node `i` again with the same config and ports.
    pub fn restart(&mut self, i: usize) {
        self.nodes.restart(i);
    }

    /// Node `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes.pid(i)
    }

    /// Sends a signal to node `i` (`STOP` pauses it, `CONT` resumes it).
    pub fn signal(&mut self, i: usize, name: &str) {
        self.nodes.signal(i, name);
    }

    /// Kills node `i`'s memcached and starts an empty one on the same port.
    pub fn memcached_restart(&mut self, i: usize) {
        let mut old = self.memcacheds[i - 1]
            .take()
            .expect("this cluster has no memcached");
        let port = old.port;
        old.kill();
        drop(old);
        self.memcacheds[i - 1] = Some(Memcached::start_on_evicting(port, self.never_evict));
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
        Client::try_connect(self.ports(i).client)?.stats("cluster")
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
        http_get(self.ports(i).admin, "/metrics")
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
