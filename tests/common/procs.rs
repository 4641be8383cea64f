//! Processes for tests and benches: free ports, temporary files, memcached,
//! one memdial node, a memdial cluster from a generated proxy.yaml, and
//! twemproxy (`nutcracker`) in front of one memcached, for the load bench.
//! Every process is ready when it listens on all its ports (polled, never a
//! fixed sleep) and is killed when dropped.
//!
//! Free ports are only free when picked: another test may take one before
//! the process binds it. A start that finds its process exited before
//! listening, or its port held by another process, starts again on fresh
//! ports, at most [`START_ATTEMPTS`] times ([`start_with_retry`]). Only a
//! restart on the ports a process had before (a node or memcached that
//! peers' configs name) cannot move, and panics instead.
//!
//! std only and nothing else of the harness: `benches/load.rs` includes this
//! file alone with `#[path]`.
#![allow(dead_code)] // each test binary and the load bench use a different part

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long anything in a test may wait before it is a failure.
pub const WAIT: Duration = Duration::from_secs(20);

/// How many times a process is started on fresh ports before giving up.
pub const START_ATTEMPTS: usize = 3;

/// A kB figure of `/proc/PID/status` by its field name (`VmRSS`,
/// `RssAnon`, `VmHWM`, ...); `None` when the process or the field is not
/// there.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Pause between two readiness polls.
const POLL: Duration = Duration::from_millis(20);

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// `n` distinct free ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let p = free_port();
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The memdial binary cargo built for these tests, or the one named by
/// `MEMDIAL_BIN` (to compare two builds with the same harness).
pub fn memdial_bin() -> PathBuf {
    std::env::var_os("MEMDIAL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_memdial")))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A file in the temp dir with a name no other test uses, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    /// A `.yaml` file.
    pub fn new(prefix: &str, contents: &str) -> TempFile {
        Self::with_suffix(prefix, ".yaml", contents)
    }

    /// A file whose name ends in `suffix` (`.yml`, `.log`).
    pub fn with_suffix(prefix: &str, suffix: &str, contents: &str) -> TempFile {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "memdial-{prefix}-{}-{}-{nanos}{suffix}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why a started process is not serving.
#[derive(Debug)]
pub enum NotReady {
    /// It exited before listening on all its ports.
    Exited(ExitStatus),
    /// Another process listens on this port.
    PortTaken(u16),
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::Exited(status) => write!(f, "exited before listening ({status})"),
            NotReady::PortTaken(port) => write!(f, "found port {port} taken by another process"),
        }
    }
}

/// Calls `start` (which picks fresh ports each time) until it succeeds, at
/// most [`START_ATTEMPTS`] times.
pub fn start_with_retry<T>(what: &str, mut start: impl FnMut() -> Result<T, NotReady>) -> T {
    let mut attempt = 1;
    loop {
        match start() {
            Ok(t) => return t,
            Err(e) if attempt < START_ATTEMPTS => {
                eprintln!("{what} {e}; starting it again on fresh ports");
                attempt += 1;
            }
            Err(e) => panic!("{what} {e}, {START_ATTEMPTS} times on fresh ports"),
        }
    }
}

