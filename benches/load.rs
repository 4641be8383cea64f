//! Load harness: drives memcached direct, (with `--twemproxy`) twemproxy
//! in front of memcached, memdial in front of memcached,
//! memdial with its embedded store and (unless `--no-cluster`) node 1 of a
//! 3-node cluster per consistency mode (`--modes`; eventual by default)
//! with the same memtier-like workload, in one run,
//! and prints ops/s, p50/p99 latency and the ratios to memcached direct.
//! With the cluster it then measures replication delay (write on node 1 →
//! visible on node 2), idle and under load.
//!
//! Run: `cargo bench --bench load -- [options]` (cargo builds the memdial
//! binary it starts). Processes are started by the test harness
//! (`tests/common/procs.rs`): fresh ports, polled readiness, killed on drop.
//!
//! Options (defaults in brackets; `--name value` or `--name=value`):
//!   --conns LIST [50]       client connections per target, e.g. 10,50,200
//!                           (the replication phases use the first)
//!   --pipeline LIST [1,16]  requests per batch on each connection
//!   --seconds S [5]         measured time per target and depth
//!   --warmup S [1]          unmeasured time before it
//!   --value LIST [32]       value sizes in bytes, e.g. 32,1024
//!   --keys N [10000]        key space, prefilled on every target
//!   --threads N [1]         load generator threads
//!   --rounds N [1]          with --memtier: measure every target N times in
//!                           turn at each point, then print each target's
//!                           medians and the median of its ratio, round by
//!                           round, to twemproxy (with --twemproxy) or else
//!                           to the first target (with --lag, the single
//!                           node); --out gets a line per round, plot.py
//!                           keeps the last
//!   --no-cluster            skip the 3-node clusters and replication delay
//!   --modes LIST [eventual] the clusters' modes, e.g. eventual,linearizable,sequential
//!   --twemproxy             also twemproxy (`nutcracker` on PATH) in front
//!                           of its own memcached; skipped, saying so, when
//!                           nutcracker is not installed
//!   --memtier PATH          drive every target with that memtier_benchmark
//!                           binary instead of the built-in generator
//!   --out FILE              also append one JSON line per measured target,
//!                           connection count, depth and value size to FILE
//!                           (see [`Out`]); `benches/plot.py` draws them
//! Unknown arguments (cargo passes `--bench`) are ignored.
//!
//! With `--memtier`, each target is prefilled by memtier itself (`--ratio=1:0
//! --key-pattern=P:P --requests=allkeys`), then, per depth, warmed up for
//! `--warmup` s by a memtier run whose figures are dropped, then measured by
//! one `--protocol=memcache_text --ratio=1:G --key-pattern R:R` run of
//! `--seconds` s. Figures come from its `--json-out-file` (see
//! [`parse_memtier_json`]). Every memtier run is killed if it outlives its
//! deadline, and its `error` lines fail the target. Each row also gives
//! the CPU time (user + system, from `/proc/PID/stat`) that the process
//! serving the target used during the measured run, and the requests it
//! answered per CPU-second (for a proxy, its own CPU only: the memcached
//! behind it is not counted).
//!
//! Workload: 1 set : 10 gets (memtier's default; `--gets-per-set N`),
//! uniformly random keys.
//!
//! `--lag` runs only the replication phases against a 3-node eventual
//! cluster over three real memcached and one memdial over a memcached of
//! its own (see [`lag_main`]): 1 set : 10 gets on node 1 against the single
//! node at each depth (default settings), then, on a new cluster with
//! anti-entropy every 2 s, node 1 driven at depth 16 (1 set : 1 get unless
//! `--gets-per-set` says otherwise) with its `stats cluster` lag and every
//! node's heartbeat round trips sampled every 250 ms, the anti-entropy
//! work meanwhile, and the time until the peers have caught up.
//! Every reply is parsed against the request it answers (a read may hold
//! part of a reply or several); a `get` must return the key and value that
//! were stored. Latency is per request: from writing its batch to reading
//! its reply. Only 127.0.0.1 is used; every wait has a deadline.

#[path = "../tests/common/procs.rs"]
mod procs;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use procs::{Memcached, Memdial, MemdialCluster, TempFile, Twemproxy, proxy_yaml};

/// Config lines that give an embedded store the 256 MiB that every
/// memcached here is started with (`-m 256`).
const EMBEDDED_LIMITS: &str = "limits:\n  embedded_memory_bytes: 268435456\n";

/// Longest wait for any single read, write or connect before the
/// connection counts as stalled.
const STALL: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- options

#[derive(Clone)]
struct Opts {
    /// Connection counts, each measured at every depth.
    conns: Vec<usize>,
    pipelines: Vec<usize>,
    seconds: u64,
    warmup: u64,
    values: Vec<usize>,
    keys: usize,
    threads: usize,
    /// Rounds over the targets at each point (`--memtier` only).
    rounds: usize,
    cluster: bool,
    /// Gets per set in the mix (memtier's default is 10).
    gets_per_set: usize,
    /// Run the write-heavy replication phase instead of the others.
    lag: bool,
    /// The consistency modes of the 3-node clusters measured.
    modes: Vec<String>,
    /// Also measure twemproxy in front of its own memcached.
    twemproxy: bool,
    /// Drive the targets with this memtier_benchmark binary.
    memtier: Option<PathBuf>,
    /// Append the raw results to this file, one JSON line each.
    out: Option<PathBuf>,
}

fn list(name: &str, v: &str) -> Vec<usize> {
    v.split(',')
        .map(|p| match p.trim().parse() {
            Ok(n) if n > 0 => n,
            _ => panic!("{name}: expected positive numbers separated by commas, got {v:?}"),
        })
        .collect()
}

fn number(name: &str, v: &str) -> usize {
    list(name, v)[0]
}

fn opts() -> Opts {
    let mut o = Opts {
        conns: vec![50],
        pipelines: vec![1, 16],
        seconds: 5,
        warmup: 1,
        values: vec![32],
        keys: 10_000,
        threads: 1,
        rounds: 1,
        cluster: true,
        gets_per_set: 10,
        lag: false,
        modes: vec!["eventual".into()],
        twemproxy: false,
        memtier: None,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let takes_value = [
            "--conns",
            "--pipeline",
            "--seconds",
            "--warmup",
            "--value",
            "--keys",
            "--threads",
            "--rounds",
            "--gets-per-set",
            "--modes",
            "--memtier",
            "--out",
        ];
        if name == "--no-cluster" {
            o.cluster = false;
            continue;
        }
        if name == "--lag" {
            o.lag = true;
            continue;
        }
        if name == "--twemproxy" {
            o.twemproxy = true;
            continue;
        }
        if !takes_value.contains(&name.as_str()) {
            continue; // `--bench` from cargo, and anything else not ours
        }
        let v = inline
            .or_else(|| args.next())
            .unwrap_or_else(|| panic!("{name} needs a value"));
        match name.as_str() {
            "--conns" => o.conns = list(&name, &v),
            "--pipeline" => o.pipelines = list(&name, &v),
            "--seconds" => o.seconds = number(&name, &v) as u64,
            "--warmup" => o.warmup = v.parse().expect("--warmup S"),
            "--value" => o.values = list(&name, &v),
            "--keys" => o.keys = number(&name, &v),
            "--threads" => o.threads = number(&name, &v),
            "--rounds" => o.rounds = number(&name, &v),
            "--gets-per-set" => o.gets_per_set = v.parse().expect("--gets-per-set N"),
            "--modes" => o.modes = v.split(',').map(|m| m.trim().to_string()).collect(),
            "--memtier" => o.memtier = Some(PathBuf::from(v)),
            "--out" => o.out = Some(PathBuf::from(v)),
            _ => unreachable!(),
        }
    }
    o
}

