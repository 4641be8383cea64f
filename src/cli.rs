//! `memdial cli`: an interactive client for a node's client (memcached
//! protocol) port.
//!
//! Lines typed are sent to the node as they are, and the whole reply is read
//! (`VALUE` data blocks included) and printed. A storage command's data
//! block is the next line typed. A few commands are the cli's own:
//! `set KEY VALUE [TTL]` (and `add`, `replace`, `append`, `prepend` in the
//! same form), `show`, `help`, `quit`/`exit`.
//!
//! `show` sends `stats cluster` and prints a summary, the node's readiness
//! (`ready`, or `NOT READY:` and the reasons, as `/ready` says), then one
//! row for the node itself and one per peer. The node's own REQ/S comes from two `stats cluster` samples
//! [`RATE_SAMPLE`] apart (`requests_total` difference, less the cli's own
//! first probe, over the time between the replies); a single node does not
//! report `requests_total`, so its REQ/S is `-`. The peers' REQ/S is the
//! `request_rate` the node measured from their heartbeats. Peers run the
//! cluster's mode, so their MODE is the node's.
//!
//! With a terminal on stdin, rustyline gives line editing and history
//! (`$HOME/.memdial_history`, errors ignored). Otherwise stdin is read line
//! by line with no prompt, so the cli can be scripted: `printf 'show\n' |
//! memdial cli`.
//!
//! The pure parts ([`parse_line`], [`with_data`], [`read_reply`],
//! [`parse_stats`], [`ClusterView`], [`format_table`]) hold no I/O of their
//! own and are unit-tested here.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long connecting to the node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply may take before the cli gives up on the connection.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line accepted (a `VALUE` line's data block is apart).
const MAX_LINE: u64 = 1 << 20;
/// Largest data block accepted in a `VALUE` reply.
const MAX_VALUE: usize = 1 << 30;
/// Time between the two `stats cluster` samples `show` takes for the node's
/// own request rate.
pub const RATE_SAMPLE: Duration = Duration::from_millis(200);

/// Storage commands: their data block follows the command line.
const STORAGE: [&str; 6] = ["set", "add", "replace", "append", "prepend", "cas"];
/// Commands whose reply is a list ended by `END` (or one other line).
const LISTS: [&str; 5] = ["get", "gets", "gat", "gats", "stats"];

pub const HELP: &str = "\
Commands are sent to the node as typed; the reply is printed as it comes.
  get KEY...   gets KEY...   gat EXPTIME KEY...   gats EXPTIME KEY...
  set|add|replace|append|prepend KEY FLAGS EXPTIME BYTES [noreply]
  cas KEY FLAGS EXPTIME BYTES CAS [noreply]
               then type the data block (BYTES bytes) on the next line
  delete KEY   incr KEY N   decr KEY N   touch KEY EXPTIME
  flush_all [DELAY]   version   verbosity N   stats [settings|cluster|reset]
  mg KEY FLAGS...   md KEY FLAGS...   ma KEY FLAGS...   me KEY   mn
  ms KEY BYTES FLAGS...   then type the data block on the next line
               (with the q flag, mn is sent after it and every reply up
               to its MN is printed)
The cli's own:
  set KEY VALUE [TTL]   store a one-word VALUE, flags 0 (also add, replace,
                        append, prepend)
  show                  this node and its peers, from `stats cluster`
                        (ADDR: the address connected to for this node, the
                        peer address for the others)
  help                  this list
  quit, exit, Ctrl-D    leave
";

/// `memdial cli` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct CliArgs {
    /// Host of the node to connect to.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The node's client (memcached protocol) port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

/// What a typed line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A blank line.
    Nothing,
    Help,
    Show,
    Quit,
    /// Send `request`; read a reply unless `wait` is false (`noreply`).
    Send {
        request: Vec<u8>,
        wait: bool,
    },
    /// A raw storage command: its data block is the next line typed, which
    /// must be `bytes` long. Build the request with [`with_data`].
    NeedData {
        line: String,
        bytes: usize,
        wait: bool,
    },
    /// Not sent: the line cannot be a valid command; the text says why.
    Usage(String),
}

/// What to do with one typed line.
pub fn parse_line(line: &str) -> Action {
    let line = line.trim();
    let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
    let Some(&cmd) = tokens.first() else {
        return Action::Nothing;
    };
    let noreply = tokens.len() > 1 && tokens.last() == Some(&"noreply");
    match cmd {
        "help" | "?" if tokens.len() == 1 => Action::Help,
        "show" if tokens.len() == 1 => Action::Show,
        "quit" | "exit" if tokens.len() == 1 => Action::Quit,
        "cas" => match tokens.len() {
            6 | 7 => raw_storage(line, &tokens, 7),
            _ => Action::Usage("usage: cas KEY FLAGS EXPTIME BYTES CAS [noreply]".into()),
        },
        "ms" => match tokens.get(2).map(|b| b.parse::<usize>()) {
            Some(Ok(bytes)) => Action::NeedData {
                line: line.to_string(),
                bytes,
                wait: true,
            },
            _ => Action::Usage("usage: ms KEY BYTES [FLAGS...]".into()),
        },
        c if STORAGE.contains(&c) => match tokens.len() {
            3 | 4 => friendly_storage(&tokens),
            5 | 6 => raw_storage(line, &tokens, 6),
            _ => Action::Usage(format!(
                "usage: {c} KEY VALUE [TTL]  or  {c} KEY FLAGS EXPTIME BYTES [noreply]"
            )),
        },
        c => Action::Send {
            request: format!("{line}\r\n").into_bytes(),
            wait: LISTS.contains(&c) || !noreply,
        },
    }
}

