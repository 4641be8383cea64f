//! Many callers' batches multiplexed onto a few long-lived connections to
//! one memcached: one write and one read carry many clients' requests.
//!
//! | Property                     | How                                                          |
//! |------------------------------|--------------------------------------------------------------|
//! | a caller's batch stays whole | it is encoded into the connection's write buffer and queued   |
//! | and in order                 | in one step under the connection's lock                      |
//! | replies frame                | one reader task per connection parses replies against the    |
//! |                              | queue of batches, FIFO ([`ReplyBuffer`]); values of 16 KiB   |
//! |                              | or more are slices of the read buffer, never copied          |
//! | few commands for memcached   | consecutive `get`s (or `gets`) of any callers are sent as    |
//! |                              | one multi-key line ([`Line`]); its one reply is split back   |
//! |                              | by key. Not if a key is already on the line for another      |
//! |                              | request: then a reply could not say whose a value is         |
//! | few writes                   | one writer task per connection; woken by the first batch     |
//! |                              | into an empty buffer, it yields once so that the batches of  |
//! |                              | every task ready meanwhile join that one write               |
//! | a failure fails every batch  | an I/O error, EOF, a misframed reply or an overdue reply     |
//! | in flight, never hangs       | fails every queued batch with the same error, ends both      |
//! |                              | tasks (closing the socket); the next batch reconnects         |
//! | a cancelled caller is safe   | its batch stays queued and its replies are read and dropped, |
//! |                              | so framing is kept                                           |
//!
//! Why join `get`s: memcached 1.6.18 flushes its replies with a `sendmsg`
//! after every `get` command, however deep the pipeline (`conn_mwrite` at
//! the end of `process_get_command`), but once per multi-key `get`. Over
//! loopback that send also carries the receiving side's TCP work, and it
//! was most of memcached's CPU behind memdial (docs/BENCHMARKS.md).
//!
//! A batch's replies are due `request_timeout` after it is queued. Replies
//! come in queue order, so only the oldest batch can be the first overdue:
//! a watchdog task per connection looks at it [`CHECKS_PER_TIMEOUT`] times
//! per `request_timeout`, and when it is overdue drops the connection, and
//! every batch on it fails with [`BackendError::Timeout`]. A batch fails
//! between `request_timeout` and 1.125 times it after it was queued. One
//! watchdog rather than a timer per batch: arming and clearing a timer
//! (and reading the clock) for every batch was a visible part of the
//! proxy's own CPU at pipeline depth 1.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

use super::BackendError;
use crate::protocol::{
    BACKEND_IDLE_BUFFER_MAX, ReplyBuffer, Request, Response, Value, encode_request, reply_shape,
};

/// How often per `request_timeout` the watchdog looks at the oldest batch.
const CHECKS_PER_TIMEOUT: u64 = 8;

/// Most keys on one joined `get` line, and most bytes of it.
const LINE_MAX_KEYS: usize = 64;
const LINE_MAX_BYTES: usize = 4096;

/// Why a connection was dropped; every batch on it fails with this.
#[derive(Debug, Clone)]
enum Failure {
    Timeout,
    Io(io::ErrorKind, String),
    Protocol(String),
}

impl Failure {
    fn io(e: &io::Error) -> Failure {
        Failure::Io(e.kind(), e.to_string())
    }

    fn error(&self, addr: &str) -> BackendError {
        match self {
            Failure::Timeout => BackendError::Timeout,
            Failure::Io(kind, msg) => {
                BackendError::Io(io::Error::new(*kind, format!("{addr}: {msg}")))
            }
            Failure::Protocol(reason) => BackendError::Protocol(reason.clone()),
        }
    }
}

type Reply = Result<Vec<Response>, BackendError>;

/// One caller's batch, waiting for its replies.
struct Exchange {
    /// What the reply parser needs of each request ([`reply_shape`]).
    requests: Vec<Request>,
    responses: Vec<Response>,
    reply: oneshot::Sender<Reply>,
    /// The watchdog's tick when the batch was queued.
    queued_at: u64,
}

/// A `get` or `gets` line that carries the keys of several requests, one
/// after another in the queue; its one reply answers them all.
struct Line {
    /// Sequence number of its first request.
    first: u64,
    cas: bool,
    /// The line's keys, separated by spaces.
    keys: Bytes,
    /// How many of them each request gave, in order.
    counts: Vec<usize>,
}

