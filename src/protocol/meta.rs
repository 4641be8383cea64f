//! The meta protocol (`mg ms md ma mn me`): request and reply types, the
//! request parser (called from [`super::parse`] once the command name is
//! known), and the return-flag writer a store uses to answer as memcached
//! 1.6.18 does.
//!
//! Every error line and every check is in memcached's order, so that the
//! same bad request earns the same line. A request's flags are kept as
//! sent, in order: memcached writes return flags in request order.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::{ClientError, Exptime, Limits, Parsed, Request};

/// Which meta command (`mn` is [`Request::MetaNoop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MetaCmd {
    /// `mg`
    Get,
    /// `ms`
    Set,
    /// `md`
    Delete,
    /// `ma`
    Arith,
    /// `me`
    Debug,
}

impl MetaCmd {
    pub fn name(self) -> &'static str {
        match self {
            MetaCmd::Get => "mg",
            MetaCmd::Set => "ms",
            MetaCmd::Delete => "md",
            MetaCmd::Arith => "ma",
            MetaCmd::Debug => "me",
        }
    }
}

/// `ms` modes (`M` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    Set,
    Add,
    Append,
    Prepend,
    Replace,
}

/// What the flags of a meta request ask for, as memcached's flag pre-parse
/// reads them (one of each flag at most).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaFlags {
    /// `b`: the key was sent base64-encoded (and is held decoded).
    pub base64: bool,
    /// `q`: hide nominal replies.
    pub quiet: bool,
    /// `v`: return the value.
    pub value: bool,
    /// `u`: no LRU bump (nor hit / last-access update).
    pub no_bump: bool,
    /// `I`: invalidate (ms with `C`, md).
    pub invalidate: bool,
    /// `T`: new TTL.
    pub ttl: Option<Exptime>,
    /// `N`: vivify on miss with this TTL.
    pub vivify: Option<Exptime>,
    /// `R`: win the recache token when the remaining TTL is below this.
    pub recache: Option<Exptime>,
    /// `F`: client flags (ms).
    pub client_flags: Option<u32>,
    /// `C`: compare CAS.
    pub compare_cas: Option<u64>,
    /// `M`: mode character.
    pub mode: Option<u8>,
    /// `J`: initial value on vivify (ma).
    pub initial: Option<u64>,
    /// `D`: delta (ma).
    pub delta: Option<u64>,
}

/// One meta request (`mg ms md ma me`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRequest {
    pub cmd: MetaCmd,
    /// The key, base64-decoded when the `b` flag was given.
    pub key: Bytes,
    pub flags: MetaFlags,
    /// Every flag token as sent, in order (for `me`, every token after the
    /// key).
    pub tokens: Vec<Bytes>,
    /// The data block of `ms`.
    pub data: Bytes,
}

impl MetaRequest {
    /// The `ms` mode; `None` for a mode memcached refuses (the parser lets
    /// none through).
    pub fn set_mode(&self) -> Option<SetMode> {
        Some(match self.flags.mode {
            None | Some(b'S') => SetMode::Set,
            Some(b'E') => SetMode::Add,
            Some(b'A') => SetMode::Append,
            Some(b'P') => SetMode::Prepend,
            Some(b'R') => SetMode::Replace,
            Some(_) => return None,
        })
    }

    /// The `ma` direction: true to increment.
    pub fn increments(&self) -> Option<bool> {
        match self.flags.mode {
            None | Some(b'I' | b'+') => Some(true),
            Some(b'D' | b'-') => Some(false),
            Some(_) => None,
        }
    }

    /// Writes the request as a client would send it (`q` left out unless
    /// `with_quiet`), for forwarding and round trips.
    pub fn encode(&self, with_quiet: bool, buf: &mut BytesMut) {
        buf.reserve(self.key.len() * 2 + self.data.len() + 64);
        buf.put_slice(self.cmd.name().as_bytes());
        buf.put_u8(b' ');
        if self.flags.base64 {
            buf.put_slice(base64_encode(&self.key).as_bytes());
        } else {
            buf.put_slice(&self.key);
        }
        if self.cmd == MetaCmd::Set {
            buf.put_u8(b' ');
            buf.put_slice(itoa::Buffer::new().format(self.data.len()).as_bytes());
        }
        for t in &self.tokens {
            if !with_quiet && t.first() == Some(&b'q') && self.cmd != MetaCmd::Debug {
                continue;
            }
            buf.put_u8(b' ');
            buf.put_slice(t);
        }
        buf.put_slice(b"\r\n");
        if self.cmd == MetaCmd::Set {
            buf.put_slice(&self.data);
            buf.put_slice(b"\r\n");
        }
    }
}

