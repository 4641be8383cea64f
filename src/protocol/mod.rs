//! The memcached text protocol, with no I/O: request and response types,
//! the limits a request is checked against, the streaming request parser,
//! the encoders, and the parser for a backend's replies.
//!
//! May use: `bytes`, `nom`, and `serde`'s derives (a Raft log carries data
//! requests and their replies). Nothing else in the crate.

mod encode;
mod error;
mod limits;
mod meta;
mod parse;
mod reply;

pub use encode::{
    encode_admin_request, encode_conn_request, encode_request, encode_response, encode_value,
    encode_value_header,
};
pub use error::ClientError;
pub use limits::Limits;
pub use meta::{
    ItemView, MetaCmd, MetaCode, MetaFlags, MetaReply, MetaRequest, SetMode, TtlChanges,
    base64_decode, base64_encode,
};
pub use parse::{Parsed, parse_request};
pub use reply::{
    BACKEND_IDLE_BUFFER_MAX, ReplyBuffer, ReplyParsed, SHARED_VALUE_MIN, parse_reply, reply_shape,
    value_footprint,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The storage commands that carry a data block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StoreOp {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    /// `cas`: store only if the item's CAS unique still equals the given one.
    Cas,
}

impl StoreOp {
    pub fn name(self) -> &'static str {
        match self {
            StoreOp::Set => "set",
            StoreOp::Add => "add",
            StoreOp::Replace => "replace",
            StoreOp::Append => "append",
            StoreOp::Prepend => "prepend",
            StoreOp::Cas => "cas",
        }
    }
}

/// `incr` or `decr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArithOp {
    Incr,
    Decr,
}

/// The expiry a client sent, as memcached reads it: 0 never expires, a
/// negative value is already expired, up to 30 days is relative seconds, more
/// is an absolute unix time. Resolved to a deadline by whoever stores it.
pub type Exptime = i64;

/// The longest relative exptime, in seconds; larger values are unix times.
pub const REALTIME_MAXDELTA: i64 = 60 * 60 * 24 * 30;

/// What a client sent: a data request, which the consistency pipeline
/// answers, or a connection request, which the server answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Data(Request),
    Conn(ConnRequest),
    Admin(AdminRequest),
}

impl Incoming {
    /// A short, closed label for metrics and logs.
    pub fn command(&self) -> Command {
        match self {
            Incoming::Data(r) => r.command(),
            Incoming::Conn(r) => r.command(),
            Incoming::Admin(r) => r.command(),
        }
    }
}

impl From<Request> for Incoming {
    fn from(r: Request) -> Incoming {
        Incoming::Data(r)
    }
}

impl From<ConnRequest> for Incoming {
    fn from(r: ConnRequest) -> Incoming {
        Incoming::Conn(r)
    }
}

/// A data request: it reads or writes keys, so it goes through the
/// consistency pipeline to a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// `get`/`gets` (`cas` true for `gets`).
    Get {
        keys: Vec<Bytes>,
        cas: bool,
    },
    /// `gat`/`gats`: get and touch.
    Gat {
        exptime: Exptime,
        keys: Vec<Bytes>,
        cas: bool,
    },
    /// `set add replace append prepend cas`.
    Store {
        op: StoreOp,
        key: Bytes,
        flags: u32,
        exptime: Exptime,
        data: Bytes,
        /// The CAS unique of a `cas` command; 0 for the others.
        cas_unique: u64,
        noreply: bool,
    },
    /// A storage command whose declared length exceeds the item size limit.
    /// memcached answers `SERVER_ERROR object too large for cache`, discards
    /// the data block, and for `set` also removes the key so stale data does
    /// not outlive the failed write.
    TooLarge {
        op: StoreOp,
        key: Bytes,
        noreply: bool,
    },
    Arith {
        op: ArithOp,
        key: Bytes,
        delta: u64,
        noreply: bool,
    },
    Delete {
        key: Bytes,
        noreply: bool,
    },
    Touch {
        key: Bytes,
        exptime: Exptime,
        noreply: bool,
    },
    /// `flush_all [delay] [noreply]`.
    FlushAll {
        delay: Option<Exptime>,
        noreply: bool,
    },
    /// `mg ms md ma me` (boxed: it is the largest request).
    Meta(Box<MetaRequest>),
    /// `mn`: answered `MN` in turn, after every request before it.
    MetaNoop,
}

/// A request about the connection or the node, answered by the server
/// without a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnRequest {
    Version,
    Verbosity {
        level: u32,
        noreply: bool,
    },
    /// `stats [group ...]`.
    Stats {
        args: Vec<Bytes>,
    },
    Quit,
}