impl Line {
    /// Splits the line's reply into one per request: each value goes to
    /// the request whose key it answers (memcached answers the keys in
    /// order and leaves out misses; no key is on the line for two
    /// requests). An error answers every request.
    fn split(&self, reply: Response) -> Result<Vec<Response>, Failure> {
        let Response::Values(values) = reply else {
            return match reply {
                Response::Error(_) => Ok(vec![reply; self.counts.len()]),
                other => Err(Failure::Protocol(format!(
                    "unexpected reply to a joined get: {:?}",
                    other.outcome()
                ))),
            };
        };
        let mut out: Vec<Vec<Value>> = self.counts.iter().map(|_| Vec::new()).collect();
        let mut owners = self
            .counts
            .iter()
            .enumerate()
            .flat_map(|(owner, &n)| std::iter::repeat_n(owner, n));
        let mut keys = self.keys.split(|&b| b == b' ');
        for value in values {
            loop {
                let (Some(owner), Some(key)) = (owners.next(), keys.next()) else {
                    return Err(Failure::Protocol(format!(
                        "a value for {:?}, not a key of the joined get",
                        String::from_utf8_lossy(&value.key)
                    )));
                };
                if key == value.key {
                    out[owner].push(value);
                    break;
                }
            }
        }
        Ok(out.into_iter().map(Response::Values).collect())
    }
}

/// The `get` line at the end of the write buffer, which the next requests'
/// keys may join.
struct OpenLine {
    first: u64,
    cas: bool,
    /// Where it starts in `wbuf`.
    start: usize,
}

/// What callers and the two tasks share, under one lock.
struct State {
    /// Set when the connection is dropped; no batch joins it after.
    failed: Option<Failure>,
    /// Encoded requests not yet taken by the writer.
    wbuf: BytesMut,
    /// Batches whose requests are in `wbuf` or written, oldest first.
    queue: VecDeque<Exchange>,
    /// Counts the watchdog's checks.
    tick: u64,
    /// Requests encoded so far, and requests answered so far: the
    /// sequence number of the next of each.
    encoded: u64,
    answered: u64,
    /// Lines that carry several requests, oldest first.
    lines: VecDeque<Line>,
    open: Option<OpenLine>,
    /// The open line's keys per request, and the hash of each of its keys
    /// (see [`key_hash`]); kept between lines.
    open_counts: Vec<usize>,
    open_hashes: Vec<u64>,
    /// Whether `get`s join lines at all.
    join_gets: bool,
    /// Requests that joined a line, so far.
    joined: u64,
}

impl State {
    fn new(join_gets: bool) -> State {
        State {
            join_gets,
            failed: None,
            wbuf: BytesMut::new(),
            queue: VecDeque::new(),
            tick: 0,
            encoded: 0,
            answered: 0,
            lines: VecDeque::new(),
            open: None,
            open_counts: Vec::new(),
            open_hashes: Vec::new(),
            joined: 0,
        }
    }

    /// Encodes `request`, onto the open `get` line when it can join it.
    fn encode(&mut self, request: &Request) {
        let seq = self.encoded;
        self.encoded += 1;
        if let Request::Get { keys, cas } = request
            && !keys.is_empty()
            && self.join_gets
        {
            if self.join(keys, *cas) {
                return;
            }
            self.close_line();
            let start = self.wbuf.len();
            encode_request(request, false, &mut self.wbuf);
            self.open = Some(OpenLine {
                first: seq,
                cas: *cas,
                start,
            });
            self.open_counts.push(keys.len());
            self.open_hashes.extend(keys.iter().map(|k| key_hash(k)));
            return;
        }
        self.close_line();
        encode_request(request, false, &mut self.wbuf);
    }

    /// Adds `keys` to the open line, if there is one of this kind with room
    /// and none of them is on it already.
    fn join(&mut self, keys: &[Bytes], cas: bool) -> bool {
        let Some(open) = &self.open else {
            return false;
        };
        let bytes: usize = keys.iter().map(|k| k.len() + 1).sum();
        let on_line = self.open_hashes.len();
        if open.cas != cas
            || on_line + keys.len() > LINE_MAX_KEYS
            || self.wbuf.len() - open.start + bytes > LINE_MAX_BYTES
        {
            return false;
        }
        // Each key hashed once: added, then looked for among the line's.
        self.open_hashes.extend(keys.iter().map(|k| key_hash(k)));
        let (line, new) = self.open_hashes.split_at(on_line);
        if new.iter().any(|h| line.contains(h)) {
            self.open_hashes.truncate(on_line);
            return false;
        }
        debug_assert!(self.wbuf.ends_with(b"\r\n"));
        self.wbuf.truncate(self.wbuf.len() - 2);
        for k in keys {
            self.wbuf.put_u8(b' ');
            self.wbuf.put_slice(k);
        }
        self.wbuf.put_slice(b"\r\n");
        self.joined += 1;
        self.open_counts.push(keys.len());
        true
    }

