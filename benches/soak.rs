//! Soak: a 3-node eventual cluster over 3 real memcached (the test
//! harness's `TestCluster`, with relays between peers), mixed load on every
//! node, and faults on a schedule; resources sampled throughout; at the end
//! every acknowledged write is accounted for on every replica.
//!
//! Run: `cargo bench --bench soak -- [options]` (cargo builds the memdial
//! binary it starts). Not part of `cargo test`: run without cargo bench's
//! `--bench` argument it says so and exits.
//!
//! Options (defaults in brackets; `--name value` or `--name=value`):
//!   --seconds S [600]   how long the load and the faults run
//!   --cycle S [100]     length of one round of the fault schedule
//!   --sample S [2]      sampling interval
//!   --rate N [100]      writes per second per node (reads: 2N keys/s)
//!   --out DIR [target/soak]  where samples.csv, events.csv, summary.txt go
//!
//! Load, per node: a writer (set of the node's own keys 70%, delete of them
//! 10%, set of keys every node writes 20%; 0–200 byte values) and a reader
//! (`get` of 5 random keys, each value checked to be one written to that
//! key). Every write is recorded: acknowledged (`STORED`, `DELETED`) or
//! unknown (no answer, an error line); a delete answered `NOT_FOUND`
//! changes nothing and is not recorded.
//!
//! Faults, in each cycle, on a node that rotates (k, k+1, k+2):
//!   5%  the memcached of node k is killed and started empty on its port
//!   25% node k+1 is killed with SIGKILL, started again at 30%
//!   50% node k+2 is paused with SIGSTOP, resumed with SIGCONT at 56%
//!   70% node k is cut from its peers (relays cut), healed at 80%
//!
//! Every `--sample` seconds, per node: RSS (`VmRSS` of /proc/<pid>/status),
//! open fds (entries of /proc/<pid>/fd), `peer:<j>:lag`, `:state` and
//! `:applied` and `backlog_entries` of `stats cluster` (1 s timeout: a
//! paused node has none), and the load counters.
//!
//! At the end: faults healed, every peer `up` on every node, replicas
//! polled until each key reads the same on all three (2 min at most), then
//! the oracle on every replica: a key written by one node only must hold
//! its last acknowledged write, or one whose outcome is unknown; a key
//! every node writes must hold a value that was written, and no
//! acknowledged write begun after that value's write was acknowledged may
//! be lost (last-writer-wins on hybrid logical clocks, one wall clock, 5 ms
//! of slack). Exit status 1 on any missing write or on no convergence.
//! Only 127.0.0.1 is used; every wait has a deadline.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::client::Client;
use common::cluster::{ClusterOpts, Dump, TestCluster, diff_summary, dump_memcached};
use common::procs::proc_status_kb;

// ---------------------------------------------------------------- options

struct Opts {
    seconds: u64,
    cycle: u64,
    sample: u64,
    rate: u64,
    out: PathBuf,
}

fn opts() -> Option<Opts> {
    let mut o = Opts {
        seconds: 600,
        cycle: 100,
        sample: 2,
        rate: 100,
        out: PathBuf::from("target/soak"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return None;
    }
    let mut i = 0;
    while i < args.len() {
        let (name, inline) = match args[i].split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (args[i].clone(), None),
        };
        let mut value = || {
            inline.clone().unwrap_or_else(|| {
                i += 1;
                args.get(i).cloned().expect("option value")
            })
        };
        let num = |v: String| v.parse::<u64>().expect("a number");
        match name.as_str() {
            "--seconds" => o.seconds = num(value()),
            "--cycle" => o.cycle = num(value()),
            "--sample" => o.sample = num(value()),
            "--rate" => o.rate = num(value()),
            "--out" => o.out = PathBuf::from(value()),
            _ => {}
        }
        i += 1;
    }
    Some(o)
}

// ---------------------------------------------------------------- load

const NODES: usize = 3;
const OWN_KEYS: usize = 400;
const SHARED_KEYS: usize = 40;
/// Read timeout of load connections: longer than any pause in the schedule.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

