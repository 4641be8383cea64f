//! Requests and responses to wire bytes. Requests are encoded to forward
//! them to a memcached backend; responses to answer clients.

use bytes::{BufMut, BytesMut};

use super::{AdminRequest, ArithOp, ConnRequest, ErrorReply, Request, Response, StoreOp, Value};

fn num(buf: &mut BytesMut, n: impl itoa::Integer) {
    buf.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn keys(buf: &mut BytesMut, keys: &[bytes::Bytes]) {
    for k in keys {
        buf.put_u8(b' ');
        buf.put_slice(k);
    }
}

/// Writes `request` as a client would send it. With `with_noreply` false the
/// `noreply` token is left out, so that every forwarded request earns exactly
/// one reply (memdial itself decides whether the client sees it).
pub fn encode_request(request: &Request, with_noreply: bool, buf: &mut BytesMut) {
    let noreply = |buf: &mut BytesMut, on: bool| {
        if on && with_noreply {
            buf.put_slice(b" noreply");
        }
    };
    match request {
        Request::Get { keys: k, cas } => {
            buf.put_slice(if *cas { b"gets" } else { b"get" });
            keys(buf, k);
        }
        Request::Gat {
            exptime,
            keys: k,
            cas,
        } => {
            buf.put_slice(if *cas { b"gats " } else { b"gat " });
            num(buf, *exptime);
            keys(buf, k);
        }
        Request::Store {
            op,
            key,
            flags,
            exptime,
            data,
            cas_unique,
            noreply: nr,
        } => {
            buf.reserve(key.len() + data.len() + 64);
            buf.put_slice(op.name().as_bytes());
            buf.put_u8(b' ');
            buf.put_slice(key);
            buf.put_u8(b' ');
            num(buf, *flags);
            buf.put_u8(b' ');
            num(buf, *exptime);
            buf.put_u8(b' ');
            num(buf, data.len());
            if *op == StoreOp::Cas {
                buf.put_u8(b' ');
                num(buf, *cas_unique);
            }
            noreply(buf, *nr);
            buf.put_slice(b"\r\n");
            buf.put_slice(data);
        }
        Request::TooLarge {
            op,
            key,
            noreply: nr,
        } => {
            // Only meaningful for round-trip tests; never forwarded.
            buf.put_slice(op.name().as_bytes());
            buf.put_u8(b' ');
            buf.put_slice(key);
            buf.put_slice(b" 0 0 ");
            num(buf, i32::MAX - 2);
            if *op == StoreOp::Cas {
                buf.put_slice(b" 0");
            }
            noreply(buf, *nr);
        }
        Request::Arith {
            op,
            key,
            delta,
            noreply: nr,
        } => {
            buf.put_slice(match op {
                ArithOp::Incr => b"incr ",
                ArithOp::Decr => b"decr ",
            });
            buf.put_slice(key);
            buf.put_u8(b' ');
            num(buf, *delta);
            noreply(buf, *nr);
        }
        Request::Delete { key, noreply: nr } => {
            buf.put_slice(b"delete ");
            buf.put_slice(key);
            noreply(buf, *nr);
        }
        Request::Touch {
            key,
            exptime,
            noreply: nr,
        } => {
            buf.put_slice(b"touch ");
            buf.put_slice(key);
            buf.put_u8(b' ');
            num(buf, *exptime);
            noreply(buf, *nr);
        }
        Request::FlushAll { delay, noreply: nr } => {
            buf.put_slice(b"flush_all");
            if let Some(d) = delay {
                buf.put_u8(b' ');
                num(buf, *d);
            }
            noreply(buf, *nr);
        }
        Request::Meta(m) => {
            // Every byte of it, `\r\n` and data block included. Forwarded,
            // a quiet request keeps its `q` (memcached's rules for what it
            // hides are its own) and is followed by `mn`, so that it earns
            // exactly one reply either way: its own then `MN`, or `MN`.
            m.encode(true, buf);
            if m.flags.quiet && !with_noreply {
                buf.put_slice(b"mn\r\n");
            }
            return;
        }
        Request::MetaNoop => buf.put_slice(b"mn"),
    }
    buf.put_slice(b"\r\n");
}

/// Writes an admin request as a client would send it, with its `noreply`
/// when `with_noreply` (forwarded, it goes without: see
/// [`AdminRequest::line`]).
pub fn encode_admin_request(request: &AdminRequest, with_noreply: bool, buf: &mut BytesMut) {
    let line = request.line();
    buf.put_slice(line.trim_end_matches("\r\n").as_bytes());
    if with_noreply && request.noreply() {
        buf.put_slice(b" noreply");
    }
    buf.put_slice(b"\r\n");
}

/// Writes a connection request as a client would send it (for round-trip
/// tests and clients; the server never forwards one).
pub fn encode_conn_request(request: &ConnRequest, buf: &mut BytesMut) {
    match request {
        ConnRequest::Version => buf.put_slice(b"version"),
        ConnRequest::Verbosity { level, noreply } => {
            buf.put_slice(b"verbosity ");
            num(buf, *level);
            if *noreply {
                buf.put_slice(b" noreply");
            }
        }
        ConnRequest::Stats { args } => {
            buf.put_slice(b"stats");
            keys(buf, args);
        }
        ConnRequest::Quit => buf.put_slice(b"quit"),
    }
    buf.put_slice(b"\r\n");
}

/// Writes one `VALUE` block of a get-family reply (its `END` is separate).
pub fn encode_value(v: &Value, buf: &mut BytesMut) {
    buf.reserve(v.key.len() + v.data.len() + 48);
    encode_value_header(v, buf);
    buf.put_slice(&v.data);
    buf.put_slice(b"\r\n");
}

/// The `VALUE <key> <flags> <bytes> [<cas>]\r\n` line before a value's
/// data, for a writer that sends the data from where it is.
pub fn encode_value_header(v: &Value, buf: &mut BytesMut) {
    buf.put_slice(b"VALUE ");
    buf.put_slice(&v.key);
    buf.put_u8(b' ');
    num(buf, v.flags);
    buf.put_u8(b' ');
    num(buf, v.data.len());
    if let Some(cas) = v.cas {
        buf.put_u8(b' ');
        num(buf, cas);
    }
    buf.put_slice(b"\r\n");
}

/// Writes `response` exactly as memcached 1.6 would.
pub fn encode_response(response: &Response, buf: &mut BytesMut) {
    match response {
        Response::Values(values) => {
            for v in values {
                encode_value(v, buf);
            }
            buf.put_slice(b"END\r\n");
        }
        Response::Stored => buf.put_slice(b"STORED\r\n"),
        Response::NotStored => buf.put_slice(b"NOT_STORED\r\n"),
        Response::Exists => buf.put_slice(b"EXISTS\r\n"),
        Response::NotFound => buf.put_slice(b"NOT_FOUND\r\n"),
        Response::Deleted => buf.put_slice(b"DELETED\r\n"),
        Response::Touched => buf.put_slice(b"TOUCHED\r\n"),
        Response::Ok => buf.put_slice(b"OK\r\n"),
        Response::Reset => buf.put_slice(b"RESET\r\n"),
        Response::Number(n) => {
            num(buf, *n);
            buf.put_slice(b"\r\n");
        }
        Response::Version(v) => {
            buf.put_slice(b"VERSION ");
            buf.put_slice(v.as_bytes());
            buf.put_slice(b"\r\n");
        }
        Response::Stats(stats) => {
            for (name, val) in stats {
                buf.put_slice(b"STAT ");
                buf.put_slice(name.as_bytes());
                buf.put_u8(b' ');
                buf.put_slice(val.as_bytes());
                buf.put_slice(b"\r\n");
            }
            buf.put_slice(b"END\r\n");
        }
        Response::Error(ErrorReply::Error) => buf.put_slice(b"ERROR\r\n"),
        Response::Error(ErrorReply::Client(m)) => {
            buf.put_slice(b"CLIENT_ERROR ");
            buf.put_slice(m.as_bytes());
            buf.put_slice(b"\r\n");
        }
        Response::Error(ErrorReply::Server(m)) => {
            buf.put_slice(b"SERVER_ERROR ");
            buf.put_slice(m.as_bytes());
            buf.put_slice(b"\r\n");
        }
        Response::Meta(m) => m.encode(buf),
        Response::Quiet => {}
        Response::Raw(bytes) => buf.put_slice(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ClientError;
    use bytes::Bytes;

    fn enc(r: &Response) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_response(r, &mut b);
        b.to_vec()
    }

    #[test]
    fn responses_match_memcached_bytes() {
        let v = Value {
            key: Bytes::from_static(b"k"),
            flags: 5,
            data: Bytes::from_static(b"a\r\nb"),
            cas: Some(16),
        };
        assert_eq!(
            enc(&Response::Values(vec![v])),
            b"VALUE k 5 4 16\r\na\r\nb\r\nEND\r\n"
        );
        assert_eq!(enc(&Response::Values(vec![])), b"END\r\n");
        assert_eq!(enc(&Response::Number(0)), b"0\r\n");
        assert_eq!(
            enc(&ClientError::BadDataChunk.into()),
            b"CLIENT_ERROR bad data chunk\r\n"
        );
        assert_eq!(enc(&ClientError::UnknownCommand.into()), b"ERROR\r\n");
        assert_eq!(
            enc(&ClientError::TooLarge.into()),
            b"SERVER_ERROR object too large for cache\r\n"
        );
    }

    #[test]
    fn forwarded_requests_drop_noreply() {
        let r = Request::Delete {
            key: Bytes::from_static(b"k"),
            noreply: true,
        };
        let mut b = BytesMut::new();
        encode_request(&r, false, &mut b);
        assert_eq!(&b[..], b"delete k\r\n");
        b.clear();
        encode_request(&r, true, &mut b);
        assert_eq!(&b[..], b"delete k noreply\r\n");
    }
}
