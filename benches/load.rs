//! Load harness: drives memcached direct, memdial in front of memcached,
//! memdial with its embedded store, and a 3-node eventual cluster, with the
//! same workload in one run, and prints ops/s, p50/p99 latency and the
//! ratios memdial / direct. With a cluster it also measures replication
//! delay (write on node 1 → visible on node 2) while the load runs.
//!
//! Run: `cargo build --release && cargo bench --bench load -- [options]`
//! Options: --conns N (50) --pipeline 1,16 --seconds S (5) --value BYTES (32)
//!          --keys N (10000) --no-cluster
//! Only 127.0.0.1 is used; every phase is bounded in time.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

struct Opts {
    conns: usize,
    pipelines: Vec<usize>,
    seconds: u64,
    value: usize,
    keys: usize,
    cluster: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        conns: 50,
        pipelines: vec![1, 16],
        seconds: 5,
        value: 32,
        keys: 10_000,
        cluster: true,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let next = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--conns" => o.conns = next.parse().expect("--conns N"),
            "--pipeline" => {
                o.pipelines = next
                    .split(',')
                    .map(|p| p.parse().expect("--pipeline 1,16"))
                    .collect()
            }
            "--seconds" => o.seconds = next.parse().expect("--seconds S"),
            "--value" => o.value = next.parse().expect("--value BYTES"),
            "--keys" => o.keys = next.parse().expect("--keys N"),
            "--no-cluster" => {
                o.cluster = false;
                i += 1;
                continue;
            }
            _ => {
                i += 1; // cargo passes --bench; ignore what is not ours
                continue;
            }
        }
        i += 2;
    }
    o
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn memcached(port: u16) -> Proc {
    let mut cmd = Command::new("memcached");
    cmd.args([
        "-l",
        "127.0.0.1",
        "-U",
        "0",
        "-t",
        "2",
        "-m",
        "256",
        "-p",
        &port.to_string(),
    ]);
    if std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
    {
        cmd.args(["-u", "root"]);
    }
    let p = Proc(
        cmd.stdout(Stdio::null())
            .spawn()
            .expect("memcached on PATH"),
    );
    wait_port(port);
    p
}

fn memdial_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/memdial");
    assert!(
        bin.exists(),
        "run `cargo build --release` first: {} is missing",
        bin.display()
    );
    bin
}

fn memdial(args: &[String], port: u16) -> Proc {
    let p = Proc(
        Command::new(memdial_bin())
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn memdial"),
    );
    wait_port(port);
    p
}

fn serve_args(port: u16, backend: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--admin".into(),
        format!("127.0.0.1:{}", free_port()),
        "--backend".into(),
        backend.into(),
    ]
}