/// True for a meta request with the `q` flag: some of its replies are
/// hidden, so `mn` is sent after it and the replies are read up to `MN`.
pub fn quiet_meta(line: &str) -> bool {
    let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
    let first_flag = match tokens.first() {
        Some(&"mg" | &"md" | &"ma") => 2,
        Some(&"ms") => 3,
        _ => return false,
    };
    tokens.iter().skip(first_flag).any(|t| *t == "q")
}

/// `set KEY VALUE [TTL]` → `set KEY 0 TTL LEN\r\nVALUE\r\n`.
fn friendly_storage(tokens: &[&str]) -> Action {
    let (cmd, key, value) = (tokens[0], tokens[1], tokens[2]);
    let ttl = match tokens.get(3) {
        None => 0,
        Some(t) => match t.parse::<i64>() {
            Ok(t) => t,
            Err(_) => {
                return Action::Usage(format!(
                    "{cmd} KEY VALUE [TTL]: TTL must be a number of seconds, not {t:?}"
                ));
            }
        },
    };
    Action::Send {
        request: format!("{cmd} {key} 0 {ttl} {}\r\n{value}\r\n", value.len()).into_bytes(),
        wait: true,
    }
}

/// A raw storage command line; `max_tokens` is its length with `noreply`.
fn raw_storage(line: &str, tokens: &[&str], max_tokens: usize) -> Action {
    let noreply = tokens.len() == max_tokens;
    if noreply && tokens[max_tokens - 1] != "noreply" {
        return Action::Usage(format!(
            "{}: the last argument can only be noreply, not {:?}",
            tokens[0],
            tokens[max_tokens - 1]
        ));
    }
    match tokens[4].parse::<usize>() {
        Ok(bytes) => Action::NeedData {
            line: line.to_string(),
            bytes,
            wait: !noreply,
        },
        Err(_) => Action::Usage(format!(
            "{}: BYTES must be a number, not {:?}",
            tokens[0], tokens[4]
        )),
    }
}

/// The request for a raw storage command and its data line. A data line of
/// another length than the command declares is refused here: the node would
/// read the wrong number of bytes and take the rest for a command.
pub fn with_data(line: &str, bytes: usize, data: &str) -> Result<Vec<u8>, String> {
    if data.len() != bytes {
        return Err(format!(
            "not sent: the data line is {} bytes, the command says {bytes}",
            data.len()
        ));
    }
    Ok(format!("{line}\r\n{data}\r\n").into_bytes())
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one whole reply: `VALUE` lines with their data blocks and `STAT`
/// lines, up to the first other line (`END`, an error, or a one-line reply
/// such as `STORED`), which is included. Returns the bytes as received.
pub fn read_reply(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let start = out.len();
        let n = r.by_ref().take(MAX_LINE).read_until(b'\n', &mut out)?;
        if !out.ends_with(b"\n") || n == 0 {
            return Err(if n as u64 == MAX_LINE {
                invalid("reply line too long")
            } else {
                io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")
            });
        }
        let line = &out[start..];
        let value = if let Some(rest) = line.strip_prefix(b"VALUE ") {
            Some(value_len(rest).ok_or_else(|| invalid("malformed VALUE line"))?)
        } else if let Some(rest) = line.strip_prefix(b"VA ") {
            Some(meta_value_len(rest).ok_or_else(|| invalid("malformed VA line"))?)
        } else {
            None
        };
        if let Some(bytes) = value {
            let want = bytes + 2;
            let before = out.len();
            r.by_ref().take(want as u64).read_to_end(&mut out)?;
            if out.len() - before != want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            if line_is_meta(&out[start..]) {
                // A meta reply is one item: its value ends it.
                return Ok(out);
            }
            continue;
        }
        if line.starts_with(b"STAT ") {
            continue;
        }
        return Ok(out);
    }
}

fn line_is_meta(line: &[u8]) -> bool {
    line.starts_with(b"VA ")
}

/// The data length of a `VA BYTES FLAGS...` line (after `VA `).
fn meta_value_len(rest: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(rest).ok()?;
    let bytes: usize = text.split_ascii_whitespace().next()?.parse().ok()?;
    (bytes <= MAX_VALUE).then_some(bytes)
}

/// The data length of a `VALUE KEY FLAGS BYTES [CAS]` line (after `VALUE `).
fn value_len(rest: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(rest).ok()?;
    let bytes: usize = text.split_ascii_whitespace().nth(2)?.parse().ok()?;
    (bytes <= MAX_VALUE).then_some(bytes)
}

