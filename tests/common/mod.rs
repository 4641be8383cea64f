//! Test harness: real memcached and real memdial processes on free ports,
//! and a plain TCP client that reads until the whole expected reply is in.
#![allow(dead_code)] // each test binary uses part of the harness

pub mod record;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long anything in a test may wait before it is a failure.
pub const WAIT: Duration = Duration::from_secs(20);

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Polls until something accepts connections on `port`.
pub fn wait_for_port(port: u16, child: &mut Child) {
    if let Err(status) = try_wait_for_port(port, child) {
        panic!("process exited before listening on {port}: {status}");
    }
}

/// Polls until something accepts on `port`; `Err` if the process exited
/// first (for example because another test took the port meanwhile).
pub fn try_wait_for_port(port: u16, child: &mut Child) -> Result<(), std::process::ExitStatus> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(status);
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {port} after {WAIT:?}");
}

/// Free ports are only free when picked: a process that exits before
/// listening is started again on fresh ports, a few times.
const START_ATTEMPTS: usize = 3;

/// A memcached process, killed when dropped.
pub struct Memcached {
    pub port: u16,
    child: Child,
}

impl Memcached {
    pub fn start() -> Memcached {
        for _ in 1..START_ATTEMPTS {
            if let Some(m) = Self::try_start_on(free_port()) {
                return m;
            }
        }
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Memcached {
        Self::try_start_on(port)
            .unwrap_or_else(|| panic!("memcached exited before listening on {port}"))
    }

    fn try_start_on(port: u16) -> Option<Memcached> {
        let mut child = Command::new("memcached")
            .args(["-l", "127.0.0.1", "-U", "0", "-t", "2", "-m", "64", "-p"])
            .arg(port.to_string())
            .args(if is_root() { &["-u", "root"][..] } else { &[] })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("memcached on PATH (the README's test command installs it)");
        try_wait_for_port(port, &mut child).ok()?;
        Some(Memcached { port, child })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false)
}

pub fn memdial_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_memdial"))
}

/// A memdial node process, killed when dropped.
pub struct Memdial {
    pub port: u16,
    pub admin_port: u16,
    child: Child,
}

impl Memdial {
    /// `serve` with the embedded store.
    pub fn embedded() -> Memdial {
        Self::serve(&["--backend", "embedded"])
    }

    /// `serve` in front of the memcached at `addr`.
    pub fn over(memcached: &Memcached) -> Memdial {
        Self::serve(&["--backend", &memcached.addr()])
    }

    /// `serve` with extra arguments; client and admin ports are chosen here.
    pub fn serve(extra: &[&str]) -> Memdial {
        Self::serve_with_config(None, extra)
    }

    /// `serve --config FILE` with extra arguments.
    pub fn serve_with_config(config: Option<&std::path::Path>, extra: &[&str]) -> Memdial {
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_serve(config, extra) {
                Ok(m) => return m,
                Err(status) if attempt < START_ATTEMPTS => {
                    eprintln!("memdial exited before listening ({status}); retrying on new ports");
                }
                Err(status) => panic!("memdial exited before listening: {status}"),
            }
        }
        unreachable!()
    }

    fn try_serve(
        config: Option<&std::path::Path>,
        extra: &[&str],
    ) -> Result<Memdial, std::process::ExitStatus> {
        let (port, admin_port) = (free_port(), free_port());
        let mut cmd = Command::new(memdial_bin());
        cmd.arg("serve");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin_port}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn memdial");
        try_wait_for_port(port, &mut child)?;
        Ok(Memdial {
            port,
            admin_port,
            child,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
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
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{name} {}", self.pid());
    }

    /// Waits for the process to exit; panics after `WAIT`.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "memdial did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin port; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin_port)).expect("admin port");
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read http");
        let (head, body) = out.split_once("\r\n\r\n").expect("http response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }
}

impl Drop for Memdial {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw protocol client over one TCP connection.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        Conn::try_open(port).unwrap_or_else(|| panic!("connect to {port}"))
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads until the buffered reply ends with `suffix`; returns it all.
    pub fn read_until_suffix(&mut self, suffix: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        while !self.buf.ends_with(suffix) {
            assert!(
                Instant::now() < deadline,
                "timed out; have {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(
                n > 0,
                "closed early; have {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
        std::mem::take(&mut self.buf)
    }

    /// Reads exactly `n` bytes.
    pub fn read_exact_len(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        self.stream.read_exact(&mut out).expect("read_exact");
        out
    }

    /// Sends `request` and reads until the reply ends with `suffix`.
    pub fn call(&mut self, request: &[u8], suffix: &[u8]) -> Vec<u8> {
        self.send(request);
        self.read_until_suffix(suffix)
    }

    /// Reads until the peer closes; returns everything read.
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut out).expect("read to eof");
        out
    }
}

/// Lossy text of bytes, for assertion messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Conn {
    /// Like [`Conn::open`], but `None` when the connect fails.
    pub fn try_open(port: u16) -> Option<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(WAIT)).ok()?;
        stream.set_nodelay(true).ok()?;
        Some(Conn {
            stream,
            buf: Vec::new(),
        })
    }
}
