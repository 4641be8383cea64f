//! Parses a memcached backend's replies. Each reply is read knowing the
//! request it answers, so a multi-key `get` is framed by its `END` and a
//! number is only taken as a number where a number may come.

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

use super::parse::magnitude;
use super::{ErrorReply, MetaCode, MetaReply, Request, Response, Value};

/// What the front of a backend connection's buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyParsed {
    Incomplete,
    Complete {
        response: Response,
        consumed: usize,
    },
    /// The backend said something that cannot answer this request; the
    /// connection's framing is lost and it must be dropped.
    Invalid(String),
}

fn line_at(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = &buf[at..];
    let nl = memchr(rest)?;
    let line = &rest[..nl];
    Some((line.strip_suffix(b"\r").unwrap_or(line), at + nl + 1))
}

fn memchr(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b'\n')
}

fn error_line(line: &[u8]) -> Option<Response> {
    let text = |m: &[u8]| String::from_utf8_lossy(m).into_owned();
    if line == b"ERROR" {
        Some(Response::Error(ErrorReply::Error))
    } else if let Some(m) = line.strip_prefix(b"CLIENT_ERROR ") {
        Some(Response::Error(ErrorReply::Client(text(m))))
    } else {
        line.strip_prefix(b"SERVER_ERROR ")
            .map(|m| Response::Error(ErrorReply::Server(text(m))))
    }
}

fn invalid(request: &Request, line: &[u8]) -> ReplyParsed {
    ReplyParsed::Invalid(format!(
        "unexpected reply to {}: {:?}",
        request.command().as_str(),
        String::from_utf8_lossy(&line[..line.len().min(80)])
    ))
}

/// A value at least this long is not copied out of a backend connection's
/// read buffer by [`ReplyBuffer::take`]: the reply's bytes are split off
/// the buffer and the value is a slice of them, so it goes from
/// memcached's socket to the client's without a copy in memdial (the
/// client side writes values this large from their `Bytes`). A slice keeps
/// its whole buffer allocated until it is written ([`value_footprint`]),
/// so smaller values are copied.
pub const SHARED_VALUE_MIN: usize = 16 * 1024;

/// The room a backend connection's read buffer has for each read, at
/// least.
pub const BACKEND_READ_CHUNK: usize = 64 * 1024;

/// A backend connection's buffer, read or write, that a long exchange grew
/// past this is given back once empty, so idle connections stay small
/// ([`ReplyBuffer::release_if_large`] for the read buffer).
pub const BACKEND_IDLE_BUFFER_MAX: usize = 256 * 1024;

/// The memory a value of `len` bytes from a backend is counted as holding
/// while it waits to be written: a shared value holds its read buffer,
/// and [`ReplyBuffer::take`] shares a reply's values only from a buffer no
/// larger than their footprints together.
pub fn value_footprint(len: usize) -> usize {
    if len >= SHARED_VALUE_MIN {
        len + 2 * BACKEND_READ_CHUNK
    } else {
        len
    }
}

/// A backend connection's read buffer: bytes are read into it
/// ([`ReplyBuffer::for_read`]) and replies taken off its front
/// ([`ReplyBuffer::take`]). When it runs short of room it moves what it
/// holds into a new allocation (or back to the front of its own, when
/// nothing else holds it); it is never grown in place, so the size of the
/// allocation shared values hold is known, and bounded by their
/// [`value_footprint`]s.
#[derive(Debug, Default)]
pub struct ReplyBuffer {
    buf: BytesMut,
    /// The size of `buf`'s allocation.
    size: usize,
}

impl ReplyBuffer {
    pub fn new() -> ReplyBuffer {
        ReplyBuffer::default()
    }