/// `STAT name value` lines of a reply, in order. `None` when the reply is
/// not a stats list (an error line, say).
pub fn parse_stats(reply: &[u8]) -> Option<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(reply);
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line == "END" {
            return Some(out);
        }
        let rest = line.strip_prefix("STAT ")?;
        let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
        out.push((name.to_string(), value.to_string()));
    }
    None
}

/// One peer as `stats cluster` describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerView {
    pub id: String,
    /// `addr`, `state`, `last_heard_ms`, ... as given.
    pub fields: Vec<(String, String)>,
}

impl PeerView {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What `stats cluster` says about the node and its peers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub node_id: String,
    pub cluster: Option<String>,
    pub mode: String,
    pub requests_total: Option<u64>,
    pub log_head: Option<String>,
    pub backlog_entries: Option<String>,
    /// The Raft figures of an ordered mode (`raft_role`, `raft_term`, …).
    pub raft: Vec<(String, String)>,
    /// The node's readiness (`ready`, `ready_reason`, `ready_note`), when
    /// the node reports it.
    pub ready: Option<bool>,
    pub ready_reason: Option<String>,
    pub ready_note: Option<String>,
    /// Sorted by id (numerically where the ids are numbers).
    pub peers: Vec<PeerView>,
}

impl ClusterView {
    /// `None` when the stats have no `node_id`.
    pub fn from_stats(stats: &[(String, String)]) -> Option<ClusterView> {
        let mut view = ClusterView::default();
        let mut node_id = None;
        for (name, value) in stats {
            match name.as_str() {
                "node_id" => node_id = Some(value.clone()),
                "cluster" => view.cluster = Some(value.clone()),
                "mode" => view.mode = value.clone(),
                "requests_total" => view.requests_total = value.parse().ok(),
                "log_head" => view.log_head = Some(value.clone()),
                "backlog_entries" => view.backlog_entries = Some(value.clone()),
                "ready" => view.ready = Some(value == "1"),
                "ready_reason" => view.ready_reason = Some(value.clone()),
                "ready_note" => view.ready_note = Some(value.clone()),
                n if n.starts_with("raft_") => view.raft.push((n.to_string(), value.clone())),
                _ => {
                    let Some((id, field)) = name
                        .strip_prefix("peer:")
                        .and_then(|rest| rest.split_once(':'))
                    else {
                        continue;
                    };
                    let peer = match view.peers.iter().position(|p| p.id == id) {
                        Some(i) => &mut view.peers[i],
                        None => {
                            view.peers.push(PeerView {
                                id: id.to_string(),
                                fields: Vec::new(),
                            });
                            let last = view.peers.len() - 1;
                            &mut view.peers[last]
                        }
                    };
                    peer.fields.push((field.to_string(), value.clone()));
                }
            }
        }
        view.node_id = node_id?;
        if view.mode.is_empty() {
            view.mode = "-".into();
        }
        view.peers.sort_by_key(|p| id_order(&p.id));
        Some(view)
    }

    /// One line above the table: the cluster's name, mode and log.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.cluster {
            parts.push(format!("cluster {c}"));
        }
        parts.push(format!("mode {}", self.mode));
        parts.push(format!(
            "{} peer{}",
            self.peers.len(),
            if self.peers.len() == 1 { "" } else { "s" }
        ));
        if let Some(h) = &self.log_head {
            parts.push(format!("log head {h}"));
        }
        if let Some(b) = &self.backlog_entries {
            parts.push(format!("backlog {b} entries"));
        }
        if let Some(role) = self.raft_field("raft_role") {
            parts.push(format!(
                "raft {role}, term {}, leader {}, applied {} of {}",
                self.raft_field("raft_term").unwrap_or("-"),
                self.raft_field("raft_leader").unwrap_or("-"),
                self.raft_field("raft_applied_index").unwrap_or("-"),
                self.raft_field("raft_last_log_index").unwrap_or("-"),
            ));
        }
        parts.join(", ")
    }

    fn raft_field(&self, name: &str) -> Option<&str> {
        self.raft
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A peer's lag: eventual's own figure, or, on a Raft leader, the log
    /// entries the peer has not matched yet.
    fn lag(&self, p: &PeerView) -> String {
        if let Some(lag) = p.get("lag") {
            return lag.to_string();
        }
        let last = self
            .raft_field("raft_last_log_index")
            .and_then(|v| v.parse::<u64>().ok());
        let matched = p
            .get("raft_matched_index")
            .and_then(|v| v.parse::<u64>().ok());
        match (last, matched) {
            (Some(l), Some(m)) => l.saturating_sub(m).to_string(),
            _ => "-".to_string(),
        }
    }

    /// The node's readiness as `/ready` has it: `ready` or `NOT READY:`
    /// with the reasons, then any notes; `None` when the node does not
    /// report it.
    pub fn readiness(&self) -> Option<String> {
        let mut line = match self.ready? {
            true => "ready".to_string(),
            false => format!(
                "NOT READY: {}",
                self.ready_reason.as_deref().unwrap_or("no reason given")
            ),
        };
        if let Some(note) = &self.ready_note {
            line.push_str(&format!(" (note: {note})"));
        }
        Some(line)
    }

    /// The table's rows, sorted by node id: the node itself (`self_addr` is
    /// where the cli connected, `self_rate` its requests per second if
    /// known), then its peers.
    pub fn rows(&self, self_addr: &str, self_rate: Option<f64>) -> Vec<[String; 8]> {
        let dash = || "-".to_string();
        let mut rows: Vec<(u8, [String; 8])> = vec![(
            0,
            [
                self.node_id.clone(),
                self_addr.to_string(),
                "self".into(),
                self.mode.clone(),
                dash(),
                dash(),
                dash(),
                self_rate.map_or_else(dash, |r| format!("{r:.1}")),
            ],
        )];
        for p in &self.peers {
            let field = |name: &str| p.get(name).unwrap_or("-").to_string();
            let heard = match p.get("last_heard_ms").map(str::parse::<u64>) {
                Some(Ok(ms)) => format!("{ms} ms ago"),
                _ => field("last_heard_ms"),
            };
            let rtt = match p.get("rtt_us").map(str::parse::<u64>) {
                Some(Ok(us)) => format_rtt(us),
                _ => field("rtt_us"),
            };
            rows.push((
                1,
                [
                    p.id.clone(),
                    field("addr"),
                    field("state"),
                    self.mode.clone(),
                    self.lag(p),
                    heard,
                    rtt,
                    field("request_rate"),
                ],
            ));
        }
        rows.sort_by(|(a_self, a), (b_self, b)| {
            id_order(&a[0])
                .cmp(&id_order(&b[0]))
                .then(a_self.cmp(b_self))
        });
        rows.into_iter().map(|(_, r)| r).collect()
    }
}