/// The status code of a meta reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCode {
    /// `HD`: success, no value.
    Hd,
    /// `VA <size>`: success, with a value.
    Va,
    /// `EN`: miss (mg, me).
    En,
    /// `NF`: not found.
    Nf,
    /// `NS`: not stored.
    Ns,
    /// `EX`: CAS mismatch.
    Ex,
    /// `MN`: the no-op's answer.
    Mn,
    /// `ME`: a debug line.
    Me,
}

impl MetaCode {
    pub fn as_str(self) -> &'static str {
        match self {
            MetaCode::Hd => "HD",
            MetaCode::Va => "VA",
            MetaCode::En => "EN",
            MetaCode::Nf => "NF",
            MetaCode::Ns => "NS",
            MetaCode::Ex => "EX",
            MetaCode::Mn => "MN",
            MetaCode::Me => "ME",
        }
    }

    pub fn parse(s: &[u8]) -> Option<MetaCode> {
        Some(match s {
            b"HD" => MetaCode::Hd,
            b"VA" => MetaCode::Va,
            b"EN" => MetaCode::En,
            b"NF" => MetaCode::Nf,
            b"NS" => MetaCode::Ns,
            b"EX" => MetaCode::Ex,
            b"MN" => MetaCode::Mn,
            b"ME" => MetaCode::Me,
            _ => return None,
        })
    }
}

/// One meta reply: `<code><rest>\r\n`, then the value for `VA`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaReply {
    pub code: MetaCode,
    /// What follows the code on its line (return flags, each with its
    /// leading space; for `VA` after the size; for `ME` the debug fields).
    pub rest: Bytes,
    /// The value of a `VA` reply.
    pub value: Option<Bytes>,
}

impl MetaReply {
    pub fn new(code: MetaCode, rest: impl Into<Bytes>) -> MetaReply {
        MetaReply {
            code,
            rest: rest.into(),
            value: None,
        }
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(self.rest.len() + self.value.as_ref().map_or(0, |v| v.len()) + 16);
        buf.put_slice(self.code.as_str().as_bytes());
        if let Some(v) = &self.value {
            buf.put_u8(b' ');
            buf.put_slice(itoa::Buffer::new().format(v.len()).as_bytes());
        }
        buf.put_slice(&self.rest);
        buf.put_slice(b"\r\n");
        if let Some(v) = &self.value {
            buf.put_slice(v);
            buf.put_slice(b"\r\n");
        }
    }
}

/// memcached's limit on a meta command's tokens (command, key and flags).
const MFLAG_MAX_OPT_LENGTH: usize = 20;
/// memcached's limit on an opaque (`O`) token, the `O` included.
const MFLAG_MAX_OPAQUE_LENGTH: usize = 32;

