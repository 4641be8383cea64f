//! Many callers' batches multiplexed onto a few long-lived connections to
//! one memcached: one write and one read carry many clients' requests.
//!
//! | Property                     | How                                                          |
//! |------------------------------|--------------------------------------------------------------|
//! | a caller's batch stays whole | it is encoded into the connection's write buffer and queued   |
//! | and in order                 | in one step under the connection's lock                      |
//! | replies frame                | one reader task per connection parses replies against the    |
//! |                              | queue of batches, FIFO, with `take_reply` (`parse_reply`)    |
//! | few writes                   | one writer task per connection; woken by the first batch     |
//! |                              | into an empty buffer, it yields once so that the batches of  |
//! |                              | every task ready meanwhile join that one write               |
//! | a failure fails every batch  | an I/O error, EOF, a misframed reply or an overdue reply     |
//! | in flight, never hangs       | fails every queued batch with the same error, ends both      |
//! |                              | tasks (closing the socket); the next batch reconnects         |
//! | a cancelled caller is safe   | its batch stays queued and its replies are read and dropped, |
//! |                              | so framing is kept                                           |
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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

use super::BackendError;
use super::memcached::take_reply;
use crate::protocol::{Request, Response, encode_request, reply_shape};

/// How much room is made in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;

/// How often per `request_timeout` the watchdog looks at the oldest batch.
const CHECKS_PER_TIMEOUT: u64 = 8;

/// A buffer grown past this by a large batch is given back once it is
/// empty again, so an idle connection stays small.
const IDLE_BUFFER_MAX: usize = 256 * 1024;

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
        for request in requests {
            encode_request(request, false, &mut state.wbuf);
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
                        if state.wbuf.capacity() > IDLE_BUFFER_MAX {
                            state.wbuf = BytesMut::new();
                        }
                        break;
                    }
                    std::mem::swap(&mut state.wbuf, &mut out);
                }
                if let Err(e) = writer.write_all(&out).await {
                    self.fail(Failure::io(&e));
                    return;
                }
                out.clear();
                if out.capacity() > IDLE_BUFFER_MAX {
                    out = BytesMut::new();
                }
            }
        }
    }

    /// Reads replies and hands each batch its own, in queue order.
    async fn read_loop(self: Arc<Self>, mut reader: OwnedReadHalf) {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            if let Err(failure) = self.parse_replies(&mut rbuf) {
                self.fail(failure);
                return;
            }
            if rbuf.is_empty() && rbuf.capacity() > IDLE_BUFFER_MAX {
                rbuf = BytesMut::with_capacity(READ_CHUNK);
            }
            rbuf.reserve(READ_CHUNK);
            match reader.read_buf(&mut rbuf).await {
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
    fn parse_replies(&self, rbuf: &mut BytesMut) -> Result<(), Failure> {
        if rbuf.is_empty() {
            return Ok(());
        }
        let mut state = self.lock();
        if state.failed.is_some() {
            return Ok(());
        }
        while !rbuf.is_empty() {
            let Some(head) = state.queue.front_mut() else {
                return Err(Failure::Protocol("unsolicited bytes from memcached".into()));
            };
            let request = &head.requests[head.responses.len()];
            match take_reply(request, rbuf) {
                Ok(Some(response)) => {
                    head.responses.push(response);
                    if head.responses.len() == head.requests.len() {
                        let done = state.queue.pop_front().expect("the head was there");
                        // A caller that gave up has dropped its receiver.
                        let _ = done.reply.send(Ok(done.responses));
                    }
                }
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
            state: Mutex::new(State {
                failed: None,
                wbuf: BytesMut::new(),
                queue: VecDeque::new(),
                tick: 0,
            }),
            writable: Notify::new(),
            dead: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
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
