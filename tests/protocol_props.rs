//! Properties of the parser and encoders: a request split at any byte
//! parses the same, encode → parse round-trips, and no input makes the
//! parser panic or claim more bytes than it was given.

use bytes::{Bytes, BytesMut};
use memdial::protocol::{
    ArithOp, ConnRequest, Incoming, Limits, Parsed, ReplyParsed, Request, Response, StoreOp, Value,
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

fn encoded(r: &Incoming) -> Vec<u8> {
    let mut b = BytesMut::new();
    match r {
        Incoming::Data(r) => encode_request(r, true, &mut b),
        Incoming::Conn(r) => encode_conn_request(r, &mut b),
    }
    b.to_vec()
}

fn response() -> impl Strategy<Value = (Request, Response)> {
    let get = Request::Get {
        keys: vec![Bytes::from_static(b"k")],
        cas: true,
    };
    let value = (
        key(),
        any::<u32>(),
        data(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(key, flags, data, cas)| Value {
            key,
            flags,
            data,
            cas,
        });
    prop_oneof![
        proptest::collection::vec(value, 0..4)
            .prop_map(move |v| (get.clone(), Response::Values(v))),
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

proptest! {
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