fn own_key(node: usize, i: usize) -> String {
    format!("o{node}-{i}")
}

fn shared_key(i: usize) -> String {
    format!("s-{i}")
}

/// One write as the client saw it.
#[derive(Debug, Clone)]
struct Write {
    node: usize,
    key: String,
    /// None: a delete.
    value: Option<String>,
    sent: Instant,
    /// None: no acknowledgement (outcome unknown).
    acked: Option<Instant>,
}

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    unknown: AtomicU64,
    reads: AtomicU64,
    read_errors: AtomicU64,
    /// Values read that were never written to that key.
    bad_reads: AtomicU64,
}

fn connect(port: u16, stop: &AtomicBool) -> Option<Client> {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(c) = Client::try_connect(port) {
            let _ = c.stream.set_read_timeout(Some(LOAD_TIMEOUT));
            let _ = c.stream.set_write_timeout(Some(LOAD_TIMEOUT));
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Sleeps until `next + period` and returns it; after a stall (a node
/// down or paused) the rate starts again from now instead of catching up.
fn pace(next: Instant, period: Duration) -> Instant {
    let now = Instant::now();
    let next = if now > next + Duration::from_secs(1) {
        now
    } else {
        next + period
    };
    if let Some(d) = next.checked_duration_since(now) {
        std::thread::sleep(d);
    }
    next
}

fn value_of(node: usize, seq: u64, rng: &mut StdRng) -> String {
    let pad = rng.random_range(0..200);
    format!("v{node}-{seq}-{}", "x".repeat(pad))
}

fn writer(
    node: usize,
    port: u16,
    rate: u64,
    stop: Arc<AtomicBool>,
    n: Arc<Counters>,
) -> Vec<Write> {
    let mut rng = StdRng::seed_from_u64(node as u64);
    let mut out = Vec::new();
    let Some(mut cl) = connect(port, &stop) else {
        return out;
    };
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        next = pace(next, period);
        seq += 1;
        let roll = rng.random_range(0..100);
        let (key, value) = if roll < 70 {
            let key = own_key(node, rng.random_range(0..OWN_KEYS));
            (key, Some(value_of(node, seq, &mut rng)))
        } else if roll < 80 {
            (own_key(node, rng.random_range(0..OWN_KEYS)), None)
        } else {
            let key = shared_key(rng.random_range(0..SHARED_KEYS));
            (key, Some(value_of(node, seq, &mut rng)))
        };
        let sent = Instant::now();
        let reply = match &value {
            Some(v) => cl.set(&key, node as u32, 0, v.as_bytes()),
            None => cl.delete(&key),
        };
        let acked = match reply.as_deref() {
            Ok("STORED") | Ok("DELETED") => Some(Instant::now()),
            // A delete of a key not live here changes nothing.
            Ok("NOT_FOUND") if value.is_none() => continue,
            Ok(other) => {
                if !other.starts_with("SERVER_ERROR") {
                    eprintln!("node {node}: {key} answered {other:?}");
                }
                None
            }
            Err(_) => {
                match connect(port, &stop) {
                    Some(c) => cl = c,
                    None => {
                        out.push(Write {
                            node,
                            key,
                            value,
                            sent,
                            acked: None,
                        });
                        break;
                    }
                }
                None
            }
        };
        let counter = if acked.is_some() {
            &n.acked
        } else {
            &n.unknown
        };
        counter.fetch_add(1, Ordering::Relaxed);
        out.push(Write {
            node,
            key,
            value,
            sent,
            acked,
        });
    }
    out
}

/// Whether `data` is a value some writer may have written to `key`.
fn plausible(key: &[u8], data: &[u8]) -> bool {
    let (key, data) = (String::from_utf8_lossy(key), String::from_utf8_lossy(data));
    let Some(rest) = data.strip_prefix('v') else {
        return false;
    };
    let mut parts = rest.splitn(3, '-');
    let (Some(node), Some(seq), Some(pad)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let well_formed = seq.parse::<u64>().is_ok() && pad.bytes().all(|b| b == b'x');
    let owner_ok = match key.strip_prefix('o') {
        Some(k) => k.split('-').next() == Some(node),
        None => node
            .parse::<usize>()
            .is_ok_and(|n| (1..=NODES).contains(&n)),
    };
    well_formed && owner_ok
}

fn reader(node: usize, port: u16, rate: u64, stop: Arc<AtomicBool>, n: Arc<Counters>) {
    let mut rng = StdRng::seed_from_u64(100 + node as u64);
    let Some(mut cl) = connect(port, &stop) else {
        return;
    };
    // 5 keys per get, 2 * rate keys per second.
    let period = Duration::from_secs_f64(5.0 / (2.0 * rate as f64));
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        next = pace(next, period);
        let keys: Vec<String> = (0..5)
            .map(|_| match rng.random_range(0..4) {
                0 => shared_key(rng.random_range(0..SHARED_KEYS)),
                _ => own_key(rng.random_range(1..=NODES), rng.random_range(0..OWN_KEYS)),
            })
            .collect();
        match cl.get_many(&keys) {
            Ok(values) => {
                n.reads.fetch_add(1, Ordering::Relaxed);
                for (k, (_, d)) in &values {
                    if !plausible(k, d) {
                        n.bad_reads.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "node {node}: read {:?} = {:?}, never written",
                            String::from_utf8_lossy(k),
                            String::from_utf8_lossy(&d[..d.len().min(40)])
                        );
                    }
                }
            }
            Err(_) => {
                n.read_errors.fetch_add(1, Ordering::Relaxed);
                match connect(port, &stop) {
                    Some(c) => cl = c,
                    None => return,
                }
            }
        }
    }
}

// ---------------------------------------------------------------- sampling

fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// `stats cluster` of the node on `port`, waiting at most 1 s.
fn quick_stats(port: u16) -> Option<BTreeMap<String, String>> {
    let mut c = Client::try_connect(port).ok()?;
    c.stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    c.stats("cluster").ok()
}

struct Sampler {
    started: Instant,
    csv: std::fs::File,
}

impl Sampler {
    const HEADER: &str =
        "t_s,node,pid,rss_kb,fds,lag_max,lags,states,applied,backlog,acked,unknown,reads";

    fn sample(&mut self, c: &Mutex<TestCluster>, ports: &[u16], n: &Counters) {
        let t = self.started.elapsed().as_secs_f64();
        // Read once, before any `stats` call can wait on a paused node.
        let (acked, unknown, reads) = (
            n.acked.load(Ordering::Relaxed),
            n.unknown.load(Ordering::Relaxed),
            n.reads.load(Ordering::Relaxed),
        );
        let pids: Vec<Option<u32>> = {
            let c = c.lock().unwrap_or_else(PoisonError::into_inner);
            (1..=NODES).map(|i| c.pid(i)).collect()
        };
        for i in 1..=NODES {
            let pid = pids[i - 1];
            let rss = pid.and_then(|p| proc_status_kb(p, "VmRSS"));
            let fds = pid.and_then(fd_count);
            let stats = pid.and_then(|_| quick_stats(ports[i - 1]));
            let (mut lags, mut states, mut lag_max) = (Vec::new(), Vec::new(), None::<u64>);
            let mut applied = Vec::new();
            for j in (1..=NODES).filter(|&j| j != i) {
                let get = |what: &str| {
                    stats
                        .as_ref()
                        .and_then(|s| s.get(&format!("peer:{j}:{what}")).cloned())
                        .unwrap_or_default()
                };
                let lag = get("lag");
                if let Ok(l) = lag.parse::<u64>() {
                    lag_max = Some(lag_max.map_or(l, |m| m.max(l)));
                }
                lags.push(format!("{j}:{lag}"));
                states.push(format!("{j}:{}", get("state")));
                applied.push(format!("{j}:{}", get("applied")));
            }
            let show = |v: Option<String>| v.unwrap_or_default();
            let _ = writeln!(
                self.csv,
                "{t:.1},{i},{},{},{},{},{},{},{},{},{},{},{}",
                show(pid.map(|p| p.to_string())),
                show(rss.map(|r| r.to_string())),
                show(fds.map(|f| f.to_string())),
                show(lag_max.map(|l| l.to_string())),
                lags.join(" "),
                states.join(" "),
                applied.join(" "),
                show(
                    stats
                        .as_ref()
                        .and_then(|s| s.get("backlog_entries").cloned())
                ),
                acked,
                unknown,
                reads,
            );
        }
        let _ = self.csv.flush();
    }
}

// ---------------------------------------------------------------- schedule

struct Events {
    started: Instant,
    csv: std::fs::File,
}

impl Events {
    fn log(&mut self, node: usize, what: &str) {
        let t = self.started.elapsed().as_secs_f64();
        eprintln!("[{t:7.1}s] node {node}: {what}");
        let _ = writeln!(self.csv, "{t:.1},{node},{what}");
        let _ = self.csv.flush();
    }
}

/// The fault schedule: at these fractions of a cycle, these actions.
#[derive(Clone, Copy, Debug)]
enum Fault {
    MemcachedRestart,
    Kill,
    Start,
    Pause,
    Resume,
    Partition,
    Heal,
}

const SCHEDULE: [(f64, usize, Fault); 7] = [
    (0.05, 0, Fault::MemcachedRestart),
    (0.25, 1, Fault::Kill),
    (0.30, 1, Fault::Start),
    (0.50, 2, Fault::Pause),
    (0.56, 2, Fault::Resume),
    (0.70, 0, Fault::Partition),
    (0.80, 0, Fault::Heal),
];

fn apply(c: &Mutex<TestCluster>, node: usize, fault: Fault) {
    let mut c = c.lock().unwrap_or_else(PoisonError::into_inner);
    match fault {
        Fault::MemcachedRestart => c.memcached_restart(node),
        Fault::Kill => c.kill9(node),
        Fault::Start => c.restart(node),
        Fault::Pause => c.signal(node, "STOP"),
        Fault::Resume => c.signal(node, "CONT"),
        Fault::Partition => c.partition(node),
        Fault::Heal => c.heal_all(),
    }
}

// ---------------------------------------------------------------- the end

fn all_up(c: &TestCluster) -> bool {
    (1..=NODES).all(|i| {
        c.peer_states(i)
            .is_ok_and(|s| s.len() == NODES - 1 && s.values().all(|v| v == "up"))
    })
}

/// What a replica holds for a key, as a client reads it: None when absent
/// or a tombstone.
fn logical(d: &Dump) -> BTreeMap<String, Option<String>> {
    d.iter()
        .map(|(k, item)| {
            let v = (!item.is_tombstone() && item.header().is_some())
                .then(|| String::from_utf8_lossy(item.data()).into_owned());
            (String::from_utf8_lossy(k).into_owned(), v)
        })
        .filter(|(_, v)| v.is_some())
        .collect()
}

/// The oracle for one key on one replica; `Err` says what is missing.
fn check_key(key: &str, history: &[&Write], fin: &Option<String>) -> Result<(), String> {
    let shared = key.starts_with("s-");
    if !shared {
        // One writer, one connection at a time: the last acknowledged write,
        // or any write whose outcome is unknown (it may have been applied
        // late, and then wins).
        let last = history.iter().rfind(|w| w.acked.is_some());
        let ok = last.map_or(fin.is_none(), |w| &w.value == fin)
            || history.iter().any(|w| w.acked.is_none() && &w.value == fin);
        return match ok {
            true => Ok(()),
            false => Err(format!(
                "{key}: holds {:?}, last acknowledged write {:?}",
                fin.as_deref().map(|v| &v[..v.len().min(24)]),
                last.map(|w| w.value.as_deref().map(|v| &v[..v.len().min(24)]))
            )),
        };
    }
    let Some(fin_v) = fin else {
        return match history.iter().any(|w| w.acked.is_some()) {
            true => Err(format!("{key}: absent, but written and acknowledged")),
            false => Ok(()),
        };
    };
    let Some(source) = history.iter().find(|w| w.value.as_ref() == Some(fin_v)) else {
        return Err(format!("{key}: holds a value never written"));
    };
    let Some(done) = source.acked else {
        return Ok(());
    };
    let slack = Duration::from_millis(5);
    match history
        .iter()
        .find(|w| w.acked.is_some() && w.sent > done + slack)
    {
        Some(lost) => Err(format!(
            "{key}: holds node {}'s write, but node {}'s acknowledged write begun {:?} after it \
             was acknowledged is lost",
            source.node,
            lost.node,
            lost.sent - done
        )),
        None => Ok(()),
    }
}

fn main() {
    let Some(o) = opts() else {
        eprintln!("the soak runs only as `cargo bench --bench soak -- [options]`");
        return;
    };
    std::fs::create_dir_all(&o.out).expect("create --out dir");
    eprintln!(
        "soak: {} s, cycle {} s, sample every {} s, {} writes/s per node; output in {}",
        o.seconds,
        o.cycle,
        o.sample,
        o.rate,
        o.out.display()
    );
    let c = TestCluster::start(
        NODES,
        ClusterOpts {
            memcached: true,
            relays: true,
            ..ClusterOpts::default()
        },
    );
    let ports: Vec<u16> = (1..=NODES).map(|i| c.ports(i).client).collect();
    let mc_ports: Vec<u16> = (1..=NODES).map(|i| c.memcached_port(i)).collect();
    let c = Arc::new(Mutex::new(c));
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());

    let writers: Vec<_> = (1..=NODES)
        .map(|i| {
            let (port, rate, stop, n) = (ports[i - 1], o.rate, stop.clone(), counters.clone());
            std::thread::spawn(move || writer(i, port, rate, stop, n))
        })
        .collect();
    let readers: Vec<_> = (1..=NODES)
        .map(|i| {
            let (port, rate, stop, n) = (ports[i - 1], o.rate, stop.clone(), counters.clone());
            std::thread::spawn(move || reader(i, port, rate, stop, n))
        })
        .collect();
    let sampling = {
        let (c, ports, n, stop) = (c.clone(), ports.clone(), counters.clone(), stop.clone());
        let mut csv = std::fs::File::create(o.out.join("samples.csv")).expect("samples.csv");
        writeln!(csv, "{}", Sampler::HEADER).expect("write samples.csv");
        let every = Duration::from_secs(o.sample);
        std::thread::spawn(move || {
            let mut s = Sampler { started, csv };
            let mut next = Instant::now();
            // Until stopped, then one last sample after the end's checks.
            while !stop.load(Ordering::SeqCst) {
                s.sample(&c, &ports, &n);
                next += every;
                while Instant::now() < next && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            s
        })
    };

    let mut events = Events {
        started,
        csv: std::fs::File::create(o.out.join("events.csv")).expect("events.csv"),
    };
    writeln!(events.csv, "t_s,node,event").expect("write events.csv");
    let total = Duration::from_secs(o.seconds);
    let cycle = Duration::from_secs(o.cycle);
    let mut round = 0usize;
    'schedule: loop {
        let begin = started + cycle * round as u32;
        for (at, offset, fault) in SCHEDULE {
            let when = begin + cycle.mul_f64(at);
            if when >= started + total {
                break 'schedule;
            }
            while Instant::now() < when {
                std::thread::sleep(Duration::from_millis(50));
            }
            let node = (round + offset) % NODES + 1;
            let t0 = Instant::now();
            apply(&c, node, fault);
            events.log(node, &format!("{fault:?} ({:?})", t0.elapsed()));
        }
        round += 1;
    }
    while Instant::now() < started + total {
        std::thread::sleep(Duration::from_millis(100));
    }
    events.log(0, "load stops");
    stop.store(true, Ordering::SeqCst);
    let mut history: Vec<Write> = Vec::new();
    for w in writers {
        history.extend(w.join().expect("writer thread"));
    }
    for r in readers {
        r.join().expect("reader thread");
    }
    let mut sampler = sampling.join().expect("sampler thread");

    // Heal (the schedule ends every fault it begins; this is a guard).
    {
        let c = c.lock().unwrap_or_else(PoisonError::into_inner);
        c.heal_all();
    }
    let mut report = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let up = loop {
        let ok = all_up(&c.lock().unwrap_or_else(PoisonError::into_inner));
        if ok || Instant::now() > deadline {
            break ok;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    events.log(0, &format!("every peer up: {up}"));

    // Converged: every key reads the same on every replica.
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(120);
    let (converged, dumps) = loop {
        let dumps: Vec<(usize, Dump)> = mc_ports
            .iter()
            .enumerate()
            .map(|(i, &p)| (i + 1, dump_memcached(p)))
            .collect();
        let views: Vec<_> = dumps.iter().map(|(_, d)| logical(d)).collect();
        let same = views.windows(2).all(|w| w[0] == w[1]);
        if same || Instant::now() > deadline {
            break (same, dumps);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    events.log(
        0,
        &format!("replicas converged: {converged} after {:?}", t0.elapsed()),
    );
    let byte_identical = dumps.windows(2).all(|w| w[0].1 == w[1].1);
    sampler.sample(&c, &ports, &counters);

    // The oracle, on every replica.
    let mut by_key: BTreeMap<&str, Vec<&Write>> = BTreeMap::new();
    for w in &history {
        by_key.entry(w.key.as_str()).or_default().push(w);
    }
    for ws in by_key.values_mut() {
        ws.sort_by_key(|w| w.sent);
    }
    let acked = history.iter().filter(|w| w.acked.is_some()).count();
    let unknown = history.len() - acked;
    let mut missing = Vec::new();
    let mut checked = 0usize;
    for (node, d) in &dumps {
        let view = logical(d);
        for (key, ws) in &by_key {
            checked += 1;
            let fin = view.get(*key).cloned().flatten();
            if let Err(e) = check_key(key, ws, &fin) {
                missing.push(format!("node {node}: {e}"));
            }
        }
    }
    for (node, d) in &dumps {
        for key in logical(d).keys() {
            if !by_key.contains_key(key.as_str()) {
                missing.push(format!("node {node}: {key}: holds a key never written"));
            }
        }
    }
    let superseded = by_key
        .values()
        .map(|ws| {
            ws.iter()
                .filter(|w| w.acked.is_some())
                .count()
                .saturating_sub(1)
        })
        .sum::<usize>();
    let keys_with_unknown = by_key
        .values()
        .filter(|ws| ws.iter().any(|w| w.acked.is_none()))
        .count();
    let n = &counters;
    let _ = writeln!(
        report,
        "duration_s {}\ncycles {}\nwrites {}\nwrites_acknowledged {acked}\nwrites_unknown {unknown}\n\
         keys_written {}\nkeys_with_an_unknown_write {keys_with_unknown}\n\
         acknowledged_superseded_by_a_later_acknowledged_write {superseded}\n\
         key_replica_pairs_checked {checked}\nmissing {}\nreads {}\nread_errors {}\nbad_reads {}\n\
         every_peer_up {up}\nconverged {converged}\nbyte_identical_replicas {byte_identical}",
        o.seconds,
        round,
        history.len(),
        by_key.len(),
        missing.len(),
        n.reads.load(Ordering::Relaxed),
        n.read_errors.load(Ordering::Relaxed),
        n.bad_reads.load(Ordering::Relaxed),
    );
    if !converged {
        let _ = writeln!(report, "\n{}", diff_summary(&dumps));
    }
    for m in missing.iter().take(20) {
        let _ = writeln!(report, "MISSING {m}");
    }
    print!("{report}");
    std::fs::write(o.out.join("summary.txt"), &report).expect("write summary.txt");
    let ok = missing.is_empty() && converged && up && n.bad_reads.load(Ordering::Relaxed) == 0;
    let keys: BTreeSet<&str> = by_key.keys().copied().collect();
    eprintln!(
        "soak {}: {} keys, {acked} acknowledged writes; output in {}",
        if ok { "passed" } else { "FAILED" },
        keys.len(),
        o.out.display()
    );
    if !ok {
        std::process::exit(1);
    }
}