impl Opts {
    /// Every connection count and depth measured at value size `value`,
    /// connection counts outermost.
    fn points(&self, value: usize) -> Vec<Point> {
        self.conns
            .iter()
            .flat_map(|&conns| {
                self.pipelines.iter().map(move |&pipeline| Point {
                    value,
                    conns,
                    pipeline,
                })
            })
            .collect()
    }
}

// ------------------------------------------------- targets and raw results

/// One process measured: its name in the tables, its client port, the
/// process whose CPU time is counted, and a cluster's consistency mode.
struct Target<'a> {
    name: &'a str,
    port: u16,
    pid: u32,
    /// `None` for a single process (memcached, twemproxy, one memdial).
    mode: Option<&'a str>,
}

/// Where in the sweep a measurement is.
#[derive(Clone, Copy)]
struct Point {
    value: usize,
    conns: usize,
    pipeline: usize,
}

/// Percentiles, in %, asked of memtier (`--print-percentiles`) and of the
/// built-in generator's histogram, for the latency curve. memtier names
/// each with at most two decimals (see [`parse_memtier_json`]).
const PERCENTILES: [f64; 11] = [
    10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99,
];

/// One measurement as `--out` writes it.
struct Row<'a> {
    target: &'a Target<'a>,
    at: Point,
    ops_per_sec: f64,
    /// memtier's mean latency; the built-in generator does not keep one.
    avg_us: Option<u64>,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    /// (percent, µs), ascending.
    percentiles_us: Vec<(f64, u64)>,
    cpu_s: Option<f64>,
    /// Requests answered in the run, the ones the CPU time is divided by.
    requests: u64,
    hit_ratio: f64,
    /// Errors, wrong replies or misses: the tables say which.
    failed: bool,
}

/// `--out FILE`: the raw results, appended as one JSON object per line so
/// that several runs can share a file. Each line holds the run's `run` (its
/// start, UTC), `commit`, `generator` (`memtier_benchmark …` or `built-in`),
/// `seconds`, `warmup`, `keys`, `gets_per_set` and `threads`, then the
/// measurement's `target`, `mode` (a cluster's consistency, or null),
/// `value`, `conns`, `pipeline`, `ops_per_sec`, `avg_us` (null for the
/// built-in generator), `p50_us`, `p99_us`, `p999_us`, `percentiles_us`
/// (`[[percent, µs], …]`), `cpu_s` and `ops_per_cpu_s` (null where /proc
/// is missing), `requests`, `hit_ratio` and `failed`.
struct Out {
    file: std::fs::File,
    run: serde_json::Map<String, serde_json::Value>,
}

impl Out {
    fn open(path: &Path, o: &Opts, generator: &str) -> Out {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("--out: create {}: {e}", dir.display()));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("--out {}: {e}", path.display()));
        let serde_json::Value::Object(run) = serde_json::json!({
            "run": utc_now(),
            "commit": git_commit(),
            "generator": generator,
            "seconds": o.seconds,
            "warmup": o.warmup,
            "keys": o.keys,
            "gets_per_set": o.gets_per_set,
            "threads": o.threads,
        }) else {
            unreachable!("json! of an object")
        };
        Out { file, run }
    }

    /// Appends `row` as one line, flushed, so that a run cut short keeps
    /// what it measured.
    fn write(&mut self, row: &Row<'_>) {
        use std::io::Write;
        let per_cpu = row
            .cpu_s
            .filter(|&c| c > 0.0)
            .map(|c| row.requests as f64 / c);
        let mut line = self.run.clone();
        let serde_json::Value::Object(fields) = serde_json::json!({
            "target": row.target.name,
            "mode": row.target.mode,
            "value": row.at.value,
            "conns": row.at.conns,
            "pipeline": row.at.pipeline,
            "ops_per_sec": row.ops_per_sec,
            "avg_us": row.avg_us,
            "p50_us": row.p50_us,
            "p99_us": row.p99_us,
            "p999_us": row.p999_us,
            "percentiles_us": row.percentiles_us,
            "cpu_s": row.cpu_s,
            "ops_per_cpu_s": per_cpu,
            "requests": row.requests,
            "hit_ratio": row.hit_ratio,
            "failed": row.failed,
        }) else {
            unreachable!("json! of an object")
        };
        line.extend(fields);
        let text = serde_json::Value::Object(line).to_string();
        writeln!(self.file, "{text}")
            .and_then(|()| self.file.flush())
            .unwrap_or_else(|e| panic!("--out: {e}"));
    }
}

// --------------------------------------------------------------- workload

/// Requests prepared once, so the generator spends its time on the network.
struct Workload {
    keys: Vec<Vec<u8>>,
    gets: Vec<Vec<u8>>,
    sets: Vec<Vec<u8>>,
    value: Vec<u8>,
    /// One request in this many is a set.
    set_every: u64,
}

impl Workload {
    fn new(keys: usize, value_len: usize, gets_per_set: usize) -> Workload {
        let value: Vec<u8> = (0..value_len).map(|i| b'a' + (i % 26) as u8).collect();
        let keys: Vec<Vec<u8>> = (0..keys)
            .map(|k| format!("key:{k:08}").into_bytes())
            .collect();
        let gets = keys
            .iter()
            .map(|k| [b"get ", &k[..], b"\r\n"].concat())
            .collect();
        let sets = keys
            .iter()
            .map(|k| {
                let head = format!(" 0 0 {value_len}\r\n");
                [b"set ", &k[..], head.as_bytes(), &value, b"\r\n"].concat()
            })
            .collect();
        Workload {
            keys,
            gets,
            sets,
            value,
            set_every: gets_per_set as u64 + 1,
        }
    }
}

// ------------------------------------------------------- reply parsing

/// What a request expects back.
#[derive(Clone, Copy)]
enum Expect {
    /// `set`: `STORED`.
    Stored,
    /// `get` of workload key `k`: its `VALUE` with the workload value, or `END`.
    Get(usize),
    /// `get` of a probe key: any `VALUE` for it, or `END`.
    Probe,
}

enum Outcome {
    Stored,
    Hit,
    Miss,
    /// A well-framed reply that is not what the request expects.
    Wrong(String),
}

enum Parse {
    Incomplete,
    Done(usize, Outcome),
    /// The stream can no longer be framed.
    Garbage(String),
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.chars().count() > 80 {
        format!("{:?}…", s.chars().take(80).collect::<String>())
    } else {
        format!("{s:?}")
    }
}

