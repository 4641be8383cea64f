//! Properties of the parser and encoders: a request (text or meta) split at
//! any byte parses the same, encode → parse round-trips, no input makes
//! the parser panic or claim more bytes than it was given, and a backend's
//! reply taken off its read buffer is the reply parsed, long values shared
//! with the buffer and short ones copied.

use bytes::{Bytes, BytesMut};
use memdial::protocol::{
    ArithOp, ConnRequest, Incoming, Limits, MetaCode, MetaReply, Parsed, ReplyBuffer, ReplyParsed,
    Request, Response, SHARED_VALUE_MIN, StoreOp, Value, base64_encode, encode_admin_request,
    encode_conn_request, encode_request, encode_response, parse_reply, parse_request,
};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(0x21u8..0x7f, 1..=250).prop_map(Bytes::from)
}

fn data() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

fn store_op() -> impl Strategy<Value = StoreOp> {
    prop_oneof![
        Just(StoreOp::Set),
        Just(StoreOp::Add),
        Just(StoreOp::Replace),
        Just(StoreOp::Append),
        Just(StoreOp::Prepend),
        Just(StoreOp::Cas),
    ]
}

fn data_request() -> impl Strategy<Value = Request> {
    let exptime = -100i64..100_000_000;
    prop_oneof![
        (proptest::collection::vec(key(), 1..5), any::<bool>())
            .prop_map(|(keys, cas)| Request::Get { keys, cas }),
        (
            exptime.clone(),
            proptest::collection::vec(key(), 0..5),
            any::<bool>()
        )
            .prop_map(|(exptime, keys, cas)| Request::Gat { exptime, keys, cas }),
        (
            store_op(),
            key(),
            any::<u32>(),
            exptime.clone(),
            data(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(op, key, flags, exptime, data, cas, noreply)| Request::Store {
                    op,
                    key,
                    flags,
                    exptime,
                    data,
                    cas_unique: if op == StoreOp::Cas { cas } else { 0 },
                    noreply,
                }
            ),
        (store_op(), key(), any::<bool>()).prop_map(|(op, key, noreply)| Request::TooLarge {
            op,
            key,
            noreply
        }),
        (any::<bool>(), key(), any::<u64>(), any::<bool>()).prop_map(
            |(incr, key, delta, noreply)| {
                Request::Arith {
                    op: if incr { ArithOp::Incr } else { ArithOp::Decr },
                    key,
                    delta,
                    noreply,
                }
            }
        ),
        (key(), any::<bool>()).prop_map(|(key, noreply)| Request::Delete { key, noreply }),
        (key(), exptime.clone(), any::<bool>()).prop_map(|(key, exptime, noreply)| {
            Request::Touch {
                key,
                exptime,
                noreply,
            }
        }),
        (proptest::option::of(exptime), any::<bool>())
            .prop_map(|(delay, noreply)| Request::FlushAll { delay, noreply }),
    ]
}

fn conn_request() -> impl Strategy<Value = ConnRequest> {
    prop_oneof![
        Just(ConnRequest::Version),
        (any::<u32>(), any::<bool>())
            .prop_map(|(level, noreply)| ConnRequest::Verbosity { level, noreply }),
        proptest::collection::vec(key(), 0..3).prop_map(|args| ConnRequest::Stats { args }),
        Just(ConnRequest::Quit),
    ]
}

fn request() -> impl Strategy<Value = Incoming> {
    prop_oneof![
        data_request().prop_map(Incoming::Data),
        conn_request().prop_map(Incoming::Conn),
    ]
}

/// Valid flags of each meta command, one per first character.
fn meta_flags(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "mg" => &[
            "c", "f", "h", "k", "l", "Oop1", "q", "s", "t", "u", "v", "N30", "R10", "T-1",
        ],
        "ms" => &["c", "C12", "F7", "I", "k", "Oop2", "q", "T100", "MA", "s"],
        "md" => &["C5", "I", "k", "Oop3", "q", "T5"],
        "ma" => &[
            "c",
            "C0",
            "N0",
            "J7",
            "D18446744073709551615",
            "T9",
            "M-",
            "q",
            "t",
            "v",
            "k",
        ],
        _ => &[],
    }
}

