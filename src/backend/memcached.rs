//! A [`Backend`] that forwards data requests to a real memcached over a few
//! multiplexed connections (the default) or a pool of TCP connections.
//!
//! | Contract ([`Backend::call`])              | This implementation                                            |
//! |-------------------------------------------|----------------------------------------------------------------|
//! | one response per request, in order        | the batch goes whole, in order, onto one connection: with      |
//! |                                           | `multiplexed_connections` > 0 one of a few shared ones, where  |
//! |                                           | it follows other callers' batches (see [`super::mux`]); with 0 |
//! |                                           | a pooled one of its own. Each reply is parsed against its      |
//! |                                           | request (FIFO), see [`ReplyBuffer`]                            |
//! | `noreply` is the caller's business        | `noreply` is stripped, so every forwarded request earns        |
//! |                                           | exactly one reply                                              |
//! | non-data requests answer `ERROR`          | `quit`, `version`, `verbosity`, `stats` and too-large stores   |
//! |                                           | are answered locally and never sent                            |
//! | an `Err` leaves the batch's outcome open  | any failure drops the connection, failing every batch on it    |
//! |                                           | with the same error; nothing is retried                        |
//! | never hangs                               | connect and the wait for a batch's replies each have a         |
//! |                                           | timeout (and the pool wait, for the pool); a connection whose  |
//! |                                           | oldest reply is overdue is dropped                             |
//!
//! Multiplexed connections are made on first use and remade by the next
//! batch after one fails (I/O error, EOF, a reply that does not frame,
//! bytes nobody asked for, or an overdue reply). A caller that gives up
//! leaves its batch queued: its replies are read and dropped, so framing
//! is kept.
//!
//! Pooled connections are made lazily by the pool. A connection is only put back
//! into service when its last exchange completed: it is marked broken when an
//! exchange starts and unmarked when every reply has been read, so an error,
//! a timeout or a cancelled caller all leave it broken, and `recycle` drops
//! it. `recycle` also drops a connection with unread bytes or one that
//! memcached has closed (a restart), so fresh connections replace them on the
//! next checkout.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use deadpool::Runtime;
use deadpool::managed::{
    self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult, TimeoutType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;

use super::mux::{Mux, MuxOptions};
use super::{Backend, BackendError, BoxFuture, KeyExpiry, PoolStatus};
use crate::outage::Outage;
use crate::protocol::{
    AdminRequest, BACKEND_IDLE_BUFFER_MAX, ErrorReply, ReplyBuffer, Request, Response,
    encode_request,
};

/// Tuning of the connections to one memcached.
#[derive(Debug, Clone)]
pub struct MemcachedOptions {
    /// Connections that carry every caller's batches, multiplexed (see
    /// [`super::mux`]); 0 runs each batch alone on a pooled connection
    /// instead.
    pub multiplexed_connections: usize,
    /// With `multiplexed_connections` 0: most pooled connections open at
    /// once (at least 1 is used).
    pub pool_size: usize,
    /// Multiplexed: consecutive `get`s go as one multi-key line.
    pub join_gets: bool,
    /// Bound on making one TCP connection (resolution included).
    pub connect_timeout: Duration,
    /// Bound on one whole exchange: writing the batch and reading every reply.
    pub request_timeout: Duration,
    /// Bound on waiting for a free pool slot when all connections are busy.
    pub pool_wait_timeout: Duration,
}

impl Default for MemcachedOptions {
    fn default() -> Self {
        MemcachedOptions {
            multiplexed_connections: crate::config::BackendConfig::default()
                .multiplexed_connections,
            pool_size: 16,
            join_gets: true,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            pool_wait_timeout: Duration::from_secs(1),
        }
    }
}

/// Connections to one memcached.
pub struct MemcachedBackend {
    addr: String,
    /// The data path, unless batches go to the pool.
    mux: Option<Mux>,
    pool: Pool<Manager>,
    /// Logs this memcached going down and coming back, once each.
    outage: Outage,
}

impl std::fmt::Debug for MemcachedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedBackend")
            .field("addr", &self.addr)
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl MemcachedBackend {
    /// A backend for the memcached at `addr` (`host:port`). Does not connect:
    /// connections are made by the pool on first use.
    pub fn new(addr: String, options: MemcachedOptions) -> MemcachedBackend {
        let manager = Manager {
            addr: addr.clone(),
            connect_timeout: options.connect_timeout,
            request_timeout: options.request_timeout,
        };
        // `create` bounds itself by `connect_timeout`; the pool bounds the
        // wait for a slot. Timeouts need a runtime, which is given, so
        // `build` cannot fail.
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .wait_timeout(Some(options.pool_wait_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime always builds");
        let outage = Outage::new(format!("memcached {addr}"));
        let mux = (options.multiplexed_connections > 0).then(|| {
            Mux::new(
                addr.clone(),
                MuxOptions {
                    connections: options.multiplexed_connections,
                    join_gets: options.join_gets,
                    connect_timeout: options.connect_timeout,
                    request_timeout: options.request_timeout,
                },
            )
        });
        MemcachedBackend {
            addr,
            mux,
            pool,
            outage,
        }
    }

    /// Runs a batch, noting whether memcached answered.
    async fn run(&self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        let started = self.outage.mark();
        let result = self.run_batch(requests).await;
        match &result {
            Ok(_) => {
                self.outage.ok_since(Some(started));
            }
            // The server answered, but not as expected: not an outage.
            Err(BackendError::Protocol(_)) => {}
            Err(e) => {
                self.outage.failed(&Loggable(e));
            }
        }
        result
    }

    async fn run_batch(&self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        if requests.iter().all(forwarded) {
            return self.exchange(requests).await;
        }
        // Rare: some requests are answered here. Forward the others, then
        // put every answer back in its request's slot.
        let sent: Vec<Request> = requests.iter().filter(|r| forwarded(r)).cloned().collect();
        let mut replies = if sent.is_empty() {
            Vec::new()
        } else {
            self.exchange(&sent).await?
        }
        .into_iter();
        requests
            .iter()
            .map(|r| {
                if forwarded(r) {
                    replies
                        .next()
                        .ok_or_else(|| BackendError::Protocol("fewer replies than requests".into()))
                } else {
                    Ok(Response::Error(ErrorReply::Error))
                }
            })
            .collect()
    }

    /// Runs `requests` (all forwardable) on a multiplexed connection or,
    /// without one, on one pooled connection.
    async fn exchange(&self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        if let Some(mux) = &self.mux {
            return mux.call(requests).await;
        }
        // Boxed so that its large future is not part of every call's.
        Box::pin(self.pooled_exchange(requests)).await
    }

    async fn pooled_exchange(&self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        let mut conn = self.pool.get().await.map_err(|e| self.checkout_error(e))?;
        match conn.call(requests).await {
            Ok(responses) => Ok(responses),
            Err(error) => {
                // Logged once per outage by `run`.
                tracing::debug!(
                    addr = %self.addr,
                    error = %Loggable(&error),
                    "memcached exchange failed; dropping connection"
                );
                // Already marked broken; taking it frees its slot now rather
                // than at the next checkout's recycle.
                drop(Object::take(conn));
                // Name the memcached, for whoever logs the error.
                Err(match error {
                    BackendError::Io(e) => {
                        BackendError::Io(io::Error::new(e.kind(), format!("{}: {e}", self.addr)))
                    }
                    other => other,
                })
            }
        }
    }

    fn checkout_error(&self, error: PoolError<BackendError>) -> BackendError {
        match error {
            // `create` has already logged why.
            PoolError::Backend(e) => e,
            PoolError::Timeout(TimeoutType::Wait) => BackendError::Timeout,
            PoolError::Timeout(TimeoutType::Create) => {
                BackendError::Unavailable(format!("{}: connect timed out", self.addr))
            }
            other => BackendError::Unavailable(format!("{}: {other}", self.addr)),
        }
    }
}

impl MemcachedBackend {
    /// Sends an administrative command on a connection of its own (not
    /// pooled: its reply is not one the reply parser frames) and returns
    /// the reply's lines up to `END`.
    async fn admin_command(&self, command: &[u8]) -> Result<Vec<Vec<u8>>, BackendError> {
        let buf = self
            .exchange_raw(command, |buf| {
                buf.ends_with(b"END\r\n") || buf.starts_with(b"BUSY") || buf.starts_with(b"ERROR")
            })
            .await?;
        Ok(buf
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
            .filter(|l| !l.is_empty() && l != b"END")
            .collect())
    }

    /// Sends `command` on a connection of its own and reads until
    /// `complete` says the reply is whole; returns its bytes.
    async fn exchange_raw(
        &self,
        command: &[u8],
        complete: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, BackendError> {
        let timeout = self
            .pool
            .manager()
            .request_timeout
            .max(Duration::from_secs(5));
        let connect = self.pool.manager().connect_timeout;
        let exchange = async {
            let mut stream = tokio::time::timeout(connect, TcpStream::connect(&self.addr))
                .await
                .map_err(|_| {
                    BackendError::Unavailable(format!("{}: connect timed out", self.addr))
                })?
                .map_err(|e| BackendError::Unavailable(format!("{}: {e}", self.addr)))?;
            stream.write_all(command).await?;
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(BackendError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                buf.extend_from_slice(&chunk[..n]);
                if complete(&buf) {
                    return Ok(buf);
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| BackendError::Timeout)?
    }
}

/// Whether `buf` holds memcached's whole answer to an admin request: one
/// line, or for a listing (`stats …`, `stats cachedump`) lines up to `END`
/// unless the first is an error line.
fn admin_reply_complete(buf: &[u8], listing: bool) -> bool {
    let Some(first_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let first = &buf[..first_end];
    let one_line = !listing
        || first.starts_with(b"ERROR")
        || first.starts_with(b"CLIENT_ERROR")
        || first.starts_with(b"SERVER_ERROR");
    if one_line {
        return true;
    }
    // Every line of a listing starts `STAT ` or `ITEM `: `END` at a line
    // start is the end.
    buf == b"END\r\n" || buf.ends_with(b"\r\nEND\r\n")
}

/// Decodes the `%XX` escapes of `lru_crawler metadump` keys.
fn percent_decode(s: &[u8]) -> Option<bytes::Bytes> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out.into())
}

impl Backend for MemcachedBackend {
    fn call<'a>(
        &'a self,
        requests: &'a [Request],
    ) -> BoxFuture<'a, Result<Vec<Response>, BackendError>> {
        Box::pin(self.run(requests))
    }

    fn keys(&self) -> BoxFuture<'_, Result<Vec<bytes::Bytes>, BackendError>> {
        Box::pin(async move {
            let listing = self.listing().await?;
            Ok(listing.into_iter().map(|(key, _)| key).collect())
        })
    }

    fn keys_with_expiry(&self) -> BoxFuture<'_, Result<Vec<KeyExpiry>, BackendError>> {
        Box::pin(self.listing())
    }

    fn instance(&self) -> BoxFuture<'_, Result<String, BackendError>> {
        Box::pin(async move {
            let lines = self.admin_command(b"stats\r\n").await?;
            let stat = |name: &str| {
                lines.iter().find_map(|l| {
                    let rest = l.strip_prefix(b"STAT ")?.strip_prefix(name.as_bytes())?;
                    std::str::from_utf8(rest.strip_prefix(b" ")?)
                        .ok()?
                        .parse::<u64>()
                        .ok()
                })
            };
            match (stat("pid"), stat("time"), stat("uptime")) {
                // The start time is exact to a second or two (memcached's
                // clock); rounding to 10 s keeps it stable across calls.
                (Some(pid), Some(time), Some(uptime)) => Ok(format!(
                    "memcached-{pid}-{}",
                    time.saturating_sub(uptime) / 10
                )),
                _ => Err(BackendError::Protocol(
                    "stats without pid/time/uptime".into(),
                )),
            }
        })
    }

    fn never_evict(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let lines = self.admin_command(b"stats settings\r\n").await?;
            match lines
                .iter()
                .find_map(|l| l.strip_prefix(b"STAT evictions "))
            {
                Some(b"off") => Ok(()),
                Some(_) => Err(BackendError::Protocol(
                    "memcached evicts items to make room (it was started without -M); \
                     an eviction on one replica would make it differ from the others: \
                     start it with -M"
                        .into(),
                )),
                None => Err(BackendError::Protocol(
                    "`stats settings` does not say whether memcached evicts".into(),
                )),
            }
        })
    }

    fn admin<'a>(
        &'a self,
        request: &'a AdminRequest,
    ) -> BoxFuture<'a, Result<Response, BackendError>> {
        Box::pin(async move {
            let listing = matches!(
                request,
                AdminRequest::Stats(_) | AdminRequest::CacheDump { .. }
            );
            let reply = self
                .exchange_raw(request.line().as_bytes(), |buf| {
                    admin_reply_complete(buf, listing)
                })
                .await?;
            Ok(Response::Raw(reply.into()))
        })
    }

    fn kind(&self) -> &'static str {
        "memcached"
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        if let Some(mux) = &self.mux {
            // Every open multiplexed connection takes batches.
            let open = mux.open();
            return Some(PoolStatus {
                max_size: mux.max(),
                size: open,
                available: open,
                joined_gets: mux.joined_gets(),
            });
        }
        let s = self.pool.status();
        Some(PoolStatus {
            max_size: s.max_size,
            size: s.size,
            available: s.available,
            joined_gets: 0,
        })
    }
}

