//! The streaming request parser: a pure function from buffered bytes to one
//! of four outcomes. It follows memcached 1.6's tokenizer and per-command
//! token counts so that the same input earns the same answer.

use bytes::Bytes;
use nom::IResult;
use nom::Parser;
use nom::bytes::streaming::take_until;
use nom::character::complete::{digit1, one_of};
use nom::combinator::{all_consuming, opt, recognize};

use super::{
    AdminRequest, ArithOp, Automove, ClientError, ConnRequest, Exptime, Incoming, Limits, Request,
    StoreOp, StoreStats,
};

/// What the bytes at the front of a connection's buffer hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet; read more (the buffer is within limits).
    Incomplete,
    /// A request. Drop `consumed` bytes, then discard a further `skip`
    /// bytes as they arrive (the data block of a rejected value).
    Request {
        request: Incoming,
        consumed: usize,
        skip: usize,
    },
    /// A bad request the connection survives: answer `error` unless
    /// `noreply`, drop `consumed` bytes, then discard a further `skip` bytes
    /// as they arrive (the data block of a refused `ms`), and go on with the
    /// next request.
    Invalid {
        error: ClientError,
        consumed: usize,
        noreply: bool,
        skip: usize,
    },
    /// A request that cannot be framed within limits: answer, then close.
    Fatal(ClientError),
    /// A line memcached hangs up on without a word: an unknown command
    /// whose last token starts with `HTTP/` (a browser or HTTP client
    /// pointed at the port). Close at once.
    Hangup,
}

/// The most tokens any command other than the `get` family and `stats`
/// looks at; a line with more is answered `ERROR` by token count.
const MAX_FIXED_TOKENS: usize = 8;