/// A valid meta request line (with its data block for `ms`), its key
/// sent as is or base64-encoded.
fn meta_bytes() -> impl Strategy<Value = Vec<u8>> {
    let cmd = prop::sample::select(&["mg", "ms", "md", "ma", "me", "mn"][..]);
    (
        cmd,
        key().prop_map(|k| k.slice(..k.len().min(180))),
        any::<bool>(),
        proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        data(),
    )
        .prop_map(|(cmd, key, b64, picks, data)| {
            let mut line = cmd.as_bytes().to_vec();
            if cmd == "mn" {
                line.extend_from_slice(b"\r\n");
                return line;
            }
            line.push(b' ');
            if b64 {
                line.extend_from_slice(base64_encode(&key).as_bytes());
            } else {
                line.extend_from_slice(&key);
            }
            if cmd == "ms" {
                line.extend_from_slice(format!(" {}", data.len()).as_bytes());
            }
            if cmd == "me" {
                if b64 {
                    line.extend_from_slice(b" b");
                }
            } else {
                let table = meta_flags(cmd);
                let mut chosen: Vec<&str> = picks.iter().map(|i| *i.get(table)).collect();
                chosen.dedup();
                chosen.sort_unstable();
                chosen.dedup();
                if b64 {
                    chosen.push("b");
                }
                for f in chosen {
                    line.push(b' ');
                    line.extend_from_slice(f.as_bytes());
                }
            }
            line.extend_from_slice(b"\r\n");
            if cmd == "ms" {
                line.extend_from_slice(&data);
                line.extend_from_slice(b"\r\n");
            }
            line
        })
}

fn encoded(r: &Incoming) -> Vec<u8> {
    let mut b = BytesMut::new();
    match r {
        Incoming::Data(r) => encode_request(r, true, &mut b),
        Incoming::Conn(r) => encode_conn_request(r, &mut b),
        Incoming::Admin(r) => encode_admin_request(r, true, &mut b),
    }
    b.to_vec()
}

/// A `gets` and its reply of up to four values with data from `data`.
fn gets_reply(data: impl Strategy<Value = Bytes>) -> impl Strategy<Value = (Request, Response)> {
    let get = Request::Get {
        keys: vec![Bytes::from_static(b"k")],
        cas: true,
    };
    let value = (
        key(),
        any::<u32>(),
        data,
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(key, flags, data, cas)| Value {
            key,
            flags,
            data,
            cas,
        });
    proptest::collection::vec(value, 0..4).prop_map(move |v| (get.clone(), Response::Values(v)))
}

fn response() -> impl Strategy<Value = (Request, Response)> {
    prop_oneof![
        gets_reply(data()),
        any::<u64>().prop_map(|n| (
            Request::Arith {
                op: ArithOp::Incr,
                key: Bytes::from_static(b"n"),
                delta: 1,
                noreply: false
            },
            Response::Number(n)
        )),
    ]
}

/// `mg k v`, quiet or not.
fn meta_get(quiet: bool) -> Request {
    let line: &[u8] = if quiet {
        b"mg k v q\r\n"
    } else {
        b"mg k v\r\n"
    };
    match parse_request(line, &Limits::default()) {
        Parsed::Request {
            request: Incoming::Data(r),
            ..
        } => r,
        other => panic!("{other:?}"),
    }
}

fn meta_response() -> impl Strategy<Value = (Request, Response)> {
    let request = meta_get;
    let code = prop::sample::select(
        &[
            MetaCode::Hd,
            MetaCode::En,
            MetaCode::Nf,
            MetaCode::Ns,
            MetaCode::Ex,
        ][..],
    );
    prop_oneof![
        (code, any::<bool>(), any::<bool>()).prop_map(move |(code, flags, quiet)| {
            let rest = if flags { " c5 Oop k+/= b" } else { "" };
            (request(quiet), Response::Meta(MetaReply::new(code, rest)))
        }),
        (data(), any::<bool>()).prop_map(move |(data, quiet)| {
            let reply = MetaReply {
                code: MetaCode::Va,
                rest: Bytes::from_static(b" f1 t-1"),
                value: Some(data),
            };
            (request(quiet), Response::Meta(reply))
        }),
    ]
}