/// Parses a meta command line. `t` holds the line's tokens (at most the
/// first 23, as memcached's tokenizer keeps), `consumed` the bytes of the
/// line with its newline.
pub(super) fn parse_meta(buf: &[u8], consumed: usize, t: &[&[u8]], limits: &Limits) -> Parsed {
    let invalid = |error| Parsed::Invalid {
        error,
        consumed,
        noreply: false,
        skip: 0,
    };
    let cmd = match t[0] {
        b"mn" => {
            return Parsed::Request {
                request: Request::MetaNoop.into(),
                consumed,
                skip: 0,
            };
        }
        b"me" => MetaCmd::Debug,
        b"mg" => MetaCmd::Get,
        b"ms" => MetaCmd::Set,
        b"md" => MetaCmd::Delete,
        b"ma" => MetaCmd::Arith,
        _ => return invalid(ClientError::UnknownCommand),
    };
    if cmd == MetaCmd::Debug {
        return parse_debug(consumed, t, limits);
    }
    if t.len() < 2 {
        return invalid(ClientError::UnknownCommand);
    }
    if t[1].len() > limits.max_key_bytes {
        return invalid(ClientError::BadCommandLine);
    }
    let too_long = if cmd == MetaCmd::Get {
        ClientError::MetaFlagsAreTooLong
    } else {
        ClientError::MetaFlagsTooLong
    };
    let mut first_flag = 2;
    let mut vlen = 0usize;
    if cmd == MetaCmd::Set {
        if t.len() == 2 {
            return invalid(ClientError::BadCommandLine);
        }
        if t.len() >= MFLAG_MAX_OPT_LENGTH {
            return invalid(too_long);
        }
        let Some(len) = super::parse::int::<i32>(t[2]).and_then(|l| usize::try_from(l).ok()) else {
            return invalid(ClientError::BadCommandLine);
        };
        if len > i32::MAX as usize - 2 {
            return invalid(ClientError::BadCommandLine);
        }
        vlen = len;
        first_flag = 3;
    } else if t.len() >= MFLAG_MAX_OPT_LENGTH {
        return invalid(too_long);
    }
    // From here on an `ms` error swallows the declared data block.
    let refuse = |error: ClientError| Parsed::Invalid {
        error,
        consumed,
        noreply: false,
        skip: if cmd == MetaCmd::Set { vlen + 2 } else { 0 },
    };
    let (key, flags) = match preparse(t[1], &t[first_flag..]) {
        Ok(parsed) => parsed,
        // md and ma name no particular flag.
        Err(_) if matches!(cmd, MetaCmd::Delete | MetaCmd::Arith) => {
            return invalid(ClientError::MetaInvalidOrDuplicateFlag);
        }
        Err(e) => return refuse(e),
    };
    let mut request = MetaRequest {
        cmd,
        key,
        flags,
        tokens: t[first_flag..]
            .iter()
            .map(|f| Bytes::copy_from_slice(f))
            .collect(),
        data: Bytes::new(),
    };
    if cmd == MetaCmd::Arith && request.increments().is_none() {
        return invalid(ClientError::MetaInvalidArithMode);
    }
    // Opaque tokens are checked where memcached checks them before any
    // effect (ms, md); for mg and ma memcached checks them while answering
    // (after a vivify, a TTL update or a delta), memdial before.
    if t[first_flag..]
        .iter()
        .any(|f| f[0] == b'O' && f.len() > MFLAG_MAX_OPAQUE_LENGTH)
    {
        return refuse(ClientError::MetaOpaqueTooLong);
    }
    if cmd == MetaCmd::Set && request.set_mode().is_none() {
        return refuse(ClientError::MetaInvalidSetMode);
    }
    // A raw key follows the text protocol's rule (no control characters);
    // a base64 key may hold any bytes.
    if !request.flags.base64 && request.key.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return refuse(ClientError::BadCommandLine);
    }
    if cmd != MetaCmd::Set {
        return Parsed::Request {
            request: Request::Meta(Box::new(request)).into(),
            consumed,
            skip: 0,
        };
    }
    if vlen > limits.item_size_max {
        // memcached answers, removes the key (so stale data does not
        // outlive the failed write, in every mode) and swallows the block.
        return Parsed::Request {
            request: Request::TooLarge {
                op: super::StoreOp::Set,
                key: request.key,
                noreply: false,
            }
            .into(),
            consumed,
            skip: vlen + 2,
        };
    }
    let end = consumed + vlen + 2;
    if buf.len() < end {
        return Parsed::Incomplete;
    }
    if &buf[end - 2..end] != b"\r\n" {
        // Always answered, `q` or not.
        return Parsed::Invalid {
            error: ClientError::BadDataChunk,
            consumed: end,
            noreply: false,
            skip: 0,
        };
    }
    request.data = Bytes::copy_from_slice(&buf[consumed..end - 2]);
    Parsed::Request {
        request: Request::Meta(Box::new(request)).into(),
        consumed: end,
        skip: 0,
    }
}

