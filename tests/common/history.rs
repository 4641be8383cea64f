//! Histories of memcached operations recorded by concurrent test clients,
//! and the checkers that judge them (issue 7, part 7):
//!
//! - [`linearizable::check`]: is there one order of the operations, each
//!   taking effect at an instant between its invoke and its complete time,
//!   that a single memcached would have answered exactly as the cluster did?
//!   A Wing–Gong search with Lowe's memoisation, run per key.
//! - [`session::check_sequential`]: did every replica apply the same write
//!   order, did every connection's reads move only forward in it, and did
//!   each connection read its own writes?
//!
//! Both run on the same [`History`]; the one-key sequential specification
//! both of them use is [`model::KeyState`]. The rules are written here again
//! on purpose (as `record.rs` does for the header): the checkers test the
//! cluster against this text, not against `src/rules.rs`.
//!
//! ## Outcomes
//!
//! A client sees one of three things ([`Outcome`]):
//!
//! | outcome | meaning | linearizability checker |
//! |---|---|---|
//! | `Ok(reply)` | the reply arrived | must be placed between invoke and complete and answer `reply` |
//! | `Failed` | definitely not applied (e.g. the node said so before proposing) | dropped: it never happened |
//! | `Unknown` | no answer (timeout, connection lost) | may be placed anywhere after invoke (complete = +∞), or nowhere; any reply |
//!
//! An unknown read carries no information and is dropped too.
//!
//! ## What the harness must do
//!
//! - Use keys nobody wrote before the run (the model starts every key
//!   missing), and make written values unique where it can: a read of a
//!   unique value names its write, which keeps the search narrow.
//! - Stamp times from one [`Clock`] (a [`Recorder`] does): invoke before the
//!   request's first byte is sent, complete after the reply's last byte.
//! - Give a connection that timed out a new `conn` id if it reconnects; a
//!   connection's operations must not overlap.
//! - Not use flags, exptime, `touch`/`gat` or `noreply`: the model has none.

pub mod linearizable;
pub mod model;
pub mod session;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

/// Index of an operation in its [`History`].
pub type OpId = usize;

/// Monotonic time in nanoseconds since the recording [`Clock`] started.
pub type Nanos = u64;

/// A monotonic clock shared by every recording client, so that invoke and
/// complete times of different clients compare.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    /// Nanoseconds since [`Clock::start`]; saturates rather than wraps.
    pub fn now(&self) -> Nanos {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A command as the client sent it. Data blocks are the client's bytes;
/// flags and exptime are not modelled (the harness uses 0 for both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Get,
    /// `gets`: like `get`, and the reply carries the CAS token.
    Gets,
    Set(Vec<u8>),
    Add(Vec<u8>),
    Replace(Vec<u8>),
    Append(Vec<u8>),
    Prepend(Vec<u8>),
    /// `cas` with the token a `gets` returned (or any token: an invented
    /// one simply never matches).
    Cas {
        data: Vec<u8>,
        token: u64,
    },
    Incr(u64),
    Decr(u64),
    Delete,
}

impl Call {
    /// Whether the command may change the key (whatever it answered).
    pub fn is_write(&self) -> bool {
        !matches!(self, Call::Get | Call::Gets)
    }
}

/// The reply to one command, for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `VALUE` with its data; `token` is `Some` for `gets`.
    Hit {
        data: Vec<u8>,
        token: Option<u64>,
    },
    /// `END` with no `VALUE`.
    Miss,
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    /// The new value of `incr`/`decr`.
    Number(u64),
    /// `CLIENT_ERROR cannot increment or decrement non-numeric value`.
    NonNumeric,
}

/// What the client learnt about its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The reply arrived.
    Ok(Reply),
    /// Definitely did not take effect.
    Failed,
    /// May or may not have taken effect; the reply never came.
    Unknown,
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub id: OpId,
    /// The connection (session) that sent it. A connection's operations do
    /// not overlap in time.
    pub conn: u64,
    pub key: Vec<u8>,
    /// Before the first byte of the request was written.
    pub invoke: Nanos,
    /// After the last byte of the reply was read. For `Unknown`, when the
    /// client gave up; the checkers treat it as +∞.
    pub complete: Nanos,
    pub call: Call,
    pub outcome: Outcome,
}

impl Op {
    /// The reply, when it arrived.
    pub fn reply(&self) -> Option<&Reply> {
        match &self.outcome {
            Outcome::Ok(reply) => Some(reply),
            Outcome::Failed | Outcome::Unknown => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} conn {} {:?} {} [{}, {}] -> {}",
            self.id,
            self.conn,
            Printable(&self.key),
            CallText(&self.call),
            self.invoke,
            match self.outcome {
                Outcome::Unknown => "inf".to_string(),
                _ => self.complete.to_string(),
            },
            OutcomeText(&self.outcome),
        )
    }
}