/// Data of any short length, or just below, at, or above
/// [`SHARED_VALUE_MIN`], with bytes that differ along it (so a slice taken
/// at the wrong place shows).
fn long_data() -> impl Strategy<Value = Bytes> {
    let sizes = vec![
        SHARED_VALUE_MIN - 1,
        SHARED_VALUE_MIN,
        SHARED_VALUE_MIN + 301,
    ];
    let long = (prop::sample::select(sizes), any::<u8>()).prop_map(|(n, seed)| {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect::<Vec<u8>>()
            .into()
    });
    prop_oneof![data(), long]
}

/// Replies that carry values, short and long: a `gets` of up to four
/// values, or an `mg` hit (quiet or not).
fn value_response() -> impl Strategy<Value = (Request, Response)> {
    prop_oneof![
        gets_reply(long_data()),
        (long_data(), any::<bool>()).prop_map(|(data, quiet)| {
            let reply = MetaReply {
                code: MetaCode::Va,
                rest: Bytes::from_static(b" f1"),
                value: Some(data),
            };
            (meta_get(quiet), Response::Meta(reply))
        }),
    ]
}

/// The values of a reply that carries values.
fn values_of(response: &Response) -> Vec<&Bytes> {
    match response {
        Response::Values(values) => values.iter().map(|v| &v.data).collect(),
        Response::Meta(m) => m.value.iter().collect(),
        other => panic!("no values: {other:?}"),
    }
}

/// The addresses of `bytes`.
fn addresses(bytes: &[u8]) -> std::ops::Range<usize> {
    let start = bytes.as_ptr() as usize;
    start..start + bytes.len()
}

/// A reply fed to a [`ReplyBuffer`] in one read: its value of `len` bytes
/// is a slice of the buffer, or a copy.
fn shared_after_one_read(len: usize) -> bool {
    let req = Request::Get {
        keys: vec![Bytes::from_static(b"k")],
        cas: false,
    };
    let value = Value {
        key: Bytes::from_static(b"k"),
        flags: 0,
        data: vec![7; len].into(),
        cas: None,
    };
    let mut wire = BytesMut::new();
    encode_response(&Response::Values(vec![value]), &mut wire);
    let mut rb = ReplyBuffer::new();
    rb.for_read().extend_from_slice(&wire);
    let region = addresses(rb.bytes());
    let taken = rb.take(&req).expect("frames").expect("all there");
    assert!(rb.is_empty());
    let data = values_of(&taken)[0];
    assert_eq!(data.len(), len);
    region.contains(&(data.as_ptr() as usize))
}

#[test]
fn a_value_of_16_kib_is_taken_as_a_slice_of_the_read_buffer_and_a_shorter_one_copied() {
    assert!(shared_after_one_read(SHARED_VALUE_MIN));
    assert!(shared_after_one_read(40_000));
    assert!(!shared_after_one_read(SHARED_VALUE_MIN - 1));
    assert!(!shared_after_one_read(10));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn a_reply_read_in_pieces_is_taken_whole_once_it_is_all_there(
        (req, resp) in value_response(),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
        pieces in proptest::collection::vec(1usize..70_000, 1..8),
    ) {
        let mut wire = BytesMut::new();
        encode_response(&resp, &mut wire);
        if matches!(&req, Request::Meta(m) if m.flags.quiet) {
            wire.extend_from_slice(b"MN\r\n");
        }
        let whole = wire.len();
        wire.extend_from_slice(&tail);
        // Fed as reads of the given sizes (each at most the buffer's room,
        // as a socket read is); taken as soon as it is all there.
        let mut rb = ReplyBuffer::new();
        let mut fed = 0;
        let mut sizes = pieces.iter().cycle();
        let (taken, region) = loop {
            let region = addresses(rb.bytes());
            match rb.take(&req) {
                Ok(Some(r)) => break (r, region),
                Ok(None) => prop_assert!(fed < wire.len(), "not taken with every byte in"),
                Err(e) => return Err(TestCaseError::fail(e)),
            }
            let into = rb.for_read();
            let room = into.capacity() - into.len();
            let n = (*sizes.next().unwrap()).min(room).min(wire.len() - fed);
            into.extend_from_slice(&wire[fed..fed + n]);
            fed += n;
        };
        prop_assert!(fed >= whole, "taken after {} of {} bytes", fed, whole);
        prop_assert_eq!(&taken, &resp);
        // What is left is what followed the reply.
        prop_assert_eq!(rb.bytes(), &wire[whole..fed]);
        // Only long values are shared.
        for d in values_of(&taken) {
            if region.contains(&(d.as_ptr() as usize)) {
                prop_assert!(d.len() >= SHARED_VALUE_MIN, "{} bytes shared", d.len());
            }
        }
    }
}