/// A request about the node's own store rather than its keys: memcached's
/// slab and LRU introspection and tuning. Never replicated: through a
/// cluster node it reads or changes that node's store alone. The parser
/// lets through only arguments memcached accepts; its refusals are answered
/// by the parser's error lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// `stats items`, `stats slabs`, `stats sizes`.
    Stats(StoreStats),
    /// `stats cachedump <class> <limit>` (class below 64; limit 0 for all).
    CacheDump { class: u32, limit: u32 },
    /// `cache_memlimit <megabytes> [noreply]` (8 to 1,000,000,000).
    MemLimit { megabytes: u32, noreply: bool },
    /// `slabs automove <0|1|2> [noreply]` or `slabs automove ratio <r>`.
    SlabsAutomove { setting: Automove, noreply: bool },
}

/// The `stats` groups about a store's slabs and items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreStats {
    Items,
    Slabs,
    Sizes,
}

/// What `slabs automove` sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Automove {
    /// 0 off, 1 or 2 on.
    Level(u8),
    /// `ratio <r>`, the number as sent (it parsed as a float).
    Ratio(String),
}

impl AdminRequest {
    /// True when the client asked for no reply.
    pub fn noreply(&self) -> bool {
        match self {
            AdminRequest::MemLimit { noreply, .. }
            | AdminRequest::SlabsAutomove { noreply, .. } => *noreply,
            AdminRequest::Stats(_) | AdminRequest::CacheDump { .. } => false,
        }
    }

    pub fn command(&self) -> Command {
        match self {
            AdminRequest::Stats(_) | AdminRequest::CacheDump { .. } => Command::Stats,
            AdminRequest::MemLimit { .. } => Command::CacheMemlimit,
            AdminRequest::SlabsAutomove { .. } => Command::Slabs,
        }
    }

    /// The request line as memcached reads it, `\r\n` included and
    /// `noreply` left out (so that a forwarded request earns its reply).
    pub fn line(&self) -> String {
        match self {
            AdminRequest::Stats(StoreStats::Items) => "stats items\r\n".into(),
            AdminRequest::Stats(StoreStats::Slabs) => "stats slabs\r\n".into(),
            AdminRequest::Stats(StoreStats::Sizes) => "stats sizes\r\n".into(),
            AdminRequest::CacheDump { class, limit } => {
                format!("stats cachedump {class} {limit}\r\n")
            }
            AdminRequest::MemLimit { megabytes, .. } => format!("cache_memlimit {megabytes}\r\n"),
            AdminRequest::SlabsAutomove {
                setting: Automove::Level(l),
                ..
            } => format!("slabs automove {l}\r\n"),
            AdminRequest::SlabsAutomove {
                setting: Automove::Ratio(r),
                ..
            } => format!("slabs automove ratio {r}\r\n"),
        }
    }
}

impl ConnRequest {
    pub fn command(&self) -> Command {
        match self {
            ConnRequest::Version => Command::Version,
            ConnRequest::Verbosity { .. } => Command::Verbosity,
            ConnRequest::Stats { .. } => Command::Stats,
            ConnRequest::Quit => Command::Quit,
        }
    }
}

impl Request {
    /// True when the client asked for no reply.
    pub fn noreply(&self) -> bool {
        match self {
            Request::Store { noreply, .. }
            | Request::TooLarge { noreply, .. }
            | Request::Arith { noreply, .. }
            | Request::Delete { noreply, .. }
            | Request::Touch { noreply, .. }
            | Request::FlushAll { noreply, .. } => *noreply,
            // A meta request's `q` hides some replies and not others: the
            // store answers [`Response::Quiet`] for those it hides.
            Request::Get { .. } | Request::Gat { .. } | Request::Meta(_) | Request::MetaNoop => {
                false
            }
        }
    }

    /// A short, closed label for metrics and logs.
    pub fn command(&self) -> Command {
        match self {
            Request::Get { cas: false, .. } => Command::Get,
            Request::Get { cas: true, .. } => Command::Gets,
            Request::Gat { cas: false, .. } => Command::Gat,
            Request::Gat { cas: true, .. } => Command::Gats,
            Request::Store { op, .. } | Request::TooLarge { op, .. } => match op {
                StoreOp::Set => Command::Set,
                StoreOp::Add => Command::Add,
                StoreOp::Replace => Command::Replace,
                StoreOp::Append => Command::Append,
                StoreOp::Prepend => Command::Prepend,
                StoreOp::Cas => Command::Cas,
            },
            Request::Arith {
                op: ArithOp::Incr, ..
            } => Command::Incr,
            Request::Arith {
                op: ArithOp::Decr, ..
            } => Command::Decr,
            Request::Delete { .. } => Command::Delete,
            Request::Touch { .. } => Command::Touch,
            Request::FlushAll { .. } => Command::FlushAll,
            Request::Meta(m) => match m.cmd {
                MetaCmd::Get => Command::MetaGet,
                MetaCmd::Set => Command::MetaSet,
                MetaCmd::Delete => Command::MetaDelete,
                MetaCmd::Arith => Command::MetaArith,
                MetaCmd::Debug => Command::MetaDebug,
            },
            Request::MetaNoop => Command::MetaNoop,
        }
    }
}

