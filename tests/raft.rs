//! The ordered modes (`linearizable`, `sequential`) on three real memdial
//! processes over the embedded store: any node takes any command and answers
//! as one memcached would; a killed leader is replaced and the node rejoins
//! and catches up; a node cut off from the majority answers `SERVER_ERROR`
//! (linearizable) and never stale data, or keeps serving reads from its
//! replica (sequential); `gets` tokens are honoured by `cas` on any node,
//! and meta CAS tokens (`mg c`, `ms C`) by text and meta writes alike; a
//! recache token (`W`) is handed out once across the cluster.
//!
//! The tests run one at a time (a lock), as the eventual cluster tests do.

mod common;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::client::{Client, metric, text};
use common::cluster::{ClusterOpts, TestCluster, poll_pause};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A client request's deadline in these clusters (`request_timeout_ms`),
/// plus room for a loaded machine.
const ANSWER_WAIT: Duration = Duration::from_secs(8);

/// How long an election may take here: a few election timeouts.
const ELECTION_WAIT: Duration = Duration::from_secs(15);

fn mode(consistency: &'static str, relays: bool) -> ClusterOpts {
    ClusterOpts {
        consistency: Some(consistency),
        relays,
        ..ClusterOpts::default()
    }
}

/// Sends `request` to node `i` until it is answered without a
/// `SERVER_ERROR` (the cluster may still be electing), and returns it.
fn call_until_served(c: &TestCluster, i: usize, request: &[u8], within: Duration) -> String {
    let start = Instant::now();
    loop {
        let answer = Client::try_connect(c.ports(i).client)
            .and_then(|mut cl| cl.try_call(request))
            .map(|b| text(&b));
        match answer {
            Ok(a) if !a.starts_with("SERVER_ERROR") => return a,
            other => assert!(
                start.elapsed() < within,
                "node {i} did not serve {:?} within {within:?}: {other:?}",
                text(request)
            ),
        }
        poll_pause();
    }
}

fn cas_token(gets_reply: &str) -> u64 {
    let line = gets_reply.lines().next().unwrap_or_default();
    line.split(' ')
        .nth(4)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no cas token in {gets_reply:?}"))
}