    /// Ends the open line: nothing joins it any more. One that carries
    /// several requests is recorded for the reader.
    fn close_line(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        if self.open_counts.len() > 1 {
            let verb = if open.cas { "gets " } else { "get " };
            let keys = &self.wbuf[open.start + verb.len()..self.wbuf.len() - 2];
            self.lines.push_back(Line {
                first: open.first,
                cas: open.cas,
                keys: Bytes::copy_from_slice(keys),
                counts: std::mem::take(&mut self.open_counts),
            });
        }
        self.open_counts.clear();
        self.open_hashes.clear();
    }

    /// Hands `response` to the oldest batch, which is answered once it has
    /// all of its replies.
    fn answer(&mut self, response: Response) -> Result<(), Failure> {
        let Some(head) = self.queue.front_mut() else {
            return Err(Failure::Protocol("unsolicited bytes from memcached".into()));
        };
        head.responses.push(response);
        self.answered += 1;
        if head.responses.len() == head.requests.len() {
            let done = self.queue.pop_front().expect("the head was there");
            // A caller that gave up has dropped its receiver.
            let _ = done.reply.send(Ok(done.responses));
        }
        Ok(())
    }
}

/// A cheap hash of a key (FNV-1a), for telling that a key is not on a line
/// yet; equal hashes only stop a join.
fn key_hash(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One multiplexed connection.
struct Conn {
    addr: Arc<str>,
    state: Mutex<State>,
    /// Wakes the writer when the write buffer stops being empty.
    writable: Notify,
    /// Mirrors `state.failed`, for a check without the lock.
    dead: AtomicBool,
    /// The reader and writer tasks, ended when the connection fails.
    tasks: Mutex<Vec<AbortHandle>>,
    /// The mux's count of joined `get`s.
    joined_gets: Arc<AtomicU64>,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves consistent state: every change
        // under it is a push, a pop or a flag.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_failed(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Queues `requests` as one batch; `None` if the connection has failed
    /// (the batch was not sent and may go elsewhere).
    fn submit(&self, requests: &[Request]) -> Option<oneshot::Receiver<Reply>> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        if state.failed.is_some() {
            return None;
        }
        let was_empty = state.wbuf.is_empty();
        let joined = state.joined;
        for request in requests {
            state.encode(request);
        }
        if state.joined > joined {
            self.joined_gets
                .fetch_add(state.joined - joined, Ordering::Relaxed);
        }
        let queued_at = state.tick;
        state.queue.push_back(Exchange {
            requests: requests.iter().map(reply_shape).collect(),
            responses: Vec::with_capacity(requests.len()),
            reply: tx,
            queued_at,
        });
        drop(state);
        if was_empty {
            self.writable.notify_one();
        }
        Some(rx)
    }

    /// Drops the connection: every queued batch fails with `failure`, both
    /// tasks end and the socket closes. Only the first call counts.
    fn fail(&self, failure: Failure) {
        let queue = {
            let mut state = self.lock();
            if state.failed.is_some() {
                return;
            }
            tracing::debug!(addr = %self.addr, error = ?failure, batches = state.queue.len(), "dropping multiplexed memcached connection");
            state.failed = Some(failure.clone());
            self.dead.store(true, Ordering::Release);
            state.wbuf = BytesMut::new();
            state.lines.clear();
            state.open = None;
            std::mem::take(&mut state.queue)
        };
        for exchange in queue {
            let _ = exchange.reply.send(Err(failure.error(&self.addr)));
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            task.abort();
        }
        // A writer not yet aborted sees the failure and ends.
        self.writable.notify_one();
    }

    /// Drops the connection once its oldest batch is overdue. A batch
    /// queued at tick `t` is overdue at tick `t + CHECKS_PER_TIMEOUT + 1`:
    /// at least `CHECKS_PER_TIMEOUT` whole periods later. A late tick (a
    /// busy runtime) only makes the deadline later, never earlier.
    async fn watch(self: Arc<Self>, request_timeout: Duration) {
        let period = (request_timeout / CHECKS_PER_TIMEOUT as u32).max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let overdue = {
                let mut state = self.lock();
                if state.failed.is_some() {
                    return;
                }
                state.tick += 1;
                let tick = state.tick;
                state
                    .queue
                    .front()
                    .is_some_and(|oldest| tick - oldest.queued_at > CHECKS_PER_TIMEOUT)
            };
            if overdue {
                self.fail(Failure::Timeout);
                return;
            }
        }
    }

    /// Writes whatever callers queue, as few writes as it can.
    async fn write_loop(self: Arc<Self>, mut writer: OwnedWriteHalf) {
        let mut out = BytesMut::new();
        loop {
            self.writable.notified().await;
            // Let every task that is ready now add its batch to this write.
            tokio::task::yield_now().await;
            loop {
                {
                    let mut state = self.lock();
                    if state.failed.is_some() {
                        return;
                    }
                    if state.wbuf.is_empty() {
                        if state.wbuf.capacity() > BACKEND_IDLE_BUFFER_MAX {
                            state.wbuf = BytesMut::new();
                        }
                        break;
                    }
                    // What is written is final.
                    state.close_line();
                    std::mem::swap(&mut state.wbuf, &mut out);
                }
                if let Err(e) = writer.write_all(&out).await {
                    self.fail(Failure::io(&e));
                    return;
                }
                out.clear();
                if out.capacity() > BACKEND_IDLE_BUFFER_MAX {
                    out = BytesMut::new();
                }
            }
        }
    }

    /// Reads replies and hands each batch its own, in queue order.
    async fn read_loop(self: Arc<Self>, mut reader: OwnedReadHalf) {
        let mut rbuf = ReplyBuffer::new();
        loop {
            if let Err(failure) = self.parse_replies(&mut rbuf) {
                self.fail(failure);
                return;
            }
            rbuf.release_if_large();
            match reader.read_buf(rbuf.for_read()).await {
                Ok(0) => {
                    self.fail(Failure::Io(
                        io::ErrorKind::UnexpectedEof,
                        "memcached closed the connection".into(),
                    ));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(Failure::io(&e));
                    return;
                }
            }
        }
    }

    /// Parses every whole reply in `rbuf` against the queue and answers
    /// each batch whose replies are all in.
    fn parse_replies(&self, rbuf: &mut ReplyBuffer) -> Result<(), Failure> {
        if rbuf.is_empty() {
            return Ok(());
        }
        let mut state = self.lock();
        let state = &mut *state;
        if state.failed.is_some() {
            return Ok(());
        }
        while !rbuf.is_empty() {
            if let Some(line) = state.lines.front()
                && line.first == state.answered
            {
                let shape = Request::Get {
                    keys: Vec::new(),
                    cas: line.cas,
                };
                match rbuf.take(&shape) {
                    Ok(Some(reply)) => {
                        let line = state.lines.pop_front().expect("the line was there");
                        for response in line.split(reply)? {
                            state.answer(response)?;
                        }
                    }
                    Ok(None) => break,
                    Err(reason) => return Err(Failure::Protocol(reason)),
                }
                continue;
            }
            let Some(head) = state.queue.front() else {
                return Err(Failure::Protocol("unsolicited bytes from memcached".into()));
            };
            let request = &head.requests[head.responses.len()];
            match rbuf.take(request) {
                Ok(Some(response)) => state.answer(response)?,
                Ok(None) => break,
                Err(reason) => return Err(Failure::Protocol(reason)),
            }
        }
        Ok(())
    }
}