    /// Whether every byte read was taken.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes read and not yet taken.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The buffer to read into (at most its spare capacity, as
    /// `read_buf` does), with at least [`BACKEND_READ_CHUNK`] free. Short
    /// of that, what it holds moves to the front of its
    /// allocation, when nothing else holds the allocation and a long reply
    /// did not make it larger than needed; otherwise to a new allocation of
    /// what it holds and a whole chunk more, or twice what it holds (so a
    /// long reply arriving costs copies of about its own length, not one
    /// per chunk).
    pub fn for_read(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < BACKEND_READ_CHUNK {
            let held = self.buf.len();
            let size = (held + BACKEND_READ_CHUNK).max(2 * held);
            let oversized = self.size > size.max(BACKEND_IDLE_BUFFER_MAX);
            if oversized || !self.buf.try_reclaim(BACKEND_READ_CHUNK) {
                let mut fresh = BytesMut::with_capacity(size);
                fresh.extend_from_slice(&self.buf);
                self.buf = fresh;
                self.size = self.buf.capacity();
            }
        }
        &mut self.buf
    }

    /// Gives back an empty buffer that a long reply made large.
    pub fn release_if_large(&mut self) {
        if self.buf.is_empty() && self.size > BACKEND_IDLE_BUFFER_MAX {
            *self = ReplyBuffer::new();
        }
    }

    /// The reply to `request` at the front, taken off: `None` while it is
    /// not all there, `Err` when it does not frame against the request (the
    /// connection's framing is lost). Values of [`SHARED_VALUE_MIN`] bytes
    /// or more are slices of the buffer when its allocation is within
    /// their [`value_footprint`]s together (a joined `get` brings many in
    /// one reply); the rest are copied.
    pub fn take(&mut self, request: &Request) -> Result<Option<Response>, String> {
        let mut left = Vec::new();
        match parse(request, &self.buf, Some(&mut left)) {
            ReplyParsed::Complete {
                mut response,
                consumed,
            } => {
                if consumed == 0 || consumed > self.buf.len() {
                    return Err(format!(
                        "reply parser consumed {consumed} of {} bytes",
                        self.buf.len()
                    ));
                }
                let counted: usize = left.iter().map(|l| value_footprint(l.range.len())).sum();
                if left.is_empty() || counted < self.size {
                    fill(&mut response, left, |r| {
                        Bytes::copy_from_slice(&self.buf[r])
                    });
                    self.buf.advance(consumed);
                } else {
                    let bytes = self.buf.split_to(consumed).freeze();
                    fill(&mut response, left, |r| bytes.slice(r));
                }
                Ok(Some(response))
            }
            ReplyParsed::Incomplete => Ok(None),
            ReplyParsed::Invalid(reason) => Err(reason),
        }
    }
}

/// A value [`parse`] left in the buffer: the data of the reply's value
/// `index` (a meta reply has one, index 0) is `buf[range]`.
struct Left {
    index: usize,
    range: Range<usize>,
}

/// Puts the values [`parse`] left into `response`, each made by `data`
/// from its place in the buffer.
fn fill(response: &mut Response, left: Vec<Left>, data: impl Fn(Range<usize>) -> Bytes) {
    for Left { index, range } in left {
        match response {
            Response::Values(values) => values[index].data = data(range),
            Response::Meta(m) => m.value = Some(data(range)),
            _ => unreachable!("only values are left in the buffer"),
        }
    }
}

/// The data at `range` of `buf`: copied, or, when `left` is given and it
/// is long enough, left for [`fill`] (empty meanwhile).
fn data(buf: &[u8], range: Range<usize>, index: usize, left: Option<&mut Vec<Left>>) -> Bytes {
    match left {
        Some(left) if range.len() >= SHARED_VALUE_MIN => {
            left.push(Left { index, range });
            Bytes::new()
        }
        _ => Bytes::copy_from_slice(&buf[range]),
    }
}

/// Parses the reply to `request` at the front of `buf`; every value is
/// copied out of it.
pub fn parse_reply(request: &Request, buf: &[u8]) -> ReplyParsed {
    parse(request, buf, None)
}