/// Parses the request at the front of `buf`.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Parsed {
    let (line, consumed) = match line(buf) {
        Ok((_, line)) => (line, line.len() + 1),
        Err(_) => return incomplete_line(buf, limits),
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line_limit = if is_get_family(line) {
        limits.max_get_line_bytes
    } else {
        limits.max_line_bytes
    };
    if line.len() > line_limit {
        return Parsed::Fatal(ClientError::LineTooLong);
    }

    let mut tokens: [&[u8]; MAX_FIXED_TOKENS] = [&[]; MAX_FIXED_TOKENS];
    let mut n = 0;
    for t in split_tokens(line) {
        if n < MAX_FIXED_TOKENS {
            tokens[n] = t;
        }
        n += 1;
    }
    let t = &tokens[..n.min(MAX_FIXED_TOKENS)];
    let invalid = |error, noreply| Parsed::Invalid {
        error,
        consumed,
        noreply,
        skip: 0,
    };
    let conn = |request: ConnRequest| Parsed::Request {
        request: Incoming::Conn(request),
        consumed,
        skip: 0,
    };
    let admin = |request: AdminRequest| Parsed::Request {
        request: Incoming::Admin(request),
        consumed,
        skip: 0,
    };
    let done = |request: Request| Parsed::Request {
        request: Incoming::Data(request),
        consumed,
        skip: 0,
    };
    // memcached reads `noreply` only as the last token of a command.
    let noreply_at = |i: usize| n == i + 1 && t[i] == b"noreply";

    match t.first().copied().unwrap_or_default() {
        cmd if cmd.len() == 2 && cmd[0] == b'm' => {
            let mut meta: [&[u8]; MEMCACHED_MAX_TOKENS] = [&[]; MEMCACHED_MAX_TOKENS];
            let mut m = 0;
            for tok in split_tokens(line).take(MEMCACHED_MAX_TOKENS) {
                meta[m] = tok;
                m += 1;
            }
            super::meta::parse_meta(buf, consumed, &meta[..m], limits)
        }
        cmd @ (b"get" | b"gets") if n >= 2 => match keys(line, t, n, 1, limits) {
            Ok(keys) => done(Request::Get {
                keys,
                cas: cmd == b"gets",
            }),
            Err(e) => invalid(e, false),
        },
        cmd @ (b"gat" | b"gats") if n >= 2 => {
            let Some(exptime) = int::<i64>(t[1]) else {
                return invalid(ClientError::InvalidExptime, false);
            };
            match keys(line, t, n, 2, limits) {
                Ok(keys) => done(Request::Gat {
                    exptime,
                    keys,
                    cas: cmd == b"gats",
                }),
                Err(e) => invalid(e, false),
            }
        }
        cmd @ (b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas") => {
            let op = match cmd {
                b"set" => StoreOp::Set,
                b"add" => StoreOp::Add,
                b"replace" => StoreOp::Replace,
                b"append" => StoreOp::Append,
                b"prepend" => StoreOp::Prepend,
                _ => StoreOp::Cas,
            };
            let fixed = if op == StoreOp::Cas { 6 } else { 5 };
            if n != fixed && n != fixed + 1 {
                return invalid(ClientError::UnknownCommand, false);
            }
            let noreply = noreply_at(fixed);
            storage(buf, consumed, op, t, noreply, limits)
        }
        cmd @ (b"incr" | b"decr") if n == 3 || n == 4 => {
            let noreply = noreply_at(3);
            let Some(key) = key(t[1], limits) else {
                return invalid(ClientError::BadCommandLine, noreply);
            };
            let Some(delta) = uint::<u64>(t[2]) else {
                return invalid(ClientError::InvalidDelta, noreply);
            };
            let op = if cmd == b"incr" {
                ArithOp::Incr
            } else {
                ArithOp::Decr
            };
            done(Request::Arith {
                op,
                key,
                delta,
                noreply,
            })
        }
        b"delete" if (2..=4).contains(&n) => {
            let mut noreply = false;
            if n > 2 {
                let hold_is_zero = t[2] == b"0";
                noreply = t[n - 1] == b"noreply";
                let valid =
                    (n == 3 && (hold_is_zero || noreply)) || (n == 4 && hold_is_zero && noreply);
                if !valid {
                    return invalid(ClientError::BadDeleteUsage, noreply);
                }
            }
            match key(t[1], limits) {
                Some(key) => done(Request::Delete { key, noreply }),
                None => invalid(ClientError::BadCommandLine, noreply),
            }
        }
        b"touch" if n == 3 || n == 4 => {
            let noreply = noreply_at(3);
            let Some(key) = key(t[1], limits) else {
                return invalid(ClientError::BadCommandLine, noreply);
            };
            match int::<i64>(t[2]) {
                Some(exptime) => done(Request::Touch {
                    key,
                    exptime,
                    noreply,
                }),
                None => invalid(ClientError::InvalidExptime, noreply),
            }
        }
        b"flush_all" if n <= 3 => {
            let noreply = n > 1 && t[n - 1] == b"noreply";
            let delay = if n != if noreply { 2 } else { 1 } {
                match int::<i64>(t[1]) {
                    Some(d) => Some(d),
                    None => return invalid(ClientError::InvalidExptime, noreply),
                }
            } else {
                None
            };
            done(Request::FlushAll { delay, noreply })
        }
        b"version" => conn(ConnRequest::Version),
        b"verbosity" if n == 2 || n == 3 => {
            let noreply = t[n - 1] == b"noreply";
            match uint::<u32>(t[1]) {
                Some(level) => conn(ConnRequest::Verbosity { level, noreply }),
                None => invalid(ClientError::BadCommandLine, noreply),
            }
        }
        b"quit" => conn(ConnRequest::Quit),
        b"stats" if n >= 2 && matches!(t[1], b"items" | b"slabs" | b"sizes") => {
            admin(AdminRequest::Stats(match t[1] {
                b"items" => StoreStats::Items,
                b"slabs" => StoreStats::Slabs,
                _ => StoreStats::Sizes,
            }))
        }
        // memcached 1.6.18 looks at the two numbers and ignores the rest.
        b"stats" if n >= 2 && t[1] == b"cachedump" => {
            if n < 4 {
                return invalid(ClientError::StatsBadCommandLine, false);
            }
            let (Some(class), Some(limit)) = (uint::<u32>(t[2]), uint::<u32>(t[3])) else {
                return invalid(ClientError::BadCommandLine, false);
            };
            if class >= MAX_SLAB_CLASSES {
                return invalid(ClientError::IllegalSlabId, false);
            }
            admin(AdminRequest::CacheDump { class, limit })
        }
        b"cache_memlimit" if n == 2 || n == 3 => {
            let noreply = t[n - 1] == b"noreply";
            match uint::<u32>(t[1]) {
                None => invalid(ClientError::UnknownCommand, noreply),
                Some(mb) if mb < 8 => invalid(ClientError::MemlimitTooSmall, noreply),
                Some(mb) if mb > 1_000_000_000 => invalid(ClientError::MemlimitNotBytes, noreply),
                Some(megabytes) => admin(AdminRequest::MemLimit { megabytes, noreply }),
            }
        }
        b"slabs" if n >= 3 && t[1] == b"automove" => {
            let noreply = split_tokens(line)
                .take(MEMCACHED_MAX_TOKENS)
                .last()
                .is_some_and(|l| l == b"noreply");
            if t[2] == b"ratio" {
                let ratio = (n >= 4)
                    .then(|| std::str::from_utf8(t[3]).ok())
                    .flatten()
                    .filter(|r| r.parse::<f64>().is_ok());
                return match ratio {
                    Some(r) => admin(AdminRequest::SlabsAutomove {
                        setting: Automove::Ratio(r.to_string()),
                        noreply,
                    }),
                    None => invalid(ClientError::UnknownCommand, noreply),
                };
            }
            match uint::<u32>(t[2]) {
                None => invalid(ClientError::BadCommandLine, noreply),
                Some(level @ 0..=2) => admin(AdminRequest::SlabsAutomove {
                    setting: Automove::Level(level as u8),
                    noreply,
                }),
                Some(_) => invalid(ClientError::UnknownCommand, noreply),
            }
        }
        b"stats" => conn(ConnRequest::Stats {
            args: split_tokens(line)
                .skip(1)
                .map(Bytes::copy_from_slice)
                .collect(),
        }),
        cmd if is_http_request(cmd, line) => Parsed::Hangup,
        _ => invalid(ClientError::UnknownCommand, false),
    }
}

