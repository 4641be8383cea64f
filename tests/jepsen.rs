//! Jepsen-style runs of the ordered modes: concurrent clients on all three
//! nodes doing get/gets/set/cas/incr/delete over a few keys, every
//! operation recorded with its invoke and complete time and its outcome
//! (ok, definite failure, unknown), while a nemesis kills, pauses or cuts
//! off the leader. Then the history is checked for linearizability, key by
//! key (`common::history`), and every replica must hold the same data.
//!
//! Sequential mode: clients do get/gets/set/cas (every write names its
//! unique value, so each entry of a node's Raft log, read with `memdial
//! raft-log` once the nodes are stopped, maps back to its operation); the
//! checker then asks that every replica applied the same write order, and
//! that each connection's reads moved only forward in it and saw its own
//! writes.
//!
//! Each run is bounded: [`LOAD`] of load, a fault in its middle, then a
//! quiet check. `MEMDIAL_JEPSEN_SECS` lengthens the load for a longer run
//! by hand (the command and result of one are in `docs/consistency.md`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::cluster::{ClusterOpts, TestCluster, poll_pause};
use common::history::linearizable::{Limits, check};
use common::history::session::{ReplicaLog, check_sequential};
use common::history::{Call, History, Outcome, Recorder, Reply};
use common::procs::memdial_bin;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Load per run, unless `MEMDIAL_JEPSEN_SECS` says otherwise.
const LOAD: Duration = Duration::from_secs(8);
/// Clients per node.
const CLIENTS_PER_NODE: usize = 2;
/// Keys per run: few, so that operations on each key overlap.
const KEYS: usize = 4;
/// A client gives up on a reply after this long (the node's own deadline
/// is 3 s): the operation's outcome is then unknown.
const REPLY_WAIT: Duration = Duration::from_secs(6);

fn load() -> Duration {
    std::env::var("MEMDIAL_JEPSEN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(LOAD, Duration::from_secs)
}

/// One client connection: a request, and its reply read whole or not at
/// all (a timeout or a broken connection makes the outcome unknown).
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Option<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(REPLY_WAIT)).ok()?;
        s.set_nodelay(true).ok()?;
        Some(Conn {
            reader: BufReader::new(s),
        })
    }

    fn line(&mut self) -> Option<String> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(n) if n > 0 && l.ends_with("\r\n") => Some(l.trim_end().to_string()),
            _ => None,
        }
    }

    /// Sends `request`; returns the reply's lines (a `get` reply's data
    /// lines included, up to `END`), or `None` when none came whole.
    fn call(&mut self, request: &[u8], retrieval: bool) -> Option<Vec<String>> {
        self.reader.get_mut().write_all(request).ok()?;
        let mut lines = vec![self.line()?];
        if retrieval {
            while lines.last()?.starts_with("VALUE ") {
                let len: usize = lines.last()?.split(' ').nth(3)?.parse().ok()?;
                let mut data = vec![0u8; len + 2];
                self.reader.read_exact(&mut data).ok()?;
                lines.push(String::from_utf8_lossy(&data[..len]).into_owned());
                lines.push(self.line()?);
            }
        }
        Some(lines)
    }
}

/// What a reply means for the history.
fn outcome(call: &Call, lines: Option<Vec<String>>) -> Outcome {
    let Some(lines) = lines else {
        return Outcome::Unknown;
    };
    let first = lines[0].as_str();
    if let Some(msg) = first.strip_prefix("SERVER_ERROR ") {
        // The node says whether the write was never proposed (or the read
        // never served): anything else is unknown.
        return if msg.starts_with("no leader reachable") || msg.starts_with("no quorum") {
            Outcome::Failed
        } else {
            Outcome::Unknown
        };
    }
    let reply = match (call, first) {
        (Call::Get | Call::Gets, "END") => Reply::Miss,
        (Call::Get | Call::Gets, l) if l.starts_with("VALUE ") && lines.len() == 3 => Reply::Hit {
            data: lines[1].clone().into_bytes(),
            token: l.split(' ').nth(4).and_then(|t| t.parse().ok()),
        },
        (_, "STORED") => Reply::Stored,
        (_, "NOT_STORED") => Reply::NotStored,
        (_, "EXISTS") => Reply::Exists,
        (_, "NOT_FOUND") => Reply::NotFound,
        (_, "DELETED") => Reply::Deleted,
        (_, l) if l.starts_with("CLIENT_ERROR cannot increment") => Reply::NonNumeric,
        (Call::Incr(_) | Call::Decr(_), l) => match l.parse() {
            Ok(n) => Reply::Number(n),
            Err(_) => panic!("unexpected reply {lines:?} to {call:?}"),
        },
        _ => panic!("unexpected reply {lines:?} to {call:?}"),
    };
    Outcome::Ok(reply)
}