/// [`parse_reply`], leaving long values in `buf` for the caller when
/// `left` is given ([`ReplyBuffer::take`]).
fn parse(request: &Request, buf: &[u8], mut left: Option<&mut Vec<Left>>) -> ReplyParsed {
    let Some((line, mut at)) = line_at(buf, 0) else {
        return ReplyParsed::Incomplete;
    };
    let done = |response, consumed| ReplyParsed::Complete { response, consumed };
    match request {
        Request::MetaNoop if line == b"MN" => {
            return done(Response::Meta(MetaReply::new(MetaCode::Mn, "")), at);
        }
        Request::Meta(m) if m.flags.quiet => {
            // Forwarded as the request then `mn`: `MN` alone means the
            // reply was hidden.
            if line == b"MN" {
                return done(Response::Quiet, at);
            }
            let (response, end) = match meta_reply(request, buf, line, at, left) {
                ReplyParsed::Complete { response, consumed } => (response, consumed),
                other => return other,
            };
            return match line_at(buf, end) {
                None => ReplyParsed::Incomplete,
                Some((b"MN", next)) => done(response, next),
                Some((other, _)) => invalid(request, other),
            };
        }
        Request::Meta(_) => return meta_reply(request, buf, line, at, left),
        _ => {}
    }
    if let Some(e) = error_line(line) {
        return done(e, at);
    }
    let simple = match (request, line) {
        (Request::Store { .. }, b"STORED") => Some(Response::Stored),
        (Request::Store { .. }, b"NOT_STORED") => Some(Response::NotStored),
        (Request::Store { .. }, b"EXISTS") => Some(Response::Exists),
        (Request::Store { .. } | Request::Arith { .. }, b"NOT_FOUND") => Some(Response::NotFound),
        (Request::Delete { .. } | Request::Touch { .. }, b"NOT_FOUND") => Some(Response::NotFound),
        (Request::Delete { .. }, b"DELETED") => Some(Response::Deleted),
        (Request::Touch { .. }, b"TOUCHED") => Some(Response::Touched),
        (Request::FlushAll { .. }, b"OK") => Some(Response::Ok),
        (Request::Arith { .. }, digits) => decimal(digits).map(Response::Number),
        _ => None,
    };
    if let Some(r) = simple {
        return done(r, at);
    }
    match request {
        Request::Get { .. } | Request::Gat { .. } => {
            let mut values = Vec::new();
            let mut line = line;
            loop {
                if line == b"END" {
                    return done(Response::Values(values), at);
                }
                let Some(header) = value_header(line) else {
                    return invalid(request, line);
                };
                let Some(end) = at.checked_add(header.len).and_then(|e| e.checked_add(2)) else {
                    return invalid(request, line);
                };
                if buf.len() < end {
                    return ReplyParsed::Incomplete;
                }
                if &buf[end - 2..end] != b"\r\n" {
                    return invalid(request, line);
                }
                let index = values.len();
                values.push(Value {
                    key: Bytes::copy_from_slice(header.key),
                    flags: header.flags,
                    data: data(buf, at..end - 2, index, left.as_deref_mut()),
                    cas: header.cas,
                });
                at = end;
                match line_at(buf, at) {
                    Some((l, next)) => {
                        line = l;
                        at = next;
                    }
                    None => return ReplyParsed::Incomplete,
                }
            }
        }
        _ => invalid(request, line),
    }
}