/// memcached's defence against cross-protocol requests: a line whose
/// command it does not know and whose last token (of the first
/// [`MEMCACHED_MAX_TOKENS`]) starts with `HTTP/` ends the connection.
/// Only commands that fall through all of memcached's dispatch reach
/// that check: a name of one character, a two-letter `m…` name, or a
/// name whose first letter is one memcached dispatches on (`g s a c i d
/// t`) is answered `ERROR` instead, as are known commands with the wrong
/// number of tokens.
fn is_http_request(cmd: &[u8], line: &[u8]) -> bool {
    const DISPATCHED: &[&[u8]] = &[
        b"replace",
        b"prepend",
        b"bget",
        b"flush_all",
        b"version",
        b"quit",
        b"lru_crawler",
        b"watch",
        b"verbosity",
        b"lru",
        b"extstore",
    ];
    let dispatched_by_letter = match cmd.first() {
        Some(b'm') => cmd.len() == 2,
        Some(c) => b"gsacidt".contains(c),
        None => true,
    };
    let falls_through = cmd.len() >= 2 && !dispatched_by_letter && !DISPATCHED.contains(&cmd);
    falls_through
        && split_tokens(line)
            .take(MEMCACHED_MAX_TOKENS)
            .last()
            .is_some_and(|t| t.starts_with(b"HTTP/"))
}

/// memcached's slab class ids are below this (`MAX_NUMBER_OF_SLAB_CLASSES`).
const MAX_SLAB_CLASSES: u32 = 64;

/// memcached tokenizes at most this many tokens of a line; the rest of
/// the line is left unread.
const MEMCACHED_MAX_TOKENS: usize = 23;

/// The rest of a storage command: its numbers, then its data block.
fn storage(
    buf: &[u8],
    consumed: usize,
    op: StoreOp,
    t: &[&[u8]],
    noreply: bool,
    limits: &Limits,
) -> Parsed {
    let bad = Parsed::Invalid {
        error: ClientError::BadCommandLine,
        consumed,
        noreply,
        skip: 0,
    };
    let Some(key) = key(t[1], limits) else {
        return bad;
    };
    let (Some(flags), Some(exptime), Some(len)) =
        (uint::<u32>(t[2]), int::<Exptime>(t[3]), int::<i32>(t[4]))
    else {
        return bad;
    };
    let cas_unique = if op == StoreOp::Cas {
        match uint::<u64>(t[5]) {
            Some(c) => c,
            None => return bad,
        }
    } else {
        0
    };
    // memcached refuses lengths that would overflow once the "\r\n" is added.
    let Ok(len) = usize::try_from(len) else {
        return bad;
    };
    if len > i32::MAX as usize - 2 {
        return bad;
    }
    // Checked before anything is buffered: the block is discarded unread.
    if len > limits.item_size_max {
        return Parsed::Request {
            request: Incoming::Data(Request::TooLarge { op, key, noreply }),
            consumed,
            skip: len + 2,
        };
    }
    let end = consumed + len + 2;
    if buf.len() < end {
        return Parsed::Incomplete;
    }
    if &buf[end - 2..end] != b"\r\n" {
        return Parsed::Invalid {
            error: ClientError::BadDataChunk,
            consumed: end,
            noreply,
            skip: 0,
        };
    }
    Parsed::Request {
        request: Incoming::Data(Request::Store {
            op,
            key,
            flags,
            exptime,
            data: Bytes::copy_from_slice(&buf[consumed..end - 2]),
            cas_unique,
            noreply,
        }),
        consumed: end,
        skip: 0,
    }
}

/// One line up to `\n` (streaming: `Incomplete` until the `\n` arrives).
fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    let (rest, line) = take_until("\n")(input)?;
    Ok((&rest[1..], line))
}

/// No `\n` yet. memcached lets a partial `get` line grow (multi-gets are
/// long) and gives up on anything else past 2048 bytes; so do we, with the
/// limits configured.
fn incomplete_line(buf: &[u8], limits: &Limits) -> Parsed {
    // NOTE: this covers the partial line only; a complete line is checked
    // against the same limits once its `\n` has arrived.
    let limit = if is_get_family(buf) {
        limits.max_get_line_bytes
    } else {
        limits.max_line_bytes
    };
    if buf.len() > limit + 1 {
        Parsed::Fatal(ClientError::LineTooLong)
    } else {
        Parsed::Incomplete
    }
}