fn request(key: &str, call: &Call) -> Vec<u8> {
    let store = |cmd: &str, data: &[u8], extra: String| {
        let mut r = format!("{cmd} {key} 0 0 {}{extra}\r\n", data.len()).into_bytes();
        r.extend_from_slice(data);
        r.extend_from_slice(b"\r\n");
        r
    };
    match call {
        Call::Get => format!("get {key}\r\n").into_bytes(),
        Call::Gets => format!("gets {key}\r\n").into_bytes(),
        Call::Set(d) => store("set", d, String::new()),
        Call::Cas { data, token } => store("cas", data, format!(" {token}")),
        Call::Incr(n) => format!("incr {key} {n}\r\n").into_bytes(),
        Call::Delete => format!("delete {key}\r\n").into_bytes(),
        other => panic!("not in this workload: {other:?}"),
    }
}

/// One client: random operations on random keys until `stop`. Written
/// values are numbers unique to the run (so `incr` has work to do, and a
/// read names the write it saw).
fn client(
    sequential: bool,
    port: u16,
    first_conn: u64,
    keys: Arc<Vec<String>>,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    unique: Arc<AtomicU64>,
) {
    let mut conn_id = first_conn;
    let mut conn = Conn::open(port);
    let mut tokens: Vec<Option<u64>> = vec![None; keys.len()];
    while !stop.load(Ordering::Relaxed) {
        let k = rand::random_range(0..keys.len());
        let key = &keys[k];
        let roll = rand::random_range(0..100);
        // Sequential runs write only what names itself in the log.
        let roll = if sequential && roll >= 75 {
            roll - 50
        } else {
            roll
        };
        let call = match roll {
            0..30 => Call::Get,
            30..40 => Call::Gets,
            40..65 => Call::Set(
                unique
                    .fetch_add(1, Ordering::Relaxed)
                    .to_string()
                    .into_bytes(),
            ),
            65..75 => Call::Cas {
                data: unique
                    .fetch_add(1, Ordering::Relaxed)
                    .to_string()
                    .into_bytes(),
                token: tokens[k].unwrap_or(1),
            },
            75..90 => Call::Incr(rand::random_range(1..10)),
            _ => Call::Delete,
        };
        let Some(c) = conn.as_mut() else {
            // The node is down (killed): try again shortly, on a new
            // connection id.
            std::thread::sleep(Duration::from_millis(100));
            conn = Conn::open(port);
            conn_id += 1000;
            continue;
        };
        let invoke = rec.invoke();
        let lines = c.call(&request(key, &call), matches!(call, Call::Get | Call::Gets));
        let broken = lines.is_none();
        let out = outcome(&call, lines);
        if let Outcome::Ok(Reply::Hit { token: Some(t), .. }) = &out {
            tokens[k] = Some(*t);
        }
        rec.record(conn_id, key.as_bytes(), invoke, call, out);
        if broken {
            conn = Conn::open(port);
            conn_id += 1000;
        }
    }
}

/// What is done to the leader in the middle of a run.
#[derive(Debug, Clone, Copy)]
enum Nemesis {
    Kill,
    Pause,
    Partition,
}

fn run(nemesis: Nemesis) {
    run_mode("linearizable", nemesis);
}