/// One meta reply (or error line) whose first line is `line`, ending at
/// `at`; a `VA` reply's value follows.
fn meta_reply(
    request: &Request,
    buf: &[u8],
    line: &[u8],
    at: usize,
    left: Option<&mut Vec<Left>>,
) -> ReplyParsed {
    let done = |response, consumed| ReplyParsed::Complete { response, consumed };
    if let Some(e) = error_line(line) {
        return done(e, at);
    }
    let code = line.get(..2).and_then(MetaCode::parse);
    let Some(code) = code.filter(|_| line.len() == 2 || line[2] == b' ') else {
        return invalid(request, line);
    };
    if code != MetaCode::Va {
        let rest = Bytes::copy_from_slice(&line[2..]);
        return done(Response::Meta(MetaReply::new(code, rest)), at);
    }
    // `VA <size><flags>`
    let after = &line[2..];
    let digits_end = after
        .iter()
        .skip(1)
        .position(|b| !b.is_ascii_digit())
        .map_or(after.len(), |i| i + 1);
    let size =
        decimal(&after[1.min(after.len())..digits_end]).and_then(|n| usize::try_from(n).ok());
    let Some(size) = size else {
        return invalid(request, line);
    };
    let Some(end) = at.checked_add(size).and_then(|e| e.checked_add(2)) else {
        return invalid(request, line);
    };
    if buf.len() < end {
        return ReplyParsed::Incomplete;
    }
    if &buf[end - 2..end] != b"\r\n" {
        return invalid(request, line);
    }
    done(
        Response::Meta(MetaReply {
            code,
            rest: Bytes::copy_from_slice(&after[digits_end..]),
            value: Some(data(buf, at..end - 2, 0, left)),
        }),
        end,
    )
}

/// What [`parse_reply`] reads of `request`: the request without its keys
/// and data, which the reply parser never looks at. Made without an
/// allocation for a text request, so a multiplexed connection can keep one
/// per request in flight cheaply; a meta request is kept whole.
pub fn reply_shape(request: &Request) -> Request {
    let none = Bytes::new;
    match request {
        Request::Get { cas, .. } => Request::Get {
            keys: Vec::new(),
            cas: *cas,
        },
        Request::Gat { exptime, cas, .. } => Request::Gat {
            exptime: *exptime,
            keys: Vec::new(),
            cas: *cas,
        },
        Request::Store {
            op,
            flags,
            exptime,
            cas_unique,
            noreply,
            ..
        } => Request::Store {
            op: *op,
            key: none(),
            flags: *flags,
            exptime: *exptime,
            data: none(),
            cas_unique: *cas_unique,
            noreply: *noreply,
        },
        Request::TooLarge { op, noreply, .. } => Request::TooLarge {
            op: *op,
            key: none(),
            noreply: *noreply,
        },
        Request::Arith {
            op, delta, noreply, ..
        } => Request::Arith {
            op: *op,
            key: none(),
            delta: *delta,
            noreply: *noreply,
        },
        Request::Delete { noreply, .. } => Request::Delete {
            key: none(),
            noreply: *noreply,
        },
        Request::Touch {
            exptime, noreply, ..
        } => Request::Touch {
            key: none(),
            exptime: *exptime,
            noreply: *noreply,
        },
        Request::FlushAll { .. } | Request::Meta(_) | Request::MetaNoop => request.clone(),
    }
}

/// A number as memcached writes one in a reply: decimal digits only, within
/// `u64`. (Cheaper than `str::parse`, which is a visible part of parsing a
/// `VALUE` line, and stricter: no sign.)
fn decimal(digits: &[u8]) -> Option<u64> {
    let plain = !digits.is_empty() && digits.iter().all(u8::is_ascii_digit);
    plain.then(|| magnitude(digits)).flatten()
}

struct ValueHeader<'a> {
    key: &'a [u8],
    flags: u32,
    len: usize,
    cas: Option<u64>,
}