/// Three nodes, embedded stores, eventual mode. Returns the processes and
/// the client ports.
fn cluster() -> (Vec<Proc>, Vec<u16>) {
    let ports: Vec<[u16; 3]> = (0..3)
        .map(|_| [free_port(), free_port(), free_port()])
        .collect();
    let mut yaml = String::from(
        "cluster:\n  name: bench\n  secret: bench-secret\n  consistency: eventual\nnodes:\n",
    );
    for (i, [c, p, a]) in ports.iter().enumerate() {
        yaml.push_str(&format!(
            "  - id: {}\n    client: 127.0.0.1:{c}\n    internal: 127.0.0.1:{p}\n    admin: 127.0.0.1:{a}\n",
            i + 1
        ));
    }
    let path = std::env::temp_dir().join(format!("memdial-bench-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    let procs = (1..=3)
        .map(|id| {
            memdial(
                &[
                    "--config".into(),
                    path.display().to_string(),
                    "--node".into(),
                    id.to_string(),
                ],
                ports[id - 1][0],
            )
        })
        .collect();
    (procs, ports.iter().map(|p| p[0]).collect())
}

/// Reads one reply: a storage answer line, or VALUE blocks up to END.
async fn read_reply(r: &mut BufReader<OwnedReadHalf>, line: &mut String) -> std::io::Result<bool> {
    loop {
        line.clear();
        if r.read_line(line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(rest) = line.strip_prefix("VALUE ") {
            let len: usize = rest
                .trim_end()
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let mut data = vec![0u8; len + 2];
            r.read_exact(&mut data).await?;
            continue;
        }
        return Ok(line.starts_with("STORED") || line.starts_with("END"));
    }
}

struct Sample {
    ops: u64,
    errors: u64,
    /// Batch round trips, microseconds.
    latencies: Vec<u32>,
}

/// One connection: P requests per batch (1 set : 10 gets), until `stop`.
async fn client(
    port: u16,
    o: Arc<Opts>,
    pipeline: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    record: Arc<AtomicBool>,
) -> Sample {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.set_nodelay(true).unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let value = "v".repeat(o.value);
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut s = Sample {
        ops: 0,
        errors: 0,
        latencies: Vec::new(),
    };
    let mut batch = Vec::with_capacity(pipeline * (o.value + 64));
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        for _ in 0..pipeline {
            let r = next();
            let key = r % o.keys as u64;
            if r % 11 == 0 {
                batch.extend_from_slice(
                    format!("set key:{key:08} 0 0 {}\r\n{value}\r\n", o.value).as_bytes(),
                );
            } else {
                batch.extend_from_slice(format!("get key:{key:08}\r\n").as_bytes());
            }
        }
        let started = Instant::now();
        wr.write_all(&batch).await.expect("write");
        for _ in 0..pipeline {
            match read_reply(&mut rd, &mut line).await {
                Ok(true) => {}
                Ok(false) => s.errors += 1,
                Err(e) => panic!("read from {port}: {e}"),
            }
        }
        if record.load(Ordering::Relaxed) {
            s.ops += pipeline as u64;
            s.latencies.push(started.elapsed().as_micros() as u32);
        }
    }
    s
}

async fn prefill(port: u16, o: &Opts) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let value = "v".repeat(o.value);
    let mut line = String::new();
    for chunk in (0..o.keys).collect::<Vec<_>>().chunks(100) {
        let mut batch = Vec::new();
        for key in chunk {
            batch.extend_from_slice(
                format!("set key:{key:08} 0 0 {}\r\n{value}\r\n", o.value).as_bytes(),
            );
        }
        wr.write_all(&batch).await.unwrap();
        for _ in chunk {
            read_reply(&mut rd, &mut line).await.unwrap();
        }
    }
}

struct Result {
    ops_per_sec: f64,
    p50_us: u32,
    p99_us: u32,
    errors: u64,
}

async fn run(port: u16, o: &Arc<Opts>, pipeline: usize) -> Result {
    let stop = Arc::new(AtomicBool::new(false));
    let record = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..o.conns)
        .map(|i| {
            tokio::spawn(client(
                port,
                o.clone(),
                pipeline,
                0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1) * 7919,
                stop.clone(),
                record.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    record.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Vec::new();
    let (mut ops, mut errors) = (0, 0);
    for t in tasks {
        let s = t.await.unwrap();
        ops += s.ops;
        errors += s.errors;
        all.extend(s.latencies);
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Result {
        ops_per_sec: ops as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

/// Writes a fresh key on `from`, polls `to` until it is visible; repeats
/// `n` times. Returns the delays in microseconds.
async fn replication_delays(from: u16, to: u16, n: usize) -> Vec<u32> {
    let w = TcpStream::connect(("127.0.0.1", from)).await.unwrap();
    let r = TcpStream::connect(("127.0.0.1", to)).await.unwrap();
    let (wr_r, mut wr) = w.into_split();
    let (rd_r, mut rd) = r.into_split();
    let (mut wr_r, mut rd_r) = (BufReader::new(wr_r), BufReader::new(rd_r));
    let mut line = String::new();
    let mut delays = Vec::new();
    for i in 0..n {
        let key = format!("probe:{}:{i}", std::process::id());
        let started = Instant::now();
        wr.write_all(format!("set {key} 0 0 1\r\nx\r\n").as_bytes())
            .await
            .unwrap();
        read_reply(&mut wr_r, &mut line).await.unwrap();
        let deadline = started + Duration::from_secs(5);
        loop {
            rd.write_all(format!("get {key}\r\n").as_bytes())
                .await
                .unwrap();
            // VALUE line (if any) is consumed by read_reply; track whether one came.
            line.clear();
            rd_r.read_line(&mut line).await.unwrap();
            let hit = line.starts_with("VALUE");
            if hit {
                let mut rest = vec![0u8; 3];
                rd_r.read_exact(&mut rest).await.unwrap();
                line.clear();
                rd_r.read_line(&mut line).await.unwrap(); // END
                delays.push(started.elapsed().as_micros() as u32);
                break;
            }
            if Instant::now() > deadline {
                delays.push(u32::MAX);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    delays
}

fn main() {
    let o = Arc::new(opts());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mc_port = free_port();
    let _mc = memcached(mc_port);
    let behind_port = free_port();
    let _behind = memcached(behind_port);
    let (over_port, emb_port) = (free_port(), free_port());
    let _over = memdial(
        &serve_args(over_port, &format!("127.0.0.1:{behind_port}")),
        over_port,
    );
    let _emb = memdial(&serve_args(emb_port, "embedded"), emb_port);
    let (_cluster, cluster_ports) = if o.cluster {
        cluster()
    } else {
        (Vec::new(), Vec::new())
    };

    let mut targets = vec![
        ("memcached direct", mc_port),
        ("memdial -> memcached", over_port),
        ("memdial embedded", emb_port),
    ];
    if o.cluster {
        targets.push(("memdial eventual x3 (node 1)", cluster_ports[0]));
    }
    println!(
        "load: {} connections, 1 set : 10 gets, {} keys, {}-byte values, {} s per run after 1 s warm-up (load generator: one thread)",
        o.conns, o.keys, o.value, o.seconds
    );
    rt.block_on(async {
        for (_, port) in &targets {
            prefill(*port, &o).await;
        }
        for &pipeline in &o.pipelines {
            println!("\npipeline depth {pipeline}");
            println!("{:<30} {:>12} {:>9} {:>9} {:>8} {:>10} {:>10}", "target", "ops/s", "p50 us", "p99 us", "errors", "ops ratio", "p99 ratio");
            let mut direct: Option<Result> = None;
            for (name, port) in &targets {
                let r = run(*port, &o, pipeline).await;
                let (ops_ratio, p99_ratio) = match &direct {
                    Some(d) => (
                        format!("{:.2}", r.ops_per_sec / d.ops_per_sec),
                        format!("{:.2}", r.p99_us as f64 / d.p99_us.max(1) as f64),
                    ),
                    None => ("1.00".into(), "1.00".into()),
                };
                println!(
                    "{:<30} {:>12.0} {:>9} {:>9} {:>8} {:>10} {:>10}",
                    name, r.ops_per_sec, r.p50_us, r.p99_us, r.errors, ops_ratio, p99_ratio
                );
                if direct.is_none() {
                    direct = Some(r);
                }
            }
        }
        if o.cluster {
            // Replication delay, idle and under the write load of the same workload.
            for loaded in [false, true] {
                let stop = Arc::new(AtomicBool::new(false));
                let record = Arc::new(AtomicBool::new(true));
                let load: Vec<_> = if loaded {
                    (0..o.conns)
                        .map(|i| tokio::spawn(client(cluster_ports[0], o.clone(), 16, (i as u64 + 3) * 104_729, stop.clone(), record.clone())))
                        .collect()
                } else {
                    Vec::new()
                };
                let mut d = replication_delays(cluster_ports[0], cluster_ports[1], 200).await;
                stop.store(true, Ordering::Relaxed);
                for t in load {
                    t.await.unwrap();
                }
                d.sort_unstable();
                let lost = d.iter().filter(|&&x| x == u32::MAX).count();
                let pct = |p: f64| d[((d.len() as f64 * p) as usize).min(d.len() - 1)];
                println!(
                    "\nreplication delay node 1 -> node 2, {} ({} probes): p50 {} us, p99 {} us, max {} us, not seen within 5 s: {lost}",
                    if loaded { format!("under load ({} conns, pipeline 16, on node 1)", o.conns) } else { "idle".to_string() },
                    d.len(),
                    pct(0.50),
                    pct(0.99),
                    d.iter().filter(|&&x| x != u32::MAX).max().copied().unwrap_or(0),
                );
            }
        }
    });
}
