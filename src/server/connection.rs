//! One client connection: read, parse every complete request in the buffer,
//! run them through the pipeline in segments, write the replies in request
//! order, repeat.
//!
//! Memory: a segment fetches at most `key_budget` values, sized from the
//! values this connection has seen so that one segment's replies fit in
//! `connection_reply_buffer_bytes`; its replies are written before the next
//! segment runs (large values straight from where the backend put them),
//! and nothing more is read from the client until the batch is written. A
//! node-wide semaphore of reply bytes bounds what all connections hold at
//! once. A client that takes none of its replies for
//! `write_stall_timeout_ms` is closed.
//!
//! A connection takes its buffers at its first request, not at accept. A
//! buffer that grew for a large request or reply is given back before the
//! connection waits for its client (see `release_for_wait`); one of the
//! usual size is kept, so a busy connection does not allocate per request,
//! until the client has been quiet for a second or two (see
//! `release_idle`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use prometheus::{Histogram, IntCounter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::SemaphorePermit;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::Shared;
use crate::consistency::Session;
use crate::metrics::Metrics;
use crate::protocol::{
    AdminRequest, ClientError, Command, ConnRequest, Incoming, MetaCmd, Parsed, Request, Response,
    encode_response, encode_value, encode_value_header, parse_request, value_footprint,
};

/// What a connection does after answering a batch.
enum Next {
    /// Nothing whole is buffered: read.
    Read,
    /// The batch stopped at the pipeline depth: parse the rest first.
    Parse,
    Close,
}

/// A reply slot in a batch, kept in request order.
enum Slot {
    /// Answered by the pipeline, in turn.
    Pipeline { noreply: bool },
    /// Answered without the pipeline (errors, `version`, …).
    Ready(Response),
    /// `stats [group ...]`: answered when its turn comes, once every
    /// request before it has run, so that its counters include them (as
    /// memcached's do).
    Stats(Vec<Bytes>),
    /// A request about the node's store, run on it in its turn (after
    /// every request before it).
    Admin(AdminRequest),
}

pub(super) struct Connection<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    rbuf: BytesMut,
    /// The read buffer grew past [`KEEP_WHILE_WAITING`] since it was last
    /// replaced (its capacity may not tell: it leaves out what was
    /// consumed).
    rbuf_grown: bool,
    wbuf: BytesMut,
    /// Values of at least [`DIRECT_WRITE_BYTES`] that go out from where
    /// the store put them, each with the length of `wbuf` where it belongs
    /// (after its `VALUE` line); written with `wbuf` in one gathered write.
    values_out: Vec<(usize, Bytes)>,
    /// The bytes of `values_out`'s values.
    values_out_bytes: usize,
    /// Bytes still to discard: the data block of a rejected value.
    skip: usize,
    handles: Handles,
    session: Session,
    /// Keys fetched per pipeline call: `connection_reply_buffer_bytes`
    /// over `value_estimate`, between 1 and [`STREAM_GET_KEYS`].
    key_budget: usize,
    /// Expected bytes of one value: item_size_max at first, then the
    /// largest value of the last fetch or a quarter of the previous
    /// estimate, whichever is larger.
    value_estimate: usize,
    /// Writes to the socket so far: tells whether part of a reply has
    /// left already.
    writes: u64,
    /// Lists of the last batch, emptied, for the next one (a batch of a
    /// few requests then allocates none of them); see [`keep_spare`].
    spare_slots: Vec<Slot>,
    spare_commands: Vec<(Command, Option<usize>, CountedAs)>,
    /// The idle release's tick is set (see `read_more`).
    release_armed: bool,
    /// The client sent something since the last tick.
    read_since_tick: bool,
    /// The tick was polled since it was last set.
    tick_polled: bool,
}

const READ_CHUNK: usize = 16 * 1024;
/// A read buffer larger than this that holds only the start of a request
/// is cut back before the connection waits (see `release_for_wait`).
/// Four chunks: a client that sets values of 16-48 KiB reuses its buffer
/// instead of taking a new one for every request (measured: 16 KiB values
/// at depth 1 lost about a tenth of their requests per CPU-second with
/// two chunks).
const KEEP_WHILE_WAITING: usize = 4 * READ_CHUNK;
/// The same for the write buffer: values of 16 KiB or more are written
/// from the store's buffers, never copied into it, so it grows only for
/// many small replies.
const KEEP_WBUF_WHILE_WAITING: usize = 2 * READ_CHUNK;
/// A connection whose client has sent nothing for one to two of these gives
/// back the buffers it keeps between requests (see `release_idle`). Long
/// beside a request's round trip, so a busy connection reuses its buffers;
/// short beside how long an idle connection stays idle. A tick, not a
/// deadline set at every wait: pushing a timer's deadline on every request
/// cost about 900 instructions per request at depth 1 (callgrind).
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// While draining at shutdown, a client quiet this long is done.
const DRAIN_QUIET: std::time::Duration = std::time::Duration::from_millis(100);
/// A write buffer grown past this by a large reply is released afterwards,
/// and a streamed get reply is written out whenever it passes it.
const KEEP_BUFFER: usize = 1024 * 1024;
/// The most keys fetched by one pipeline call: a get of more keys is
/// fetched and answered in parts of at most this many keys (fewer when the
/// values are large; see `key_budget`).
const STREAM_GET_KEYS: usize = 64;
/// A value at least this large is written from the backend's buffer rather
/// than copied into the write buffer.
const DIRECT_WRITE_BYTES: usize = 16 * 1024;
/// The smallest `value_estimate`, and the reply bytes counted for a reply
/// that holds no value.
const MIN_REPLY_ESTIMATE: usize = 64;