impl MemcachedBackend {
    /// Every key with its expiry (absolute unix seconds; `None` never), from
    /// the crawler.
    async fn listing(&self) -> Result<Vec<KeyExpiry>, BackendError> {
        // The crawler answers BUSY while another crawl runs; try a few times.
        for attempt in 0..20u64 {
            // `metadump all` walks the LRUs and, on 1.6.18, misses keys
            // that clients touch meanwhile; `hash` walks the hash table.
            let lines = self.admin_command(b"lru_crawler metadump hash\r\n").await?;
            if lines.first().is_some_and(|l| l.starts_with(b"BUSY")) {
                tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
                continue;
            }
            return lines
                .iter()
                .filter(|l| l.starts_with(b"key="))
                .map(|l| metadump_line(l))
                .collect();
        }
        Err(BackendError::Unavailable("lru_crawler stayed busy".into()))
    }
}

/// One line of `lru_crawler metadump`: `key=<percent-encoded> exp=<unix
/// seconds, -1 never> la=… cas=… …`.
fn metadump_line(line: &[u8]) -> Result<KeyExpiry, BackendError> {
    let bad = || BackendError::Protocol("bad line in lru_crawler metadump".into());
    let mut key = None;
    let mut exp = None;
    for field in line.split(|&b| b == b' ') {
        if let Some(k) = field.strip_prefix(b"key=") {
            key = Some(percent_decode(k).ok_or_else(bad)?);
        } else if let Some(e) = field.strip_prefix(b"exp=") {
            let e: i64 = std::str::from_utf8(e)
                .ok()
                .and_then(|e| e.parse().ok())
                .ok_or_else(bad)?;
            exp = u64::try_from(e).ok().filter(|&e| e > 0);
        }
    }
    Ok((key.ok_or_else(bad)?, exp))
}