/// `me <key> [b]`: memcached checks only the key and whether the third
/// token is `b`.
fn parse_debug(consumed: usize, t: &[&[u8]], limits: &Limits) -> Parsed {
    let invalid = |error| Parsed::Invalid {
        error,
        consumed,
        noreply: false,
        skip: 0,
    };
    if t.len() < 2 || t[1].len() > limits.max_key_bytes {
        return invalid(ClientError::BadCommandLine);
    }
    let base64 = t.get(2) == Some(&&b"b"[..]);
    let key = if base64 {
        match base64_decode(t[1]) {
            Some(k) => k,
            None => return invalid(ClientError::BadCommandLine),
        }
    } else {
        if t[1].iter().any(|&b| b < 0x20 || b == 0x7f) {
            return invalid(ClientError::BadCommandLine);
        }
        t[1].to_vec()
    };
    Parsed::Request {
        request: Request::Meta(Box::new(MetaRequest {
            cmd: MetaCmd::Debug,
            key: Bytes::from(key),
            flags: MetaFlags {
                base64,
                ..MetaFlags::default()
            },
            tokens: t[2..].iter().map(|f| Bytes::copy_from_slice(f)).collect(),
            data: Bytes::new(),
        }))
        .into(),
        consumed,
        skip: 0,
    }
}

/// memcached's `_meta_flag_preparse`: each flag once, known flags only,
/// numeric tokens checked. A duplicate or unknown flag stops at once; any
/// other error is remembered and the scan goes on, so the last one is the
/// one reported.
fn preparse(raw_key: &[u8], flags: &[&[u8]]) -> Result<(Bytes, MetaFlags), ClientError> {
    let mut seen = [false; 128];
    let mut of = MetaFlags::default();
    let mut key = Bytes::copy_from_slice(raw_key);
    let mut error = None;
    let mut failed = false;
    let num = |t: &[u8]| super::parse::int::<i32>(&t[1..]).map(i64::from);
    for &f in flags {
        let o = f[0];
        if o >= 127 || seen[o as usize] {
            return Err(ClientError::MetaDuplicateFlag);
        }
        seen[o as usize] = true;
        let bad_token = ClientError::MetaBadToken;
        match o {
            b'b' => {
                of.base64 = true;
                match base64_decode(raw_key) {
                    Some(k) => key = Bytes::from(k),
                    None => error = Some(ClientError::MetaKeyDecode),
                }
            }
            b'N' => match num(f) {
                Some(n) => of.vivify = Some(n),
                None => error = Some(bad_token),
            },
            b'T' => match num(f) {
                Some(n) => of.ttl = Some(n),
                None => error = Some(bad_token),
            },
            b'R' => match num(f) {
                Some(n) => of.recache = Some(n),
                None => error = Some(bad_token),
            },
            b'l' | b'O' | b'P' | b'L' | b'k' | b's' | b't' | b'c' | b'f' | b'h' => {}
            b'v' => of.value = true,
            b'u' => of.no_bump = true,
            b'q' => of.quiet = true,
            b'F' => match super::parse::uint::<u32>(&f[1..]) {
                Some(n) => of.client_flags = Some(n),
                // memcached sets no message here: the last message set
                // stands, or its default line.
                None => failed = true,
            },
            b'C' => match super::parse::uint::<u64>(&f[1..]) {
                Some(n) => of.compare_cas = Some(n),
                None => error = Some(bad_token),
            },
            b'M' => {
                if f.len() != 2 {
                    error = Some(ClientError::MetaModeLength);
                } else {
                    of.mode = Some(f[1]);
                }
            }
            b'J' => match super::parse::uint::<u64>(&f[1..]) {
                Some(n) => of.initial = Some(n),
                None => error = Some(ClientError::MetaInitial),
            },
            b'D' => match super::parse::uint::<u64>(&f[1..]) {
                Some(n) => of.delta = Some(n),
                None => error = Some(ClientError::MetaDelta),
            },
            b'I' => of.invalidate = true,
            _ => return Err(ClientError::MetaInvalidFlag),
        }
    }
    match error {
        Some(e) => Err(e),
        None if failed => Err(ClientError::BadCommandLine),
        None => Ok((key, of)),
    }
}