/// True when the line starts with a complete `get`/`gets`/`gat`/`gats` token.
fn is_get_family(line: &[u8]) -> bool {
    let start = line.iter().position(|&b| b != b' ').unwrap_or(line.len());
    let rest = &line[start..];
    [&b"get "[..], b"gets ", b"gat ", b"gats "]
        .iter()
        .any(|p| rest.starts_with(p))
}

/// memcached's tokenizer: tokens are separated by runs of spaces (only
/// spaces; a tab is part of a token).
fn split_tokens(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| b == b' ').filter(|t| !t.is_empty())
}

/// The keys of a get-family line: its tokens from `first` on. `fixed` holds
/// the line's first tokens and `n` counts them all; a line of no more
/// tokens than `fixed` holds is not split again.
fn keys(
    line: &[u8],
    fixed: &[&[u8]],
    n: usize,
    first: usize,
    limits: &Limits,
) -> Result<Vec<Bytes>, ClientError> {
    if n <= fixed.len() {
        key_list(fixed[first..n].iter().copied(), n - first, limits)
    } else {
        key_list(split_tokens(line).skip(first), n - first, limits)
    }
}

fn key_list<'a>(
    tokens: impl Iterator<Item = &'a [u8]>,
    count: usize,
    limits: &Limits,
) -> Result<Vec<Bytes>, ClientError> {
    let mut keys = Vec::with_capacity(count.min(limits.max_keys_per_get));
    for t in tokens {
        if keys.len() == limits.max_keys_per_get {
            return Err(ClientError::BadCommandLine);
        }
        keys.push(key(t, limits).ok_or(ClientError::BadCommandLine)?);
    }
    Ok(keys)
}

/// A key within the length limit and free of control characters.
/// (memcached 1.6.18 takes control characters other than space and newline
/// in text-protocol keys; the protocol forbids them, so memdial refuses.)
fn key(token: &[u8], limits: &Limits) -> Option<Bytes> {
    let ok = token.len() <= limits.max_key_bytes && !token.iter().any(|&b| b < 0x20 || b == 0x7f);
    ok.then(|| Bytes::copy_from_slice(token))
}

/// A whole token that is an optionally signed decimal number.
fn decimal(token: &[u8]) -> Option<(bool, &[u8])> {
    let parsed: IResult<&[u8], (Option<char>, &[u8])> =
        all_consuming((opt(one_of("+-")), recognize(digit1))).parse(token);
    let (_, (sign, digits)) = parsed.ok()?;
    Some((sign == Some('-'), digits))
}