proptest! {
    #[test]
    fn meta_requests_split_at_any_byte_parse_the_same(
        bytes in meta_bytes(),
        cut in any::<prop::sample::Index>(),
    ) {
        let whole = parse_request(&bytes, &Limits::default());
        let Parsed::Request { request, consumed, skip: 0 } = &whole else {
            return Err(TestCaseError::fail(format!("{:?}: {:?}", String::from_utf8_lossy(&bytes), whole)));
        };
        prop_assert_eq!(*consumed, bytes.len());
        let cut = cut.index(bytes.len());
        let prefix = parse_request(&bytes[..cut], &Limits::default());
        prop_assert_eq!(prefix, Parsed::Incomplete);
        // Re-encoded (`q` kept), it parses to the same request.
        let again = encoded(request);
        match parse_request(&again, &Limits::default()) {
            Parsed::Request { request: r, consumed, .. } => {
                prop_assert_eq!(&r, request);
                prop_assert_eq!(consumed, again.len());
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn meta_replies_round_trip_through_the_reply_parser((req, resp) in meta_response()) {
        // A quiet request is forwarded followed by `mn`: its reply ends in `MN`.
        let quiet = matches!(&req, Request::Meta(m) if m.flags.quiet);
        let mut b = BytesMut::new();
        encode_response(&resp, &mut b);
        if quiet {
            b.extend_from_slice(b"MN\r\n");
        }
        prop_assert_eq!(
            parse_reply(&req, &b),
            ReplyParsed::Complete { response: resp, consumed: b.len() }
        );
        for cut in 0..b.len() {
            prop_assert_eq!(parse_reply(&req, &b[..cut]), ReplyParsed::Incomplete);
        }
        if quiet {
            prop_assert_eq!(
                parse_reply(&req, b"MN\r\n"),
                ReplyParsed::Complete { response: Response::Quiet, consumed: 4 }
            );
        }
    }

    #[test]
    fn encode_then_parse_round_trips(r in request()) {
        let bytes = encoded(&r);
        match parse_request(&bytes, &Limits::default()) {
            Parsed::Request { request, consumed, .. } => {
                prop_assert_eq!(request, r);
                let line_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
                prop_assert!(consumed == bytes.len() || consumed == line_end);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn any_split_parses_the_same(r in request(), cut in any::<prop::sample::Index>()) {
        let bytes = encoded(&r);
        let whole = parse_request(&bytes, &Limits::default());
        let cut = cut.index(bytes.len());
        // A prefix either waits for more, or (when the cut falls after the
        // command line of an oversized store) already gives the same answer.
        let prefix = parse_request(&bytes[..cut], &Limits::default());
        prop_assert!(prefix == Parsed::Incomplete || prefix == whole, "{:?} vs {:?}", prefix, whole);
    }

    #[test]
    fn responses_round_trip_through_the_reply_parser((req, resp) in response()) {
        let mut b = BytesMut::new();
        encode_response(&resp, &mut b);
        let parsed = parse_reply(&req, &b);
        prop_assert_eq!(parsed, ReplyParsed::Complete { response: resp, consumed: b.len() });
        for cut in 0..b.len() {
            prop_assert_eq!(parse_reply(&req, &b[..cut]), ReplyParsed::Incomplete);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overrun(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        let limits = Limits { max_line_bytes: 512, max_get_line_bytes: 512, ..Limits::default() };
        match parse_request(&input, &limits) {
            Parsed::Request { consumed, .. } | Parsed::Invalid { consumed, .. } => {
                prop_assert!(consumed > 0 && consumed <= input.len());
            }
            Parsed::Incomplete => prop_assert!(input.len() <= limits.max_line_bytes + 1 + 2 + limits.item_size_max + 2),
            Parsed::Fatal(_) | Parsed::Hangup => {}
        }
    }
}
