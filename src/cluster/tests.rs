//! The transport between two nodes over real loopback TCP: a mode's
//! messages arrive in order, requests are answered or time out, and a
//! peer running another mode or message version is refused without losing
//! the link.

use std::sync::Mutex;

use super::*;

const TAG: ModeTag = ModeTag {
    name: "test",
    version: 1,
};

/// A mode that records what it receives and answers requests by echoing
/// them reversed; a request `"slow"` takes a second.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<(u32, Bytes)>>,
}

impl Handler for Recorder {
    fn on_message(&self, peer: u32, body: Bytes) -> BoxFuture<'_, Result<(), String>> {
        self.got.lock().unwrap().push((peer, body));
        Box::pin(async { Ok(()) })
    }

    fn on_request(&self, _peer: u32, body: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if &body[..] == b"slow" {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if &body[..] == b"fail" {
                return Err("no".into());
            }
            Ok(body.iter().rev().copied().collect())
        })
    }
}

struct Node {
    cluster: Arc<Cluster>,
    recorder: Arc<Recorder>,
    registry: prometheus::Registry,
}

/// Two nodes (ids 1 and 2) with the given tags, linked over loopback.
async fn pair(tags: [ModeTag; 2], shutdown: &CancellationToken) -> [Node; 2] {
    let listeners = [
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    ];
    let addrs = [
        listeners[0].local_addr().unwrap(),
        listeners[1].local_addr().unwrap(),
    ];
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u32 + 1;
        let other = 1 - i;
        let settings = ClusterSettings {
            cluster_name: "t".into(),
            secret: "s".into(),
            node_id: id,
            peers: vec![(other as u32 + 1, addrs[other].into())],
            heartbeat_interval: Duration::from_millis(20),
            suspect_after: Duration::from_millis(500),
            down_after: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(500),
            reconnect_max: Duration::from_millis(100),
        };
        let registry = prometheus::Registry::new();
        let cluster = Cluster::new(settings, tags[i], &registry, Box::new(|| 0)).unwrap();
        let recorder = Arc::new(Recorder::default());
        tokio::spawn(
            cluster
                .clone()
                .run(listener, recorder.clone(), shutdown.clone()),
        );
        nodes.push(Node {
            cluster,
            recorder,
            registry,
        });
    }
    nodes.try_into().ok().unwrap()
}

fn counter(registry: &prometheus::Registry, name: &str, label: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == label))
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// Polls `check` until it holds, for up to 5 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test]
async fn a_slow_request_does_not_hold_back_the_next() {
    let shutdown = CancellationToken::new();
    let [a, _b] = pair([TAG, TAG], &shutdown).await;
    let link = a.cluster.link(2).await.expect("peer 2 is known");
    let slow = tokio::spawn({
        let link = link.clone();
        async move { link.request(Bytes::from_static(b"slow")).await }
    });
    // The slow request is on the wire first, so the fast one queues behind
    // it at the peer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast = link.request(Bytes::from_static(b"ab")).await.unwrap();
    assert_eq!(&fast[..], b"ba");
    assert!(
        !slow.is_finished(),
        "the fast request was answered only after the slow one"
    );
    assert_eq!(&slow.await.unwrap().unwrap()[..], b"wols");
    shutdown.cancel();
}

#[tokio::test]
async fn messages_arrive_in_order_and_requests_are_answered() {
    let shutdown = CancellationToken::new();
    let [a, b] = pair([TAG, TAG], &shutdown).await;
    let link = a.cluster.link(2).await.expect("peer 2 is known");
    for i in 0..200u32 {
        link.send(Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    let answer = a
        .cluster
        .request(2, Bytes::from_static(b"abc"), Duration::from_secs(5))
        .await;
    assert_eq!(answer, Ok(Bytes::from_static(b"cba")));
    // The request was handled after every message sent before it.
    let got = b.recorder.got.lock().unwrap().clone();
    let expected: Vec<(u32, Bytes)> = (0..200u32)
        .map(|i| (1, Bytes::from(i.to_be_bytes().to_vec())))
        .collect();
    assert_eq!(got, expected);

    let slow = a
        .cluster
        .request(2, Bytes::from_static(b"slow"), Duration::from_millis(200))
        .await;
    assert_eq!(slow, Err(PeerError::Timeout(2)));
    let failed = a
        .cluster
        .request(2, Bytes::from_static(b"fail"), Duration::from_secs(5))
        .await;
    assert_eq!(
        failed,
        Err(PeerError::Rejected {
            peer: 2,
            reason: "no".into()
        })
    );
    assert_eq!(
        a.cluster.send(9, Bytes::new()).await,
        Err(PeerError::Unknown(9))
    );
    eventually("peers up with a round trip", || {
        a.cluster
            .view()
            .iter()
            .all(|p| p.liveness == Liveness::Up && p.rtt.is_some())
    })
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn another_mode_or_version_is_refused_and_the_link_stays_up() {
    for (theirs, reason) in [
        (
            ModeTag {
                name: "other",
                version: 1,
            },
            "mode",
        ),
        (
            ModeTag {
                name: "test",
                version: 2,
            },
            "version",
        ),
    ] {
        let shutdown = CancellationToken::new();
        let [a, b] = pair([theirs, TAG], &shutdown).await;
        let link = a.cluster.link(2).await.unwrap();
        link.send(Bytes::from_static(b"m")).await.unwrap();
        let answer = link.request(Bytes::from_static(b"q")).await;
        assert!(
            matches!(&answer, Err(PeerError::Rejected { peer: 2, reason }) if reason.contains("this node runs test v1")),
            "{answer:?}"
        );
        assert!(b.recorder.got.lock().unwrap().is_empty());
        assert_eq!(
            counter(&b.registry, "peer_messages_refused_total", reason),
            2.0
        );
        // The link is the same connection, still carrying heartbeats.
        let closed = tokio::time::timeout(Duration::from_millis(100), link.closed()).await;
        assert!(closed.is_err(), "{reason}: the link was dropped");
        assert!(
            a.cluster.view()[0].liveness == Liveness::Up
                && b.cluster.view()[0].liveness == Liveness::Up
        );
        // Node 2's messages to node 1 are refused the same way.
        b.cluster.send(1, Bytes::from_static(b"x")).await.unwrap();
        eventually("refused on node 1 too", || {
            counter(&a.registry, "peer_messages_refused_total", reason) == 1.0
        })
        .await;
        shutdown.cancel();
    }
}

#[tokio::test]
async fn a_request_waits_for_the_link_within_its_deadline() {
    let shutdown = CancellationToken::new();
    // Peer 2 is an address where nothing listens.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let settings = ClusterSettings {
        cluster_name: "t".into(),
        secret: "s".into(),
        node_id: 1,
        peers: vec![(2, port.into())],
        heartbeat_interval: Duration::from_millis(20),
        suspect_after: Duration::from_millis(500),
        down_after: Duration::from_millis(1000),
        connect_timeout: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(100),
    };
    let registry = prometheus::Registry::new();
    let cluster = Cluster::new(settings, TAG, &registry, Box::new(|| 0)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(
        cluster
            .clone()
            .run(listener, Arc::new(Recorder::default()), shutdown.clone()),
    );
    let started = std::time::Instant::now();
    let r = cluster
        .request(2, Bytes::from_static(b"q"), Duration::from_millis(300))
        .await;
    assert_eq!(r, Err(PeerError::Timeout(2)));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(cluster.send(2, Bytes::new()).await, Err(PeerError::Down(2)));
    assert_eq!(cluster.view()[0].liveness, Liveness::Down);
    shutdown.cancel();
}