/// Tuning of the multiplexed connections to one memcached.
#[derive(Debug, Clone)]
pub(super) struct MuxOptions {
    /// Connections opened to memcached (at least 1 is used); batches go to
    /// them in turn.
    pub connections: usize,
    /// Consecutive `get`s (or `gets`) go as one line ([`Line`]).
    pub join_gets: bool,
    pub connect_timeout: Duration,
    /// Bound on waiting for a batch's replies, from when it is queued.
    pub request_timeout: Duration,
}

/// A few multiplexed connections to one memcached, made on first use and
/// remade after a failure.
pub(super) struct Mux {
    addr: Arc<str>,
    options: MuxOptions,
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// Requests whose `get` joined another's line, over every connection.
    joined_gets: Arc<AtomicU64>,
}

#[derive(Default)]
struct Slot {
    /// The live connection, if any; read on every batch.
    conn: Mutex<Option<Arc<Conn>>>,
    /// Held while connecting, so one caller connects and the others wait
    /// for its connection.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn live(&self) -> Option<Arc<Conn>> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.as_ref().filter(|c| !c.is_failed()).cloned()
    }
}

impl Mux {
    pub fn new(addr: String, options: MuxOptions) -> Mux {
        let slots = (0..options.connections.max(1))
            .map(|_| Slot::default())
            .collect();
        Mux {
            addr: addr.into(),
            options,
            slots,
            next: AtomicUsize::new(0),
            joined_gets: Arc::default(),
        }
    }