/// All operations of one run, in the order they were recorded.
#[derive(Debug, Clone, Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// Records an operation and returns its id.
    ///
    /// # Panics
    /// When `complete < invoke` for an operation whose reply arrived: the
    /// recorder's clock is broken and no verdict would mean anything.
    pub fn push(
        &mut self,
        conn: u64,
        key: impl Into<Vec<u8>>,
        invoke: Nanos,
        complete: Nanos,
        call: Call,
        outcome: Outcome,
    ) -> OpId {
        assert!(
            invoke <= complete || outcome == Outcome::Unknown,
            "operation completes ({complete}) before it is invoked ({invoke})"
        );
        let id = self.ops.len();
        self.ops.push(Op {
            id,
            conn,
            key: key.into(),
            invoke,
            complete,
            call,
            outcome,
        });
        id
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn op(&self, id: OpId) -> &Op {
        &self.ops[id]
    }

    /// For tests that break a recorded history on purpose.
    pub fn op_mut(&mut self, id: OpId) -> &mut Op {
        &mut self.ops[id]
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations of each key, in recording order. Keys are independent
    /// in memcached (no command touches two keys' values), so each key is
    /// checked alone: the history is linearizable iff every key's is.
    pub fn by_key(&self) -> BTreeMap<&[u8], Vec<&Op>> {
        let mut keys: BTreeMap<&[u8], Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            keys.entry(op.key.as_slice()).or_default().push(op);
        }
        keys
    }

    /// The operations of each connection, in invoke order.
    pub fn by_conn(&self) -> BTreeMap<u64, Vec<&Op>> {
        let mut conns: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            conns.entry(op.conn).or_default().push(op);
        }
        for ops in conns.values_mut() {
            ops.sort_by_key(|op| (op.invoke, op.id));
        }
        conns
    }

    /// The storage command that wrote exactly `data` to `key`: how a harness
    /// that writes unique values maps a replica's log entry back to an
    /// operation. `None` when no such operation, or more than one.
    pub fn writer_of(&self, key: &[u8], data: &[u8]) -> Option<OpId> {
        self.writers().get(key, data)
    }

    /// [`Self::writer_of`] for many lookups: every storage command indexed
    /// once by key and data.
    pub fn writers(&self) -> Writers<'_> {
        let mut by: std::collections::HashMap<(&[u8], &[u8]), Option<OpId>> =
            std::collections::HashMap::new();
        for op in &self.ops {
            if let Call::Set(d) | Call::Add(d) | Call::Replace(d) | Call::Cas { data: d, .. } =
                &op.call
            {
                by.entry((op.key.as_slice(), d.as_slice()))
                    .and_modify(|w| *w = None)
                    .or_insert(Some(op.id));
            }
        }
        Writers(by)
    }
}

/// Storage commands by key and data ([`History::writers`]); a pair that
/// more than one wrote maps to `None`.
pub struct Writers<'a>(std::collections::HashMap<(&'a [u8], &'a [u8]), Option<OpId>>);

impl Writers<'_> {
    pub fn get(&self, key: &[u8], data: &[u8]) -> Option<OpId> {
        self.0.get(&(key, data)).copied().flatten()
    }
}

/// A history that many client threads record into at once, on one
/// [`Clock`]: take `invoke()` before sending, call `record` once the reply
/// arrived (or the client gave up), which stamps the complete time.
#[derive(Debug)]
pub struct Recorder {
    clock: Clock,
    history: Mutex<History>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            clock: Clock::start(),
            history: Mutex::new(History::new()),
        }
    }

    /// The invoke time of an operation about to be sent.
    pub fn invoke(&self) -> Nanos {
        self.clock.now()
    }

    /// Records an operation invoked at `invoke` that completes now.
    pub fn record(
        &self,
        conn: u64,
        key: impl Into<Vec<u8>>,
        invoke: Nanos,
        call: Call,
        outcome: Outcome,
    ) -> OpId {
        let complete = self.clock.now();
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(conn, key, invoke, complete, call, outcome)
    }

    /// The history recorded so far.
    pub fn history(&self) -> History {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Bytes shown as text where printable, escaped elsewhere.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Debug for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

struct CallText<'a>(&'a Call);

impl fmt::Display for CallText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Call::Get => write!(f, "get"),
            Call::Gets => write!(f, "gets"),
            Call::Set(d) => write!(f, "set {:?}", Printable(d)),
            Call::Add(d) => write!(f, "add {:?}", Printable(d)),
            Call::Replace(d) => write!(f, "replace {:?}", Printable(d)),
            Call::Append(d) => write!(f, "append {:?}", Printable(d)),
            Call::Prepend(d) => write!(f, "prepend {:?}", Printable(d)),
            Call::Cas { data, token } => write!(f, "cas {:?} token {token}", Printable(data)),
            Call::Incr(n) => write!(f, "incr {n}"),
            Call::Decr(n) => write!(f, "decr {n}"),
            Call::Delete => write!(f, "delete"),
        }
    }
}

struct OutcomeText<'a>(&'a Outcome);

impl fmt::Display for OutcomeText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Outcome::Failed => write!(f, "FAILED"),
            Outcome::Unknown => write!(f, "UNKNOWN"),
            Outcome::Ok(Reply::Hit { data, token: None }) => write!(f, "{:?}", Printable(data)),
            Outcome::Ok(Reply::Hit {
                data,
                token: Some(t),
            }) => write!(f, "{:?} token {t}", Printable(data)),
            Outcome::Ok(Reply::Miss) => write!(f, "miss"),
            Outcome::Ok(Reply::Stored) => write!(f, "STORED"),
            Outcome::Ok(Reply::NotStored) => write!(f, "NOT_STORED"),
            Outcome::Ok(Reply::Exists) => write!(f, "EXISTS"),
            Outcome::Ok(Reply::NotFound) => write!(f, "NOT_FOUND"),
            Outcome::Ok(Reply::Deleted) => write!(f, "DELETED"),
            Outcome::Ok(Reply::Number(n)) => write!(f, "{n}"),
            Outcome::Ok(Reply::NonNumeric) => write!(f, "CLIENT_ERROR non-numeric"),
        }
    }
}