/// The value of `digits` (ASCII digits only: the caller checked), or
/// `None` past `u64`.
pub(super) fn magnitude(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// An unsigned number as memcached's `safe_strtoul`/`safe_strtoull` read
/// it: a leading `+` is fine, a `-` or a value out of range is not.
pub(super) fn uint<T: TryFrom<u64>>(token: &[u8]) -> Option<T> {
    match decimal(token)? {
        (false, digits) => T::try_from(magnitude(digits)?).ok(),
        (true, _) => None,
    }
}

/// A signed number as `safe_strtol` reads it.
pub(super) fn int<T: TryFrom<i64>>(token: &[u8]) -> Option<T> {
    let (negative, digits) = decimal(token)?;
    let m = i64::try_from(magnitude(digits)?).ok()?;
    T::try_from(if negative { -m } else { m }).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8]) -> Parsed {
        parse_request(input, &Limits::default())
    }

    fn incoming(input: &[u8]) -> Incoming {
        match parse(input) {
            Parsed::Request {
                request,
                consumed,
                skip: 0,
            } => {
                assert_eq!(consumed, input.len(), "{input:?} consumed");
                request
            }
            other => panic!("{input:?}: expected a request, got {other:?}"),
        }
    }

    fn request(input: &[u8]) -> Request {
        match incoming(input) {
            Incoming::Data(r) => r,
            other => panic!("{input:?}: expected a data request, got {other:?}"),
        }
    }

    fn conn(input: &[u8]) -> ConnRequest {
        match incoming(input) {
            Incoming::Conn(r) => r,
            other => panic!("{input:?}: expected a connection request, got {other:?}"),
        }
    }

    fn error(input: &[u8]) -> (ClientError, usize, bool) {
        match parse(input) {
            Parsed::Invalid {
                error,
                consumed,
                noreply,
                skip: 0,
            } => (error, consumed, noreply),
            other => panic!("{input:?}: expected an error, got {other:?}"),
        }
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn get_family_takes_many_keys_and_any_spacing() {
        assert_eq!(
            request(b"get a b c\r\n"),
            Request::Get {
                keys: vec![b("a"), b("b"), b("c")],
                cas: false
            }
        );
        assert_eq!(
            request(b"  gets   a   \n"),
            Request::Get {
                keys: vec![b("a")],
                cas: true
            }
        );
        assert_eq!(
            request(b"gat 10 a b\r\n"),
            Request::Gat {
                exptime: 10,
                keys: vec![b("a"), b("b")],
                cas: false
            }
        );
        // memcached answers a `gat` with no key with a bare END.
        assert_eq!(
            request(b"gats -1\r\n"),
            Request::Gat {
                exptime: -1,
                keys: vec![],
                cas: true
            }
        );
        // Either side of the tokens the parser holds without splitting
        // the line again: the keys come whole and in order.
        for count in 5..=10 {
            let names: Vec<String> = (0..count).map(|i| format!("k{i}")).collect();
            let want: Vec<Bytes> = names.iter().map(|k| b(k)).collect();
            let get = format!("get {}\r\n", names.join(" "));
            assert_eq!(
                request(get.as_bytes()),
                Request::Get {
                    keys: want.clone(),
                    cas: false
                },
                "{count} keys"
            );
            let gat = format!("gat 7 {}\r\n", names.join(" "));
            assert_eq!(
                request(gat.as_bytes()),
                Request::Gat {
                    exptime: 7,
                    keys: want,
                    cas: false
                },
                "{count} keys"
            );
        }
        let many = format!("get {}\r\n", vec!["k"; 30].join(" "));
        let Request::Get { keys, .. } = request(many.as_bytes()) else {
            panic!()
        };
        assert_eq!(keys.len(), 30);
    }

    #[test]
    fn get_family_errors() {
        assert_eq!(error(b"get\r\n").0, ClientError::UnknownCommand);
        assert_eq!(error(b"gat\r\n").0, ClientError::UnknownCommand);
        assert_eq!(error(b"gat x k\r\n").0, ClientError::InvalidExptime);
        let long = format!("get ok {}\r\n", "k".repeat(251));
        assert_eq!(error(long.as_bytes()).0, ClientError::BadCommandLine);
        let edge = format!("get {}\r\n", "k".repeat(250));
        assert!(matches!(request(edge.as_bytes()), Request::Get { .. }));
        assert_eq!(error(b"get a\x01b\r\n").0, ClientError::BadCommandLine);
        let limits = Limits {
            max_keys_per_get: 2,
            ..Limits::default()
        };
        assert!(matches!(
            parse_request(b"get a b c\r\n", &limits),
            Parsed::Invalid {
                error: ClientError::BadCommandLine,
                ..
            }
        ));
    }

    #[test]
    fn storage_commands() {
        assert_eq!(
            request(b"set k 5 10 3\r\nabc\r\n"),
            Request::Store {
                op: StoreOp::Set,
                key: b("k"),
                flags: 5,
                exptime: 10,
                data: b("abc"),
                cas_unique: 0,
                noreply: false
            }
        );
        assert_eq!(
            request(b"cas k 0 0 2 99 noreply\r\n\r\n\r\n"),
            Request::Store {
                op: StoreOp::Cas,
                key: b("k"),
                flags: 0,
                exptime: 0,
                data: b("\r\n"),
                cas_unique: 99,
                noreply: true
            }
        );
        for (cmd, op) in [
            ("add", StoreOp::Add),
            ("replace", StoreOp::Replace),
            ("append", StoreOp::Append),
            ("prepend", StoreOp::Prepend),
        ] {
            let input = format!("{cmd} k 0 0 1\r\nx\r\n");
            assert!(matches!(request(input.as_bytes()), Request::Store { op: o, .. } if o == op));
        }
        // A sixth token other than `noreply` is ignored, as memcached does.
        assert!(matches!(
            request(b"set k 0 0 1 norepl\r\na\r\n"),
            Request::Store { noreply: false, .. }
        ));
        // Signs and leading zeros as strtol reads them.
        assert!(matches!(
            request(b"set k +1 -1 01\r\na\r\n"),
            Request::Store {
                flags: 1,
                exptime: -1,
                ..
            }
        ));
        // A bare `\n` ends the command line too.
        assert!(matches!(
            request(b"set k 0 0 1\na\r\n"),
            Request::Store { .. }
        ));
    }

    #[test]
    fn storage_waits_for_the_whole_data_block() {
        assert_eq!(parse(b"set k 0 0 5\r\nabc"), Parsed::Incomplete);
        assert_eq!(parse(b"set k 0 0 5\r\nabcde\r"), Parsed::Incomplete);
        assert_eq!(parse(b"set k 0 0 5"), Parsed::Incomplete);
    }

    #[test]
    fn storage_errors() {
        // The data line is left in the buffer: memcached reads it as a command.
        let input = b"set k 0 0 x\r\nab\r\n";
        assert_eq!(error(input), (ClientError::BadCommandLine, 13, false));
        assert_eq!(
            error(b"set k -1 0 1\r\n"),
            (ClientError::BadCommandLine, 14, false)
        );
        assert_eq!(error(b"set k 0 0 -1\r\n").0, ClientError::BadCommandLine);
        assert_eq!(error(b"set k 0 1x 1\r\n").0, ClientError::BadCommandLine);
        assert_eq!(
            error(b"set k 4294967296 0 1\r\n").0,
            ClientError::BadCommandLine
        );
        assert_eq!(
            error(b"set k 0 0 2147483646\r\n").0,
            ClientError::BadCommandLine
        );
        assert_eq!(
            error(b"set k 0 0 1 noreply x\r\n").0,
            ClientError::UnknownCommand
        );
        assert_eq!(error(b"set k 0 0\r\n").0, ClientError::UnknownCommand);
        assert_eq!(error(b"cas k 0 0 1\r\n").0, ClientError::UnknownCommand);
        assert_eq!(error(b"cas k 0 0 1 -5\r\n").0, ClientError::BadCommandLine);
        let long = format!("set {} 0 0 1 noreply\r\n", "k".repeat(251));
        assert_eq!(error(long.as_bytes()).0, ClientError::BadCommandLine);
        assert!(error(long.as_bytes()).2, "noreply silences the error");
        // The data block is consumed whole, then checked for its "\r\n".
        assert_eq!(
            error(b"set k 0 0 3\r\nabcde\r\n"),
            (ClientError::BadDataChunk, 18, false)
        );
        assert_eq!(
            error(b"set k 0 0 3 noreply\r\nabcde\r\n"),
            (ClientError::BadDataChunk, 26, true)
        );
    }

    #[test]
    fn too_large_is_discarded_unread() {
        let p = parse(b"set k 0 0 2000000\r\n");
        assert_eq!(
            p,
            Parsed::Request {
                request: Incoming::Data(Request::TooLarge {
                    op: StoreOp::Set,
                    key: b("k"),
                    noreply: false
                }),
                consumed: 19,
                skip: 2_000_002
            }
        );
        let at_limit = format!("set k 0 0 {}\r\n", Limits::default().item_size_max);
        assert_eq!(parse(at_limit.as_bytes()), Parsed::Incomplete);
    }

    #[test]
    fn arithmetic() {
        assert_eq!(
            request(b"incr n 18446744073709551615\r\n"),
            Request::Arith {
                op: ArithOp::Incr,
                key: b("n"),
                delta: u64::MAX,
                noreply: false
            }
        );
        assert!(matches!(
            request(b"decr n 1 noreply\r\n"),
            Request::Arith {
                op: ArithOp::Decr,
                noreply: true,
                ..
            }
        ));
        assert_eq!(error(b"incr n -1\r\n").0, ClientError::InvalidDelta);
        assert_eq!(
            error(b"incr n 18446744073709551616\r\n").0,
            ClientError::InvalidDelta
        );
        assert_eq!(error(b"incr n\r\n").0, ClientError::UnknownCommand);
        assert_eq!(error(b"incr n 1 2 3\r\n").0, ClientError::UnknownCommand);
        let long = format!("incr {} 1\r\n", "k".repeat(251));
        assert_eq!(error(long.as_bytes()).0, ClientError::BadCommandLine);
    }

    #[test]
    fn delete_accepts_only_a_zero_hold_and_noreply() {
        assert_eq!(
            request(b"delete k\r\n"),
            Request::Delete {
                key: b("k"),
                noreply: false
            }
        );
        assert!(matches!(
            request(b"delete k 0\r\n"),
            Request::Delete { noreply: false, .. }
        ));
        assert!(matches!(
            request(b"delete k noreply\r\n"),
            Request::Delete { noreply: true, .. }
        ));
        assert!(matches!(
            request(b"delete k 0 noreply\r\n"),
            Request::Delete { noreply: true, .. }
        ));
        assert_eq!(error(b"delete k 1\r\n").0, ClientError::BadDeleteUsage);
        assert_eq!(
            error(b"delete k noreply 0\r\n").0,
            ClientError::BadDeleteUsage
        );
        assert_eq!(error(b"delete k x y z\r\n").0, ClientError::UnknownCommand);
        assert_eq!(error(b"delete\r\n").0, ClientError::UnknownCommand);
    }

    #[test]
    fn touch_flush_verbosity_version_quit_stats() {
        assert_eq!(
            request(b"touch k -1 noreply\r\n"),
            Request::Touch {
                key: b("k"),
                exptime: -1,
                noreply: true
            }
        );
        assert_eq!(error(b"touch k x\r\n").0, ClientError::InvalidExptime);
        assert_eq!(error(b"touch k\r\n").0, ClientError::UnknownCommand);
        assert_eq!(
            request(b"flush_all\r\n"),
            Request::FlushAll {
                delay: None,
                noreply: false
            }
        );
        assert_eq!(
            request(b"flush_all noreply\r\n"),
            Request::FlushAll {
                delay: None,
                noreply: true
            }
        );
        assert_eq!(
            request(b"flush_all 5 x\r\n"),
            Request::FlushAll {
                delay: Some(5),
                noreply: false
            }
        );
        assert_eq!(error(b"flush_all x\r\n").0, ClientError::InvalidExptime);
        assert_eq!(error(b"flush_all 0 0 0\r\n").0, ClientError::UnknownCommand);
        assert_eq!(
            conn(b"verbosity 1 2\r\n"),
            ConnRequest::Verbosity {
                level: 1,
                noreply: false
            }
        );
        assert_eq!(error(b"verbosity x\r\n").0, ClientError::BadCommandLine);
        assert_eq!(error(b"verbosity\r\n").0, ClientError::UnknownCommand);
        assert_eq!(conn(b"version x\r\n"), ConnRequest::Version);
        assert_eq!(conn(b"quit\r\n"), ConnRequest::Quit);
        assert_eq!(
            conn(b"stats settings\r\n"),
            ConnRequest::Stats {
                args: vec![b("settings")]
            }
        );
    }

    fn admin(input: &[u8]) -> AdminRequest {
        match incoming(input) {
            Incoming::Admin(r) => r,
            other => panic!("{input:?}: expected an admin request, got {other:?}"),
        }
    }

    #[test]
    fn store_admin_requests_as_memcached_1_6_18_reads_them() {
        assert_eq!(
            admin(b"stats items x\r\n"),
            AdminRequest::Stats(StoreStats::Items)
        );
        assert_eq!(
            admin(b"stats slabs\r\n"),
            AdminRequest::Stats(StoreStats::Slabs)
        );
        assert_eq!(
            admin(b"stats sizes\r\n"),
            AdminRequest::Stats(StoreStats::Sizes)
        );
        assert_eq!(
            admin(b"stats cachedump +1 0 extra\r\n"),
            AdminRequest::CacheDump { class: 1, limit: 0 }
        );
        assert_eq!(
            error(b"stats cachedump 1\r\n").0,
            ClientError::StatsBadCommandLine
        );
        assert_eq!(
            error(b"stats cachedump -1 0\r\n").0,
            ClientError::BadCommandLine
        );
        assert_eq!(
            error(b"stats cachedump 64 0\r\n").0,
            ClientError::IllegalSlabId
        );
        assert_eq!(
            admin(b"cache_memlimit 100 x\r\n"),
            AdminRequest::MemLimit {
                megabytes: 100,
                noreply: false
            }
        );
        assert!(admin(b"cache_memlimit 8 noreply\r\n").noreply());
        assert_eq!(error(b"cache_memlimit\r\n").0, ClientError::UnknownCommand);
        assert_eq!(
            error(b"cache_memlimit 1 2 3\r\n").0,
            ClientError::UnknownCommand
        );
        assert_eq!(
            error(b"cache_memlimit x noreply\r\n"),
            (ClientError::UnknownCommand, 26, true)
        );
        assert_eq!(
            error(b"cache_memlimit 7\r\n").0,
            ClientError::MemlimitTooSmall
        );
        assert_eq!(
            error(b"cache_memlimit 1000000001\r\n").0,
            ClientError::MemlimitNotBytes
        );
        // memcached wraps this to 0 (too small); memdial refuses it.
        assert_eq!(
            error(b"cache_memlimit 4294967296\r\n").0,
            ClientError::UnknownCommand
        );
        assert_eq!(
            admin(b"slabs automove 2 noreply\r\n"),
            AdminRequest::SlabsAutomove {
                setting: Automove::Level(2),
                noreply: true
            }
        );
        assert_eq!(
            admin(b"slabs automove ratio 0.5\r\n"),
            AdminRequest::SlabsAutomove {
                setting: Automove::Ratio("0.5".into()),
                noreply: false
            }
        );
        assert_eq!(error(b"slabs automove\r\n").0, ClientError::UnknownCommand);
        assert_eq!(
            error(b"slabs automove 3\r\n").0,
            ClientError::UnknownCommand
        );
        assert_eq!(
            error(b"slabs automove ratio x\r\n").0,
            ClientError::UnknownCommand
        );
        assert_eq!(
            error(b"slabs automove x\r\n").0,
            ClientError::BadCommandLine
        );
        assert!(error(b"slabs automove x noreply\r\n").2);
        assert_eq!(
            error(b"slabs reassign 1 2\r\n").0,
            ClientError::UnknownCommand
        );
    }

    #[test]
    fn unknown_and_empty_lines_are_error() {
        assert_eq!(error(b"\r\n"), (ClientError::UnknownCommand, 2, false));
        assert_eq!(error(b"GET k\r\n").0, ClientError::UnknownCommand);
        assert_eq!(error(b"bogus\n").0, ClientError::UnknownCommand);
    }

    #[test]
    fn http_request_lines_hang_up_as_memcached_does() {
        // Checked against memcached 1.6.18: each of these closes the
        // connection with no reply.
        for line in [
            &b"GET / HTTP/1.0\r\n"[..],
            b"POST /x HTTP/1.1\r\n",
            b"HTTP/1.1\r\n",
            b"foo HTTP/1.0 \r\n",
            b"mgx HTTP/1\r\n",
            b"replacex a HTTP/1.1\r\n",
        ] {
            assert_eq!(parse(line), Parsed::Hangup, "{line:?}");
        }
        // ... and each of these is answered `ERROR` or served.
        for line in [
            &b"foo HTTP/x y\r\n"[..],
            b"foo http/1.0\r\n",
            b"foo HTTP\r\n",
            b"x HTTP/1.0\r\n",
            b"gx HTTP/1.0\r\n",
            b"mx HTTP/1.0\r\n",
            b"lru_crawler HTTP/1.1\r\n",
            b"verbosity 1 2 HTTP/1.1\r\n",
        ] {
            assert_eq!(error(line).0, ClientError::UnknownCommand, "{line:?}");
        }
        assert!(matches!(
            request(b"get a HTTP/1.1\r\n"),
            Request::Get { .. }
        ));
        // Only the first 23 tokens are looked at.
        let far = format!("foo {} HTTP/1.0\r\n", vec!["x"; 22].join(" "));
        assert_eq!(error(far.as_bytes()).0, ClientError::UnknownCommand);
        let near = format!("foo {} HTTP/1.0\r\n", vec!["x"; 21].join(" "));
        assert_eq!(parse(near.as_bytes()), Parsed::Hangup);
    }

    #[test]
    fn complete_lines_up_to_memcached_s_read_buffer_are_answered() {
        // memcached 1.6.18 answers a 16,382-byte unknown command plus
        // `\r\n` with ERROR and goes on; one byte more and it hangs up.
        let mut line = vec![b'x'; 16_382];
        line.extend_from_slice(b"\r\n");
        assert_eq!(error(&line).0, ClientError::UnknownCommand);
        let mut line = vec![b'x'; 4096];
        line.extend_from_slice(b"\r\n");
        assert_eq!(error(&line).0, ClientError::UnknownCommand);
        let mut line = vec![b'x'; 16_383];
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line), Parsed::Fatal(ClientError::LineTooLong));
    }

    #[test]
    fn a_get_takes_every_key_its_line_holds() {
        // memcached answers an 18,725-key get line of 187 KB.
        let keys: Vec<String> = (0..18_725).map(|i| format!("key-{i:05}")).collect();
        let line = format!("get {}\r\n", keys.join(" "));
        assert!(line.len() > 180_000);
        let Request::Get { keys: got, .. } = request(line.as_bytes()) else {
            panic!("not a get")
        };
        assert_eq!(got.len(), 18_725);
    }

    #[test]
    fn line_limits() {
        let limits = Limits::default();
        let partial = vec![b'x'; limits.max_line_bytes + 2];
        assert_eq!(parse(&partial), Parsed::Fatal(ClientError::LineTooLong));
        assert_eq!(parse(&partial[..limits.max_line_bytes]), Parsed::Incomplete);
        let mut long_get = b"get ".to_vec();
        long_get.resize(limits.max_line_bytes * 4, b'k');
        assert_eq!(
            parse(&long_get),
            Parsed::Incomplete,
            "multi-get lines may be long"
        );
        long_get.resize(limits.max_get_line_bytes + 2, b'k');
        assert_eq!(parse(&long_get), Parsed::Fatal(ClientError::LineTooLong));
        let mut complete = vec![b' '; limits.max_line_bytes + 1];
        complete.extend_from_slice(b"version\r\n");
        assert_eq!(parse(&complete), Parsed::Fatal(ClientError::LineTooLong));
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let input = b"get a\r\nset b 0 0 1\r\nx\r\ndelete b\r\n";
        let mut at = 0;
        let mut seen = Vec::new();
        while at < input.len() {
            let Parsed::Request {
                request, consumed, ..
            } = parse(&input[at..])
            else {
                panic!("at {at}")
            };
            seen.push(request.command());
            at += consumed;
        }
        use super::super::Command::*;
        assert_eq!(seen, vec![Get, Set, Delete]);
    }
}