/// A child process, killed when dropped (also while a test unwinds).
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> Proc {
        let name = name.into();
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { name, child }
    }

    /// Polls until this process listens on every one of `ports`.
    /// Panics if that takes longer than [`WAIT`].
    pub fn wait_ready(&mut self, ports: &[u16]) -> Result<(), NotReady> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(NotReady::Exited(status));
            }
            let mut ready = true;
            for &port in ports {
                match listener_of(self.child.id(), port) {
                    Listener::Mine => {}
                    Listener::Other => return Err(NotReady::PortTaken(port)),
                    Listener::None => ready = false,
                    // No /proc: whoever accepts is taken to be this process.
                    Listener::Unknown => {
                        ready &= TcpStream::connect(("127.0.0.1", port)).is_ok();
                    }
                }
            }
            if ready {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "{}: not listening on all of {ports:?} after {WAIT:?}",
                self.name
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal with kill(1) (`TERM`, `INT`, `STOP`, `CONT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} {} ({})", self.pid(), self.name);
    }

    /// Waits for the process to exit; panics after [`WAIT`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?}",
                self.name
            );
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Listener {
    /// A socket of this process listens on the port.
    Mine,
    /// Only other processes' sockets listen on it.
    Other,
    /// Nothing listens on it.
    None,
    /// /proc cannot tell (not Linux, or not readable).
    Unknown,
}

/// Who listens on TCP `port` (any local address): the listening sockets'
/// inodes from /proc/net/tcp{,6}, looked up among `pid`'s open files.
fn listener_of(pid: u32, port: u16) -> Listener {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            return Listener::Unknown;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 9); 0A = LISTEN
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if on_port
                && f.get(3) == Some(&"0A")
                && let Some(inode) = f.get(9)
            {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return Listener::None;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Listener::Unknown;
    };
    let mine = fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    });
    if mine {
        Listener::Mine
    } else {
        Listener::Other
    }
}

// ---------------------------------------------------------------------------
// memcached

/// A memcached process on 127.0.0.1, killed when dropped.
pub struct Memcached {
    pub port: u16,
    proc: Proc,
}

impl Memcached {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// 64 MB of memory, on a fresh port.
    pub fn start() -> Memcached {
        Self::start_with_memory_mb(64)
    }

    pub fn start_with_memory_mb(mb: u32) -> Memcached {
        start_with_retry("memcached", || Self::try_start_on(free_port(), mb, false))
    }

    /// Started with `-M` if `never_evict` (a full memcached refuses a
    /// write instead of evicting), as the ordered modes need it.
    pub fn start_evicting(never_evict: bool) -> Memcached {
        start_with_retry("memcached", || {
            Self::try_start_on(free_port(), 64, never_evict)
        })
    }

    /// On `port` exactly (a restart where memdial expects it); panics if
    /// the port is taken.
    pub fn start_on(port: u16) -> Memcached {
        Self::start_on_evicting(port, false)
    }

    /// [`Self::start_on`], with `-M` if `never_evict`.
    pub fn start_on_evicting(port: u16, never_evict: bool) -> Memcached {
        Self::try_start_on(port, 64, never_evict)
            .unwrap_or_else(|e| panic!("memcached on {port} {e}"))
    }

    fn try_start_on(port: u16, mb: u32, never_evict: bool) -> Result<Memcached, NotReady> {
        let mut cmd = Command::new("memcached");
        cmd.args(["-l", "127.0.0.1", "-U", "0", "-t", "2"]).args([
            "-m",
            &mb.to_string(),
            "-p",
            &port.to_string(),
        ]);
        if never_evict {
            cmd.arg("-M");
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if is_root() {
            // memcached refuses to run as root without it.
            cmd.args(["-u", "root"]);
        }
        let mut proc = Proc::spawn(
            format!("memcached :{port} (on PATH; the README's test command installs it)"),
            &mut cmd,
        );
        proc.wait_ready(&[port])?;
        Ok(Memcached { port, proc })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

// ---------------------------------------------------------------------------
// twemproxy

/// twemproxy (`nutcracker`, the Debian package) in front of one memcached:
/// one pool, memcache protocol, one connection to the server opened at
/// start. Killed when dropped; its config and log are temp files.
pub struct Twemproxy {
    pub port: u16,
    pub stats_port: u16,
    proc: Proc,
    config: TempFile,
    log: TempFile,
}

impl Twemproxy {
    /// `nutcracker --version` when it is on PATH.
    pub fn version() -> Option<String> {
        let out = Command::new("nutcracker").arg("--version").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // "This is nutcracker-0.5.0"
        text.lines()
            .find_map(|l| l.strip_prefix("This is "))
            .map(str::to_string)
    }

    /// On fresh ports, in front of `memcached`.
    pub fn start(memcached: &Memcached) -> Twemproxy {
        start_with_retry("nutcracker", || {
            Self::try_start(free_port(), free_port(), memcached)
        })
    }

    /// The config: `server_connections: 1` and `preconnect: true`, so every
    /// client connection shares one connection to memcached, opened before
    /// the first request; hosts are never ejected.
    pub fn config(port: u16, memcached: &Memcached) -> String {
        format!(
            "memdial_bench:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  \
             distribution: ketama\n  redis: false\n  preconnect: true\n  \
             server_connections: 1\n  auto_eject_hosts: false\n  servers:\n    \
             - {}:1\n",
            memcached.addr()
        )
    }

    fn try_start(port: u16, stats_port: u16, memcached: &Memcached) -> Result<Twemproxy, NotReady> {
        let config = TempFile::with_suffix("nutcracker", ".yml", &Self::config(port, memcached));
        let log = TempFile::with_suffix("nutcracker", ".log", "");
        let mut cmd = Command::new("nutcracker");
        cmd.arg("--conf-file")
            .arg(config.path())
            .arg("--output")
            .arg(log.path())
            // Warnings and worse; the default (notice) logs every connection.
            .args(["--verbose", "4"])
            .args(["--stats-addr", "127.0.0.1"])
            .args(["--stats-port", &stats_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn(format!("nutcracker :{port}"), &mut cmd);
        if let Err(e) = proc.wait_ready(&[port, stats_port]) {
            let said = std::fs::read_to_string(log.path()).unwrap_or_default();
            eprintln!("nutcracker :{port} {e}; its log:\n{said}");
            return Err(e);
        }
        Ok(Twemproxy {
            port,
            stats_port,
            proc,
            config,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

// ---------------------------------------------------------------------------
// One memdial node

/// A `memdial serve` process, killed when dropped.
pub struct Memdial {
    pub port: u16,
    pub admin_port: u16,
    proc: Proc,
}

impl Memdial {
    /// `serve` with the embedded store.
    pub fn embedded() -> Memdial {
        Self::serve(&["--backend", "embedded"])
    }

    /// `serve` in front of `memcached`.
    pub fn over(memcached: &Memcached) -> Memdial {
        Self::serve(&["--backend", &memcached.addr()])
    }

    /// `serve` with extra arguments; client and admin ports are chosen here.
    pub fn serve(extra: &[&str]) -> Memdial {
        Self::serve_with_config(None, extra)
    }

    /// `serve [--config FILE]` with extra arguments, logging warnings.
    pub fn serve_with_config(config: Option<&Path>, extra: &[&str]) -> Memdial {
        Self::start(config, extra, "warn")
    }

    /// `serve [--config FILE] --listen P --admin Q EXTRA` with `RUST_LOG`
    /// set to `rust_log`, on fresh ports.
    pub fn start(config: Option<&Path>, extra: &[&str], rust_log: &str) -> Memdial {
        start_with_retry("memdial", || {
            let (port, admin_port) = (free_port(), free_port());
            let mut cmd = Command::new(memdial_bin());
            cmd.arg("serve");
            if let Some(c) = config {
                cmd.arg("--config").arg(c);
            }
            cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin", &format!("127.0.0.1:{admin_port}")])
                .args(extra)
                .env("RUST_LOG", rust_log)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            let mut proc = Proc::spawn(format!("memdial :{port}"), &mut cmd);
            proc.wait_ready(&[port, admin_port])?;
            Ok(Memdial {
                port,
                admin_port,
                proc,
            })
        })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends a signal with kill(1) (`TERM`, `INT`, `STOP`, `CONT`, `KILL`).
    pub fn signal(&self, name: &str) {
        self.proc.signal(name);
    }

    /// Waits for the process to exit; panics after [`WAIT`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.proc.wait_exit()
    }
}

// ---------------------------------------------------------------------------
// A memdial cluster

/// The ports of one node.
#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    pub client: u16,
    pub internal: u16,
    pub admin: u16,
}

impl NodePorts {
    /// Fresh ports for `n` nodes, all distinct.
    pub fn pick(n: usize) -> Vec<NodePorts> {
        free_ports(3 * n)
            .chunks(3)
            .map(|p| NodePorts {
                client: p[0],
                internal: p[1],
                admin: p[2],
            })
            .collect()
    }

    /// Every port the node binds.
    pub fn all(&self) -> [u16; 3] {
        [self.client, self.admin, self.internal]
    }
}

/// A proxy.yaml: `cluster:` with `cluster` as its body (indented lines;
/// left out when empty), then `nodes:` with ids from 1, each with its ports
/// on 127.0.0.1 and optional memcached address. The node list comes last,
/// so a line appended to the text adds to the last node.
pub fn proxy_yaml(cluster: &str, nodes: &[(NodePorts, Option<String>)]) -> String {
    proxy_yaml_hosts(cluster, nodes, |_| "127.0.0.1".to_string())
}

/// [`proxy_yaml`] with node `id`'s internal address on `internal_host(id)`
/// (an IP or a host name); client and admin stay on 127.0.0.1, where the
/// harness's clients connect.
pub fn proxy_yaml_hosts(
    cluster: &str,
    nodes: &[(NodePorts, Option<String>)],
    internal_host: impl Fn(usize) -> String,
) -> String {
    let mut s = String::new();
    if !cluster.is_empty() {
        s += "cluster:\n";
        s += cluster;
    }
    s += "nodes:\n";
    for (i, (p, memcached)) in nodes.iter().enumerate() {
        s += &format!(
            "  - id: {}\n    client: 127.0.0.1:{}\n    internal: {}:{}\n    \
             admin: 127.0.0.1:{}\n",
            i + 1,
            p.client,
            internal_host(i + 1),
            p.internal,
            p.admin
        );
        if let Some(m) = memcached {
            s += &format!("    memcached: {m}\n");
        }
    }
    s
}

/// `memdial serve --config CONFIG --node ID` resolving names from `hosts`
/// instead of /etc/hosts, for this process alone: it runs in a private
/// mount namespace (`unshare -m`; root, or `-r` for user namespaces) with
/// `hosts` bind-mounted over /etc/hosts. Rewriting `hosts` in place changes
/// what the process resolves from its next lookup on (glibc reads the file
/// at every lookup); the machine's /etc/hosts is never touched.
pub fn serve_with_hosts(config: &Path, id: usize, hosts: &Path, rust_log: &str) -> Proc {
    let mut cmd = Command::new("unshare");
    if !is_root() {
        cmd.arg("-r");
    }
    // unshare and sh exec: the process (and its pid) is memdial's.
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(hosts)
        .arg(memdial_bin())
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--node", &id.to_string()])
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Proc::spawn(
        format!("memdial node {id} (private /etc/hosts; needs unshare -m)"),
        &mut cmd,
    )
}

/// `memdial serve --config CONFIG --node ID`.
pub fn serve_node(config: &Path, id: usize, rust_log: &str) -> Proc {
    let mut cmd = Command::new(memdial_bin());
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--node", &id.to_string()])
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Proc::spawn(format!("memdial node {id}"), &mut cmd)
}

/// One `memdial serve --config FILE --node I` process per node, each with
/// its own config file; nodes are numbered from 1.
pub struct MemdialCluster {
    ports: Vec<NodePorts>,
    configs: Vec<TempFile>,
    nodes: Vec<Option<Proc>>,
    rust_log: String,
}

impl MemdialCluster {
    /// Starts `n` nodes on fresh ports; `configs(&ports)` returns each
    /// node's proxy.yaml, node 1's first. Ready when every node listens on
    /// its client, admin and internal ports. Every config names every port,
    /// so when one node cannot start, the whole cluster starts again on fresh
    /// ports (and `configs` is called again).
    pub fn start(
        n: usize,
        rust_log: &str,
        mut configs: impl FnMut(&[NodePorts]) -> Vec<String>,
    ) -> MemdialCluster {
        start_with_retry(&format!("a node of a cluster of {n}"), || {
            let ports = NodePorts::pick(n);
            let yaml = configs(&ports);
            assert_eq!(yaml.len(), n, "one config per node");
            let mut c = MemdialCluster {
                ports,
                configs: yaml
                    .iter()
                    .map(|y| TempFile::new("cluster-node", y))
                    .collect(),
                nodes: (0..n).map(|_| None).collect(),
                rust_log: rust_log.to_string(),
            };
            for i in 1..=n {
                c.spawn(i);
            }
            for i in 1..=n {
                let ports = c.ports[i - 1].all();
                c.node(i).wait_ready(&ports)?;
            }
            Ok(c)
        })
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.nodes[i - 1].is_none(), "node {i} is already running");
        let proc = serve_node(self.configs[i - 1].path(), i, &self.rust_log);
        self.nodes[i - 1] = Some(proc);
    }

    fn node(&mut self, i: usize) -> &mut Proc {
        self.nodes[i - 1]
            .as_mut()
            .unwrap_or_else(|| panic!("node {i} is not running"))
    }

    pub fn ports(&self, i: usize) -> NodePorts {
        self.ports[i - 1]
    }

    /// SIGKILL node `i`.
    pub fn kill9(&mut self, i: usize) {
        self.node(i).kill();
        self.nodes[i - 1] = None;
    }

    /// Node `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i - 1].as_ref().map(Proc::pid)
    }

    /// Sends a signal to node `i` with kill(1) (`STOP`, `CONT`, …).
    pub fn signal(&mut self, i: usize, name: &str) {
        self.node(i).signal(name);
    }

    /// Starts node `i` again with the same config and ports (its peers'
    /// configs name them); panics if it cannot listen on them.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        let ports = self.ports[i - 1].all();
        if let Err(e) = self.node(i).wait_ready(&ports) {
            panic!("node {i}, restarted on its ports {ports:?}, {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// memdial cli

/// Runs `memdial cli --port PORT` with `input` on its stdin until it exits.
pub fn run_cli(port: u16, input: &str) -> std::process::Output {
    let mut child = Command::new(memdial_bin())
        .args(["cli", "--port", &port.to_string()])
        // No history file from a test run.
        .env_remove("HOME")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memdial cli");
    let mut stdin = child.stdin.take().expect("stdin");
    use std::io::Write;
    // The cli may exit before reading its input (it cannot connect): then
    // the pipe is closed, and its exit status and stderr tell why.
    if let Err(e) = stdin.write_all(input.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    drop(stdin);
    child.wait_with_output().expect("memdial cli output")
}