/// Numeric ids in order, then the others by text.
fn id_order(id: &str) -> (u64, String) {
    (id.parse().unwrap_or(u64::MAX), id.to_string())
}

/// `120 us`, `1.25 ms`, `1.50 s`.
pub fn format_rtt(us: u64) -> String {
    if us < 1000 {
        format!("{us} us")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1_000_000.0)
    }
}

pub const COLUMNS: [&str; 8] = [
    "NODE",
    "ADDR",
    "STATE",
    "MODE",
    "LAG",
    "LAST HEARTBEAT",
    "RTT",
    "REQ/S",
];

/// The header and rows, left-aligned in columns two spaces apart.
pub fn format_table(rows: &[[String; 8]]) -> String {
    let mut widths = COLUMNS.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = COLUMNS.map(String::from);
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Requests per second between two `requests_total` samples `elapsed`
/// apart; the first sample's own request is not counted.
pub fn self_rate(first: u64, second: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0 && second >= first).then(|| second.saturating_sub(first + 1) as f64 / secs)
}

/// `host:port`, bracketing IPv6 hosts.
fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Replies for the terminal: `\r\n` becomes `\n`.
fn for_display(reply: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(reply.len());
    let mut i = 0;
    while i < reply.len() {
        if reply[i] == b'\r' && reply.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(reply[i]);
        i += 1;
    }
    out
}

/// The connection to the node.
struct Conn {
    target: String,
    writer: TcpStream,
    reader: io::BufReader<TcpStream>,
}