/// Parses one reply at the start of `buf` as the answer to `expect`.
fn parse_reply(buf: &[u8], expect: Expect, w: &Workload) -> Parse {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > 8192 {
            Parse::Garbage(format!("no line end in {} bytes", buf.len()))
        } else {
            Parse::Incomplete
        };
    };
    if nl == 0 || buf[nl - 1] != b'\r' {
        return Parse::Garbage(format!("line not ended by CRLF: {}", lossy(&buf[..=nl])));
    }
    let line = &buf[..nl - 1];
    let data = nl + 1;
    if let Some(rest) = line.strip_prefix(b"VALUE ") {
        let mut parts = rest.split(|&b| b == b' ');
        let (key, flags, len) = (parts.next(), parts.next(), parts.next());
        let len = len
            .and_then(|l| std::str::from_utf8(l).ok())
            .and_then(|l| l.parse::<usize>().ok());
        let (Some(key), Some(_), Some(len)) = (key, flags, len) else {
            return Parse::Garbage(format!("bad VALUE line {}", lossy(line)));
        };
        let data_end = data + len;
        let end = data_end + b"\r\nEND\r\n".len();
        if buf.len() < end {
            return Parse::Incomplete;
        }
        if &buf[data_end..end] != b"\r\nEND\r\n" {
            return Parse::Garbage(format!(
                "single-key VALUE block not followed by CRLF END: {}",
                lossy(&buf[data_end..end])
            ));
        }
        let outcome = match expect {
            Expect::Get(k) if key != &w.keys[k][..] => Outcome::Wrong(format!(
                "get {} answered VALUE {}",
                lossy(&w.keys[k]),
                lossy(key)
            )),
            Expect::Get(k) if buf[data..data_end] != w.value[..] => Outcome::Wrong(format!(
                "get {}: {} bytes differing from the {} stored",
                lossy(&w.keys[k]),
                len,
                w.value.len()
            )),
            Expect::Get(_) | Expect::Probe => Outcome::Hit,
            Expect::Stored => Outcome::Wrong(format!("set answered {}", lossy(line))),
        };
        return Parse::Done(end, outcome);
    }
    let outcome = match (line, expect) {
        (b"STORED", Expect::Stored) => Outcome::Stored,
        (b"END", Expect::Get(_) | Expect::Probe) => Outcome::Miss,
        (_, Expect::Stored) => Outcome::Wrong(format!("set answered {}", lossy(line))),
        (_, _) => Outcome::Wrong(format!("get answered {}", lossy(line))),
    };
    Parse::Done(data, outcome)
}