/// What a store knows of an item, for the return flags of `mg` and `ma`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemView<'a> {
    pub key: &'a [u8],
    /// The key was stored through a base64 (`b`) meta request.
    pub key_binary: bool,
    pub cas: u64,
    pub client_flags: u32,
    pub size: usize,
    /// Remaining TTL in seconds; `None` never expires.
    pub ttl: Option<i64>,
    /// Seconds since last access, as the item held it before this request.
    pub last_access: u64,
    /// Hit before this request.
    pub fetched: bool,
}

/// What changes as `mg`/`ma` walk their flags (memcached applies `T` and
/// `N` in flag order, so a `t` before them reports the old TTL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TtlChanges {
    /// The TTL a `T` flag sets (`Some(None)`: never expires).
    pub on_t: Option<Option<i64>>,
    /// The TTL an `N` flag sets, when the item was just created.
    pub on_n: Option<Option<i64>>,
}

fn put_num(buf: &mut BytesMut, n: impl itoa::Integer) {
    buf.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// ` k<key>`, base64 with a ` b` after it for a binary key.
fn put_key(buf: &mut BytesMut, key: &[u8], binary: bool) {
    buf.put_slice(b" k");
    if binary {
        buf.put_slice(base64_encode(key).as_bytes());
        buf.put_slice(b" b");
    } else {
        buf.put_slice(key);
    }
}

impl MetaRequest {
    /// The return flags of a hit (`mg`: `s t c f l h O k`; `ma`: `c t O
    /// k`), in request order.
    pub fn hit_flags(&self, item: &ItemView<'_>, changes: TtlChanges) -> BytesMut {
        let mut buf = BytesMut::new();
        let mut ttl = item.ttl;
        for t in &self.tokens {
            match (self.cmd, t[0]) {
                (MetaCmd::Get | MetaCmd::Arith, b'T') => {
                    if let Some(new) = changes.on_t {
                        ttl = new;
                    }
                }
                (MetaCmd::Get | MetaCmd::Arith, b'N') => {
                    if let Some(new) = changes.on_n {
                        ttl = new;
                    }
                }
                (MetaCmd::Get, b's') => {
                    buf.put_slice(b" s");
                    put_num(&mut buf, item.size);
                }
                (MetaCmd::Get | MetaCmd::Arith, b't') => {
                    buf.put_slice(b" t");
                    match ttl {
                        None => buf.put_slice(b"-1"),
                        // memcached prints the difference as unsigned.
                        Some(s) => put_num(&mut buf, s as u32),
                    }
                }
                (MetaCmd::Get | MetaCmd::Arith, b'c') => {
                    buf.put_slice(b" c");
                    put_num(&mut buf, item.cas);
                }
                (MetaCmd::Get, b'f') => {
                    buf.put_slice(b" f");
                    put_num(&mut buf, item.client_flags);
                }
                (MetaCmd::Get, b'l') => {
                    buf.put_slice(b" l");
                    put_num(&mut buf, item.last_access);
                }
                (MetaCmd::Get, b'h') => {
                    buf.put_slice(if item.fetched { b" h1" } else { b" h0" });
                }
                (_, b'O') => {
                    buf.put_u8(b' ');
                    buf.put_slice(t);
                }
                (MetaCmd::Get, b'k') => put_key(&mut buf, item.key, item.key_binary),
                (MetaCmd::Arith, b'k') => put_key(&mut buf, &self.key, self.flags.base64),
                _ => {}
            }
        }
        buf
    }

    /// The return flags of a miss or a plain status (`O`, `k`), in request
    /// order; for `ms` also `c` (the new CAS, 0 when nothing was stored),
    /// with the key as the item holds it.
    pub fn status_flags(&self, cas: u64) -> BytesMut {
        let mut buf = BytesMut::new();
        for t in &self.tokens {
            match t[0] {
                b'O' => {
                    buf.put_u8(b' ');
                    buf.put_slice(t);
                }
                b'k' => put_key(&mut buf, &self.key, self.flags.base64),
                b'c' if self.cmd == MetaCmd::Set => {
                    buf.put_slice(b" c");
                    put_num(&mut buf, cas);
                }
                _ => {}
            }
        }
        buf
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as memcached writes keys.
pub fn base64_encode(src: &[u8]) -> String {
    let mut out = String::with_capacity(src.len().div_ceil(3) * 4);
    for chunk in src.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let idx = [
            b[0] >> 2,
            ((b[0] & 0x03) << 4) | (b[1] >> 4),
            ((b[1] & 0x0f) << 2) | (b[2] >> 6),
            b[2] & 0x3f,
        ];
        for (i, &x) in idx.iter().enumerate() {
            if i <= chunk.len() {
                out.push(BASE64[x as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// memcached's base64 decoder: characters outside the alphabet are
/// skipped, the rest must come in groups of four, and decoding stops after
/// the first group with padding. `None` where memcached's returns 0.
pub fn base64_decode(src: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            b'=' => Some(0),
            _ => None,
        }
    };
    let count = src.iter().filter(|&&c| value(c).is_some()).count();
    if count == 0 || count % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(count / 4 * 3);
    let (mut block, mut n, mut pad) = ([0u8; 4], 0, 0);
    for &c in src {
        let Some(v) = value(c) else { continue };
        if c == b'=' {
            pad += 1;
        }
        block[n] = v;
        n += 1;
        if n == 4 {
            out.push((block[0] << 2) | (block[1] >> 4));
            out.push((block[1] << 4) | (block[2] >> 2));
            out.push((block[2] << 6) | block[3]);
            n = 0;
            if pad > 0 {
                match pad {
                    1 => out.truncate(out.len() - 1),
                    2 => out.truncate(out.len() - 2),
                    _ => return None,
                }
                break;
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    //! Each line was checked against memcached 1.6.18.

    use super::*;
    use crate::protocol::{Incoming, parse_request};

    fn parse(input: &[u8]) -> Parsed {
        parse_request(input, &Limits::default())
    }

    fn meta(input: &[u8]) -> MetaRequest {
        match parse(input) {
            Parsed::Request {
                request: Incoming::Data(Request::Meta(m)),
                consumed,
                skip: 0,
            } => {
                assert_eq!(consumed, input.len());
                *m
            }
            other => panic!("{input:?}: {other:?}"),
        }
    }

    fn refused(input: &[u8]) -> (ClientError, usize) {
        match parse(input) {
            Parsed::Invalid {
                error,
                noreply: false,
                skip,
                ..
            } => (error, skip),
            other => panic!("{input:?}: {other:?}"),
        }
    }

    #[test]
    fn flags_are_read_as_memcached_reads_them() {
        let m = meta(b"mg k v c f T30 N-1 R5 q Oabc k\r\n");
        assert_eq!(m.cmd, MetaCmd::Get);
        assert_eq!(&m.key[..], b"k");
        assert!(m.flags.value && m.flags.quiet);
        assert_eq!(
            (m.flags.ttl, m.flags.vivify, m.flags.recache),
            (Some(30), Some(-1), Some(5))
        );
        assert_eq!(m.tokens.len(), 9);
        let s = meta(b"ms k 3 F5 C9 I MA\r\nabc\r\n");
        assert_eq!(&s.data[..], b"abc");
        assert_eq!(s.set_mode(), Some(SetMode::Append));
        assert_eq!(
            (s.flags.client_flags, s.flags.compare_cas),
            (Some(5), Some(9))
        );
        let a = meta(b"ma n M- D3 J7 N0\r\n");
        assert_eq!(a.increments(), Some(false));
        assert_eq!((a.flags.delta, a.flags.initial), (Some(3), Some(7)));
        let b = meta(b"mg YWJj b k\r\n");
        assert_eq!((&b.key[..], b.flags.base64), (&b"abc"[..], true));
        assert_eq!(meta(b"me YWJj b\r\n").key, Bytes::from_static(b"abc"));
        assert!(matches!(
            parse(b"mn x y\r\n"),
            Parsed::Request {
                request: Incoming::Data(Request::MetaNoop),
                ..
            }
        ));
    }

    #[test]
    fn errors_are_memcached_s_lines_in_memcached_s_order() {
        use ClientError::*;
        let cases: &[(&[u8], ClientError)] = &[
            (b"mg\r\n", UnknownCommand),
            (b"mz k\r\n", UnknownCommand),
            (b"me\r\n", BadCommandLine),
            (b"ms k\r\n", BadCommandLine),
            (b"ms k x\r\n", BadCommandLine),
            (b"ms k -1\r\n", BadCommandLine),
            (b"mg k Nx Tx\r\n", MetaBadToken),
            (b"mg k Nx Tx Nx\r\n", MetaDuplicateFlag),
            // `F` sets no message: the last one set stands.
            (b"mg k Tx F1x\r\n", MetaBadToken),
            (b"mg k F1x\r\n", BadCommandLine),
            (b"mg k Z\r\n", MetaInvalidFlag),
            (b"mg k \xff\r\n", MetaDuplicateFlag),
            (b"mg Y b\r\n", MetaKeyDecode),
            (b"md k Z\r\n", MetaInvalidOrDuplicateFlag),
            (b"ma k MSS\r\n", MetaInvalidOrDuplicateFlag),
            (b"ma k MX\r\n", MetaInvalidArithMode),
            (
                b"mg a b c d e f g h i j k l m n o p q r s\r\n",
                MetaFlagsAreTooLong,
            ),
            (
                b"md a b c d e f g h i j k l m n o p q r s\r\n",
                MetaFlagsTooLong,
            ),
            (
                b"mg a b c d e f g h i j k l m n o p q r\r\n",
                MetaInvalidFlag,
            ),
            (
                b"mg k Oabcdefghijklmnopqrstuvwxyzabcdefg\r\n",
                MetaOpaqueTooLong,
            ),
        ];
        for (input, error) in cases {
            assert_eq!(refused(input), (*error, 0), "{input:?}");
        }
        let long = format!("mg {}\r\n", "k".repeat(251));
        assert_eq!(refused(long.as_bytes()).0, BadCommandLine);
    }

    #[test]
    fn a_refused_ms_swallows_its_data_block_once_its_length_is_known() {
        use ClientError::*;
        assert_eq!(refused(b"ms k 2 Z\r\nab\r\n"), (MetaInvalidFlag, 4));
        assert_eq!(refused(b"ms k 2 MX\r\nab\r\n"), (MetaInvalidSetMode, 4));
        assert_eq!(refused(b"ms k 2 MSS\r\nab\r\n"), (MetaModeLength, 4));
        assert_eq!(refused(b"ms k 2 F-1\r\nab\r\n"), (BadCommandLine, 4));
        // No length, no swallowing.
        assert_eq!(refused(b"ms k x\r\nab\r\n"), (BadCommandLine, 0));
        // A bad chunk is answered even under `q`.
        assert!(matches!(
            parse(b"ms k 3 q\r\nabcde\r\n"),
            Parsed::Invalid {
                error: BadDataChunk,
                noreply: false,
                consumed: 15,
                ..
            }
        ));
        assert_eq!(parse(b"ms k 3\r\nab"), Parsed::Incomplete);
        assert!(matches!(
            parse(b"ms k 2000000 q\r\n"),
            Parsed::Request {
                request: Incoming::Data(Request::TooLarge { noreply: false, .. }),
                skip: 2_000_002,
                ..
            }
        ));
    }

    #[test]
    fn base64_as_memcached_codes_it() {
        assert_eq!(base64_encode(b"abc"), "YWJj");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_decode(b"YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(base64_decode(b"YW*Jj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(base64_decode(b"YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode(b"Y"), None);
        assert_eq!(base64_decode(b"===="), None);
        for len in 0..40u8 {
            let raw: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            let back = base64_decode(base64_encode(&raw).as_bytes());
            assert_eq!(back, (!raw.is_empty()).then_some(raw));
        }
    }

    #[test]
    fn replies_are_written_as_memcached_writes_them() {
        let mut b = BytesMut::new();
        MetaReply {
            code: MetaCode::Va,
            rest: Bytes::from_static(b" f0 t-1"),
            value: Some(Bytes::from_static(b"ab")),
        }
        .encode(&mut b);
        MetaReply::new(MetaCode::En, "").encode(&mut b);
        assert_eq!(&b[..], b"VA 2 f0 t-1\r\nab\r\nEN\r\n");
        let m = meta(b"mg aw== k Oxy c b\r\n");
        assert_eq!(&m.status_flags(5)[..], b" kaw== b Oxy");
    }
}
