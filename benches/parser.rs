//! Parser and encoder throughput: small `get` and `set` requests, and a
//! pipelined buffer of mixed requests, parsed as a connection would.

use bytes::BytesMut;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use memdial::protocol::{Limits, Parsed, Response, Value, encode_response, parse_request};

fn parse_all(buf: &[u8], limits: &Limits) -> usize {
    let mut at = 0;
    let mut n = 0;
    while at < buf.len() {
        match parse_request(&buf[at..], limits) {
            Parsed::Request { consumed, .. } => {
                at += consumed;
                n += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    n
}

fn parser(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("parse");
    let get = b"get user:1234567890:profile\r\n";
    g.throughput(Throughput::Elements(1));
    g.bench_function("get_small", |b| {
        b.iter(|| parse_request(black_box(get), &limits))
    });
    let set = b"set user:1234567890:profile 0 3600 32\r\n0123456789abcdef0123456789abcdef\r\n";
    g.bench_function("set_32b", |b| {
        b.iter(|| parse_request(black_box(set), &limits))
    });
    let multi = format!(
        "get {}\r\n",
        (0..100)
            .map(|i| format!("key:{i:08}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    g.bench_function("get_100_keys", |b| {
        b.iter(|| parse_request(black_box(multi.as_bytes()), &limits))
    });
    // 100 pipelined requests, 1:1 get/set, as one read buffer.
    let mut pipelined = Vec::new();
    for i in 0..50 {
        pipelined.extend_from_slice(format!("get key:{i:08}\r\n").as_bytes());
        pipelined.extend_from_slice(
            format!("set key:{i:08} 0 0 32\r\n{}\r\n", "v".repeat(32)).as_bytes(),
        );
    }
    g.throughput(Throughput::Elements(100));
    g.bench_function("pipelined_100_mixed", |b| {
        b.iter(|| parse_all(black_box(&pipelined), &limits))
    });
    g.finish();

    let mut g = c.benchmark_group("encode");
    let value = Response::Values(vec![Value {
        key: bytes::Bytes::from_static(b"user:1234567890:profile"),
        flags: 0,
        data: bytes::Bytes::from(vec![b'v'; 32]),
        cas: None,
    }]);
    let mut buf = BytesMut::with_capacity(4096);
    g.throughput(Throughput::Elements(1));
    g.bench_function("value_32b", |b| {
        b.iter(|| {
            buf.clear();
            encode_response(black_box(&value), &mut buf);
        })
    });
    g.finish();
}

criterion_group!(benches, parser);
criterion_main!(benches);