/// A client connection with its own read buffer.
///
/// Not the tests' `Client` (tests/common/client.rs): that one blocks a
/// thread on each read, and this one runs as one of many tasks on a tokio
/// runtime; and in this hot loop `parse_reply` checks each reply against the
/// request it answers in place, without copying it out first.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn connect(port: u16) -> Result<Conn, String> {
        let stream = match timeout(STALL, TcpStream::connect(("127.0.0.1", port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err(format!("connect: no answer within {STALL:?}")),
        };
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        match timeout(STALL, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err(format!("write blocked for {STALL:?}")),
        }
    }

    async fn reply(&mut self, expect: Expect, w: &Workload) -> Result<Outcome, String> {
        loop {
            match parse_reply(&self.buf, expect, w) {
                Parse::Done(n, outcome) => {
                    self.buf.advance(n);
                    return Ok(outcome);
                }
                Parse::Garbage(e) => return Err(e),
                Parse::Incomplete => {}
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            match timeout(STALL, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => return Err("connection closed by the server".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Err(_) => return Err(format!("no reply within {STALL:?}")),
            }
        }
    }
}

// ------------------------------------------------------------ measurement

/// Log-linear latency histogram in microseconds: exact below 128 µs, then
/// 64 buckets per power of two (under 1.6 % error).
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    const EXACT: u64 = 128;

    fn new() -> Histogram {
        Histogram {
            counts: vec![0; 128 + 25 * 64],
            total: 0,
        }
    }

    fn bucket(us: u64) -> usize {
        let us = us.min(u32::MAX as u64);
        if us < Self::EXACT {
            return us as usize;
        }
        let p = 63 - us.leading_zeros() as u64; // ≥ 7
        let mantissa = us >> (p - 6); // 64..128
        (128 + (p - 7) * 64 + (mantissa - 64)) as usize
    }

    /// The middle of bucket `i`, in microseconds.
    fn value(i: usize) -> u64 {
        if (i as u64) < Self::EXACT {
            return i as u64;
        }
        let p = (i as u64 - 128) / 64 + 7;
        let mantissa = (i as u64 - 128) % 64 + 64;
        let width = 1u64 << (p - 6);
        (mantissa << (p - 6)) + width / 2
    }

    fn record(&mut self, d: Duration) {
        self.counts[Self::bucket(d.as_micros() as u64)] += 1;
        self.total += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    fn percentile(&self, p: f64) -> u64 {
        let rank = ((self.total as f64 * p).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        0
    }
}

/// What one connection saw while measuring.
struct Stats {
    ops: u64,
    hits: u64,
    misses: u64,
    wrong: u64,
    examples: Vec<String>,
    failure: Option<String>,
    latency: Histogram,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            ops: 0,
            hits: 0,
            misses: 0,
            wrong: 0,
            examples: Vec::new(),
            failure: None,
            latency: Histogram::new(),
        }
    }

    fn merge(&mut self, o: Stats) {
        self.ops += o.ops;
        self.hits += o.hits;
        self.misses += o.misses;
        self.wrong += o.wrong;
        for e in o.examples {
            if self.examples.len() < 3 {
                self.examples.push(e);
            }
        }
        if let Some(f) = o.failure {
            self.failure.get_or_insert(f);
        }
        self.latency.merge(&o.latency);
    }
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// One connection: batches of `pipeline` requests (1 set : 10 gets on
/// random keys), each written at once, every reply read and checked,
/// until the phase is `STOP`.
async fn client(
    port: u16,
    w: Arc<Workload>,
    pipeline: usize,
    seed: u64,
    phase: Arc<AtomicU8>,
) -> Stats {
    let mut s = Stats::new();
    let mut conn = match Conn::connect(port).await {
        Ok(c) => c,
        Err(e) => {
            s.failure = Some(e);
            return s;
        }
    };
    let mut rng = seed | 1;
    let mut batch = Vec::with_capacity(pipeline * (w.value.len() + 64));
    let mut expects = Vec::with_capacity(pipeline);
    loop {
        let now = phase.load(Ordering::Relaxed);
        if now == STOP {
            return s;
        }
        let record = now == MEASURE;
        batch.clear();
        expects.clear();
        for _ in 0..pipeline {
            // xorshift64*
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            let r = rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let key = ((r >> 32) % w.keys.len() as u64) as usize;
            if r.is_multiple_of(w.set_every) {
                batch.extend_from_slice(&w.sets[key]);
                expects.push(Expect::Stored);
            } else {
                batch.extend_from_slice(&w.gets[key]);
                expects.push(Expect::Get(key));
            }
        }
        let started = Instant::now();
        if let Err(e) = conn.send(&batch).await {
            s.failure = Some(e);
            return s;
        }
        for &expect in &expects {
            let outcome = match conn.reply(expect, &w).await {
                Ok(o) => o,
                Err(e) => {
                    s.failure = Some(e);
                    return s;
                }
            };
            if let Outcome::Wrong(e) = &outcome
                && s.examples.len() < 3
            {
                s.examples.push(e.clone());
            }
            if record {
                s.latency.record(started.elapsed());
                s.ops += 1;
                match outcome {
                    Outcome::Stored => {}
                    Outcome::Hit => s.hits += 1,
                    Outcome::Miss => s.misses += 1,
                    Outcome::Wrong(_) => s.wrong += 1,
                }
            }
        }
    }
}

/// Sets every key of the workload, 100 per batch.
async fn prefill(port: u16, w: &Workload) -> Result<(), String> {
    let mut conn = Conn::connect(port).await?;
    let all: Vec<usize> = (0..w.keys.len()).collect();
    for chunk in all.chunks(100) {
        let batch: Vec<u8> = chunk.iter().flat_map(|&k| w.sets[k].clone()).collect();
        conn.send(&batch).await?;
        for _ in chunk {
            if let Outcome::Wrong(e) = conn.reply(Expect::Stored, w).await? {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// `conns` clients, started together, running in the background until
/// `phase` is `STOP`.
fn start_clients(
    port: u16,
    w: &Arc<Workload>,
    conns: usize,
    pipeline: usize,
    phase: &Arc<AtomicU8>,
) -> Vec<tokio::task::JoinHandle<Stats>> {
    (0..conns)
        .map(|i| {
            let seed = 0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 7919);
            tokio::spawn(client(port, w.clone(), pipeline, seed, phase.clone()))
        })
        .collect()
}

/// Stops the clients and gathers what they saw; each ends within `STALL`.
async fn join_clients(tasks: Vec<tokio::task::JoinHandle<Stats>>) -> Stats {
    let mut all = Stats::new();
    for t in tasks {
        match timeout(STALL * 2, t).await {
            Ok(Ok(s)) => all.merge(s),
            Ok(Err(e)) => {
                all.failure.get_or_insert(format!("client task: {e}"));
            }
            Err(_) => {
                all.failure.get_or_insert("client did not stop".into());
            }
        }
    }
    all
}

struct Measured {
    ops_per_sec: f64,
    stats: Stats,
    /// CPU seconds the process serving the target used while measuring.
    cpu: Option<f64>,
}

async fn measure(t: &Target<'_>, w: &Arc<Workload>, o: &Opts, at: Point) -> Measured {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let tasks = start_clients(t.port, w, at.conns, at.pipeline, &phase);
    tokio::time::sleep(Duration::from_secs(o.warmup)).await;
    let cpu_before = cpu_seconds(t.pid);
    phase.store(MEASURE, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    phase.store(STOP, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_before.zip(cpu_seconds(t.pid)).map(|(b, a)| a - b);
    let stats = join_clients(tasks).await;
    Measured {
        ops_per_sec: stats.ops as f64 / elapsed,
        stats,
        cpu,
    }
}

/// Sets a fresh key on `from`, polls `to` with `get` until it is there;
/// `n` probes, 5 ms apart. Delays in µs; `None` when not seen within 5 s.
async fn replication_delays(
    from: u16,
    to: u16,
    n: usize,
    w: &Workload,
) -> Result<Vec<Option<u64>>, String> {
    let mut writer = Conn::connect(from).await?;
    let mut reader = Conn::connect(to).await?;
    let mut delays = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("probe:{}:{i}", std::process::id());
        let started = Instant::now();
        writer
            .send(format!("set {key} 0 0 1\r\nx\r\n").as_bytes())
            .await?;
        if let Outcome::Wrong(e) = writer.reply(Expect::Stored, w).await? {
            return Err(e);
        }
        let get = format!("get {key}\r\n");
        loop {
            reader.send(get.as_bytes()).await?;
            match reader.reply(Expect::Probe, w).await? {
                Outcome::Hit => {
                    delays.push(Some(started.elapsed().as_micros() as u64));
                    break;
                }
                Outcome::Wrong(e) => return Err(e),
                _ if started.elapsed() > Duration::from_secs(5) => {
                    delays.push(None);
                    break;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(delays)
}

/// Prefills every target, then runs every target at each connection count
/// and depth back to back with the built-in generator and prints one table
/// per value size, connection count and depth. Returns whether anything
/// failed.
async fn builtin_main(targets: &[Target<'_>], o: &Opts, out: &mut Option<Out>) -> bool {
    let mut failed = false;
    for &value in &o.values {
        let w = Arc::new(Workload::new(o.keys, value, o.gets_per_set));
        for t in targets {
            if let Err(e) = prefill(t.port, &w).await {
                panic!("prefill of {} ({value}-byte values): {e}", t.name);
            }
        }
        for at in o.points(value) {
            let (conns, pipeline) = (at.conns, at.pipeline);
            println!("\n{value}-byte values, {conns} connections, pipeline depth {pipeline}");
            println!(
                "{:<32} {:>10} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9}",
                "target", "ops/s", "p50", "p99", "hit %", "wrong", "ops ratio", "p99 ratio"
            );
            let mut direct: Option<(f64, u64)> = None;
            for t in targets {
                let m = measure(t, &w, o, at).await;
                let s = &m.stats;
                let (p50, p99) = (s.latency.percentile(0.50), s.latency.percentile(0.99));
                let (d_ops, d_p99) = *direct.get_or_insert((m.ops_per_sec, p99));
                let gets = s.hits + s.misses;
                let hit_ratio = s.hits as f64 / gets.max(1) as f64;
                println!(
                    "{:<32} {:>10.0} {:>8} {:>8} {:>8.2} {:>7} {:>9.2} {:>9.2}",
                    t.name,
                    m.ops_per_sec,
                    p50,
                    p99,
                    100.0 * hit_ratio,
                    s.wrong,
                    m.ops_per_sec / d_ops.max(1.0),
                    p99 as f64 / d_p99.max(1) as f64,
                );
                for e in &s.examples {
                    println!("    wrong reply: {e}");
                }
                if let Some(f) = &s.failure {
                    println!("    connection failed: {f}");
                    failed = true;
                }
                failed |= s.wrong > 0 || s.misses > 0;
                if let Some(out) = out {
                    out.write(&Row {
                        target: t,
                        at,
                        ops_per_sec: m.ops_per_sec,
                        avg_us: None,
                        p50_us: p50,
                        p99_us: p99,
                        p999_us: s.latency.percentile(0.999),
                        percentiles_us: PERCENTILES
                            .iter()
                            .map(|&p| (p, s.latency.percentile(p / 100.0)))
                            .collect(),
                        cpu_s: m.cpu,
                        requests: s.ops,
                        hit_ratio,
                        failed: s.failure.is_some() || s.wrong > 0,
                    });
                }
            }
        }
    }
    failed
}

// ------------------------------------------------------ memtier_benchmark

/// What one measured memtier_benchmark run saw. Latencies in µs.
struct MemtierRun {
    ops_per_sec: f64,
    avg: u64,
    p50: u64,
    p99: u64,
    p999: u64,
    /// Gets that found their key, of all gets.
    hit_ratio: f64,
    connection_errors: u64,
    /// Requests answered in the whole run (the tail included).
    count: u64,
    /// Every percentile memtier printed, as (percent, µs), in order.
    percentiles: Vec<(f64, u64)>,
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// `/proc/PID/stat`; `None` where there is no /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th and stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// memtier's first `--version` line, e.g. `memtier_benchmark v=2.3.0
/// sha=1655c39a:0 ...`; panics, saying why, when it cannot be run.
fn memtier_version(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("--memtier {}: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    assert!(
        out.status.success() && line.starts_with("memtier_benchmark"),
        "--memtier {}: `--version` said {line:?} ({})",
        bin.display(),
        out.status
    );
    line
}

/// Arguments every memtier run takes: the target, the protocol, the key
/// space `memtier-1` … `memtier-K` and the value size.
fn memtier_common(port: u16, o: &Opts, value: usize) -> Vec<String> {
    [
        "--server=127.0.0.1".to_string(),
        format!("--port={port}"),
        "--protocol=memcache_text".into(),
        format!("--data-size={value}"),
        "--key-minimum=1".into(),
        format!("--key-maximum={}", o.keys),
        "--hide-histogram".into(),
    ]
    .into()
}

/// Sets every key once, in order, on one connection.
fn memtier_prefill(port: u16, o: &Opts, value: usize) -> Vec<String> {
    let mut a = memtier_common(port, o, value);
    a.extend(
        [
            "--ratio=1:0",
            "--key-pattern=P:P",
            "--requests=allkeys",
            "--threads=1",
            "--clients=1",
            "--pipeline=64",
        ]
        .map(String::from),
    );
    a
}

/// The measured mix: `at.conns` connections over `o.threads` threads, each
/// with its own random key sequence, `seconds` long, reporting every
/// percentile of [`PERCENTILES`].
fn memtier_load(port: u16, o: &Opts, at: Point, seconds: u64) -> Vec<String> {
    let mut a = memtier_common(port, o, at.value);
    let percentiles: Vec<String> = PERCENTILES.iter().map(|p| p.to_string()).collect();
    a.extend([
        format!("--ratio=1:{}", o.gets_per_set),
        format!("--pipeline={}", at.pipeline),
        format!("--threads={}", o.threads),
        format!("--clients={}", at.conns / o.threads),
        format!("--test-time={seconds}"),
        "--key-pattern=R:R".into(),
        "--distinct-client-seed".into(),
        format!("--print-percentiles={}", percentiles.join(",")),
    ]);
    a
}

/// Runs memtier with `args` until it exits, killing it after `limit`.
/// Fails on a nonzero exit or any `error:` line it printed (memtier logs a
/// reply it cannot parse and goes on).
async fn run_memtier(bin: &Path, args: &[String], limit: Duration) -> Result<(), String> {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let out = match timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("memtier: {e}")),
        Err(_) => return Err(format!("memtier still running after {limit:?}; killed")),
    };
    // Progress lines end in CR.
    let said = String::from_utf8_lossy(&out.stderr).replace('\r', "\n");
    let errors: Vec<&str> = said
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("error:"))
        .take(3)
        .collect();
    if !out.status.success() {
        let tail: Vec<&str> = said.lines().rev().take(3).collect();
        return Err(format!("memtier {}: {}", out.status, tail.join(" | ")));
    }
    if !errors.is_empty() {
        return Err(format!("memtier said: {}", errors.join(" | ")));
    }
    Ok(())
}

/// Reads the figures of a `--test-time=seconds` run from memtier's JSON
/// output (`ALL STATS` → `Totals`, `Gets`).
///
/// Throughput is the requests answered in the per-second buckets
/// `0..seconds` (`Time-Serie`, counted from each connection's own start)
/// divided by `seconds`. memtier 2.3.0's own `Ops/sec` divides by a run
/// time from start and end times averaged over the connections and stored
/// back as whole seconds, which can be a second off (3.001 s for a 2 s run,
/// so a third low, in one check). The bucket `seconds` holds the replies
/// to requests still in flight at the deadline and is left out. Latencies
/// are memtier's, over the whole run, in ms to 1 µs. memtier names each
/// percentile `p%.3f` cut to six characters (`p50.00`, `p99.90`, `p5.000`),
/// so every key under `Percentile Latencies` is read back as a number.
fn parse_memtier_json(text: &str, seconds: u64) -> Result<MemtierRun, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("memtier JSON: {e}"))?;
    let totals = &v["ALL STATS"]["Totals"];
    let series = totals["Time-Serie"]
        .as_object()
        .ok_or("memtier JSON: no ALL STATS/Totals/Time-Serie")?;
    let answered: u64 = series
        .iter()
        .filter(|(second, _)| second.parse::<u64>().is_ok_and(|s| s < seconds))
        .map(|(_, bucket)| bucket["Count"].as_u64().unwrap_or(0))
        .sum();
    let count = totals["Count"]
        .as_u64()
        .ok_or("memtier JSON: no Totals/Count")?;
    let us = |ms: f64| (ms * 1000.0).round() as u64;
    let percentile = |name: &str| {
        totals["Percentile Latencies"][name]
            .as_f64()
            .map(us)
            .ok_or_else(|| format!("memtier JSON: no Totals/Percentile Latencies/{name}"))
    };
    // Accumulated Latency is the sum of every request's latency, in ms.
    let accumulated = totals["Accumulated Latency"].as_f64().unwrap_or(0.0);
    let mut percentiles: Vec<(f64, u64)> = totals["Percentile Latencies"]
        .as_object()
        .ok_or("memtier JSON: no Totals/Percentile Latencies")?
        .iter()
        .filter_map(|(name, ms)| Some((name.strip_prefix('p')?.parse().ok()?, us(ms.as_f64()?))))
        .collect();
    percentiles.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gets = &v["ALL STATS"]["Gets"];
    let hits = gets["Hits/sec"].as_f64().unwrap_or(0.0);
    let misses = gets["Misses/sec"].as_f64().unwrap_or(0.0);
    Ok(MemtierRun {
        ops_per_sec: answered as f64 / seconds as f64,
        avg: us(accumulated / count.max(1) as f64),
        p50: percentile("p50.00")?,
        p99: percentile("p99.00")?,
        p999: percentile("p99.90")?,
        hit_ratio: if hits + misses > 0.0 {
            hits / (hits + misses)
        } else {
            1.0
        },
        connection_errors: totals["Connection Errors"].as_u64().unwrap_or(0),
        count,
        percentiles,
    })
}

/// Warm-up (figures dropped), then the measured run of one target at one
/// connection count, depth and value size.
async fn memtier_measure(
    bin: &Path,
    t: &Target<'_>,
    o: &Opts,
    at: Point,
    json: &Path,
) -> Result<(MemtierRun, Option<f64>), String> {
    // memtier's own start-up and the in-flight tail, with room to spare.
    let slack = Duration::from_secs(30);
    if o.warmup > 0 {
        let args = memtier_load(t.port, o, at, o.warmup);
        run_memtier(bin, &args, Duration::from_secs(o.warmup) + slack)
            .await
            .map_err(|e| format!("warm-up: {e}"))?;
    }
    let mut args = memtier_load(t.port, o, at, o.seconds);
    args.push(format!("--json-out-file={}", json.display()));
    let cpu_before = cpu_seconds(t.pid);
    run_memtier(bin, &args, Duration::from_secs(o.seconds) + slack).await?;
    let cpu = cpu_before.zip(cpu_seconds(t.pid)).map(|(b, a)| a - b);
    let text = std::fs::read_to_string(json).map_err(|e| format!("{}: {e}", json.display()))?;
    Ok((parse_memtier_json(&text, o.seconds)?, cpu))
}

/// Prefills every target with memtier, then runs every target at each
/// connection count and depth back to back and prints one table per value
/// size, connection count and depth, with the CPU time the process serving
/// each target used in the measured run and its requests per CPU-second.
/// Returns whether anything failed.
async fn memtier_main(bin: &Path, targets: &[Target<'_>], o: &Opts, out: &mut Option<Out>) -> bool {
    let dir = tempfile::tempdir().expect("a directory for memtier's JSON");
    let mut failed = false;
    let ratio = |x: f64, base: Option<f64>| match base {
        Some(b) if b > 0.0 => format!("{:.2}", x / b),
        _ => "-".into(),
    };
    for &value in &o.values {
        for t in targets {
            let args = memtier_prefill(t.port, o, value);
            // 10,000 keys take well under a second.
            let limit = Duration::from_secs(30 + o.keys as u64 / 1000);
            if let Err(e) = run_memtier(bin, &args, limit).await {
                panic!("memtier prefill of {} ({value}-byte values): {e}", t.name);
            }
        }
        for at in o.points(value) {
            let (conns, pipeline) = (at.conns, at.pipeline);
            println!(
                "\n{value}-byte values, {conns} connections, pipeline depth {pipeline} (memtier_benchmark)"
            );
            println!(
                "{:<32} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9}",
                "target",
                "ops/s",
                "avg",
                "p50",
                "p99",
                "p99.9",
                "hit %",
                "ops x",
                "p50 x",
                "p99 x",
                "p99.9 x",
                "cpu s",
                "ops/cpu-s"
            );
            // Per round, each target's ops/s, p99 and requests per
            // CPU-second.
            let mut rounds: Vec<Vec<Option<[f64; 3]>>> = Vec::new();
            for round in 0..o.rounds {
                if o.rounds > 1 {
                    println!("round {}", round + 1);
                }
                rounds.push(vec![None; targets.len()]);
                // memcached direct's figures, the ratios' base.
                let mut direct: Option<[f64; 4]> = None;
                for (i, t) in targets.iter().enumerate() {
                    let name = t.name;
                    let json = dir
                        .path()
                        .join(format!("{value}-{conns}-{pipeline}-{i}-{round}.json"));
                    let (r, cpu) = match memtier_measure(bin, t, o, at, &json).await {
                        Ok(r) => r,
                        Err(e) => {
                            println!("{name:<32} failed: {e}");
                            failed = true;
                            continue;
                        }
                    };
                    let figures = [r.ops_per_sec, r.p50 as f64, r.p99 as f64, r.p999 as f64];
                    if i == 0 {
                        direct = Some(figures);
                    }
                    let base = |k: usize| direct.map(|d| d[k]);
                    // CPU seconds and requests per CPU-second, when measured.
                    let measured = cpu.filter(|c| *c > 0.0).map(|c| (c, r.count as f64 / c));
                    let (cpu_s, per_cpu_s) = measured
                        .map_or(("-".to_string(), "-".to_string()), |(c, n)| {
                            (format!("{c:.2}"), format!("{n:.0}"))
                        });
                    let per_cpu = measured.map_or(0.0, |(_, n)| n);
                    rounds[round][i] = Some([r.ops_per_sec, r.p99 as f64, per_cpu]);
                    println!(
                        "{:<32} {:>10.0} {:>7} {:>7} {:>7} {:>7} {:>7.2} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9}",
                        name,
                        r.ops_per_sec,
                        r.avg,
                        r.p50,
                        r.p99,
                        r.p999,
                        100.0 * r.hit_ratio,
                        ratio(figures[0], base(0)),
                        ratio(figures[1], base(1)),
                        ratio(figures[2], base(2)),
                        ratio(figures[3], base(3)),
                        cpu_s,
                        per_cpu_s,
                    );
                    if r.connection_errors > 0 {
                        println!("    connection errors: {}", r.connection_errors);
                    }
                    let bad = r.ops_per_sec <= 0.0 || r.connection_errors > 0 || r.hit_ratio < 1.0;
                    failed |= bad;
                    if let Some(out) = out {
                        out.write(&Row {
                            target: t,
                            at,
                            ops_per_sec: r.ops_per_sec,
                            avg_us: Some(r.avg),
                            p50_us: r.p50,
                            p99_us: r.p99,
                            p999_us: r.p999,
                            percentiles_us: r.percentiles,
                            cpu_s: cpu,
                            requests: r.count,
                            hit_ratio: r.hit_ratio,
                            failed: bad,
                        });
                    }
                }
            }
            if o.rounds > 1 {
                print_medians(targets, &rounds);
            }
        }
    }
    failed
}

/// Each target's medians over the rounds and the median of each target's
/// ratio, in the same round, to twemproxy (or, when twemproxy was not
/// measured, to the first target), with its spread: the machine's noise
/// moves whole rounds, so a ratio taken within a round varies less than
/// one of medians.
fn print_medians(targets: &[Target<'_>], rounds: &[Vec<Option<[f64; 3]>>]) {
    fn median(mut xs: Vec<f64>) -> Option<f64> {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        (n > 0).then(|| {
            if n % 2 == 1 {
                xs[n / 2]
            } else {
                (xs[n / 2 - 1] + xs[n / 2]) / 2.0
            }
        })
    }
    // Ratios are to twemproxy when it ran, else to the first target (the
    // single node of `--lag`, memcached direct otherwise).
    let tw = targets
        .iter()
        .position(|t| t.name.starts_with("twemproxy"))
        .or((!targets.is_empty()).then_some(0));
    println!(
        "medians over {} rounds: {:<19} {:>10} {:>7} {:>9}   x {}, same round: ops/s (min-max), p99, ops/cpu-s",
        rounds.len(),
        "target",
        "ops/s",
        "p99",
        "ops/cpu-s",
        tw.map_or("-", |i| targets[i].name),
    );
    for (i, t) in targets.iter().enumerate() {
        let col = |k: usize| median(rounds.iter().filter_map(|r| r[i].map(|f| f[k])).collect());
        let fmt = |x: Option<f64>, width: usize| match x {
            Some(x) => format!("{x:>width$.0}"),
            None => format!("{:>width$}", "-"),
        };
        let mut line = format!(
            "{:<39} {} {} {}",
            t.name,
            fmt(col(0), 10),
            fmt(col(1), 7),
            fmt(col(2), 9)
        );
        if let Some(tw) = tw.filter(|&tw| tw != i) {
            let ratios = |k: usize| -> Vec<f64> {
                rounds
                    .iter()
                    .filter_map(|r| match (r[i], r[tw]) {
                        (Some(a), Some(b)) if b[k] > 0.0 => Some(a[k] / b[k]),
                        _ => None,
                    })
                    .collect()
            };
            let ops = ratios(0);
            let lo = ops.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ops.iter().copied().fold(0.0, f64::max);
            if let (Some(m), Some(p99), Some(cpu)) =
                (median(ops), median(ratios(1)), median(ratios(2)))
            {
                line += &format!("   {m:.2} ({lo:.2}-{hi:.2}), {p99:.2}, {cpu:.2}");
            }
        }
        println!("{line}");
    }
}

// ---------------------------------------------------- replication lag

/// Node `port`'s `stats cluster` lines `peer:N:NAME VALUE`, as
/// (peer, name, value).
async fn peer_stats(port: u16) -> Result<Vec<(u32, String, String)>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"stats cluster\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    while !buf.ends_with(b"END\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .map_err(|_| "stats cluster timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("STAT peer:")?;
            let (peer, rest) = rest.split_once(':')?;
            let (name, value) = rest.split_once(' ')?;
            Some((peer.parse().ok()?, name.to_string(), value.to_string()))
        })
        .collect())
}

/// The numeric `name` of every peer in `stats` (peers showing `-` left out).
fn per_peer(stats: &[(u32, String, String)], name: &str) -> Vec<u64> {
    stats
        .iter()
        .filter(|(_, n, _)| n == name)
        .filter_map(|(_, _, v)| v.parse().ok())
        .collect()
}

/// Node `port`'s `stats cluster` lines `peer:N:lag`, as lags.
async fn peer_lags(port: u16) -> Result<Vec<u64>, String> {
    Ok(per_peer(&peer_stats(port).await?, "lag"))
}

/// The sum of `name` over the peers of every node in `ports`.
async fn cluster_sum(ports: &[u16], name: &str) -> Result<u64, String> {
    let mut sum = 0;
    for &p in ports {
        sum += per_peer(&peer_stats(p).await?, name).iter().sum::<u64>();
    }
    Ok(sum)
}

/// The `p` quantile of `v` (sorted here).
fn quantile(v: &[u64], p: f64) -> u64 {
    let mut sorted = v.to_vec();
    sorted.sort_unstable();
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

/// The replication phase (`--lag`): a 3-node eventual cluster over three
/// memcached (anti-entropy every 2 s, so rounds run under the load), and
/// one memdial over a memcached of its own.
///
/// 1. Throughput at 1 set : 10 gets, at each `--pipeline` depth: the single
///    node, then node 1 of the cluster with default settings (issue 9's
///    goal 3: at least 0.8 of the single node).
/// 2. On a new cluster with anti-entropy every 2 s, so that its rounds
///    show in one run: write-heavy load on node 1 (depth 16, 1 set : `--gets-per-set` gets,
///    1 unless given) for `--seconds`: node 1's lag to its peers (entries
///    not acknowledged), its heartbeat round trips and its peers' states,
///    sampled every 250 ms; the anti-entropy entries sent and keys
///    repaired meanwhile; then the time until the peers have caught up.
fn lag_main(o: &Opts) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Three nodes over memcached each; `extra` lines join the cluster
    // section of their config.
    let start_cluster = |extra: &str| {
        let stores: Vec<Memcached> = (0..3)
            .map(|_| Memcached::start_with_memory_mb(256))
            .collect();
        let cluster = MemdialCluster::start(3, "error", |ports| {
            let nodes: Vec<_> = ports
                .iter()
                .zip(&stores)
                .map(|(p, m)| (*p, Some(m.addr())))
                .collect();
            let cluster =
                format!("  name: bench\n  secret: bench-secret\n  consistency: eventual\n{extra}");
            vec![proxy_yaml(&cluster, &nodes); 3]
        });
        (stores, cluster)
    };
    let behind = Memcached::start_with_memory_mb(256);
    let single = Memdial::start(None, &["--backend", &behind.addr()], "error");
    let value = o.values[0];
    println!(
        "memdial replication, commit {}: eventual x3 over memcached against one memdial over memcached; {} connections, {value}-byte values, {} keys",
        git_commit(),
        o.conns[0],
        o.keys,
    );
    let mut failed = false;
    rt.block_on(async {
        // 1. Throughput at 1:10, with the default settings.
        let (stores, cluster) = start_cluster("");
        let targets = [
            Target {
                name: "memdial -> memcached",
                port: single.port,
                pid: single.pid(),
                mode: None,
            },
            Target {
                name: "memdial eventual x3, node 1",
                port: cluster.ports(1).client,
                pid: cluster.pid(1).expect("node 1 runs"),
                mode: Some("eventual"),
            },
        ];
        let mix = Opts {
            gets_per_set: 10,
            values: vec![value],
            ..o.clone()
        };
        println!("\n1 set : 10 gets; ratios to the single node");
        failed |= match &o.memtier {
            Some(bin) => memtier_main(bin, &targets, &mix, &mut None).await,
            None => builtin_main(&targets, &mix, &mut None).await,
        };

        drop(cluster);
        drop(stores);

        // 2. Write-heavy load, on a new cluster whose anti-entropy rounds
        // come often enough to be seen in one run.
        let (_stores, cluster) = start_cluster("  anti_entropy_interval_ms: 2000\n");
        let node1 = cluster.ports(1).client;
        let nodes: Vec<u16> = (1..=3).map(|i| cluster.ports(i).client).collect();
        let w = Arc::new(Workload::new(o.keys, value, o.gets_per_set));
        if let Err(e) = prefill(node1, &w).await {
            panic!("prefill of node 1: {e}");
        }
        let settle = Instant::now();
        while peer_lags(node1)
            .await
            .map(|l| l.len() < 2 || l.iter().any(|l| *l > 0))
            .unwrap_or(true)
        {
            assert!(
                settle.elapsed() < Duration::from_secs(120),
                "the prefill did not replicate within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let counts = |name: &'static str| cluster_sum(&nodes, name);
        let (sent0, repaired0) = (counts("repair_sent").await, counts("repaired").await);
        println!(
            "\nwrite-heavy (a new cluster, anti-entropy every 2 s): node 1 driven by {} connections at depth 16, 1 set : {} gets, {} s",
            o.conns[0], o.gets_per_set, o.seconds
        );
        let phase = Arc::new(AtomicU8::new(MEASURE));
        let started = Instant::now();
        let load = start_clients(node1, &w, o.conns[0], 16, &phase);
        // Per sample: node 1's larger lag; every node's heartbeat round
        // trip to each peer, by link; peers any node saw not up.
        let (mut lags, mut not_up) = (Vec::new(), 0);
        let mut rtts: std::collections::BTreeMap<(usize, u32), Vec<u64>> = Default::default();
        while started.elapsed() < Duration::from_secs(o.seconds) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            for (i, &port) in nodes.iter().enumerate() {
                match peer_stats(port).await {
                    Ok(s) => {
                        if i == 0 {
                            lags.push(per_peer(&s, "lag").into_iter().max().unwrap_or(0));
                        }
                        for (peer, name, v) in &s {
                            match (name.as_str(), v.parse::<u64>()) {
                                ("rtt_us", Ok(rtt)) => {
                                    rtts.entry((i + 1, *peer)).or_default().push(rtt)
                                }
                                ("state", _) if v != "up" => not_up += 1,
                                _ => {}
                            }
                        }
                    }
                    Err(e) => println!("    stats cluster of node {} failed: {e}", i + 1),
                }
            }
        }
        phase.store(STOP, Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let stats = join_clients(load).await;
        let stopped = Instant::now();
        let drained = loop {
            let lag = peer_lags(node1)
                .await
                .map(|l| l.into_iter().max().unwrap_or(0));
            if lag == Ok(0) {
                break Some(stopped.elapsed());
            }
            if stopped.elapsed() > Duration::from_secs(120) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let delta = |after: Result<u64, String>, before: Result<u64, String>| match (after, before) {
            (Ok(a), Ok(b)) => a.saturating_sub(b).to_string(),
            _ => "-".into(),
        };
        let (sent, repaired) = (
            delta(counts("repair_sent").await, sent0),
            delta(counts("repaired").await, repaired0),
        );
        let half = lags.len() / 2;
        println!(
            "node 1: {:.0} ops/s ({} wrong, {} misses{})",
            stats.ops as f64 / elapsed,
            stats.wrong,
            stats.misses,
            stats
                .failure
                .as_ref()
                .map_or(String::new(), |f| format!(", connection failed: {f}")),
        );
        println!(
            "lag (entries) over {} samples: p50 {}, p99 {}, max {}; p99 of the first half {}, of the second {}; caught up {}",
            lags.len(),
            quantile(&lags, 0.50),
            quantile(&lags, 0.99),
            lags.iter().max().copied().unwrap_or(0),
            quantile(&lags[..half], 0.99),
            quantile(&lags[half..], 0.99),
            drained.map_or("not within 120 s".into(), |d| format!(
                "{:.2} s after the load stopped",
                d.as_secs_f64()
            )),
        );
        let links: Vec<String> = rtts
            .iter()
            .map(|((from, to), v)| {
                format!(
                    "{from}->{to} {} / {} / {}",
                    quantile(v, 0.50),
                    quantile(v, 0.99),
                    v.iter().max().copied().unwrap_or(0)
                )
            })
            .collect();
        println!(
            "heartbeat round trip (µs, p50 / p99 / max): {}; peer samples not up: {not_up}",
            links.join(", ")
        );
        println!("anti-entropy meanwhile: {sent} entries sent in repairs, {repaired} keys changed by them");
        failed |= stats.wrong > 0 || stats.failure.is_some() || drained.is_none();
    });
    if failed {
        println!(
            "\nsome requests failed or got wrong replies, or the peers did not catch up (see above)"
        );
    }
}

// ------------------------------------------------------------------- main

/// The time now, UTC, as `date -u` gives it (`2026-12-02T01:30:00Z`).
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let mut o = opts();
    if o.lag {
        if !std::env::args().any(|a| a.starts_with("--gets-per-set")) {
            o.gets_per_set = 1;
        }
        return lag_main(&o);
    }
    let rt = if o.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(o.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");

    // Checked before any process starts.
    let memtier = o.memtier.as_deref().map(|bin| {
        for conns in &o.conns {
            assert!(
                conns.is_multiple_of(o.threads),
                "--memtier: --conns {conns} is not a multiple of --threads {}",
                o.threads
            );
        }
        memtier_version(bin)
    });
    // Declared before the runtime work so they outlive it, and are killed
    // on every exit path, panics included.
    let mc = Memcached::start_with_memory_mb(256);
    let behind = Memcached::start_with_memory_mb(256);
    let over = Memdial::start(None, &["--backend", &behind.addr()], "error");
    // twemproxy in front of a memcached of its own, when asked for and
    // installed.
    let twemproxy_version = if o.twemproxy {
        let v = Twemproxy::version();
        if v.is_none() {
            println!(
                "--twemproxy: skipped, `nutcracker` is not on PATH (Debian: apt-get install nutcracker)"
            );
        }
        v
    } else {
        None
    };
    let twemproxy = twemproxy_version.as_ref().map(|_| {
        let store = Memcached::start_with_memory_mb(256);
        let proxy = Twemproxy::start(&store);
        // The proxy first: it is killed before its memcached.
        (proxy, store)
    });
    // The embedded store gets the memory memcached gets, so that large
    // values are compared hit for hit instead of against evictions.
    let emb_config = TempFile::with_suffix("memdial-emb", ".yaml", EMBEDDED_LIMITS);
    let emb = Memdial::start(Some(emb_config.path()), &["--backend", "embedded"], "error");
    // Three nodes, embedded stores, per mode asked for (eventual unless
    // `--modes` says otherwise).
    let data = tempfile::tempdir().expect("a data directory");
    let clusters: Vec<(String, MemdialCluster)> = if o.cluster {
        o.modes
            .iter()
            .map(|mode| {
                let dir = data.path().join(mode);
                let c = MemdialCluster::start(3, "error", |ports| {
                    let nodes: Vec<_> = ports.iter().map(|p| (*p, None)).collect();
                    let cluster = format!(
                        "  name: bench\n  secret: bench-secret\n  consistency: {mode}\n  data_dir: \"{}\"\n",
                        dir.display()
                    );
                    vec![proxy_yaml(&cluster, &nodes) + EMBEDDED_LIMITS; 3]
                });
                (mode.clone(), c)
            })
            .collect()
    } else {
        Vec::new()
    };
    let cluster_names: Vec<String> = clusters
        .iter()
        .map(|(mode, _)| format!("memdial {mode} x3, node 1"))
        .collect();

    let single = |name, port, pid| Target {
        name,
        port,
        pid,
        mode: None,
    };
    let mut targets = vec![single("memcached direct", mc.port, mc.pid())];
    if let Some((proxy, _)) = &twemproxy {
        targets.push(single("twemproxy -> memcached", proxy.port, proxy.pid()));
    }
    targets.push(single("memdial -> memcached", over.port, over.pid()));
    targets.push(single("memdial embedded", emb.port, emb.pid()));
    for (name, (mode, c)) in cluster_names.iter().zip(&clusters) {
        targets.push(Target {
            name,
            port: c.ports(1).client,
            pid: c.pid(1).expect("node 1 runs"),
            mode: Some(mode),
        });
    }
    let conns: Vec<String> = o.conns.iter().map(|c| c.to_string()).collect();
    println!(
        "memdial load, commit {}: {} connections, 1 set : {} gets, {} keys, {} s measured after {} s warm-up, {} generator thread(s); latency per request, µs",
        git_commit(),
        conns.join(","),
        o.gets_per_set,
        o.keys,
        o.seconds,
        o.warmup,
        o.threads
    );
    if let Some(v) = &memtier {
        println!("load generator: {v}");
    }
    if let Some(v) = &twemproxy_version {
        println!("twemproxy: {v}, server_connections 1, preconnect");
    }
    let mut out = o.out.as_deref().map(|path| {
        let generator = memtier.as_deref().unwrap_or("built-in");
        Out::open(path, &o, generator)
    });
    let mut failed = false;
    rt.block_on(async {
        failed |= match &o.memtier {
            Some(bin) => memtier_main(bin, &targets, &o, &mut out).await,
            None => builtin_main(&targets, &o, &mut out).await,
        };
        // Replication delay: eventual mode's measure (the ordered modes
        // answer once the write is committed).
        let eventual = clusters
            .iter()
            .find(|(mode, _)| mode == "eventual")
            .map(|(_, c)| [c.ports(1).client, c.ports(2).client]);
        if let Some(cluster_ports) = eventual {
            let w = Arc::new(Workload::new(o.keys, o.values[0], o.gets_per_set));
            for loaded in [false, true] {
                let phase = Arc::new(AtomicU8::new(MEASURE));
                let load = if loaded {
                    start_clients(cluster_ports[0], &w, o.conns[0], 16, &phase)
                } else {
                    Vec::new()
                };
                let delays = replication_delays(cluster_ports[0], cluster_ports[1], 200, &w).await;
                phase.store(STOP, Ordering::Relaxed);
                join_clients(load).await;
                let what = if loaded {
                    format!("under load ({} conns, depth 16, on node 1)", o.conns[0])
                } else {
                    "idle".into()
                };
                let mut d = match delays {
                    Ok(d) => d,
                    Err(e) => {
                        println!("\nreplication delay {what}: probe failed: {e}");
                        failed = true;
                        continue;
                    }
                };
                let lost = d.iter().filter(|x| x.is_none()).count();
                d.sort_unstable();
                let seen: Vec<u64> = d.into_iter().flatten().collect();
                let pct = |p: f64| {
                    seen.get(((seen.len() as f64 * p) as usize).min(seen.len().saturating_sub(1)))
                        .copied()
                        .unwrap_or(0)
                };
                println!(
                    "\nreplication delay node 1 -> node 2, {what}, {} probes: p50 {} µs, p99 {} µs, max {} µs, not seen within 5 s: {lost}",
                    seen.len() + lost,
                    pct(0.50),
                    pct(0.99),
                    seen.last().copied().unwrap_or(0),
                );
            }
        }
    });
    if failed {
        println!("\nsome requests failed or got wrong replies (see above)");
    }
}