/// Whether memcached answers `request` with exactly one reply of its own.
/// The others are answered by memdial and must never reach a pooled
/// connection: `quit` would close it, and a too-large store has no data block.
fn forwarded(request: &Request) -> bool {
    match request {
        Request::Get { .. }
        | Request::Gat { .. }
        | Request::Store { .. }
        | Request::Arith { .. }
        | Request::Delete { .. }
        | Request::Touch { .. }
        | Request::FlushAll { .. }
        | Request::Meta(_)
        | Request::MetaNoop => true,
        Request::TooLarge { .. } => false,
    }
}

/// An error for logs: a protocol error's reason quotes the backend's reply,
/// which may be a value, so only its kind is logged.
struct Loggable<'a>(&'a BackendError);

impl std::fmt::Display for Loggable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            BackendError::Protocol(_) => f.write_str("reply did not frame against its request"),
            other => std::fmt::Display::fmt(other, f),
        }
    }
}

/// Makes and vets connections for the pool.
struct Manager {
    addr: String,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Manager {
    fn unavailable(&self, reason: impl std::fmt::Display) -> BackendError {
        // Logged once per outage by the backend's `run`.
        tracing::debug!(addr = %self.addr, error = %reason, "memcached connect failed");
        BackendError::Unavailable(format!("{}: {reason}", self.addr))
    }
}

impl managed::Manager for Manager {
    type Type = Conn;
    type Error = BackendError;

    async fn create(&self) -> Result<Conn, BackendError> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.addr.as_str()),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(self.unavailable(e)),
            Err(_) => return Err(self.unavailable("connect timed out")),
        };
        stream.set_nodelay(true).map_err(|e| self.unavailable(e))?;
        tracing::debug!(addr = %self.addr, "memcached connection opened");
        Ok(Conn {
            stream,
            rbuf: ReplyBuffer::new(),
            wbuf: BytesMut::new(),
            broken: false,
            request_timeout: self.request_timeout,
        })
    }

    async fn recycle(&self, conn: &mut Conn, _: &Metrics) -> RecycleResult<BackendError> {
        if conn.broken {
            // Its failure was logged when it happened (or its caller gave up).
            tracing::debug!(addr = %self.addr, "dropping broken memcached connection");
            return Err(RecycleError::message("connection broken"));
        }
        if !conn.rbuf.is_empty() {
            return Err(RecycleError::message("unread bytes in buffer"));
        }
        // An idle connection has nothing to read: EOF means memcached closed
        // it (a restart), bytes mean the framing is lost. `try_read` never
        // waits.
        let mut probe = [0u8; 1];
        let reason = match conn.stream.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Ok(0) => "closed by memcached".to_string(),
            Ok(_) => "unsolicited bytes from memcached".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::debug!(addr = %self.addr, error = %reason, "dropping idle memcached connection");
        Err(RecycleError::Message(reason.into()))
    }
}

/// One connection to memcached, with its buffers.
struct Conn {
    stream: TcpStream,
    rbuf: ReplyBuffer,
    wbuf: BytesMut,
    /// Set while an exchange is under way and left set if it does not
    /// finish: such a connection is never used again.
    broken: bool,
    request_timeout: Duration,
}

impl Conn {
    /// Sends `requests` in one write and reads one reply per request, in
    /// order. Every request must be one memcached answers exactly once. Any
    /// error leaves the connection broken.
    async fn call(&mut self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        debug_assert!(requests.iter().all(forwarded));
        self.broken = true;
        self.wbuf.clear();
        for request in requests {
            encode_request(request, false, &mut self.wbuf);
        }
        let (mut reader, mut writer) = self.stream.split();
        let wbuf = &self.wbuf;
        // Write and read at once: a batch whose replies fill the socket
        // buffers before its requests are all written would otherwise stall
        // both sides until the timeout.
        let write = async move { writer.write_all(wbuf).await.map_err(BackendError::Io) };
        let read = read_replies(&mut reader, &mut self.rbuf, requests);
        let responses = match tokio::time::timeout(self.request_timeout, async {
            tokio::try_join!(write, read)
        })
        .await
        {
            Ok(Ok(((), responses))) => responses,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(BackendError::Timeout),
        };
        self.broken = false;
        if self.wbuf.capacity() > BACKEND_IDLE_BUFFER_MAX {
            self.wbuf = BytesMut::new();
        }
        self.rbuf.release_if_large();
        Ok(responses)
    }
}