fn value_header(line: &[u8]) -> Option<ValueHeader<'_>> {
    let mut t = line.split(|&b| b == b' ');
    if t.next()? != b"VALUE" {
        return None;
    }
    let key = t.next()?;
    let flags = u32::try_from(decimal(t.next()?)?).ok()?;
    let len = usize::try_from(decimal(t.next()?)?).ok()?;
    let cas = match t.next() {
        Some(c) => Some(decimal(c)?),
        None => None,
    };
    if t.next().is_some() {
        return None;
    }
    Some(ValueHeader {
        key,
        flags,
        len,
        cas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get() -> Request {
        Request::Get {
            keys: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            cas: true,
        }
    }

    #[test]
    fn multi_get_is_framed_by_end() {
        let reply = b"VALUE a 1 3 7\r\nx\r\n\r\nEND\r\nSTORED\r\n";
        let ReplyParsed::Complete { response, consumed } = parse_reply(&get(), reply) else {
            panic!()
        };
        assert_eq!(consumed, reply.len() - 8);
        assert_eq!(
            response,
            Response::Values(vec![Value {
                key: Bytes::from_static(b"a"),
                flags: 1,
                data: Bytes::from_static(b"x\r\n"),
                cas: Some(7),
            }])
        );
        for cut in 0..reply.len() - 8 {
            assert_eq!(
                parse_reply(&get(), &reply[..cut]),
                ReplyParsed::Incomplete,
                "cut {cut}"
            );
        }
    }

    /// Every reply parses the same against a request's shape as against
    /// the request itself, whole or cut short.
    #[test]
    fn a_reply_shape_parses_like_its_request() {
        use super::super::{ArithOp, StoreOp};
        let key = || Bytes::from_static(b"k");
        let requests = [
            get(),
            Request::Gat {
                exptime: 5,
                keys: vec![key()],
                cas: false,
            },
            Request::Store {
                op: StoreOp::Cas,
                key: key(),
                flags: 3,
                exptime: 0,
                data: Bytes::from_static(b"value"),
                cas_unique: 9,
                noreply: false,
            },
            Request::TooLarge {
                op: StoreOp::Set,
                key: key(),
                noreply: false,
            },
            Request::Arith {
                op: ArithOp::Decr,
                key: key(),
                delta: 2,
                noreply: false,
            },
            Request::Delete {
                key: key(),
                noreply: false,
            },
            Request::Touch {
                key: key(),
                exptime: 0,
                noreply: false,
            },
            Request::FlushAll {
                delay: None,
                noreply: false,
            },
        ];
        let replies: [&[u8]; 12] = [
            b"VALUE k 3 5 11\r\nvalue\r\nEND\r\n",
            b"VALUE k 3 5\r\nvalue\r\nEND\r\n",
            b"END\r\n",
            b"STORED\r\n",
            b"EXISTS\r\n",
            b"NOT_FOUND\r\n",
            b"DELETED\r\n",
            b"TOUCHED\r\n",
            b"OK\r\n",
            b"17\r\n",
            b"SERVER_ERROR out of memory\r\n",
            b"CLIENT_ERROR bad data chunk\r\n",
        ];
        for request in &requests {
            let shape = reply_shape(request);
            assert_eq!(shape.command(), request.command());
            for reply in replies {
                for cut in 0..=reply.len() {
                    assert_eq!(
                        parse_reply(&shape, &reply[..cut]),
                        parse_reply(request, &reply[..cut]),
                        "{request:?} {:?}",
                        String::from_utf8_lossy(&reply[..cut])
                    );
                }
            }
        }
    }

    #[test]
    fn reply_numbers_are_digits_within_u64() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(decimal(b"0042"), Some(42));
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"+1",
            b"-1",
            b"1a",
            b" 1",
            b"1.5",
        ] {
            assert_eq!(decimal(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn replies_are_read_against_their_request() {
        let incr = Request::Arith {
            op: super::super::ArithOp::Incr,
            key: Bytes::from_static(b"n"),
            delta: 1,
            noreply: false,
        };
        assert_eq!(
            parse_reply(&incr, b"42\r\n"),
            ReplyParsed::Complete {
                response: Response::Number(42),
                consumed: 4
            }
        );
        assert!(matches!(
            parse_reply(&get(), b"42\r\n"),
            ReplyParsed::Invalid(_)
        ));
        assert!(matches!(
            parse_reply(&incr, b"STORED\r\n"),
            ReplyParsed::Invalid(_)
        ));
        assert_eq!(
            parse_reply(&incr, b"SERVER_ERROR out of memory\r\n"),
            ReplyParsed::Complete {
                response: Response::server_error("out of memory"),
                consumed: 28
            }
        );
    }

    /// Feeds `stream` to a [`ReplyBuffer`] in reads of `read` bytes (at
    /// most its room) and takes `replies` replies to `request`; returns how
    /// many of their values were slices of the buffer. Checks on the way
    /// that the buffer never grew in place and that shared values' buffer
    /// is within their footprints.
    fn take_all(stream: &[u8], read: usize, request: &Request, replies: usize) -> usize {
        let mut rb = ReplyBuffer::new();
        let (mut fed, mut taken, mut shared) = (0, 0, 0);
        while taken < replies {
            let at = rb.bytes().as_ptr() as usize;
            let region = at..at + rb.bytes().len();
            match rb.take(request).expect("frames") {
                Some(Response::Values(values)) => {
                    taken += 1;
                    let counted: usize = values
                        .iter()
                        .filter(|v| region.contains(&(v.data.as_ptr() as usize)))
                        .map(|v| value_footprint(v.data.len()))
                        .sum();
                    if counted > 0 {
                        shared += values.len();
                        assert!(rb.size <= counted, "{} > {counted}", rb.size);
                    }
                }
                Some(other) => panic!("{other:?}"),
                None => {
                    assert!(fed < stream.len(), "every byte read, {taken} replies taken");
                    let into = rb.for_read();
                    let n = read
                        .min(into.capacity() - into.len())
                        .min(stream.len() - fed);
                    into.extend_from_slice(&stream[fed..fed + n]);
                    fed += n;
                    assert!(rb.buf.capacity() <= rb.size, "grown in place");
                }
            }
        }
        assert!(rb.is_empty());
        shared
    }

    fn value_reply(len: usize) -> Vec<u8> {
        let mut r = format!("VALUE k 0 {len}\r\n").into_bytes();
        r.extend((0..len).map(|i| i as u8));
        r.extend_from_slice(b"\r\nEND\r\n");
        r
    }

    #[test]
    fn values_of_16_kib_read_in_chunks_are_shared_and_hold_bounded_buffers() {
        let one = Request::Get {
            keys: vec![Bytes::from_static(b"k")],
            cas: false,
        };
        let stream = value_reply(SHARED_VALUE_MIN).repeat(40);
        for read in [BACKEND_READ_CHUNK, 10_000, 100_000] {
            let shared = take_all(&stream, read, &one, 40);
            assert!(shared >= 36, "{shared} of 40 shared with reads of {read}");
        }
        // A long value grows the buffer while it arrives; values read into
        // a buffer beyond their footprint are copied, and the buffer after
        // it is of the usual size again.
        let mut stream = value_reply(1_000_000);
        stream.extend(value_reply(SHARED_VALUE_MIN).repeat(200));
        let shared = take_all(&stream, BACKEND_READ_CHUNK, &one, 201);
        assert!(shared >= 190, "{shared} of 201 shared");
        // A joined get's reply: 64 values of 16 KiB, a megabyte, held in
        // one buffer until its end arrives, then shared.
        let many = Request::Get {
            keys: (0..64).map(|i| Bytes::from(format!("k{i}"))).collect(),
            cas: false,
        };
        let mut joined = Vec::new();
        for i in 0..64 {
            joined.extend(format!("VALUE k{i} 0 {SHARED_VALUE_MIN}\r\n").into_bytes());
            joined.extend(std::iter::repeat_n(i as u8, SHARED_VALUE_MIN));
            joined.extend_from_slice(b"\r\n");
        }
        joined.extend_from_slice(b"END\r\n");
        assert_eq!(
            take_all(&joined.repeat(3), BACKEND_READ_CHUNK, &many, 3),
            192
        );
        // Short values are never shared.
        assert_eq!(
            take_all(&value_reply(100).repeat(2000), 65536, &one, 2000),
            0
        );
    }
}