/// Every command name, as a closed set for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Get,
    Gets,
    Gat,
    Gats,
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas,
    Incr,
    Decr,
    Delete,
    Touch,
    FlushAll,
    Version,
    Verbosity,
    Stats,
    Quit,
    MetaGet,
    MetaSet,
    MetaDelete,
    MetaArith,
    MetaNoop,
    MetaDebug,
    CacheMemlimit,
    Slabs,
}

impl Command {
    /// Every command, in declaration order (so `ALL[c as usize] == c`).
    pub const ALL: [Command; 27] = [
        Command::Get,
        Command::Gets,
        Command::Gat,
        Command::Gats,
        Command::Set,
        Command::Add,
        Command::Replace,
        Command::Append,
        Command::Prepend,
        Command::Cas,
        Command::Incr,
        Command::Decr,
        Command::Delete,
        Command::Touch,
        Command::FlushAll,
        Command::Version,
        Command::Verbosity,
        Command::Stats,
        Command::Quit,
        Command::MetaGet,
        Command::MetaSet,
        Command::MetaDelete,
        Command::MetaArith,
        Command::MetaNoop,
        Command::MetaDebug,
        Command::CacheMemlimit,
        Command::Slabs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Get => "get",
            Command::Gets => "gets",
            Command::Gat => "gat",
            Command::Gats => "gats",
            Command::Set => "set",
            Command::Add => "add",
            Command::Replace => "replace",
            Command::Append => "append",
            Command::Prepend => "prepend",
            Command::Cas => "cas",
            Command::Incr => "incr",
            Command::Decr => "decr",
            Command::Delete => "delete",
            Command::Touch => "touch",
            Command::FlushAll => "flush_all",
            Command::Version => "version",
            Command::Verbosity => "verbosity",
            Command::Stats => "stats",
            Command::Quit => "quit",
            Command::MetaGet => "mg",
            Command::MetaSet => "ms",
            Command::MetaDelete => "md",
            Command::MetaArith => "ma",
            Command::MetaNoop => "mn",
            Command::MetaDebug => "me",
            Command::CacheMemlimit => "cache_memlimit",
            Command::Slabs => "slabs",
        }
    }
}

/// One item in a `get` family reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    pub key: Bytes,
    pub flags: u32,
    pub data: Bytes,
    /// Present for `gets`/`gats`.
    pub cas: Option<u64>,
}

/// One reply, as memcached would send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// `VALUE ...` lines, then `END`.
    Values(Vec<Value>),
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Ok,
    Reset,
    /// The new value after `incr`/`decr`.
    Number(u64),
    /// `VERSION <text>`.
    Version(String),
    /// `STAT <name> <value>` lines, then `END`.
    Stats(Vec<(String, String)>),
    Error(ErrorReply),
    /// A meta reply.
    Meta(MetaReply),
    /// Nothing: a meta request's `q` flag hid its reply.
    Quiet,
    /// Reply bytes as they are, `\r\n`s included: a store's answer to an
    /// [`AdminRequest`] relayed from memcached, a `stats cachedump`
    /// listing, or one of memcached's own one-line answers
    /// (`MEMLIMIT_TOO_SMALL …`).
    Raw(Bytes),
}

/// The three error replies of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorReply {
    /// `ERROR`: unknown command or wrong number of tokens.
    Error,
    /// `CLIENT_ERROR <message>`.
    Client(String),
    /// `SERVER_ERROR <message>`.
    Server(String),
}

impl Response {
    pub fn client_error(e: ClientError) -> Response {
        e.into()
    }

    pub fn server_error(message: impl Into<String>) -> Response {
        Response::Error(ErrorReply::Server(message.into()))
    }

    /// The outcome label for metrics: hit/miss for reads, the reply kind
    /// otherwise.
    pub fn outcome(&self) -> &'static str {
        match self {
            Response::Values(v) if v.is_empty() => "miss",
            Response::Values(_) => "hit",
            Response::Stored => "stored",
            Response::NotStored => "not_stored",
            Response::Exists => "exists",
            Response::NotFound => "not_found",
            Response::Deleted => "deleted",
            Response::Touched => "touched",
            Response::Ok | Response::Reset | Response::Version(_) | Response::Stats(_) => "ok",
            Response::Number(_) => "ok",
            Response::Error(ErrorReply::Error) => "error",
            Response::Error(ErrorReply::Client(_)) => "client_error",
            Response::Error(ErrorReply::Server(_)) => "server_error",
            Response::Meta(m) => match m.code {
                MetaCode::En => "miss",
                MetaCode::Nf => "not_found",
                MetaCode::Ns => "not_stored",
                MetaCode::Ex => "exists",
                MetaCode::Hd | MetaCode::Va | MetaCode::Mn | MetaCode::Me => "ok",
            },
            Response::Quiet => "quiet",
            Response::Raw(_) => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Command;

    #[test]
    fn all_commands_are_listed_in_declaration_order() {
        for (i, c) in Command::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
        }
    }
}