#[test]
fn every_node_answers_as_one_memcached() {
    let _s = serial();
    let c = TestCluster::start(3, mode("linearizable", false));
    c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    assert_eq!(
        call_until_served(&c, 2, b"set k 5 0 2\r\nhi\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    // A write acknowledged on one node is seen by a read on any other.
    assert_eq!(
        Client::connect(c.ports(3).client).call(b"get k\r\n"),
        b"VALUE k 5 2\r\nhi\r\nEND\r\n"
    );
    // gets on one node, cas on another: the token is the cluster's.
    let gets = text(&Client::connect(c.ports(1).client).call(b"gets k\r\n"));
    let token = cas_token(&gets);
    let mut n3 = Client::connect(c.ports(3).client);
    let stale = format!("cas k 0 0 1 {}\r\nx\r\n", token + 1000);
    assert_eq!(n3.call(stale.as_bytes()), b"EXISTS\r\n");
    let fresh = format!("cas k 0 0 1 {token}\r\nx\r\n");
    assert_eq!(n3.call(fresh.as_bytes()), b"STORED\r\n");
    assert_eq!(
        Client::connect(c.ports(2).client).call(fresh.as_bytes()),
        b"EXISTS\r\n",
        "a cas token is good for one write only"
    );
    // The rest of the commands, through different nodes.
    let mut n1 = Client::connect(c.ports(1).client);
    assert_eq!(n1.call(b"add k 0 0 1\r\ny\r\n"), b"NOT_STORED\r\n");
    assert_eq!(n1.call(b"set n 0 0 2\r\n10\r\n"), b"STORED\r\n");
    assert_eq!(n3.call(b"incr n 5\r\n"), b"15\r\n");
    assert_eq!(n3.call(b"decr n 100\r\n"), b"0\r\n");
    assert_eq!(n1.call(b"append k 0 0 1\r\n!\r\n"), b"STORED\r\n");
    assert_eq!(n3.call(b"get k\r\n"), b"VALUE k 0 2\r\nx!\r\nEND\r\n");
    assert_eq!(n1.call(b"touch k 100\r\n"), b"TOUCHED\r\n");
    assert_eq!(n3.call(b"delete k\r\n"), b"DELETED\r\n");
    assert_eq!(n1.call(b"delete k\r\n"), b"NOT_FOUND\r\n");
    assert_eq!(n1.call(b"incr nothing 1\r\n"), b"NOT_FOUND\r\n");
    assert_eq!(n3.call(b"flush_all\r\n"), b"OK\r\n");
    assert_eq!(n1.call(b"get n\r\n"), b"END\r\n");
    // /metrics: one leader, the same term everywhere, proposals timed on
    // the leader, and the stages of a proposal timed where they run.
    let start = Instant::now();
    loop {
        let texts: Vec<String> = (1..=3).map(|i| c.metrics(i).unwrap_or_default()).collect();
        let leaders: f64 = texts
            .iter()
            .filter_map(|t| metric(t, "memdial_raft_is_leader"))
            .sum();
        let terms: Vec<Option<f64>> = texts
            .iter()
            .map(|t| metric(t, "memdial_raft_term"))
            .collect();
        let proposals: f64 = texts
            .iter()
            .filter_map(|t| metric(t, "memdial_raft_proposal_duration_seconds_count"))
            .sum();
        // The stages: every node synced its log and applied entries; the
        // followers took AppendEntries from the leader (a node that led
        // before an election may have too).
        let on_every = |name: &str| {
            texts
                .iter()
                .filter(|t| metric(t, name).is_some_and(|v| v > 0.0))
                .count()
        };
        let stages = [
            on_every("memdial_raft_log_sync_duration_seconds_count"),
            on_every("memdial_raft_apply_duration_seconds_count"),
            on_every("memdial_raft_append_rpc_duration_seconds_count"),
        ];
        if leaders == 1.0
            && terms.iter().all(|t| t.is_some() && *t == terms[0])
            && proposals > 0.0
            && stages[..2] == [3, 3]
            && stages[2] >= 2
        {
            break;
        }
        assert!(
            start.elapsed() < ANSWER_WAIT,
            "raft metrics: {leaders} leaders, terms {terms:?}, {proposals} proposals, \
             nodes with syncs, applies, append RPCs: {stages:?}"
        );
        poll_pause();
    }
    // A pipelined batch mixing reads and writes is answered in order.
    n1.send(b"set p 0 0 1\r\n1\r\nget p\r\nincr p 1\r\nget p\r\n");
    let replies: Vec<String> = (0..4).map(|_| text(&n1.read_reply().unwrap())).collect();
    assert_eq!(
        replies,
        [
            "STORED\r\n",
            "VALUE p 0 1\r\n1\r\nEND\r\n",
            "2\r\n",
            "VALUE p 0 1\r\n2\r\nEND\r\n"
        ]
    );
}

#[test]
fn a_killed_leader_is_replaced_and_catches_up_when_back() {
    let _s = serial();
    let mut c = TestCluster::start(3, mode("linearizable", false));
    let leader = c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    let others: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    assert_eq!(
        call_until_served(&c, leader, b"set before 0 0 1\r\nb\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    c.kill9(leader);
    let killed = Instant::now();
    let next = c.wait_leader(&others, ELECTION_WAIT);
    let elected = killed.elapsed();
    assert_ne!(next, leader);
    // Writes resume on both survivors, and nothing acknowledged is lost.
    assert_eq!(
        call_until_served(&c, others[0], b"set after 0 0 1\r\na\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    assert_eq!(
        call_until_served(&c, others[1], b"get before after\r\n", ANSWER_WAIT),
        "VALUE before 0 1\r\nb\r\nVALUE after 0 1\r\na\r\nEND\r\n"
    );
    // The killed node comes back with its log and catches up by itself.
    c.restart(leader);
    assert_eq!(
        call_until_served(&c, leader, b"get before after\r\n", ANSWER_WAIT),
        "VALUE before 0 1\r\nb\r\nVALUE after 0 1\r\na\r\nEND\r\n"
    );
    eprintln!("new leader {next} elected {elected:?} after leader {leader} was killed");
}

#[test]
fn a_cut_off_node_never_serves_stale_data_and_rejoins() {
    let _s = serial();
    let c = TestCluster::start(3, mode("linearizable", true));
    let leader = c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    assert_eq!(
        call_until_served(&c, 1, b"set k 0 0 3\r\nold\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    // Cut off a follower: the majority goes on writing.
    let cut = (1..=3).find(|&i| i != leader).unwrap();
    let majority: Vec<usize> = (1..=3).filter(|&i| i != cut).collect();
    c.partition(cut);
    assert_eq!(
        call_until_served(&c, majority[0], b"set k 0 0 3\r\nnew\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    // The cut-off node answers, within its deadline, SERVER_ERROR: never
    // the old value, never a hang.
    let mut isolated = Client::connect(c.ports(cut).client);
    let asked = Instant::now();
    let read = text(&isolated.call(b"get k\r\n"));
    assert!(
        read.starts_with("SERVER_ERROR"),
        "a minority read: {read:?}"
    );
    assert!(asked.elapsed() < ANSWER_WAIT, "took {:?}", asked.elapsed());
    let write = text(&isolated.call(b"set k 0 0 1\r\nz\r\n"));
    assert!(
        write.starts_with("SERVER_ERROR"),
        "a minority write: {write:?}"
    );
    // Meta reads and writes too; `mn` reads nothing and answers.
    for request in ["mg k v\r\n", "ms k 1\r\nz\r\n", "md k\r\n"] {
        let answer = text(&isolated.call(request.as_bytes()));
        assert!(
            answer.starts_with("SERVER_ERROR"),
            "{request:?} on a minority: {answer:?}"
        );
    }
    assert_eq!(isolated.call(b"mn\r\n"), b"MN\r\n");
    for batch in ["mg k v q\r\nmn\r\n", "ms k 1 q\r\nz\r\nmn\r\n"] {
        isolated.send(batch.as_bytes());
        let failed = text(&isolated.read_reply().unwrap());
        assert!(failed.starts_with("SERVER_ERROR"), "{batch:?}: {failed:?}");
        assert_eq!(isolated.read_reply().unwrap(), b"MN\r\n", "{batch:?}");
    }
    // Healed, it serves the majority's value.
    c.heal_all();
    assert_eq!(
        call_until_served(&c, cut, b"get k\r\n", ANSWER_WAIT),
        "VALUE k 0 3\r\nnew\r\nEND\r\n"
    );
}

#[test]
fn sequential_reads_stay_local_and_see_the_sessions_own_writes() {
    let _s = serial();
    let c = TestCluster::start(3, mode("sequential", true));
    let leader = c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    assert_eq!(
        call_until_served(&c, follower, b"set k 0 0 1\r\n1\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    // Read-your-writes on the same connection, through a follower.
    let mut session = Client::connect(c.ports(follower).client);
    assert_eq!(session.call(b"set k 0 0 1\r\n2\r\n"), b"STORED\r\n");
    assert_eq!(session.call(b"get k\r\n"), b"VALUE k 0 1\r\n2\r\nEND\r\n");
    // The same for meta writes and reads.
    let token = meta_cas(&meta(&mut session, "ms m 1 c\r\nx\r\n"));
    assert_eq!(
        meta(&mut session, "mg m v c\r\n"),
        format!("VA 1 c{token}\r\nx\r\n")
    );
    assert_eq!(meta(&mut session, "ms s 1\r\ny\r\n"), "HD\r\n");
    assert_eq!(meta(&mut session, "md s I\r\n"), "HD\r\n");
    // Cut off, the follower still serves reads from its replica; writes
    // need the majority.
    c.partition(follower);
    assert_eq!(session.call(b"get k\r\n"), b"VALUE k 0 1\r\n2\r\nEND\r\n");
    let write = text(&session.call(b"set k 0 0 1\r\n3\r\n"));
    assert!(
        write.starts_with("SERVER_ERROR"),
        "a minority write: {write:?}"
    );
    // Meta reads too, unless the read would win a recache token: that
    // changes the item, so it is a write and needs the majority.
    assert_eq!(meta(&mut session, "mg m v\r\n"), "VA 1\r\nx\r\n");
    assert!(meta(&mut session, "me m\r\n").starts_with("ME m exp=-1 la=0 "));
    let win = meta(&mut session, "mg s v\r\n");
    assert!(
        win.starts_with("SERVER_ERROR"),
        "a token won on a minority: {win:?}"
    );
    c.heal_all();
    assert_eq!(
        call_until_served(&c, follower, b"mg s v\r\n", ANSWER_WAIT),
        "VA 1 X W\r\n"
    );
}

#[test]
fn a_memcached_that_restarts_empty_is_rebuilt_from_the_log() {
    let _s = serial();
    let mut c = TestCluster::start(
        3,
        ClusterOpts {
            memcached: true,
            ..mode("linearizable", false)
        },
    );
    let leader = c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    let victim = (1..=3).find(|&i| i != leader).unwrap();
    let mut writer = Client::connect(c.ports(leader).client);
    assert_eq!(
        call_until_served(&c, leader, b"set k0 0 0 2\r\nv0\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    for i in 1..50 {
        let set = format!("set k{i} 0 0 {}\r\nv{i}\r\n", format!("v{i}").len());
        assert_eq!(writer.call(set.as_bytes()), b"STORED\r\n");
    }
    assert_eq!(writer.call(b"incr k-n 1\r\n"), b"NOT_FOUND\r\n");
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    let get = format!("get {}\r\n", keys.join(" "));
    let expected = text(&writer.call(get.as_bytes()));
    assert_eq!(expected.matches("VALUE").count(), 50);

    c.memcached_restart(victim);
    // The node notices (its store check) and rebuilds the store from the
    // log; then it serves every value again, and says so.
    let start = Instant::now();
    loop {
        let seen = Client::try_connect(c.ports(victim).client)
            .and_then(|mut cl| cl.try_call(get.as_bytes()))
            .map(|b| text(&b));
        let rebuilt = c
            .stats_cluster(victim)
            .ok()
            .and_then(|s| s.get("raft_store_rebuilds").cloned());
        if seen.as_ref().is_ok_and(|s| *s == expected) && rebuilt.as_deref() == Some("1") {
            break;
        }
        // Before the rebuild the store is empty: a read that was served
        // must not have been served from it.
        if let Ok(s) = &seen {
            assert!(
                s == &expected || s.starts_with("SERVER_ERROR"),
                "node {victim} answered from its emptied store: {s:?}"
            );
        }
        assert!(
            start.elapsed() < ANSWER_WAIT * 2,
            "node {victim} not rebuilt: rebuilds {rebuilt:?}, reads {seen:?}"
        );
        poll_pause();
    }
    // And it takes part in writes again.
    assert_eq!(
        Client::connect(c.ports(victim).client).call(b"incr k-n 1\r\n"),
        b"NOT_FOUND\r\n"
    );
    assert_eq!(
        Client::connect(c.ports(victim).client).call(b"append k1 0 0 1\r\n!\r\n"),
        b"STORED\r\n"
    );
    assert_eq!(
        Client::connect(c.ports(leader).client).call(b"get k1\r\n"),
        b"VALUE k1 0 3\r\nv1!\r\nEND\r\n"
    );
}

#[test]
fn a_node_too_far_behind_gets_a_snapshot() {
    let _s = serial();
    let mut c = TestCluster::start(
        3,
        ClusterOpts {
            cluster_yaml: "  snapshot_after_entries: 50\n  log_kept_after_snapshot: 5\n".into(),
            ..mode("linearizable", false)
        },
    );
    let leader = c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    let behind = (1..=3).find(|&i| i != leader).unwrap();
    assert_eq!(
        call_until_served(&c, leader, b"set first 0 0 1\r\n1\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    c.kill9(behind);
    // Far more entries than the log keeps behind a snapshot, one at a time.
    let mut w = Client::connect(c.ports(leader).client);
    for i in 0..300 {
        let set = format!("set k{} 0 0 {}\r\n{i}\r\n", i % 20, i.to_string().len());
        assert_eq!(w.call(set.as_bytes()), b"STORED\r\n");
    }
    let built = c.stats_cluster(leader).unwrap()["raft_snapshots_built"]
        .parse::<u64>()
        .unwrap();
    assert!(built >= 1, "the leader built no snapshot");
    c.restart(behind);
    let expected = text(&w.call(b"get first k0 k19\r\n"));
    assert_eq!(
        call_until_served(&c, behind, b"get first k0 k19\r\n", ANSWER_WAIT * 2),
        expected
    );
    let installed = c.stats_cluster(behind).unwrap()["raft_snapshots_installed"]
        .parse::<u64>()
        .unwrap();
    assert!(
        installed >= 1,
        "the node caught up without the leader's snapshot"
    );
}

#[test]
fn values_expire_on_every_node_while_nothing_is_written() {
    let _s = serial();
    let c = TestCluster::start(3, mode("linearizable", false));
    let leader = c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    assert_eq!(
        call_until_served(&c, leader, b"set long 0 0 1\r\ny\r\n", ANSWER_WAIT),
        "STORED\r\n"
    );
    assert_eq!(
        Client::connect(c.ports(leader).client).call(b"set short 0 1 1\r\nx\r\n"),
        b"STORED\r\n"
    );
    // Reads judge expiry by the log's clock; with no writes, the leader's
    // clock entries keep it moving, so the 1 s value goes on every node.
    let start = Instant::now();
    let mut gone = [false; 3];
    while !gone.iter().all(|&g| g) {
        for i in 1..=3 {
            let seen = text(&Client::connect(c.ports(i).client).call(b"get short long\r\n"));
            assert!(seen.contains("VALUE long"), "node {i}: {seen:?}");
            gone[i - 1] = !seen.contains("VALUE short");
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "the 1 s value did not expire everywhere: gone {gone:?}"
        );
        poll_pause();
    }
}

/// Sends a meta request and reads its reply, the value block of a `VA`
/// included.
fn meta(c: &mut Client, request: &str) -> String {
    let mut reply = text(&c.call(request.as_bytes()));
    if let Some(rest) = reply.strip_prefix("VA ") {
        let len: usize = rest
            .split([' ', '\r'])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad VA line {reply:?}"));
        reply.push_str(&text(&c.read_exact_len(len + 2)));
    }
    reply
}

/// The number after ` c` in a meta reply line.
fn meta_cas(reply: &str) -> u64 {
    reply
        .lines()
        .next()
        .unwrap_or_default()
        .split(' ')
        .find_map(|f| f.strip_prefix('c').and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no c flag in {reply:?}"))
}

#[test]
fn meta_commands_on_one_node_are_seen_and_honoured_on_the_others() {
    let _s = serial();
    let c = TestCluster::start(3, mode("linearizable", false));
    c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    let stored = call_until_served(&c, 1, b"ms mk 2 F5 c\r\nhi\r\n", ANSWER_WAIT);
    let token = meta_cas(&stored);
    let (mut n1, mut n2, mut n3) = (c.client(1), c.client(2), c.client(3));
    // Meta writes on node 1, meta and text reads on the others.
    assert_eq!(
        meta(&mut n2, "mg mk v f c t s\r\n"),
        format!("VA 2 f5 c{token} t-1 s2\r\nhi\r\n")
    );
    assert_eq!(
        text(&n3.call(b"gets mk\r\n")),
        format!("VALUE mk 5 2 {token}\r\nhi\r\nEND\r\n")
    );
    // A `mg c` token from node 2 is honoured by `ms C` on node 3, once.
    let seen = meta_cas(&meta(&mut n2, "mg mk c\r\n"));
    assert_eq!(seen, token);
    assert_eq!(
        meta(&mut n3, &format!("ms mk 2 C{} c\r\nno\r\n", seen + 1)),
        "EX c0\r\n"
    );
    let after = meta_cas(&meta(&mut n3, &format!("ms mk 2 C{seen} c\r\nok\r\n")));
    assert_ne!(after, seen);
    assert_eq!(
        meta(&mut n2, &format!("ms mk 2 C{seen}\r\nno\r\n")),
        "EX\r\n",
        "a CAS token is good for one write only"
    );
    // ...and the token `ms` handed back is the one `gets` and `cas` know.
    assert_eq!(
        text(&n1.call(b"gets mk\r\n")),
        format!("VALUE mk 0 2 {after}\r\nok\r\nEND\r\n")
    );
    assert_eq!(
        text(&n2.call(format!("cas mk 0 0 1 {after}\r\nz\r\n").as_bytes())),
        "STORED\r\n"
    );
    assert_eq!(meta(&mut n3, &format!("md mk C{after}\r\n")), "EX\r\n");
    // Counters: created by `ma N` on one node, counted on the others.
    assert_eq!(meta(&mut n1, "ma cnt N0 J10 v\r\n"), "VA 2\r\n10\r\n");
    assert_eq!(meta(&mut n2, "ma cnt v\r\n"), "VA 2\r\n11\r\n");
    assert_eq!(text(&n3.call(b"incr cnt 1\r\n")), "12\r\n");
    assert_eq!(meta(&mut n1, "mg cnt v\r\n"), "VA 2\r\n12\r\n");
    // An invalidated item: the first `mg` anywhere wins the recache token,
    // every later one, on any node, sees it taken.
    assert_eq!(meta(&mut n1, "md mk I\r\n"), "HD\r\n");
    assert_eq!(meta(&mut n2, "mg mk v\r\n"), "VA 1 X W\r\nz\r\n");
    assert_eq!(meta(&mut n3, "mg mk v\r\n"), "VA 1 Z X\r\nz\r\n");
    assert_eq!(meta(&mut n1, "mg mk v\r\n"), "VA 1 Z X\r\nz\r\n");
    // Vivified on a miss: one winner too.
    assert_eq!(meta(&mut n3, "mg viv N30 v\r\n"), "VA 0 W\r\n\r\n");
    assert_eq!(meta(&mut n1, "mg viv N30 v\r\n"), "VA 0 Z\r\n\r\n");
    // Deleted on one node: gone on the others; quiet mode flushes at `mn`.
    assert_eq!(meta(&mut n2, "md mk q\r\nmn\r\n"), "MN\r\n");
    assert_eq!(meta(&mut n3, "mg mk v\r\n"), "EN\r\n");
    assert_eq!(meta(&mut n1, "mg mk v q\r\nmn\r\n"), "MN\r\n");
    assert_eq!(text(&n2.call(b"get mk\r\n")), "END\r\n");
    assert_eq!(meta(&mut n2, "me mk\r\n"), "EN\r\n");
}

#[test]
fn a_value_too_large_once_stored_is_refused_and_the_cluster_goes_on() {
    let _s = serial();
    let c = TestCluster::start(
        3,
        ClusterOpts {
            memcached: true,
            ..mode("linearizable", false)
        },
    );
    let leader = c.wait_leader(&[1, 2, 3], ELECTION_WAIT);
    call_until_served(&c, leader, b"set small 0 0 1\r\n1\r\n", ANSWER_WAIT);
    // Within memdial's value limit, but memcached would refuse the stored
    // record (value and header): every replica refuses it alike.
    let len = 1_048_566;
    let mut set = format!("set big 0 0 {len}\r\n").into_bytes();
    set.extend(std::iter::repeat_n(b'x', len));
    set.extend_from_slice(b"\r\n");
    assert_eq!(
        Client::connect(c.ports(leader).client).call(&set),
        b"SERVER_ERROR object too large for cache\r\n"
    );
    for i in 1..=3 {
        let mut cl = Client::connect(c.ports(i).client);
        let key = format!("after{i}");
        assert_eq!(
            cl.call(format!("set {key} 0 0 1\r\n{i}\r\n").as_bytes()),
            b"STORED\r\n",
            "node {i} stopped taking writes"
        );
        assert_eq!(
            cl.call(b"get big small\r\n"),
            b"VALUE small 0 1\r\n1\r\nEND\r\n"
        );
    }
}