    /// Runs `requests` (all forwardable: each earns exactly one reply) as
    /// one batch on one connection.
    pub async fn call(&self, requests: &[Request]) -> Result<Vec<Response>, BackendError> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        // A connection that fails between being picked and taking the batch
        // has not sent it: try once more on a fresh one.
        for _ in 0..2 {
            let conn = match slot.live() {
                Some(conn) => conn,
                // Boxed: rare, and its future is large.
                None => Box::pin(self.connect(slot)).await?,
            };
            let Some(rx) = conn.submit(requests) else {
                continue;
            };
            // The connection's watchdog bounds the wait.
            return match rx.await {
                Ok(reply) => reply,
                // Never: a failing connection answers every batch first.
                Err(_) => Err(Failure::Io(
                    io::ErrorKind::ConnectionAborted,
                    "connection dropped".into(),
                )
                .error(&self.addr)),
            };
        }
        Err(BackendError::Unavailable(format!(
            "{}: connection failed as it was made",
            self.addr
        )))
    }

    /// The slot's connection, made now if it has none (or a failed one).
    async fn connect(&self, slot: &Slot) -> Result<Arc<Conn>, BackendError> {
        // Callers queued behind a connect that hangs give up in time too.
        let Ok(_connecting) =
            tokio::time::timeout(self.options.connect_timeout, slot.connecting.lock()).await
        else {
            return Err(BackendError::Unavailable(format!(
                "{}: connect timed out",
                self.addr
            )));
        };
        if let Some(conn) = slot.live() {
            return Ok(conn);
        }
        let unavailable = |reason: &dyn std::fmt::Display| {
            tracing::debug!(addr = %self.addr, error = %reason, "memcached connect failed");
            BackendError::Unavailable(format!("{}: {reason}", self.addr))
        };
        let stream = match tokio::time::timeout(
            self.options.connect_timeout,
            TcpStream::connect(&*self.addr),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unavailable(&e)),
            Err(_) => return Err(unavailable(&"connect timed out")),
        };
        stream.set_nodelay(true).map_err(|e| unavailable(&e))?;
        tracing::debug!(addr = %self.addr, "multiplexed memcached connection opened");
        let (reader, writer) = stream.into_split();
        let conn = Arc::new(Conn {
            addr: self.addr.clone(),
            state: Mutex::new(State::new(self.options.join_gets)),
            writable: Notify::new(),
            dead: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            joined_gets: self.joined_gets.clone(),
        });
        let tasks = vec![
            tokio::spawn(conn.clone().read_loop(reader)).abort_handle(),
            tokio::spawn(conn.clone().write_loop(writer)).abort_handle(),
            tokio::spawn(conn.clone().watch(self.options.request_timeout)).abort_handle(),
        ];
        *conn.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        if conn.is_failed() {
            // It failed before its tasks were recorded: end them here.
            for task in
                std::mem::take(&mut *conn.tasks.lock().unwrap_or_else(PoisonError::into_inner))
            {
                task.abort();
            }
        }
        let old = slot
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(conn.clone());
        if let Some(old) = old {
            // Already failed; this ends its tasks if they have not ended.
            old.fail(Failure::Io(
                io::ErrorKind::ConnectionAborted,
                "replaced".into(),
            ));
        }
        Ok(conn)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.slots.iter().filter(|s| s.live().is_some()).count()
    }

    /// Connections it opens at most.
    pub fn max(&self) -> usize {
        self.slots.len()
    }

    /// Requests whose `get` joined another's line, since start.
    pub fn joined_gets(&self) -> u64 {
        self.joined_gets.load(Ordering::Relaxed)
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        for slot in &self.slots {
            let conn = slot
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(conn) = conn {
                conn.fail(Failure::Io(
                    io::ErrorKind::ConnectionAborted,
                    "backend dropped".into(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn get(keys: &[&str], cas: bool) -> Request {
        Request::Get {
            keys: keys.iter().map(|k| b(k)).collect(),
            cas,
        }
    }

    fn value(key: &str, data: &str) -> Value {
        Value {
            key: b(key),
            flags: 0,
            data: b(data),
            cas: None,
        }
    }

    fn encoded(requests: &[Request]) -> State {
        encoded_as(requests, true)
    }

    fn encoded_as(requests: &[Request], join_gets: bool) -> State {
        let mut state = State::new(join_gets);
        for r in requests {
            state.encode(r);
        }
        state.close_line();
        state
    }

    #[test]
    fn consecutive_gets_share_a_line_unless_a_key_is_on_it_already() {
        let set = Request::Delete {
            key: b("x"),
            noreply: false,
        };
        let state = encoded(&[
            get(&["a"], false),
            get(&["b", "c"], false),
            get(&["d", "d"], false), // its own duplicate: still joins
            get(&["c"], false),      // on the line for another request
            get(&["e"], false),
            get(&["f"], true), // gets: a line of its own kind
            get(&["g"], true),
            set,
            get(&["h"], false),
            get(&[], false), // no key: memcached's ERROR, alone
        ]);
        assert_eq!(
            &state.wbuf[..],
            b"get a b c d d\r\nget c e\r\ngets f g\r\ndelete x\r\nget h\r\nget\r\n"
        );
        let lines: Vec<(u64, bool, &[u8], &[usize])> = state
            .lines
            .iter()
            .map(|l| (l.first, l.cas, &l.keys[..], &l.counts[..]))
            .collect();
        assert_eq!(
            lines,
            vec![
                (0, false, &b"a b c d d"[..], &[1, 2, 2][..]),
                (3, false, &b"c e"[..], &[1, 1][..]),
                (5, true, &b"f g"[..], &[1, 1][..]),
            ]
        );
        assert_eq!(state.encoded, 10);
        assert_eq!(state.joined, 4, "b c, d d, e and g joined");

        // Not joined when the backend says so.
        let state = encoded_as(&[get(&["a"], false), get(&["b"], false)], false);
        assert_eq!(&state.wbuf[..], b"get a\r\nget b\r\n");
        assert!(state.lines.is_empty());
    }

    #[test]
    fn a_line_stops_at_its_key_and_byte_bounds() {
        let many: Vec<String> = (0..LINE_MAX_KEYS + 1).map(|i| format!("k{i}")).collect();
        let requests: Vec<Request> = many.iter().map(|k| get(&[k], false)).collect();
        let state = encoded(&requests);
        let counts: Vec<usize> = state.lines.iter().map(|l| l.counts.len()).collect();
        assert_eq!(
            counts,
            vec![LINE_MAX_KEYS],
            "the last key starts a line of its own"
        );

        let long = "x".repeat(250);
        let keys: Vec<String> = (0..20).map(|i| format!("{i:02}{long}")).collect();
        let requests: Vec<Request> = keys.iter().map(|k| get(&[k], false)).collect();
        let state = encoded(&requests);
        for line in state.wbuf[..]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            assert!(line.len() < LINE_MAX_BYTES, "{} bytes", line.len() + 1);
        }
        assert_eq!(
            state.lines.iter().map(|l| l.counts.len()).sum::<usize>(),
            20
        );
    }

    #[test]
    fn a_joined_reply_is_split_by_key() {
        let line = Line {
            first: 0,
            cas: false,
            keys: b("a b c d d e"),
            counts: vec![1, 2, 2, 1],
        };
        // b and e missed.
        let reply = Response::Values(vec![
            value("a", "1"),
            value("c", "3"),
            value("d", "4"),
            value("d", "4"),
        ]);
        assert_eq!(
            line.split(reply).unwrap(),
            vec![
                Response::Values(vec![value("a", "1")]),
                Response::Values(vec![value("c", "3")]),
                Response::Values(vec![value("d", "4"), value("d", "4")]),
                Response::Values(vec![]),
            ]
        );
        // An error answers every request on the line.
        let error = Response::Error(crate::protocol::ErrorReply::Server("out of memory".into()));
        assert_eq!(line.split(error.clone()).unwrap(), vec![error; 4]);
        // A value for no key, or out of order, loses the framing.
        for bad in [
            vec![value("z", "1")],
            vec![value("c", "3"), value("a", "1")],
        ] {
            assert!(line.split(Response::Values(bad)).is_err());
        }
        assert!(line.split(Response::Stored).is_err());
    }
}