impl Conn {
    fn open(host: &str, port: u16) -> io::Result<Conn> {
        let mut last = None;
        for addr in (host, port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
                    return Ok(Conn {
                        target: display_addr(host, port),
                        reader: io::BufReader::new(stream.try_clone()?),
                        writer: stream,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
    }

    fn closed(&self) -> anyhow::Error {
        anyhow::anyhow!("connection closed by {}", self.target)
    }

    /// Whatever arrived unasked (errors the node sent for a `noreply`
    /// command, say). Errs when the node closed the connection.
    fn stray(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut out = self.reader.buffer().to_vec();
        self.reader.consume(out.len());
        self.writer.set_nonblocking(true)?;
        let mut chunk = [0u8; 4096];
        let result = loop {
            match self.reader.get_mut().read(&mut chunk) {
                Ok(0) => break Err(self.closed()),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.writer.set_nonblocking(false)?;
        if !out.is_empty() {
            print_raw(&out)?;
        }
        result.map(|()| out)
    }

    /// Sends a quiet meta `request` followed by `mn`, and returns every
    /// reply up to and including `MN`.
    fn call_quiet(&mut self, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut both = request.to_vec();
        both.extend_from_slice(b"mn\r\n");
        let mut out = Vec::new();
        let mut reply = self.call(&both, true)?.unwrap_or_default();
        loop {
            let done = reply == b"MN\r\n";
            out.extend_from_slice(&reply);
            if done {
                return Ok(out);
            }
            reply = match read_reply(&mut self.reader) {
                Ok(r) => r,
                Err(e) => return Err(anyhow::Error::new(e).context("reading a quiet reply")),
            };
        }
    }

    /// Sends `request` and returns the reply (`None` when not waiting).
    fn call(&mut self, request: &[u8], wait: bool) -> anyhow::Result<Option<Vec<u8>>> {
        self.stray()?;
        self.writer
            .write_all(request)
            .with_context(|| format!("sending to {}", self.target))?;
        if !wait {
            return Ok(None);
        }
        match read_reply(&mut self.reader) {
            Ok(reply) => Ok(Some(reply)),
            Err(e) => Err(match e.kind() {
                io::ErrorKind::UnexpectedEof => self.closed(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    anyhow::anyhow!("no reply from {} within {REPLY_TIMEOUT:?}", self.target)
                }
                _ => anyhow::Error::new(e).context(format!("reading from {}", self.target)),
            }),
        }
    }
}

fn print_raw(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(&for_display(bytes))?;
    out.flush()
}

/// What reading a line gave.
enum Typed {
    Line(String),
    Interrupted,
    Eof,
}

/// Where typed lines come from.
enum Input {
    /// A terminal: rustyline, with history.
    Editor {
        editor: Box<rustyline::DefaultEditor>,
        history: Option<PathBuf>,
    },
    /// A pipe or file (or a terminal rustyline cannot drive): plain lines,
    /// with the prompt printed when `prompt` is set.
    Plain {
        stdin: io::StdinLock<'static>,
        prompt: bool,
    },
}

impl Input {
    fn new() -> Input {
        let stdin = io::stdin();
        let tty = stdin.is_terminal();
        if tty && let Ok(mut editor) = rustyline::DefaultEditor::new() {
            let history = std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".memdial_history"));
            if let Some(path) = &history {
                let _ = editor.load_history(path);
            }
            return Input::Editor {
                editor: Box::new(editor),
                history,
            };
        }
        Input::Plain {
            stdin: stdin.lock(),
            prompt: tty,
        }
    }

    fn read(&mut self, prompt: &str, remember: bool) -> anyhow::Result<Typed> {
        match self {
            Input::Editor { editor, .. } => match editor.readline(prompt) {
                Ok(line) => {
                    if remember && !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    Ok(Typed::Line(line))
                }
                Err(rustyline::error::ReadlineError::Interrupted) => Ok(Typed::Interrupted),
                Err(rustyline::error::ReadlineError::Eof) => Ok(Typed::Eof),
                Err(e) => Err(anyhow::Error::new(e).context("reading input")),
            },
            Input::Plain { stdin, prompt: p } => {
                if *p {
                    let mut out = io::stdout().lock();
                    out.write_all(prompt.as_bytes())?;
                    out.flush()?;
                }
                let mut buf = Vec::new();
                if stdin.read_until(b'\n', &mut buf)? == 0 {
                    return Ok(Typed::Eof);
                }
                let line = String::from_utf8_lossy(&buf);
                Ok(Typed::Line(line.trim_end_matches(['\n', '\r']).to_string()))
            }
        }
    }

    fn save_history(&mut self) {
        if let Input::Editor {
            editor,
            history: Some(path),
        } = self
        {
            let _ = editor.save_history(path);
        }
    }
}

/// `memdial cli`'s entry: [`run`], then exit 1 with a one-line message on
/// stderr if it failed (no backtrace: these are the user's errors, such as
/// a node that is not running).
pub fn main(args: CliArgs) -> anyhow::Result<()> {
    if let Err(e) = run(args) {
        let _ = io::stdout().flush();
        eprintln!("memdial cli: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// Connects, then reads and runs lines until `quit` or EOF. Errs when the
/// node cannot be reached or drops the connection.
pub fn run(args: CliArgs) -> anyhow::Result<()> {
    let target = display_addr(&args.host, args.port);
    let mut conn =
        Conn::open(&args.host, args.port).with_context(|| format!("cannot connect to {target}"))?;
    let mut input = Input::new();
    let result = repl(&mut conn, &mut input, &format!("memdial {target}> "));
    input.save_history();
    result
}

fn repl(conn: &mut Conn, input: &mut Input, prompt: &str) -> anyhow::Result<()> {
    loop {
        let line = match input.read(prompt, true)? {
            Typed::Line(line) => line,
            Typed::Interrupted => continue,
            Typed::Eof => return Ok(()),
        };
        match parse_line(&line) {
            Action::Nothing => {}
            Action::Help => print!("{HELP}"),
            Action::Quit => return Ok(()),
            Action::Usage(msg) => println!("{msg}"),
            Action::Show => show(conn)?,
            Action::Send { request, .. } if quiet_meta(&line) => {
                print_raw(&conn.call_quiet(&request)?)?;
            }
            Action::Send { request, wait } => {
                if let Some(reply) = conn.call(&request, wait)? {
                    print_raw(&reply)?;
                }
            }
            Action::NeedData { line, bytes, wait } => {
                let data = match input.read("data> ", false)? {
                    Typed::Line(data) => data,
                    Typed::Interrupted => {
                        println!("not sent");
                        continue;
                    }
                    Typed::Eof => return Ok(()),
                };
                match with_data(&line, bytes, &data) {
                    Ok(request) if quiet_meta(&line) => {
                        print_raw(&conn.call_quiet(&request)?)?;
                    }
                    Ok(request) => {
                        if let Some(reply) = conn.call(&request, wait)? {
                            print_raw(&reply)?;
                        }
                    }
                    Err(msg) => println!("{msg}"),
                }
            }
        }
    }
}

/// `stats cluster`, parsed; `Err(reply)` when the node answered otherwise.
fn cluster_stats(conn: &mut Conn) -> anyhow::Result<Result<ClusterView, Vec<u8>>> {
    let reply = conn.call(b"stats cluster\r\n", true)?.unwrap_or_default();
    Ok(parse_stats(&reply)
        .and_then(|s| ClusterView::from_stats(&s))
        .ok_or(reply))
}

fn show(conn: &mut Conn) -> anyhow::Result<()> {
    let first = match cluster_stats(conn)? {
        Ok(view) => view,
        Err(reply) => {
            println!("the node did not answer `stats cluster` with a cluster view:");
            return Ok(print_raw(&reply)?);
        }
    };
    let mut view = first.clone();
    let mut rate = None;
    if let Some(before) = first.requests_total {
        let t0 = Instant::now();
        std::thread::sleep(RATE_SAMPLE);
        if let Ok(second) = cluster_stats(conn)? {
            if let Some(after) = second.requests_total {
                rate = self_rate(before, after, t0.elapsed());
            }
            view = second;
        }
    }
    println!("{}", view.summary());
    if let Some(line) = view.readiness() {
        println!("{line}");
    }
    print!("{}", format_table(&view.rows(&conn.target, rate)));
    io::stdout().flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(request: &str, wait: bool) -> Action {
        Action::Send {
            request: request.as_bytes().to_vec(),
            wait,
        }
    }

    #[test]
    fn local_commands() {
        assert_eq!(parse_line(""), Action::Nothing);
        assert_eq!(parse_line("   \t "), Action::Nothing);
        assert_eq!(parse_line("help"), Action::Help);
        assert_eq!(parse_line(" show "), Action::Show);
        assert_eq!(parse_line("quit"), Action::Quit);
        assert_eq!(parse_line("exit"), Action::Quit);
    }

    #[test]
    fn raw_commands_are_sent_as_typed() {
        assert_eq!(parse_line("get a b"), send("get a b\r\n", true));
        assert_eq!(parse_line("  gets a  "), send("gets a\r\n", true));
        assert_eq!(parse_line("stats cluster"), send("stats cluster\r\n", true));
        assert_eq!(parse_line("delete k"), send("delete k\r\n", true));
        assert_eq!(
            parse_line("delete k noreply"),
            send("delete k noreply\r\n", false)
        );
        assert_eq!(
            parse_line("incr k 1 noreply"),
            send("incr k 1 noreply\r\n", false)
        );
        // A key named noreply is still a get.
        assert_eq!(parse_line("get noreply"), send("get noreply\r\n", true));
        assert_eq!(parse_line("version"), send("version\r\n", true));
        // `show x` is not the cli's show.
        assert_eq!(parse_line("show x"), send("show x\r\n", true));
    }

    #[test]
    fn friendly_set() {
        assert_eq!(
            parse_line("set greeting hello"),
            send("set greeting 0 0 5\r\nhello\r\n", true)
        );
        assert_eq!(
            parse_line("set greeting hello 60"),
            send("set greeting 0 60 5\r\nhello\r\n", true)
        );
        assert_eq!(
            parse_line("append k xy"),
            send("append k 0 0 2\r\nxy\r\n", true)
        );
        assert!(matches!(parse_line("set k v soon"), Action::Usage(_)));
    }

    #[test]
    fn raw_storage_needs_data() {
        assert_eq!(
            parse_line("set k 0 0 3"),
            Action::NeedData {
                line: "set k 0 0 3".into(),
                bytes: 3,
                wait: true
            }
        );
        assert_eq!(
            parse_line("add k 1 2 3 noreply"),
            Action::NeedData {
                line: "add k 1 2 3 noreply".into(),
                bytes: 3,
                wait: false
            }
        );
        assert_eq!(
            parse_line("cas k 0 0 3 77"),
            Action::NeedData {
                line: "cas k 0 0 3 77".into(),
                bytes: 3,
                wait: true
            }
        );
        assert_eq!(
            parse_line("cas k 0 0 3 77 noreply"),
            Action::NeedData {
                line: "cas k 0 0 3 77 noreply".into(),
                bytes: 3,
                wait: false
            }
        );
        for bad in [
            "set",
            "set k",
            "set k 0 0 x",
            "set k 0 0 3 later",
            "set k 0 0 3 noreply extra",
            "cas k v",
            "cas k 0 0 3",
        ] {
            assert!(matches!(parse_line(bad), Action::Usage(_)), "{bad}");
        }
    }

    #[test]
    fn data_must_match_the_declared_length() {
        assert_eq!(
            with_data("set k 0 0 3", 3, "abc").unwrap(),
            b"set k 0 0 3\r\nabc\r\n"
        );
        assert!(with_data("set k 0 0 3", 3, "abcd").is_err());
        assert_eq!(
            with_data("set k 0 0 0", 0, "").unwrap(),
            b"set k 0 0 0\r\n\r\n"
        );
    }

    fn reply(bytes: &[u8]) -> io::Result<Vec<u8>> {
        read_reply(&mut io::Cursor::new(bytes))
    }

    #[test]
    fn replies_are_read_whole() {
        assert_eq!(reply(b"STORED\r\nEXTRA\r\n").unwrap(), b"STORED\r\n");
        assert_eq!(reply(b"END\r\n").unwrap(), b"END\r\n");
        // A data block that looks like END does not end the reply.
        let get = b"VALUE k 0 5\r\nEND\r\n\r\nVALUE j 3 1 9\r\nx\r\nEND\r\nnext";
        assert_eq!(reply(get).unwrap(), &get[..get.len() - 4]);
        // A meta value ends its reply; a data block may look like a reply.
        let va = b"VA 4 f0\r\nHD\r\n\r\nMN\r\n";
        assert_eq!(reply(va).unwrap(), &va[..va.len() - 4]);
        assert_eq!(reply(b"HD c5\r\nMN\r\n").unwrap(), b"HD c5\r\n");
        assert_eq!(
            reply(b"ME k exp=-1 la=0\r\n").unwrap(),
            b"ME k exp=-1 la=0\r\n"
        );
        assert!(quiet_meta("mg k v q") && quiet_meta("ms k 2 q T5"));
        assert!(!quiet_meta("mg q") && !quiet_meta("ms k 2") && !quiet_meta("get q"));
        let stats = b"STAT a 1\r\nSTAT b two words\r\nEND\r\n";
        assert_eq!(reply(stats).unwrap(), stats);
        assert_eq!(
            reply(b"CLIENT_ERROR bad\r\nSTORED\r\n").unwrap(),
            b"CLIENT_ERROR bad\r\n"
        );
        assert_eq!(
            reply(b"STAT a 1\r\nERROR\r\n").unwrap(),
            b"STAT a 1\r\nERROR\r\n"
        );
    }

    #[test]
    fn broken_replies_are_errors() {
        let kind = |b: &[u8]| reply(b).unwrap_err().kind();
        assert_eq!(kind(b""), io::ErrorKind::UnexpectedEof);
        assert_eq!(kind(b"STORED"), io::ErrorKind::UnexpectedEof);
        assert_eq!(kind(b"VALUE k 0 5\r\nab"), io::ErrorKind::UnexpectedEof);
        assert_eq!(kind(b"VALUE k 0\r\n"), io::ErrorKind::InvalidData);
        assert_eq!(kind(b"VALUE k 0 -1\r\n"), io::ErrorKind::InvalidData);
        assert_eq!(
            kind(b"VALUE k 0 99999999999999999999\r\n"),
            io::ErrorKind::InvalidData
        );
        let long = vec![b'x'; MAX_LINE as usize + 10];
        assert_eq!(kind(&long), io::ErrorKind::InvalidData);
    }

    const CLUSTER: &[u8] = b"STAT node_id 3\r\n\
STAT cluster memdial-local\r\n\
STAT mode eventual\r\n\
STAT log_head 0\r\n\
STAT backlog_entries 0\r\n\
STAT requests_total 1\r\n\
STAT peers 2\r\n\
STAT peer:2:addr 127.0.0.1:7001\r\n\
STAT peer:2:state suspect\r\n\
STAT peer:2:last_heard_ms 1200\r\n\
STAT peer:2:rtt_us 1500\r\n\
STAT peer:2:lag 7\r\n\
STAT peer:2:request_rate 0.0\r\n\
STAT peer:1:addr 127.0.0.1:7000\r\n\
STAT peer:1:state up\r\n\
STAT peer:1:last_heard_ms 34\r\n\
STAT peer:1:rtt_us 120\r\n\
STAT peer:1:lag 0\r\n\
STAT peer:1:request_rate 4.9\r\n\
STAT peer:1:applied 1\r\n\
STAT peer:1:repaired 0\r\n\
END\r\n";

    #[test]
    fn stats_cluster_is_parsed() {
        let stats = parse_stats(CLUSTER).unwrap();
        assert_eq!(stats[0], ("node_id".into(), "3".into()));
        let view = ClusterView::from_stats(&stats).unwrap();
        assert_eq!(view.node_id, "3");
        assert_eq!(view.mode, "eventual");
        assert_eq!(view.requests_total, Some(1));
        assert_eq!(view.peers.len(), 2);
        assert_eq!(view.peers[0].id, "1");
        assert_eq!(view.peers[0].get("request_rate"), Some("4.9"));
        assert_eq!(view.peers[1].get("state"), Some("suspect"));
        assert_eq!(
            view.summary(),
            "cluster memdial-local, mode eventual, 2 peers, log head 0, backlog 0 entries"
        );
        assert!(parse_stats(b"ERROR\r\n").is_none());
        assert!(parse_stats(b"STAT a 1\r\n").is_none());
        assert!(ClusterView::from_stats(&[("mode".into(), "x".into())]).is_none());
    }

    #[test]
    fn a_raft_node_shows_its_role_and_each_peers_lag() {
        let stats = parse_stats(
            b"STAT node_id 1\r\nSTAT mode linearizable\r\nSTAT raft_role leader\r\n\
              STAT raft_term 3\r\nSTAT raft_leader 1\r\nSTAT raft_last_log_index 120\r\n\
              STAT raft_applied_index 118\r\nSTAT peers 1\r\nSTAT peer:2:addr 10.0.0.2:7001\r\n\
              STAT peer:2:state up\r\nSTAT peer:2:raft_matched_index 115\r\nEND\r\n",
        )
        .unwrap();
        let view = ClusterView::from_stats(&stats).unwrap();
        assert!(
            view.summary()
                .ends_with("raft leader, term 3, leader 1, applied 118 of 120"),
            "{}",
            view.summary()
        );
        let rows = view.rows("127.0.0.1:8000", None);
        assert_eq!(rows[1][4], "5", "peer 2 lags 120 - 115 entries");
    }

    #[test]
    fn rows_and_table() {
        let view = ClusterView::from_stats(&parse_stats(CLUSTER).unwrap()).unwrap();
        let rows = view.rows("127.0.0.1:8002", Some(12.345));
        let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(ids, ["1", "2", "3"]);
        assert_eq!(
            rows[0],
            [
                "1",
                "127.0.0.1:7000",
                "up",
                "eventual",
                "0",
                "34 ms ago",
                "120 us",
                "4.9"
            ]
            .map(String::from)
        );
        assert_eq!(rows[1][6], "1.50 ms");
        assert_eq!(
            rows[2],
            [
                "3",
                "127.0.0.1:8002",
                "self",
                "eventual",
                "-",
                "-",
                "-",
                "12.3"
            ]
            .map(String::from)
        );
        let table = format_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "NODE  ADDR            STATE    MODE      LAG  LAST HEARTBEAT  RTT      REQ/S"
        );
        assert_eq!(
            lines[1],
            "1     127.0.0.1:7000  up       eventual  0    34 ms ago       120 us   4.9"
        );
        assert_eq!(
            lines[3],
            "3     127.0.0.1:8002  self     eventual  -    -               -        12.3"
        );
    }

    #[test]
    fn single_node() {
        let stats =
            parse_stats(b"STAT node_id 1\r\nSTAT mode single\r\nSTAT peers 0\r\nEND\r\n").unwrap();
        let view = ClusterView::from_stats(&stats).unwrap();
        assert_eq!(view.requests_total, None);
        let rows = view.rows("127.0.0.1:8000", None);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0][2], "self");
        assert_eq!(rows[0][3], "single");
        assert_eq!(rows[0][7], "-");
    }

    #[test]
    fn readiness_line() {
        let stats = parse_stats(
            b"STAT node_id 1\r\nSTAT mode single\r\nSTAT peers 0\r\nSTAT ready 0\r\n\
              STAT ready_reason backend: memcached 127.0.0.1:1 unreachable\r\nEND\r\n",
        )
        .unwrap();
        let view = ClusterView::from_stats(&stats).unwrap();
        assert_eq!(
            view.readiness().as_deref(),
            Some("NOT READY: backend: memcached 127.0.0.1:1 unreachable")
        );
        let stats = vec![
            ("node_id".to_string(), "1".to_string()),
            ("ready".to_string(), "1".to_string()),
            ("ready_note".to_string(), "peer 2 is down".to_string()),
        ];
        let view = ClusterView::from_stats(&stats).unwrap();
        assert_eq!(
            view.readiness().as_deref(),
            Some("ready (note: peer 2 is down)")
        );
        let old = vec![("node_id".to_string(), "1".to_string())];
        assert_eq!(ClusterView::from_stats(&old).unwrap().readiness(), None);
    }

    #[test]
    fn peers_with_missing_or_odd_fields() {
        let stats = vec![
            ("node_id".to_string(), "1".to_string()),
            ("mode".to_string(), "eventual".to_string()),
            ("peer:10:state".to_string(), "down".to_string()),
            ("peer:2:last_heard_ms".to_string(), "-".to_string()),
            ("peer:x".to_string(), "ignored".to_string()),
        ];
        let view = ClusterView::from_stats(&stats).unwrap();
        let rows = view.rows("h:1", None);
        let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(ids, ["1", "2", "10"]);
        assert_eq!(rows[1][5], "-");
        assert_eq!(rows[2][1], "-");
        assert_eq!(rows[2][2], "down");
    }

    #[test]
    fn rates_and_rtt() {
        assert_eq!(self_rate(10, 11, Duration::from_millis(200)), Some(0.0));
        assert_eq!(self_rate(10, 21, Duration::from_millis(500)), Some(20.0));
        assert_eq!(self_rate(10, 5, Duration::from_millis(200)), None);
        assert_eq!(self_rate(10, 12, Duration::ZERO), None);
        assert_eq!(format_rtt(999), "999 us");
        assert_eq!(format_rtt(1000), "1.00 ms");
        assert_eq!(format_rtt(2_500_000), "2.50 s");
    }

    #[test]
    fn display() {
        assert_eq!(
            for_display(b"VALUE k 0 1\r\nx\r\nEND\r\n"),
            b"VALUE k 0 1\nx\nEND\n"
        );
        assert_eq!(for_display(b"a\rb\r"), b"a\rb\r");
        assert_eq!(display_addr("::1", 8000), "[::1]:8000");
    }
}