fn run_mode(consistency: &'static str, nemesis: Nemesis) {
    let _s = serial();
    let sequential = consistency == "sequential";
    // The sequential check reads every node's whole log afterwards: no
    // snapshot may compact it away during the run.
    let cluster_yaml = if sequential {
        "  snapshot_after_entries: 100000000\n".to_string()
    } else {
        String::new()
    };
    let mut c = TestCluster::start(
        3,
        ClusterOpts {
            consistency: Some(consistency),
            relays: true,
            cluster_yaml,
            ..ClusterOpts::default()
        },
    );
    let first = c.wait_leader(&[1, 2, 3], Duration::from_secs(15));
    let run_id = rand::random::<u32>();
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|k| format!("j{run_id}-{k}")).collect());
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    let unique = Arc::new(AtomicU64::new(1));
    let mut threads = Vec::new();
    for node in 1..=3 {
        for n in 0..CLIENTS_PER_NODE {
            let port = c.ports(node).client;
            let (keys, rec, stop, unique) =
                (keys.clone(), rec.clone(), stop.clone(), unique.clone());
            let conn = (node * 10 + n) as u64;
            threads.push(std::thread::spawn(move || {
                client(sequential, port, conn, keys, rec, stop, unique)
            }));
        }
    }
    let load = load();
    std::thread::sleep(load / 4);
    let fault_at = Instant::now();
    match nemesis {
        Nemesis::Kill => {
            c.kill9(first);
            std::thread::sleep(load / 4);
            c.restart(first);
        }
        Nemesis::Pause => {
            c.signal(first, "STOP");
            std::thread::sleep(load / 4);
            c.signal(first, "CONT");
        }
        Nemesis::Partition => {
            c.partition(first);
            std::thread::sleep(load / 4);
            c.heal_all();
        }
    }
    let others: Vec<usize> = (1..=3).filter(|&i| i != first).collect();
    let fault_lasted = fault_at.elapsed();
    std::thread::sleep(load / 2);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    let after = c.wait_leader(&[1, 2, 3], Duration::from_secs(15));

    let history = rec.history();
    let ok = history
        .ops()
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Ok(_)))
        .count();
    let failed = history
        .ops()
        .iter()
        .filter(|o| o.outcome == Outcome::Failed)
        .count();
    let unknown = history.len() - ok - failed;
    if sequential {
        eprintln!(
            "sequential, {nemesis:?} of leader {first} for {fault_lasted:?} (others {others:?}, leader after: {after}): \
             {} ops ({ok} ok, {failed} failed, {unknown} unknown) on {KEYS} keys",
            history.len()
        );
        assert!(
            ok > 100,
            "too little got done to mean anything: {ok} ok operations"
        );
        return check_replica_logs(&mut c, &history);
    }
    let started = Instant::now();
    let report = check(&history, Limits::default());
    eprintln!(
        "{nemesis:?} of leader {first} for {fault_lasted:?} (others {others:?}, leader after: {after}): \
         {} ops ({ok} ok, {failed} failed, {unknown} unknown) on {KEYS} keys, checked in {:?}",
        history.len(),
        started.elapsed()
    );
    assert!(
        report.is_linearizable(),
        "not linearizable:\n{}",
        report.explain(&history)
    );
    assert!(
        ok > 100,
        "too little got done to mean anything: {ok} ok operations"
    );

    // Every replica holds the same data once it has applied everything.
    let keys_line = format!("gets {}\r\n", keys.join(" "));
    let start = Instant::now();
    loop {
        let applied: Vec<Option<String>> = (1..=3)
            .map(|i| {
                c.stats_cluster(i)
                    .ok()
                    .and_then(|s| s.get("raft_applied_index").cloned())
            })
            .collect();
        let replicas: Vec<Option<Vec<String>>> = (1..=3)
            .map(|i| Conn::open(c.ports(i).client)?.call(keys_line.as_bytes(), true))
            .collect();
        let same = applied.iter().all(|a| a.is_some() && *a == applied[0])
            && replicas.iter().all(|r| r.is_some() && *r == replicas[0]);
        if same {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "replicas differ: applied {applied:?}, data {replicas:?}"
        );
        poll_pause();
    }
}

#[test]
fn linearizable_under_a_killed_leader() {
    run(Nemesis::Kill);
}

#[test]
fn linearizable_under_a_paused_leader() {
    run(Nemesis::Pause);
}

#[test]
fn linearizable_under_a_partitioned_leader() {
    run(Nemesis::Partition);
}

/// Waits until every node has applied the same log, stops the nodes, reads
/// each one's log, and runs the sequential checker on the history.
fn check_replica_logs(c: &mut TestCluster, history: &History) {
    let start = Instant::now();
    loop {
        let stats: Vec<Option<(String, String)>> = (1..=3)
            .map(|i| {
                let s = c.stats_cluster(i).ok()?;
                Some((
                    s.get("raft_applied_index")?.clone(),
                    s.get("raft_last_log_index")?.clone(),
                ))
            })
            .collect();
        if stats.iter().all(|s| s.is_some() && *s == stats[0]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "replicas did not catch up: {stats:?}"
        );
        poll_pause();
    }
    let mut logs = Vec::new();
    let writers = history.writers();
    for node in 1..=3 {
        c.kill9(node);
        let out = std::process::Command::new(memdial_bin())
            .arg("raft-log")
            .arg(c.raft_log_dir(node))
            .output()
            .expect("run memdial raft-log");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let first_index: u64 = text
            .lines()
            .next()
            .and_then(|l| l.split('\t').next()?.parse().ok())
            .unwrap_or(0);
        assert!(
            first_index < 10,
            "node {node}'s log starts at {first_index}: compacted, so the check would be blind"
        );
        let applied = text
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                assert_eq!(f.len(), 4, "a log line: {line:?}");
                writers
                    .get(f[2].as_bytes(), f[3].as_bytes())
                    .unwrap_or_else(|| panic!("node {node}: no operation wrote {line:?}"))
            })
            .collect();
        logs.push(ReplicaLog {
            node: node as u32,
            applied,
        });
    }
    let report = check_sequential(history, &logs);
    eprintln!("sequential check: {report}");
    assert!(report.is_ok(), "{report}");
    assert!(report.reads_checked > 50, "too few reads checked: {report}");
}

#[test]
fn sequential_under_a_partitioned_leader() {
    run_mode("sequential", Nemesis::Partition);
}

#[test]
fn sequential_under_a_killed_leader() {
    run_mode("sequential", Nemesis::Kill);
}