impl<'a> Connection<'a> {
    pub fn new(stream: TcpStream, shared: &'a Shared, conn_id: u64) -> Self {
        let _ = stream.set_nodelay(true);
        Connection {
            stream,
            shared,
            rbuf: BytesMut::new(),
            rbuf_grown: false,
            wbuf: BytesMut::new(),
            values_out: Vec::new(),
            values_out_bytes: 0,
            skip: 0,
            handles: Handles::new(&shared.metrics),
            session: Session::new(conn_id),
            key_budget: 1,
            value_estimate: 0,
            writes: 0,
            spare_slots: Vec::new(),
            spare_commands: Vec::new(),
            release_armed: true,
            read_since_tick: false,
            tick_polled: false,
        }
        .with_estimate(shared.settings.limits.item_size_max)
    }

    /// The client's address, for the connection's own log lines (its
    /// span is at debug).
    fn peer(&self) -> String {
        self.stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string())
    }

    fn with_estimate(mut self, value_bytes: usize) -> Self {
        self.set_estimate(value_bytes);
        self
    }

    fn set_estimate(&mut self, value_bytes: usize) {
        self.value_estimate = value_bytes.max(MIN_REPLY_ESTIMATE);
        self.key_budget = (self.shared.settings.connection_reply_buffer_bytes
            / self.value_estimate)
            .clamp(1, STREAM_GET_KEYS);
    }

    pub async fn run(&mut self, shutdown: &CancellationToken) -> std::io::Result<()> {
        // Made once: making it registers a waiter with the token, and
        // dropping it removes the waiter again, each under a lock.
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        // The idle release's tick (see `read_more`), made once for the same
        // reason: a deadline pushed later costs no timer registration.
        let mut release = std::pin::pin!(tokio::time::sleep(IDLE_RELEASE));
        loop {
            let (slots, requests, next) = self.take_batch();
            if !slots.is_empty() {
                self.answer(slots, requests).await?;
            }
            match next {
                Next::Close => {
                    self.stream.shutdown().await?;
                    return Ok(());
                }
                Next::Parse => {}
                Next::Read => {
                    let release = release.as_mut();
                    if !self
                        .read_more(shutdown, cancelled.as_mut(), release)
                        .await?
                    {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Reads once. Returns false when the connection should end: the peer
    /// closed, it was idle too long, or the node is shutting down and the
    /// client has sent nothing more.
    ///
    /// Before waiting for the socket, a buffer that grew is given back (see
    /// [`release_for_wait`]); the usual ones are kept for the next request
    /// until a tick of `release` (every [`IDLE_RELEASE`]) finds that the
    /// client sent nothing since the tick before, and then given back too
    /// (see [`Self::release_idle`]). A connection that holds nothing waits
    /// with no tick, and takes a read buffer again once the socket is
    /// readable.
    async fn read_more(
        &mut self,
        shutdown: &CancellationToken,
        mut cancelled: std::pin::Pin<&mut WaitForCancellationFuture<'_>>,
        mut release: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> std::io::Result<bool> {
        // While shutting down, requests the client already sent are still
        // read and answered; the connection ends once the client has been
        // quiet for a moment (the server's grace period bounds the whole).
        let wait = if shutdown.is_cancelled() {
            Some(DRAIN_QUIET)
        } else {
            self.shared.settings.idle_timeout
        };
        // One deadline for the whole wait: the loop goes round again after
        // a tick or a stale readiness, and must not restart it.
        let quiet_at = wait.map(|d| tokio::time::Instant::now() + d);
        loop {
            release_for_wait(&mut self.rbuf, &mut self.rbuf_grown, KEEP_WHILE_WAITING);
            release_for_wait(&mut self.wbuf, &mut false, KEEP_WBUF_WHILE_WAITING);
            let holding = self.holds_buffers();
            if holding && !self.release_armed {
                release
                    .as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_RELEASE);
                self.release_armed = true;
                self.tick_polled = false;
            }
            // The tick is polled once after each reset, which gives the
            // timer this task's waker; after that, a wake-up only needs to
            // ask whether it fired (polling it at every wait cost about
            // 150 instructions per request at depth 1). That one poll is
            // outside tokio's task budget: a timer polled with the budget
            // spent is not registered, and would never wake the task.
            let tick_polled = &mut self.tick_polled;
            let tick = std::future::poll_fn(|cx| {
                if !std::mem::replace(tick_polled, true) {
                    std::pin::pin!(tokio::task::unconstrained(release.as_mut())).poll(cx)
                } else if release.is_elapsed() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            let ready = self.stream.readable();
            let ready = async {
                match quiet_at {
                    Some(t) => tokio::time::timeout_at(t, ready).await.ok(),
                    None => Some(ready.await),
                }
            };
            tokio::select! {
                biased;
                r = ready => match r {
                    Some(r) => r?,
                    None => {
                        tracing::debug!(draining = shutdown.is_cancelled(), "connection quiet; closing");
                        return Ok(false);
                    }
                },
                // Wake up to switch to draining; the next read goes on.
                _ = cancelled.as_mut(), if !shutdown.is_cancelled() => return Ok(true),
                () = tick, if holding => {
                    if std::mem::take(&mut self.read_since_tick) {
                        release.as_mut().reset(tokio::time::Instant::now() + IDLE_RELEASE);
                        self.tick_polled = false;
                    } else {
                        self.release_idle();
                        self.release_armed = false;
                    }
                    continue;
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK {
                self.rbuf.reserve(READ_CHUNK);
                self.rbuf_grown |= self.rbuf.capacity() > KEEP_WHILE_WAITING;
            }
            // One poll of an async read rather than `try_read_buf`: a read
            // that leaves room in the buffer drained the socket, and the
            // async read then forgets the readiness, so the next wait goes
            // to the poller instead of trying a read that would block (one
            // wasted `recv` per request from a client that waits for its
            // replies).
            let mut read = std::pin::pin!(self.stream.read_buf(&mut self.rbuf));
            match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                Poll::Ready(Ok(n)) => {
                    self.shared.metrics.bytes_read.inc_by(n as u64);
                    self.read_since_tick = true;
                    return Ok(n > 0);
                }
                Poll::Ready(Err(e)) => return Err(e),
                // Readiness was stale: wait again.
                Poll::Pending => {}
            }
        }
    }

    /// Whether the connection holds memory that [`Self::release_idle`]
    /// gives back.
    fn holds_buffers(&self) -> bool {
        (self.rbuf.is_empty() && self.rbuf.capacity() > 0)
            || self.wbuf.capacity() > 0
            || self.spare_slots.capacity() > 0
            || self.spare_commands.capacity() > 0
    }

    /// Gives back the buffers and lists kept for the next request, once the
    /// connection has waited [`IDLE_RELEASE`] for its client: an idle
    /// connection then holds its task and socket alone. The start of a
    /// request still arriving stays in the read buffer.
    fn release_idle(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
            self.rbuf_grown = false;
        }
        self.wbuf = BytesMut::new();
        self.spare_slots = Vec::new();
        self.spare_commands = Vec::new();
    }

    /// Parses up to the pipeline depth of complete requests from the buffer.
    /// Returns the reply slots, the requests for the pipeline, and what to
    /// do once they are answered.
    fn take_batch(&mut self) -> (Vec<Slot>, Vec<Request>, Next) {
        let depth = self.shared.settings.max_pipeline_depth;
        let mut slots = std::mem::take(&mut self.spare_slots);
        // Sized like the spare slot list, the size of recent batches: at
        // depth 16 grown from empty, it was reallocated twice per batch.
        let mut requests = Vec::with_capacity(slots.capacity());
        loop {
            self.discard_skipped();
            if self.skip > 0 || self.rbuf.is_empty() {
                return (slots, requests, Next::Read);
            }
            if slots.len() >= depth {
                return (slots, requests, Next::Parse);
            }
            match parse_request(&self.rbuf, &self.shared.settings.limits) {
                Parsed::Incomplete => return (slots, requests, Next::Read),
                Parsed::Request {
                    request,
                    consumed,
                    skip,
                } => {
                    self.rbuf.advance(consumed);
                    self.skip = skip;
                    match request {
                        Incoming::Data(data) => {
                            slots.push(Slot::Pipeline {
                                noreply: data.noreply(),
                            });
                            requests.push(data);
                        }
                        Incoming::Conn(ConnRequest::Quit) => {
                            return (slots, requests, Next::Close);
                        }
                        Incoming::Conn(ConnRequest::Stats { args }) => {
                            slots.push(Slot::Stats(args));
                        }
                        Incoming::Admin(request) => slots.push(Slot::Admin(request)),
                        Incoming::Conn(conn) => {
                            if let Some(reply) = self.answer_conn(conn) {
                                slots.push(Slot::Ready(reply));
                            }
                        }
                    }
                }
                Parsed::Invalid {
                    error,
                    consumed,
                    noreply,
                    skip,
                } => {
                    self.rbuf.advance(consumed);
                    self.skip = skip;
                    self.count_client_error(error);
                    if !noreply {
                        slots.push(Slot::Ready(error.into()));
                    }
                }
                Parsed::Hangup => {
                    tracing::info!(
                        peer = %self.peer(),
                        conn_id = self.session.conn_id(),
                        "closing connection after an HTTP request line"
                    );
                    return (slots, requests, Next::Close);
                }
                Parsed::Fatal(error) => {
                    self.count_client_error(error);
                    tracing::info!(
                        peer = %self.peer(),
                        conn_id = self.session.conn_id(),
                        reply = error.line(),
                        "closing connection after a fatal request"
                    );
                    slots.push(Slot::Ready(error.into()));
                    return (slots, requests, Next::Close);
                }
            }
        }
    }

    /// Answers a connection request (`quit` excepted); `None` when the
    /// client asked for no reply.
    fn answer_conn(&self, request: ConnRequest) -> Option<Response> {
        match request {
            ConnRequest::Version => Some(Response::Version(super::version())),
            ConnRequest::Verbosity { level, noreply } => {
                self.shared.verbosity.store(level, Ordering::Relaxed);
                (!noreply).then_some(Response::Ok)
            }
            // Deferred to their turn (see `Slot::Stats`).
            ConnRequest::Stats { .. } | ConnRequest::Quit => None,
        }
    }

    fn discard_skipped(&mut self) {
        let n = self.skip.min(self.rbuf.len());
        self.rbuf.advance(n);
        self.skip -= n;
    }

    fn count_client_error(&self, error: ClientError) {
        let reply = Response::from(error).outcome();
        self.shared
            .metrics
            .client_errors
            .with_label_values(&[reply])
            .inc();
    }

    /// Runs the batch in segments of at most `key_budget` keys and writes
    /// every reply, in order (a get of more keys is answered in parts; see
    /// `stream_get`).
    async fn answer(&mut self, slots: Vec<Slot>, requests: Vec<Request>) -> std::io::Result<()> {
        // Given back at the last wait (`read_more`); replies grow it further.
        self.wbuf.reserve(READ_CHUNK);
        // The usual batch is one segment: run it as it is, without
        // splitting it into new lists.
        let one_segment = slots
            .iter()
            .all(|s| matches!(s, Slot::Pipeline { .. } | Slot::Ready(_)))
            && requests
                .iter()
                .map(|r| key_count(r).unwrap_or(0))
                .sum::<usize>()
                <= self.key_budget;
        if one_segment {
            self.run_segment(slots, requests).await?;
            return self.write_out().await;
        }
        let mut requests = requests.into_iter();
        let (mut seg_slots, mut seg_requests, mut seg_keys) = (Vec::new(), Vec::new(), 0);
        for slot in slots {
            let noreply = match slot {
                Slot::Pipeline { noreply } => noreply,
                Slot::Ready(_) => {
                    seg_slots.push(slot);
                    continue;
                }
                Slot::Stats(_) | Slot::Admin(_) => {
                    // Everything before it runs first.
                    let (slots, requests) = (
                        std::mem::take(&mut seg_slots),
                        std::mem::take(&mut seg_requests),
                    );
                    seg_keys = 0;
                    self.run_segment(slots, requests).await?;
                    self.answer_in_turn(slot).await;
                    continue;
                }
            };
            let Some(request) = requests.next() else {
                break;
            };
            let keys = key_count(&request).unwrap_or(0);
            if keys > self.key_budget || seg_keys + keys > self.key_budget {
                let (slots, requests) = (
                    std::mem::take(&mut seg_slots),
                    std::mem::take(&mut seg_requests),
                );
                seg_keys = 0;
                self.run_segment(slots, requests).await?;
                if keys > self.key_budget {
                    self.stream_get(request).await?;
                    continue;
                }
            }
            seg_keys += keys;
            seg_requests.push(request);
            seg_slots.push(Slot::Pipeline { noreply });
        }
        self.run_segment(seg_slots, seg_requests).await?;
        self.write_out().await
    }

    /// Runs `requests` through the pipeline once its estimated replies fit
    /// the node's reply budget. Returns the responses and the permit that
    /// holds their bytes until they are written; learns the size of values
    /// for the next fetch.
    async fn fetch(
        &mut self,
        requests: Vec<Request>,
    ) -> (Vec<Response>, Option<SemaphorePermit<'a>>) {
        let shared = self.shared;
        let node_budget = shared.settings.node_reply_buffer_bytes;
        let keys: usize = requests.iter().filter_map(key_count).sum();
        let estimate = (keys * value_footprint(self.value_estimate)
            + requests.len() * MIN_REPLY_ESTIMATE)
            .min(node_budget);
        let mut permit = reserve(shared, estimate).await;
        let responses = shared.pipeline.execute(&mut self.session, requests).await;
        let (bytes, largest) = reply_footprint(&responses);
        if bytes.min(node_budget) > estimate {
            // Give back, then wait for the whole: never hold some permits
            // while waiting for more (two connections could wait on each
            // other).
            drop(permit.take());
            permit = reserve(shared, bytes.min(node_budget)).await;
        }
        if keys > 0 {
            self.set_estimate(largest.max(self.value_estimate / 4));
        }
        (responses, permit)
    }

    /// Runs consecutive requests as one pipeline batch and writes their
    /// replies, with the ready ones among them, in order (the last of them
    /// may stay buffered, below `connection_reply_buffer_bytes`).
    async fn run_segment(
        &mut self,
        mut slots: Vec<Slot>,
        requests: Vec<Request>,
    ) -> std::io::Result<()> {
        let mut commands = std::mem::take(&mut self.spare_commands);
        commands.extend(
            requests
                .iter()
                .map(|r| (r.command(), key_count(r), CountedAs::of(r))),
        );
        let (mut responses, _permit) = if requests.is_empty() {
            (Vec::new().into_iter(), None)
        } else {
            let started = Instant::now();
            let (responses, permit) = self.fetch(requests).await;
            self.record(&commands, &responses, started.elapsed().as_secs_f64());
            (responses.into_iter(), permit)
        };
        keep_spare(&mut self.spare_commands, commands);
        // Pipeline slots are in request order, so responses are taken in turn.
        for slot in slots.drain(..) {
            match slot {
                Slot::Ready(r) => encode_response(&r, &mut self.wbuf),
                // `answer` never puts these in a segment.
                slot @ (Slot::Stats(_) | Slot::Admin(_)) => self.answer_in_turn(slot).await,
                Slot::Pipeline { noreply } => {
                    let r = responses
                        .next()
                        .unwrap_or_else(|| Response::server_error("no reply"));
                    if !noreply {
                        self.put_response(&r).await?;
                    }
                }
            }
            if self.buffered() >= self.shared.settings.connection_reply_buffer_bytes {
                self.write_out().await?;
            }
        }
        keep_spare(&mut self.spare_slots, slots);
        // Values are not held past the fetch (and its permit) that brought
        // them: they may keep a larger read buffer of the backend alive.
        if !self.values_out.is_empty() {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Answers a `stats` or admin slot into the write buffer, once the
    /// requests before it have run.
    async fn answer_in_turn(&mut self, slot: Slot) {
        let reply = match slot {
            Slot::Stats(args) => Some(super::stats::answer(self.shared, &args)),
            Slot::Admin(request) => {
                let reply = self.shared.pipeline.admin(&request).await;
                (!request.noreply()).then_some(reply)
            }
            Slot::Pipeline { .. } | Slot::Ready(_) => None,
        };
        if let Some(reply) = reply {
            encode_response(&reply, &mut self.wbuf);
        }
    }

    /// Adds `r` to the write buffer; a large value is queued to be written
    /// from where it is, in its place.
    async fn put_response(&mut self, r: &Response) -> std::io::Result<()> {
        let Response::Values(values) = r else {
            encode_response(r, &mut self.wbuf);
            return Ok(());
        };
        for v in values {
            self.put_value(v);
        }
        self.wbuf.extend_from_slice(b"END\r\n");
        Ok(())
    }

    /// Adds a value to the reply: copied into the write buffer, or, when
    /// large, queued to be written from where it is, so that the replies
    /// around it still leave in the same write (one wake-up of the client).
    fn put_value(&mut self, v: &crate::protocol::Value) {
        if v.data.len() < DIRECT_WRITE_BYTES {
            encode_value(v, &mut self.wbuf);
            return;
        }
        encode_value_header(v, &mut self.wbuf);
        self.values_out.push((self.wbuf.len(), v.data.clone()));
        self.values_out_bytes += v.data.len();
        self.wbuf.extend_from_slice(b"\r\n");
    }

    /// The reply bytes waiting to be written.
    fn buffered(&self) -> usize {
        self.wbuf.len() + self.values_out_bytes
    }

    /// A get of more keys than one fetch takes, fetched and written a part
    /// at a time so that the values held for one reply stay bounded
    /// (memcached streams such replies too). A failure before any of the
    /// reply was sent is answered with the error alone; after, it ends the
    /// reply with the error line and closes the connection, since the
    /// client cannot tell which keys it is missing.
    async fn stream_get(&mut self, request: Request) -> std::io::Result<()> {
        let command = request.command();
        let keys = match &request {
            Request::Get { keys, .. } | Request::Gat { keys, .. } => keys.clone(),
            _ => Vec::new(),
        };
        let started = Instant::now();
        let mut hits = 0;
        let mut done = 0;
        let (mark, writes_before) = (self.wbuf.len(), self.writes);
        while done < keys.len() {
            let chunk = &keys[done..(done + self.key_budget).min(keys.len())];
            let first = done == 0;
            done += chunk.len();
            let (mut reply, _permit) = self.fetch(vec![with_keys(&request, chunk.to_vec())]).await;
            match reply.pop() {
                Some(Response::Values(values)) => {
                    hits += values.len();
                    for v in &values {
                        self.put_value(v);
                    }
                }
                other => {
                    let error = other.unwrap_or_else(|| Response::server_error("no reply"));
                    self.record(
                        &[(command, None, CountedAs::Itself)],
                        std::slice::from_ref(&error),
                        started.elapsed().as_secs_f64(),
                    );
                    let unsent = first || self.writes == writes_before;
                    if unsent {
                        // Nothing of this reply has left: drop its values.
                        self.wbuf.truncate(mark);
                        while self.values_out.last().is_some_and(|(at, _)| *at > mark) {
                            if let Some((_, v)) = self.values_out.pop() {
                                self.values_out_bytes -= v.len();
                            }
                        }
                    }
                    encode_response(&error, &mut self.wbuf);
                    self.write_out().await?;
                    if unsent {
                        return Ok(());
                    }
                    return Err(std::io::Error::other(
                        "backend failed in the middle of a get",
                    ));
                }
            }
            // Large values are written before this part's permit goes.
            if !self.values_out.is_empty()
                || self.wbuf.len() >= self.shared.settings.connection_reply_buffer_bytes
            {
                self.write_out().await?;
            }
        }
        self.wbuf.extend_from_slice(b"END\r\n");
        let outcome = if hits == 0 { "miss" } else { "hit" };
        let elapsed = started.elapsed().as_secs_f64();
        self.handles.record(
            command,
            outcome,
            Some(elapsed),
            Some((hits, keys.len() - hits)),
        );
        Ok(())
    }

    /// Writes what is buffered, with the queued large values in their
    /// places.
    async fn write_out(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            let stall = self.shared.settings.write_stall_timeout;
            self.writes += 1;
            if self.values_out.is_empty() {
                write_all(&mut self.stream, &self.wbuf, stall).await?;
            } else {
                write_all_gathered(&mut self.stream, &self.wbuf, &self.values_out, stall).await?;
            }
            self.shared
                .metrics
                .bytes_written
                .inc_by(self.buffered() as u64);
            self.wbuf.clear();
            self.values_out.clear();
            self.values_out_bytes = 0;
            if self.wbuf.capacity() > KEEP_BUFFER {
                self.wbuf = BytesMut::with_capacity(READ_CHUNK);
            }
        }
        Ok(())
    }

    /// Counts the requests of one pipeline batch. A request alone in its
    /// batch is timed; a batch of several is timed once as a batch, since
    /// the time of each request in it is not known (see `metrics`).
    fn record(
        &mut self,
        commands: &[(Command, Option<usize>, CountedAs)],
        responses: &[Response],
        elapsed: f64,
    ) {
        let alone = commands.len() == 1;
        if !alone {
            self.handles.batch(elapsed);
        }
        for ((command, keys, counted_as), response) in commands.iter().zip(responses) {
            let keys = match (keys, response) {
                (Some(keys), Response::Values(values)) => {
                    Some((values.len(), keys.saturating_sub(values.len())))
                }
                _ => None,
            };
            let outcome = response.outcome();
            self.handles
                .record(*command, outcome, alone.then_some(elapsed), keys);
            if let Some(counter) = counted_as.counter(outcome) {
                self.handles.count_as(counter, 1);
            }
        }
    }
}

/// How memcached 1.6.18 counts a request beyond its own command (see
/// `Metrics::counted_as`).
#[derive(Debug, Clone, Copy)]
enum CountedAs {
    Itself,
    /// `mg` with `T`: a hit counts as a touch (`cmd_touch`, `touch_hits`)
    /// and not as a get; a miss stays a get miss.
    Touch,
    /// `ma`: a hit counts in `incr_hits` or `decr_hits`, a miss in
    /// `incr_misses` or `decr_misses`. memcached counts an `ma` whose `N`
    /// created the item as neither; memdial cannot tell a creation from a
    /// hit by the reply, and counts it as a hit.
    Arith {
        incr: bool,
    },
}

impl CountedAs {
    fn of(r: &Request) -> CountedAs {
        match r {
            Request::Meta(m) if m.cmd == MetaCmd::Get && m.flags.ttl.is_some() => CountedAs::Touch,
            Request::Meta(m) if m.cmd == MetaCmd::Arith => CountedAs::Arith {
                incr: m.increments().unwrap_or(true),
            },
            _ => CountedAs::Itself,
        }
    }

    /// The counter a request of this kind with `outcome` also moves.
    fn counter(self, outcome: &str) -> Option<&'static str> {
        match (self, outcome) {
            (CountedAs::Touch, "ok") => Some("touch_hits"),
            // A hidden (`q`) `ma` reply is a success.
            (CountedAs::Arith { incr: true }, "ok" | "quiet") => Some("incr_hits"),
            (CountedAs::Arith { incr: false }, "ok" | "quiet") => Some("decr_hits"),
            (CountedAs::Arith { incr: true }, "not_found") => Some("incr_misses"),
            (CountedAs::Arith { incr: false }, "not_found") => Some("decr_misses"),
            _ => None,
        }
    }
}

/// Metric handles resolved once per connection, on first use, so a request
/// costs no label lookups and no series exists for a command or outcome
/// never seen (labels are closed sets: commands and outcomes).
struct Handles {
    metrics: std::sync::Arc<Metrics>,
    /// Indexed by `Command as usize`.
    latency: Vec<Option<Histogram>>,
    /// A list, not a map: a connection sees a few pairs, and hashing the
    /// key on every request cost more than scanning them.
    requests: Vec<(Command, &'static str, IntCounter)>,
    hit: Option<IntCounter>,
    miss: Option<IntCounter>,
    counted_as: HashMap<&'static str, IntCounter>,
}

impl Handles {
    fn new(metrics: &std::sync::Arc<Metrics>) -> Handles {
        Handles {
            latency: vec![None; Command::ALL.len()],
            requests: Vec::new(),
            hit: None,
            miss: None,
            counted_as: HashMap::new(),
            metrics: metrics.clone(),
        }
    }

    /// Counts one request; `elapsed` is its time when it was timed alone,
    /// `keys` is (hits, misses) for the get family.
    fn record(
        &mut self,
        command: Command,
        outcome: &'static str,
        elapsed: Option<f64>,
        keys: Option<(usize, usize)>,
    ) {
        let metrics = &self.metrics;
        if let Some(elapsed) = elapsed {
            self.latency[command as usize]
                .get_or_insert_with(|| metrics.latency.with_label_values(&[command.as_str()]))
                .observe(elapsed);
        }
        match self
            .requests
            .iter()
            .find(|(c, o, _)| *c == command && *o == outcome)
        {
            Some((_, _, counter)) => counter.inc(),
            None => {
                let counter = metrics
                    .requests
                    .with_label_values(&[command.as_str(), outcome]);
                counter.inc();
                self.requests.push((command, outcome, counter));
            }
        }
        if let Some((hits, misses)) = keys {
            // memcached counts each key of a gat as a touch, not a get.
            if matches!(command, Command::Gat | Command::Gats) {
                self.count_as("touch_hits", hits as u64);
                self.count_as("touch_misses", misses as u64);
            }
            let metrics = &self.metrics;
            let keys = &metrics.get_keys;
            if hits > 0 {
                self.hit
                    .get_or_insert_with(|| keys.with_label_values(&["hit"]))
                    .inc_by(hits as u64);
            }
            if misses > 0 {
                self.miss
                    .get_or_insert_with(|| keys.with_label_values(&["miss"]))
                    .inc_by(misses as u64);
            }
        }
    }

    /// Counts `n` under another command's counter as well.
    fn count_as(&mut self, counter: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        let metrics = &self.metrics;
        self.counted_as
            .entry(counter)
            .or_insert_with(|| metrics.counted_as.with_label_values(&[counter]))
            .inc_by(n);
    }

    /// Times one batch of several requests.
    fn batch(&self, elapsed: f64) {
        self.metrics.batch_latency.observe(elapsed);
    }
}

/// Keeps `list`, emptied, in `spare` for the next batch, unless a deep
/// pipeline grew it: an idle connection holds a few entries at most.
fn keep_spare<T>(spare: &mut Vec<T>, mut list: Vec<T>) {
    const SPARE_MAX: usize = 16;
    if list.capacity() <= SPARE_MAX {
        list.clear();
        *spare = list;
    }
}

/// Before a connection waits for its client: gives back the memory of
/// `buf` that grew past `keep` (`grown`, or its capacity, says so) and that what it holds does not need. Empty, it is dropped
/// whole (the next read takes a `READ_CHUNK`); holding less than a
/// `READ_CHUNK`, the start of the next request, it is copied into a fresh
/// buffer with a `READ_CHUNK` of room. Anything else is kept: a buffer of
/// the usual size (dropping it on every wait cost 5-10 % of the requests
/// per CPU-second at depth 1; `docs/BENCHMARKS.md`), and a large request
/// still arriving.
fn release_for_wait(buf: &mut BytesMut, grown: &mut bool, keep: usize) {
    let large = *grown || buf.capacity() > keep;
    if !large {
        return;
    }
    if buf.is_empty() {
        *buf = BytesMut::new();
        *grown = false;
    } else if buf.len() < READ_CHUNK {
        let mut fresh = BytesMut::with_capacity(buf.len() + READ_CHUNK);
        fresh.extend_from_slice(buf);
        *buf = fresh;
        *grown = false;
    }
}

/// What `responses` are counted as holding against the node's reply
/// budget until they are written (a value by its [`value_footprint`], so a
/// large one shared from a backend's read buffer counts that buffer), and
/// the longest value among them.
fn reply_footprint(responses: &[Response]) -> (usize, usize) {
    let (mut bytes, mut largest) = (0, 0);
    for r in responses {
        bytes += MIN_REPLY_ESTIMATE;
        match r {
            Response::Values(values) => {
                for v in values {
                    bytes += value_footprint(v.data.len()) + v.key.len();
                    largest = largest.max(v.data.len());
                }
            }
            Response::Meta(m) => bytes += m.value.as_ref().map_or(0, |v| value_footprint(v.len())),
            _ => {}
        }
    }
    (bytes, largest)
}

/// Takes `bytes` permits of the node's reply budget, waiting while other
/// connections hold it. `None` when there is nothing to take.
async fn reserve(shared: &Shared, bytes: usize) -> Option<SemaphorePermit<'_>> {
    let n = u32::try_from(bytes).unwrap_or(u32::MAX);
    if n == 0 {
        return None;
    }
    // The semaphore is never closed, so acquiring cannot fail.
    shared.reply_bytes.acquire_many(n).await.ok()
}

/// Writes all of `buf`; fails with `TimedOut` when a write makes no
/// progress for `stall` (the client takes none of its replies).
async fn write_all(
    stream: &mut TcpStream,
    mut buf: &[u8],
    stall: Option<Duration>,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = progress(stream.write(buf), stall).await?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Writes `buf` with each of `values` at its offset in `buf`, gathered
/// into as few writes as the socket takes, with `write_all`'s stall bound
/// on each.
async fn write_all_gathered(
    stream: &mut TcpStream,
    buf: &[u8],
    values: &[(usize, Bytes)],
    stall: Option<Duration>,
) -> std::io::Result<()> {
    let mut slices = gather(buf, values);
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = progress(stream.write_vectored(slices), stall).await?;
        std::io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// `buf` cut at the offsets of `values` (in order) with each value between
/// its two parts; no empty slice.
fn gather<'b>(buf: &'b [u8], values: &'b [(usize, Bytes)]) -> Vec<std::io::IoSlice<'b>> {
    let mut slices = Vec::with_capacity(2 * values.len() + 1);
    let mut from = 0;
    for (at, value) in values {
        if *at > from {
            slices.push(std::io::IoSlice::new(&buf[from..*at]));
        }
        slices.push(std::io::IoSlice::new(value));
        from = *at;
    }
    if buf.len() > from {
        slices.push(std::io::IoSlice::new(&buf[from..]));
    }
    slices
}

/// One socket write of at least a byte, or `TimedOut` when it makes no
/// progress for `stall`.
async fn progress(
    write: impl std::future::Future<Output = std::io::Result<usize>>,
    stall: Option<Duration>,
) -> std::io::Result<usize> {
    let mut write = std::pin::pin!(write);
    // Most writes finish at once: only a write that has to wait arms the
    // stall timer (which costs a clock read and a timer entry).
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    let n = match (first, stall) {
        (Poll::Ready(n), _) => n?,
        (Poll::Pending, None) => write.await?,
        (Poll::Pending, Some(d)) => match tokio::time::timeout(d, write).await {
            Ok(n) => n?,
            // Logged where the connection ends, which knows its peer.
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        },
    };
    if n == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

/// The same get-family request for other keys.
fn with_keys(request: &Request, keys: Vec<bytes::Bytes>) -> Request {
    match request {
        Request::Gat { exptime, cas, .. } => Request::Gat {
            exptime: *exptime,
            keys,
            cas: *cas,
        },
        Request::Get { cas, .. } => Request::Get { keys, cas: *cas },
        other => other.clone(),
    }
}

/// How many keys a get-family request looks up.
fn key_count(r: &Request) -> Option<usize> {
    match r {
        Request::Get { keys, .. } | Request::Gat { keys, .. } => Some(keys.len()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A value long enough to be shared from a backend's read buffer counts
    // that buffer too; a shorter one counts its own length.
    #[test]
    fn replies_count_shared_values_with_their_read_buffer() {
        use crate::protocol::SHARED_VALUE_MIN;
        let value = |len: usize| crate::protocol::Value {
            key: Bytes::from_static(b"key"),
            flags: 0,
            data: Bytes::from(vec![b'v'; len]),
            cas: None,
        };
        let short = SHARED_VALUE_MIN - 1;
        let (bytes, largest) = reply_footprint(&[
            Response::Values(vec![value(short), value(SHARED_VALUE_MIN)]),
            Response::Stored,
        ]);
        let shared = value_footprint(SHARED_VALUE_MIN);
        assert!(
            shared > SHARED_VALUE_MIN,
            "a shared value counts its buffer"
        );
        assert_eq!(
            bytes,
            2 * MIN_REPLY_ESTIMATE + short + 3 + shared + 3,
            "the shared value's buffer is not counted"
        );
        assert_eq!(largest, SHARED_VALUE_MIN);

        let mut meta = crate::protocol::MetaReply::new(crate::protocol::MetaCode::Va, "");
        meta.value = Some(Bytes::from(vec![b'v'; SHARED_VALUE_MIN]));
        let (bytes, largest) = reply_footprint(&[Response::Meta(meta)]);
        assert_eq!(bytes, MIN_REPLY_ESTIMATE + shared);
        // Only `get` values teach the connection their size.
        assert_eq!(largest, 0);
    }

    #[test]
    fn gathered_values_sit_at_their_offsets_with_no_empty_slice() {
        let joined = |slices: &[std::io::IoSlice<'_>]| -> Vec<u8> {
            assert!(slices.iter().all(|s| !s.is_empty()));
            slices.iter().flat_map(|s| s.to_vec()).collect()
        };
        let buf = b"H1\r\n\r\nH2\r\n\r\nEND\r\n";
        let values = [
            (4, Bytes::from_static(b"one")),
            (10, Bytes::from_static(b"two")),
        ];
        let slices = gather(buf, &values);
        assert_eq!(slices.len(), 5);
        assert_eq!(joined(&slices), b"H1\r\none\r\nH2\r\ntwo\r\nEND\r\n");
        // A value at the very start, two in a row, one at the very end.
        let values = [
            (0, Bytes::from_static(b"a")),
            (2, Bytes::from_static(b"b")),
            (2, Bytes::from_static(b"c")),
            (4, Bytes::from_static(b"d")),
        ];
        let slices = gather(b"xxyy", &values);
        assert_eq!(slices.len(), 6);
        assert_eq!(joined(&slices), b"axxbcyyd");
    }

    #[test]
    fn a_connection_waiting_with_nothing_buffered_holds_no_grown_buffer() {
        // The usual size: kept, not allocated again for the next request.
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.extend_from_slice(b"get a\r\n");
        buf.advance(7);
        let mut grown = false;
        release_for_wait(&mut buf, &mut grown, KEEP_WHILE_WAITING);
        assert!(buf.capacity() >= READ_CHUNK - 7, "{}", buf.capacity());

        // Grown by a large request, then consumed to the end.
        let mut buf = BytesMut::new();
        buf.resize(1 << 20, b'v');
        buf.advance(1 << 20);
        let mut grown = true;
        release_for_wait(&mut buf, &mut grown, KEEP_WHILE_WAITING);
        assert_eq!(buf.capacity(), 0);
        assert!(!grown);
    }

    #[test]
    fn a_grown_buffer_holding_the_start_of_a_request_is_cut_back() {
        let mut buf = BytesMut::new();
        buf.resize(1 << 20, b'v');
        buf.extend_from_slice(b"get next");
        buf.advance(1 << 20);
        // The capacity left after the consumed part no longer shows the
        // allocation's size; `grown` does.
        let mut grown = true;
        release_for_wait(&mut buf, &mut grown, KEEP_WHILE_WAITING);
        assert_eq!(&buf[..], b"get next");
        assert!(buf.capacity() <= READ_CHUNK + 8, "{}", buf.capacity());
        assert!(!grown);

        // Seen from its capacity alone too.
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.extend_from_slice(b"get next");
        release_for_wait(&mut buf, &mut false, KEEP_WHILE_WAITING);
        assert!(buf.capacity() <= READ_CHUNK + 8, "{}", buf.capacity());
    }

    #[test]
    fn a_buffer_a_request_still_needs_is_kept() {
        // Small: kept as it is (no copy on every wait of a pipelining
        // client).
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.extend_from_slice(b"get ne");
        let at = buf.as_ptr();
        release_for_wait(&mut buf, &mut false, KEEP_WHILE_WAITING);
        assert_eq!(buf.as_ptr(), at);

        // A large value still arriving: kept whole.
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.resize(READ_CHUNK * 4, b'v');
        let mut grown = true;
        release_for_wait(&mut buf, &mut grown, KEEP_WHILE_WAITING);
        assert_eq!(buf.len(), READ_CHUNK * 4);
        assert!(buf.capacity() >= 1 << 20);
    }
}