/// Reads and parses the reply to each request in turn.
async fn read_replies(
    reader: &mut ReadHalf<'_>,
    rbuf: &mut ReplyBuffer,
    requests: &[Request],
) -> Result<Vec<Response>, BackendError> {
    let mut responses = Vec::with_capacity(requests.len());
    for request in requests {
        loop {
            match rbuf.take(request) {
                Ok(Some(response)) => {
                    responses.push(response);
                    break;
                }
                Ok(None) => {
                    if reader.read_buf(rbuf.for_read()).await? == 0 {
                        return Err(BackendError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "memcached closed the connection mid-reply",
                        )));
                    }
                }
                Err(reason) => return Err(BackendError::Protocol(reason)),
            }
        }
    }
    Ok(responses)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{SocketAddr, TcpListener};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::protocol::{ArithOp, StoreOp, Value};

    /// A memcached child process on a local port, killed on drop.
    struct Memcached {
        port: u16,
        child: Child,
    }

    fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        listener.local_addr().expect("local addr").port()
    }

    impl Memcached {
        async fn start() -> Memcached {
            Memcached::start_on(free_port()).await
        }

        /// Spawns memcached on `port` and waits until it accepts.
        async fn start_on(port: u16) -> Memcached {
            Memcached::start_with(port, &[]).await
        }

        async fn start_with(port: u16, extra: &[&str]) -> Memcached {
            let child = Command::new("memcached")
                .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
                .args(extra)
                // Required when the tests run as root; ignored otherwise.
                .args(["-u", "root"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn memcached");
            let mut mc = Memcached { port, child };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return mc;
                }
                if let Ok(Some(status)) = mc.child.try_wait() {
                    panic!("memcached exited early: {status}");
                }
                assert!(
                    Instant::now() < deadline,
                    "memcached did not start on {port}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn addr(&self) -> String {
            format!("127.0.0.1:{}", self.port)
        }

        fn backend(&self) -> MemcachedBackend {
            MemcachedBackend::new(self.addr(), MemcachedOptions::default())
        }

        /// A backend that runs each batch alone on a pooled connection.
        fn pooled(&self) -> MemcachedBackend {
            MemcachedBackend::new(self.addr(), pooled())
        }

        fn signal(&self, signal: &str) {
            let status = Command::new("kill")
                .args([signal, &self.child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal}");
        }

        fn stop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for Memcached {
        fn drop(&mut self) {
            self.stop();
        }
    }

    /// Options for the pool path: no multiplexed connections.
    fn pooled() -> MemcachedOptions {
        MemcachedOptions {
            multiplexed_connections: 0,
            ..MemcachedOptions::default()
        }
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn store(op: StoreOp, key: &str, data: &[u8], cas_unique: u64) -> Request {
        Request::Store {
            op,
            key: b(key),
            flags: 7,
            exptime: 0,
            data: Bytes::copy_from_slice(data),
            cas_unique,
            noreply: false,
        }
    }

    fn set(key: &str, data: &[u8]) -> Request {
        store(StoreOp::Set, key, data, 0)
    }

    fn delete(key: &str) -> Request {
        Request::Delete {
            key: b(key),
            noreply: false,
        }
    }

    fn get(keys: &[&str], cas: bool) -> Request {
        Request::Get {
            keys: keys.iter().map(|k| b(k)).collect(),
            cas,
        }
    }

    fn arith(op: ArithOp, key: &str, delta: u64) -> Request {
        Request::Arith {
            op,
            key: b(key),
            delta,
            noreply: false,
        }
    }

    fn value(key: &str, data: &[u8]) -> Value {
        Value {
            key: b(key),
            flags: 7,
            data: Bytes::copy_from_slice(data),
            cas: None,
        }
    }

    /// Values with their CAS uniques blanked, and the uniques.
    fn split_cas(r: &Response) -> (Vec<Value>, Vec<u64>) {
        let Response::Values(vs) = r else {
            panic!("not values: {r:?}")
        };
        let cas = vs.iter().map(|v| v.cas.expect("gets has cas")).collect();
        let vs = vs
            .iter()
            .map(|v| Value {
                cas: None,
                ..v.clone()
            })
            .collect();
        (vs, cas)
    }

    async fn one(backend: &MemcachedBackend, request: Request) -> Response {
        let mut r = backend.call(&[request]).await.expect("call");
        assert_eq!(r.len(), 1);
        r.remove(0)
    }

    #[tokio::test]
    async fn set_then_get_and_gets_multi_key() {
        let mc = Memcached::start().await;
        let backend = mc.backend();
        assert_eq!(backend.kind(), "memcached");
        assert_eq!(
            backend.pool_status().map(|s| s.size),
            Some(0),
            "no connection before use"
        );

        let r = backend
            .call(&[
                set("a", b"one"),
                set("b", b"two\r\nlines\r\n"),
                set("empty", b""),
            ])
            .await
            .unwrap();
        assert_eq!(r, vec![Response::Stored; 3]);

        let r = backend
            .call(&[get(&["a", "missing", "b", "empty"], false)])
            .await
            .unwrap();
        assert_eq!(
            r,
            vec![Response::Values(vec![
                value("a", b"one"),
                value("b", b"two\r\nlines\r\n"),
                value("empty", b""),
            ])]
        );

        let r = one(&backend, get(&["b", "a"], true)).await;
        let (vs, cas) = split_cas(&r);
        assert_eq!(
            vs,
            vec![value("b", b"two\r\nlines\r\n"), value("a", b"one")]
        );
        assert_ne!(cas[0], cas[1]);

        assert_eq!(
            one(&backend, get(&["nothing"], false)).await,
            Response::Values(vec![])
        );
        // Batches go to the multiplexed connections in turn.
        let status = backend.pool_status().unwrap();
        assert_eq!((status.max_size, status.size, status.available), (2, 2, 2));
    }

    #[tokio::test]
    async fn every_data_command_round_trips() {
        let mc = Memcached::start().await;
        let backend = mc.backend();
        let k = |s: &str| b(s);

        // add / replace
        assert_eq!(
            one(&backend, store(StoreOp::Add, "k", b"v1", 0)).await,
            Response::Stored
        );
        assert_eq!(
            one(&backend, store(StoreOp::Add, "k", b"v2", 0)).await,
            Response::NotStored
        );
        assert_eq!(
            one(&backend, store(StoreOp::Replace, "nok", b"x", 0)).await,
            Response::NotStored
        );
        assert_eq!(
            one(&backend, store(StoreOp::Replace, "k", b"mid", 0)).await,
            Response::Stored
        );

        // append / prepend
        assert_eq!(
            one(&backend, store(StoreOp::Append, "k", b">", 0)).await,
            Response::Stored
        );
        assert_eq!(
            one(&backend, store(StoreOp::Prepend, "k", b"<", 0)).await,
            Response::Stored
        );
        assert_eq!(
            one(&backend, store(StoreOp::Append, "nok", b"x", 0)).await,
            Response::NotStored
        );
        assert_eq!(
            one(&backend, get(&["k"], false)).await,
            Response::Values(vec![value("k", b"<mid>")])
        );

        // cas: EXISTS with a stale unique, NOT_FOUND without the item, STORED
        // with the current one.
        let (_, cas) = split_cas(&one(&backend, get(&["k"], true)).await);
        let unique = cas[0];
        assert_eq!(
            one(
                &backend,
                store(StoreOp::Cas, "k", b"c", unique.wrapping_add(1000))
            )
            .await,
            Response::Exists
        );
        assert_eq!(
            one(&backend, store(StoreOp::Cas, "nok", b"c", unique)).await,
            Response::NotFound
        );
        assert_eq!(
            one(&backend, store(StoreOp::Cas, "k", b"c", unique)).await,
            Response::Stored
        );
        assert_eq!(
            one(&backend, store(StoreOp::Cas, "k", b"d", unique)).await,
            Response::Exists
        );

        // incr / decr
        assert_eq!(one(&backend, set("n", b"10")).await, Response::Stored);
        assert_eq!(
            one(&backend, arith(ArithOp::Incr, "n", 5)).await,
            Response::Number(15)
        );
        assert_eq!(
            one(&backend, arith(ArithOp::Decr, "n", 3)).await,
            Response::Number(12)
        );
        assert_eq!(
            one(&backend, arith(ArithOp::Decr, "n", 100)).await,
            Response::Number(0)
        );
        assert_eq!(
            one(&backend, arith(ArithOp::Incr, "nok", 1)).await,
            Response::NotFound
        );
        assert!(matches!(
            one(&backend, arith(ArithOp::Incr, "k", 1)).await,
            Response::Error(ErrorReply::Client(_))
        ));

        // touch / gat / gats
        let touch = |key: &str| Request::Touch {
            key: k(key),
            exptime: 100,
            noreply: false,
        };
        assert_eq!(one(&backend, touch("k")).await, Response::Touched);
        assert_eq!(one(&backend, touch("nok")).await, Response::NotFound);
        assert_eq!(one(&backend, set("g", b"gv")).await, Response::Stored);
        let gat = |cas| Request::Gat {
            exptime: 100,
            keys: vec![k("k"), k("nok"), k("g")],
            cas,
        };
        assert_eq!(
            one(&backend, gat(false)).await,
            Response::Values(vec![value("k", b"c"), value("g", b"gv")])
        );
        let (vs, _) = split_cas(&one(&backend, gat(true)).await);
        assert_eq!(vs, vec![value("k", b"c"), value("g", b"gv")]);

        // delete
        let delete = |key: &str| Request::Delete {
            key: k(key),
            noreply: false,
        };
        assert_eq!(one(&backend, delete("k")).await, Response::Deleted);
        assert_eq!(one(&backend, delete("k")).await, Response::NotFound);

        // noreply is stripped: the caller still gets memcached's answer.
        let quiet = Request::Store {
            op: StoreOp::Set,
            key: k("q"),
            flags: 0,
            exptime: 0,
            data: b("quiet"),
            cas_unique: 0,
            noreply: true,
        };
        assert_eq!(one(&backend, quiet).await, Response::Stored);

        // flush_all
        let flush = Request::FlushAll {
            delay: None,
            noreply: false,
        };
        assert_eq!(one(&backend, flush).await, Response::Ok);
        assert_eq!(
            one(&backend, get(&["q", "n"], false)).await,
            Response::Values(vec![])
        );

        // A get with no key is an error memcached answers exactly once.
        assert_eq!(
            backend
                .call(&[get(&[], false), get(&["q"], false)])
                .await
                .unwrap(),
            vec![Response::Error(ErrorReply::Error), Response::Values(vec![])]
        );
        assert_eq!(
            backend.pool_status().unwrap().size,
            2,
            "the two multiplexed connections served it all"
        );
    }

    #[tokio::test]
    async fn pipelined_batch_is_answered_in_order() {
        let mc = Memcached::start().await;
        let backend = mc.backend();
        let mut batch = Vec::new();
        let mut expected = Vec::new();
        for i in 0..50 {
            let key = format!("key{i}");
            let data = format!("value {i}\r\n").repeat(i + 1);
            batch.push(set(&key, data.as_bytes()));
            expected.push(Response::Stored);
            batch.push(get(&[&key], false));
            expected.push(Response::Values(vec![value(&key, data.as_bytes())]));
        }
        assert_eq!(batch.len(), 100);
        assert_eq!(backend.call(&batch).await.unwrap(), expected);
    }

    #[tokio::test]
    async fn large_batch_does_not_stall_on_full_socket_buffers() {
        // Replies of many megabytes precede many megabytes of requests: this
        // only completes if replies are read while requests are written.
        let mc = Memcached::start().await;
        let options = MemcachedOptions {
            request_timeout: Duration::from_secs(20),
            ..MemcachedOptions::default()
        };
        let backend = MemcachedBackend::new(mc.addr(), options);
        let big = vec![b'x'; 900 * 1024];
        assert_eq!(one(&backend, set("big", &big)).await, Response::Stored);
        let mut batch: Vec<Request> = (0..16).map(|_| get(&["big"], false)).collect();
        batch.extend((0..16).map(|i| set(&format!("big{i}"), &big)));
        let r = backend.call(&batch).await.unwrap();
        assert_eq!(r.len(), 32);
        assert!(
            r[..16]
                .iter()
                .all(|r| *r == Response::Values(vec![value("big", &big)]))
        );
        assert!(r[16..].iter().all(|r| *r == Response::Stored));
    }

    #[tokio::test]
    async fn local_requests_are_answered_error_without_being_sent() {
        let mc = Memcached::start().await;
        let backend = mc.pooled();
        let too_large = Request::TooLarge {
            op: StoreOp::Set,
            key: b("k"),
            noreply: false,
        };
        let batch = vec![set("k", b"v"), too_large.clone(), get(&["k"], false)];
        let err = Response::Error(ErrorReply::Error);
        let hit = Response::Values(vec![value("k", b"v")]);
        assert_eq!(
            backend.call(&batch).await.unwrap(),
            vec![Response::Stored, err.clone(), hit.clone()]
        );
        assert_eq!(one(&backend, get(&["k"], false)).await, hit);
        assert_eq!(backend.pool_status().unwrap().size, 1);

        // A batch of local requests alone needs no connection at all.
        let nowhere = MemcachedBackend::new(format!("127.0.0.1:{}", free_port()), pooled());
        assert_eq!(
            nowhere.call(&[too_large.clone(), too_large]).await.unwrap(),
            vec![err.clone(), err]
        );
        assert_eq!(nowhere.pool_status().unwrap().size, 0);
        assert_eq!(nowhere.call(&[]).await.unwrap(), vec![]);
    }

    #[test]
    fn metadump_lines_give_the_key_and_its_expiry() {
        let line = b"key=a%20b exp=-1 la=1733000000 cas=7 fetch=no cls=1 size=63";
        assert_eq!(
            metadump_line(line).unwrap(),
            (Bytes::from_static(b"a b"), None)
        );
        let line = b"key=k exp=1800000000 la=1 cas=2 fetch=yes cls=1 size=60";
        assert_eq!(
            metadump_line(line).unwrap(),
            (Bytes::from_static(b"k"), Some(1_800_000_000))
        );
        assert!(metadump_line(b"key=k exp=soon").is_err());
        assert!(metadump_line(b"exp=5").is_err(), "no key");
    }

    #[tokio::test]
    async fn never_evict_needs_memcached_started_with_big_m() {
        let evicting = Memcached::start().await;
        let err = evicting.backend().never_evict().await.unwrap_err();
        assert!(err.to_string().contains("-M"), "{err}");
        let refusing = Memcached::start_with(free_port(), &["-M"]).await;
        refusing.backend().never_evict().await.unwrap();
    }

    #[tokio::test]
    async fn keys_come_with_their_expiry() {
        let mc = Memcached::start().await;
        let backend = mc.backend();
        let store = |key: &str, exptime| Request::Store {
            op: StoreOp::Set,
            key: b(key),
            flags: 0,
            exptime,
            data: b("v"),
            cas_unique: 0,
            noreply: false,
        };
        backend
            .call(&[store("forever", 0), store("soon", 300)])
            .await
            .unwrap();
        let mut listing = backend.keys_with_expiry().await.unwrap();
        listing.sort();
        let now = crate::time::unix_ms() / 1000;
        assert_eq!(listing[0], (b("forever"), None));
        assert_eq!(listing[1].0, b("soon"));
        let exp = listing[1].1.expect("an expiry");
        // memcached's clock ticks once a second and may trail by two.
        assert!(exp + 5 >= now + 300 && exp <= now + 305, "{exp} vs {now}");
        assert_eq!(backend.keys().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn recovers_after_memcached_restarts() {
        let mut mc = Memcached::start().await;
        let port = mc.port;
        let options = MemcachedOptions {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(500),
            ..MemcachedOptions::default()
        };
        let backend = MemcachedBackend::new(mc.addr(), options);
        assert_eq!(one(&backend, set("k", b"before")).await, Response::Stored);

        mc.stop();
        let started = Instant::now();
        for _ in 0..3 {
            let r = backend.call(&[get(&["k"], false)]).await;
            assert!(r.is_err(), "memcached is down: {r:?}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "errors must come quickly"
        );

        let _mc = Memcached::start_on(port).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = loop {
            match backend.call(&[get(&["k"], false)]).await {
                Ok(r) => break r,
                Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // A fresh memcached: the old value is gone and new writes work.
        assert_eq!(r, vec![Response::Values(vec![])]);
        assert_eq!(one(&backend, set("k", b"after")).await, Response::Stored);
        assert_eq!(
            one(&backend, get(&["k"], false)).await,
            Response::Values(vec![value("k", b"after")])
        );
    }

    #[tokio::test]
    async fn closed_port_is_unavailable_within_connect_timeout() {
        let connect_timeout = Duration::from_millis(300);
        let options = MemcachedOptions {
            connect_timeout,
            ..MemcachedOptions::default()
        };
        let backend = MemcachedBackend::new(format!("127.0.0.1:{}", free_port()), options);
        let started = Instant::now();
        let r = backend.call(&[get(&["k"], false)]).await;
        assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
        assert!(started.elapsed() <= connect_timeout + Duration::from_millis(200));
        assert_eq!(backend.pool_status().unwrap().size, 0);
    }

    /// A server that accepts and answers every connection with `reply`
    /// (after reading what it is sent), or never answers if `reply` is None.
    async fn fake_server(reply: Option<&'static [u8]>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    if let Some(reply) = reply {
                        let _ = socket.write_all(reply).await;
                    }
                    // Hold the connection open without answering more.
                    let _ = socket.read(&mut buf).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn silent_server_times_out_and_connection_is_dropped() {
        let addr = fake_server(None).await;
        let options = MemcachedOptions {
            request_timeout: Duration::from_millis(200),
            ..MemcachedOptions::default()
        };
        let backend = MemcachedBackend::new(addr.to_string(), options);
        let started = Instant::now();
        let r = backend.call(&[get(&["k"], false)]).await;
        assert!(matches!(r, Err(BackendError::Timeout)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            backend.pool_status().unwrap().size,
            0,
            "timed-out connection discarded"
        );
    }

    #[tokio::test]
    async fn misframed_reply_is_a_protocol_error() {
        let addr = fake_server(Some(b"STORED\r\n")).await;
        let backend = MemcachedBackend::new(addr.to_string(), MemcachedOptions::default());
        let r = backend.call(&[get(&["k"], false)]).await;
        assert!(matches!(r, Err(BackendError::Protocol(_))), "{r:?}");
        assert_eq!(backend.pool_status().unwrap().size, 0);

        // Trailing bytes after the expected reply also lose the connection.
        let addr = fake_server(Some(b"STORED\r\nSTORED\r\n")).await;
        let backend = MemcachedBackend::new(addr.to_string(), pooled());
        assert_eq!(one(&backend, set("k", b"v")).await, Response::Stored);
        assert_eq!(backend.pool_status().unwrap().size, 1);
        // The leftover reply makes recycle drop that connection; the next
        // one is fresh (and the fake server answers it with STORED again).
        assert_eq!(one(&backend, set("k", b"v")).await, Response::Stored);
        assert_eq!(backend.pool_status().unwrap().size, 1);
    }

    #[tokio::test]
    async fn cancelled_call_does_not_return_a_reusable_connection() {
        let addr = fake_server(None).await;
        let backend = MemcachedBackend::new(addr.to_string(), pooled());
        // The caller gives up mid-exchange.
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            backend.call(&[get(&["k"], false)]),
        )
        .await;
        assert!(r.is_err());
        let status = backend.pool_status().unwrap();
        assert_eq!(
            (status.size, status.available),
            (1, 1),
            "returned to the pool, marked broken"
        );
        let conn = backend.pool.get().await.unwrap();
        assert!(
            !conn.broken,
            "the broken connection was recycled away, this one is fresh"
        );
        assert!(conn.rbuf.is_empty());
    }

    // ---- the multiplexed connections (the default data path)

    /// `callers` tasks, each running `rounds` batches of its own keys and
    /// values on `backend` at once; each checks every reply it gets.
    async fn run_callers(
        backend: &Arc<MemcachedBackend>,
        callers: usize,
        rounds: usize,
        value_len: impl Fn(usize, usize) -> usize + Send + Sync + Copy + 'static,
    ) {
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let backend = backend.clone();
                tokio::spawn(async move {
                    for round in 0..rounds {
                        let key = format!("caller{c}");
                        let len = value_len(c, round);
                        let tag = format!("{c}.{round}.");
                        let mut data = tag.repeat(len / tag.len() + 1).into_bytes();
                        data.truncate(len.max(tag.len()));
                        let other = format!("{c}:{round}");
                        let batch = vec![
                            set(&key, &data),
                            get(&[&key], false),
                            set(&format!("{key}b"), other.as_bytes()),
                            get(&[&format!("{key}b"), &key], false),
                        ];
                        let replies = backend.call(&batch).await.expect("call");
                        assert_eq!(
                            replies,
                            vec![
                                Response::Stored,
                                Response::Values(vec![value(&key, &data)]),
                                Response::Stored,
                                Response::Values(vec![
                                    value(&format!("{key}b"), other.as_bytes()),
                                    value(&key, &data)
                                ]),
                            ],
                            "caller {c} round {round}"
                        );
                    }
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("callers finish")
                .expect("caller passed");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_two_connections_and_get_their_own_replies() {
        let mc = Memcached::start().await;
        let backend = Arc::new(mc.backend());
        run_callers(&backend, 64, 50, |c, round| 8 + (c * 7 + round * 13) % 300).await;
        let status = backend.pool_status().unwrap();
        assert_eq!((status.max_size, status.size), (2, 2));
        // memcached saw two data connections (and this test's own probe).
        let lines = backend.admin_command(b"stats\r\n").await.unwrap();
        let total = lines
            .iter()
            .find_map(|l| l.strip_prefix(b"STAT total_connections ".as_slice()))
            .map(|n| String::from_utf8_lossy(n).parse::<u64>().unwrap())
            .expect("total_connections");
        // The harness's readiness probe, the two multiplexed connections and
        // the stats connection; memcached counts its listener too.
        assert!(total <= 5, "{total} connections for 3200 batches");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_values_interleaved_with_small_ones_frame() {
        let mc = Memcached::start_with(free_port(), &["-I", "2m"]).await;
        let options = MemcachedOptions {
            request_timeout: Duration::from_secs(20),
            ..MemcachedOptions::default()
        };
        let backend = Arc::new(MemcachedBackend::new(mc.addr(), options));
        // Every third caller moves 1 MiB values (some rounds a byte off, so
        // a value's end never lines up with a read), the others small ones.
        run_callers(&backend, 12, 8, |c, round| {
            if c % 3 == 0 {
                1024 * 1024 - round % 2
            } else {
                5 + round
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_memcached_fails_batches_in_flight_then_reconnects() {
        let mut mc = Memcached::start().await;
        let port = mc.port;
        let options = MemcachedOptions {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            ..MemcachedOptions::default()
        };
        let backend = Arc::new(MemcachedBackend::new(mc.addr(), options));
        let big = vec![b'v'; 200 * 1024];
        assert_eq!(one(&backend, set("big", &big)).await, Response::Stored);
        // Callers keep batches in flight until one fails.
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let backend = backend.clone();
                tokio::spawn(async move {
                    let batch: Vec<Request> = (0..8).map(|_| get(&["big"], false)).collect();
                    for _ in 0..100_000 {
                        if let Err(e) = backend.call(&batch).await {
                            return e;
                        }
                    }
                    panic!("no batch failed");
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let killed = Instant::now();
        mc.stop();
        for task in tasks {
            let error = tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .expect("an error, not a hang")
                .expect("caller task");
            assert!(
                matches!(
                    error,
                    BackendError::Io(_) | BackendError::Unavailable(_) | BackendError::Protocol(_)
                ),
                "{error:?}"
            );
        }
        // Errors came at once, far within the request timeout.
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "{:?}",
            killed.elapsed()
        );
        assert_eq!(backend.pool_status().unwrap().size, 0, "no live connection");

        let _mc = Memcached::start_on(port).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match backend.call(&[set("k", b"after")]).await {
                Ok(r) => break assert_eq!(r, vec![Response::Stored]),
                Err(e) => assert!(Instant::now() < deadline, "no reconnect: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        run_callers(&backend, 8, 10, |c, _| 10 + c).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_memcached_times_out_every_batch_within_the_bound() {
        let mc = Memcached::start().await;
        let request_timeout = Duration::from_millis(300);
        let options = MemcachedOptions {
            request_timeout,
            ..MemcachedOptions::default()
        };
        let backend = Arc::new(MemcachedBackend::new(mc.addr(), options));
        // Both connections open before memcached stops answering.
        run_callers(&backend, 4, 2, |_, _| 10).await;
        assert_eq!(backend.pool_status().unwrap().size, 2);
        mc.signal("-STOP");
        let started = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let backend = backend.clone();
                tokio::spawn(async move {
                    backend
                        .call(&[set(&format!("s{i}"), b"v"), get(&["s0"], false)])
                        .await
                })
            })
            .collect();
        for task in tasks {
            let r = task.await.unwrap();
            assert!(matches!(r, Err(BackendError::Timeout)), "{r:?}");
        }
        let took = started.elapsed();
        assert!(
            took >= request_timeout && took < request_timeout + Duration::from_millis(500),
            "{took:?}"
        );
        assert_eq!(backend.pool_status().unwrap().size, 0, "both dropped");
        mc.signal("-CONT");
        // Fresh connections; the answers are this batch's own.
        assert_eq!(one(&backend, set("k", b"back")).await, Response::Stored);
        assert_eq!(
            one(&backend, get(&["k"], false)).await,
            Response::Values(vec![value("k", b"back")])
        );
    }

    #[tokio::test]
    async fn unsolicited_bytes_drop_the_connection_and_the_next_batch_reconnects() {
        // Two replies to one request: the second answers nothing.
        let addr = fake_server(Some(b"STORED\r\nSTORED\r\n")).await;
        let backend = MemcachedBackend::new(addr.to_string(), MemcachedOptions::default());
        assert_eq!(one(&backend, set("k", b"v")).await, Response::Stored);
        let deadline = Instant::now() + Duration::from_secs(5);
        while backend.pool_status().unwrap().size > 0 {
            assert!(Instant::now() < deadline, "the connection was kept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(one(&backend, set("k", b"v")).await, Response::Stored);
    }

    /// Many callers' batches of `get`, `gets`, `set` and `delete` on a few
    /// keys, queued at once on one multiplexed connection, so that their
    /// `get`s join lines (duplicate keys among them): every caller gets
    /// what running the requests one at a time, in queue order, gives.
    #[tokio::test]
    async fn joined_gets_answer_each_caller_as_one_at_a_time_would() {
        let mc = Memcached::start().await;
        let options = MemcachedOptions {
            multiplexed_connections: 1,
            ..MemcachedOptions::default()
        };
        let backend = MemcachedBackend::new(mc.addr(), options);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let mut model: HashMap<&str, Vec<u8>> = HashMap::new();
        let mut joined = 0;
        for round in 0..200 {
            let mut batches: Vec<Vec<Request>> = Vec::new();
            for _ in 0..1 + next(12) {
                let batch = (0..1 + next(4))
                    .map(|_| {
                        let key = keys[next(keys.len() as u64) as usize];
                        match next(10) {
                            0 => set(key, format!("{round}.{}", next(1000)).as_bytes()),
                            1 => delete(key),
                            n => {
                                let more: Vec<&str> = (0..next(3))
                                    .map(|_| keys[next(keys.len() as u64) as usize])
                                    .collect();
                                get(&[&[key][..], &more].concat(), n == 2)
                            }
                        }
                    })
                    .collect();
                batches.push(batch);
            }
            // What one request at a time gives, in queue order.
            let mut want: Vec<Vec<Response>> = Vec::new();
            for batch in &batches {
                let mut replies = Vec::new();
                for request in batch {
                    replies.push(match request {
                        Request::Store { key, data, .. } => {
                            model.insert(
                                keys.iter().find(|k| k.as_bytes() == &key[..]).unwrap(),
                                data.to_vec(),
                            );
                            Response::Stored
                        }
                        Request::Delete { key, .. } => {
                            let k = keys.iter().find(|k| k.as_bytes() == &key[..]).unwrap();
                            match model.remove(k) {
                                Some(_) => Response::Deleted,
                                None => Response::NotFound,
                            }
                        }
                        Request::Get { keys: ks, .. } => Response::Values(
                            ks.iter()
                                .filter_map(|k| {
                                    let k = std::str::from_utf8(k).unwrap();
                                    model.get(k).map(|d| value(k, d))
                                })
                                .collect(),
                        ),
                        _ => unreachable!(),
                    });
                }
                want.push(replies);
            }
            let got = futures_util::future::join_all(batches.iter().map(|b| backend.call(b))).await;
            for (i, (got, want)) in got.into_iter().zip(want).enumerate() {
                let got: Vec<Response> = got
                    .expect("call")
                    .into_iter()
                    .zip(&batches[i])
                    .map(|(r, request)| match (r, request) {
                        (Response::Values(vs), Request::Get { cas, .. }) => Response::Values(
                            vs.into_iter()
                                .map(|v| {
                                    assert_eq!(v.cas.is_some(), *cas, "round {round}");
                                    Value { cas: None, ..v }
                                })
                                .collect(),
                        ),
                        (r, _) => r,
                    })
                    .collect();
                assert_eq!(got, want, "round {round}, batch {i}: {:?}", batches[i]);
            }
            joined += batches
                .windows(2)
                .filter(|w| {
                    matches!(w[0].last(), Some(Request::Get { .. }))
                        && matches!(w[1].first(), Some(Request::Get { .. }))
                })
                .count();
        }
        assert!(joined > 100, "{joined} chances to join across callers");
        let status = backend.pool_status().unwrap();
        assert_eq!(status.size, 1, "never reconnected");
        assert!(status.joined_gets > 100, "few joins: {status:?}");
    }

    #[tokio::test]
    async fn cancelled_caller_leaves_the_framing_intact() {
        let mc = Memcached::start().await;
        let options = MemcachedOptions {
            multiplexed_connections: 1,
            ..MemcachedOptions::default()
        };
        let backend = MemcachedBackend::new(mc.addr(), options);
        let big = vec![b'x'; 512 * 1024];
        assert_eq!(one(&backend, set("big", &big)).await, Response::Stored);
        // Queue a batch, then give up on it before any reply is read: its
        // future is polled once (which queues it) and dropped.
        let batch: Vec<Request> = (0..32).map(|_| get(&["big"], false)).collect();
        let mut call = backend.call(&batch);
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the batch was meant to be cut short");
        drop(call);
        // The next batch on the same connection gets its own replies.
        assert_eq!(one(&backend, set("k", b"mine")).await, Response::Stored);
        assert_eq!(
            one(&backend, get(&["k"], false)).await,
            Response::Values(vec![value("k", b"mine")])
        );
        assert_eq!(backend.pool_status().unwrap().size, 1, "never reconnected");
    }
}
