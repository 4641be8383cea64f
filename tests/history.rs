//! The history checkers of `tests/common/history.rs`: hand-written histories
//! that must be rejected (each a classic anomaly) or accepted (each an
//! allowed interleaving).
//!
//! Times in the hand-written histories are small integers: only their order
//! matters.

mod common;

use common::history::linearizable::{self, Limits, Verdict, Violation};
use common::history::session::{self, ReplicaLog, SessionViolation};
use common::history::{Call, History, OpId, Outcome, Reply};

// ---------------------------------------------------------------- helpers

fn ok(reply: Reply) -> Outcome {
    Outcome::Ok(reply)
}

fn hit(data: &str) -> Outcome {
    ok(Reply::Hit {
        data: data.into(),
        token: None,
    })
}

fn hit_token(data: &str, token: u64) -> Outcome {
    ok(Reply::Hit {
        data: data.into(),
        token: Some(token),
    })
}

fn set(data: &str) -> Call {
    Call::Set(data.into())
}

fn cas(data: &str, token: u64) -> Call {
    Call::Cas {
        data: data.into(),
        token,
    }
}

fn check(h: &History) -> linearizable::Report {
    linearizable::check(h, Limits::default())
}

#[track_caller]
fn assert_linearizable(h: &History) {
    let report = check(h);
    assert!(report.is_linearizable(), "{}", report.explain(h));
}

/// Asserts a violation on exactly one key and returns it.
#[track_caller]
fn assert_violation(h: &History) -> Violation {
    let report = check(h);
    let mut found = report.keys.iter().filter_map(|k| match &k.verdict {
        Verdict::NotLinearizable(v) => Some(v.clone()),
        _ => None,
    });
    let v = found
        .next()
        .unwrap_or_else(|| panic!("expected a violation:\n{}", report.explain(h)));
    assert!(found.next().is_none(), "{}", report.explain(h));
    v
}

// ------------------------------------------------ linearizability: rejected

#[test]
fn stale_read_after_an_acknowledged_write_completed() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    let b = h.push(1, "k", 20, 30, set("b"), ok(Reply::Stored));
    let read = h.push(2, "k", 40, 50, Call::Get, hit("a"));
    let v = assert_violation(&h);
    assert_eq!(v.stuck, vec![read]);
    assert_eq!(v.linearized.last(), Some(&b));
    assert_eq!(v.state.as_deref(), Some(&b"b"[..]));
}

#[test]
fn lost_acknowledged_write() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(2, "k", 20, 30, Call::Get, ok(Reply::Miss));
    assert_violation(&h);
}

#[test]
fn lost_write_seen_by_the_writer_itself() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 11, 20, set("b"), ok(Reply::Stored));
    h.push(1, "k", 21, 30, Call::Get, hit("a"));
    assert_violation(&h);
}

#[test]
fn cas_stored_twice_with_one_token() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, Call::Gets, hit_token("a", 7));
    h.push(1, "k", 40, 50, cas("b", 7), ok(Reply::Stored));
    h.push(2, "k", 40, 50, cas("c", 7), ok(Reply::Stored));
    assert_violation(&h);
}

#[test]
fn cas_stored_twice_with_one_token_no_gets_seen() {
    // The token came from somewhere the checker never saw (another key, a
    // lost reply): the first cas may pin it, the second cannot reuse it.
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, cas("b", 7), ok(Reply::Stored));
    h.push(2, "k", 40, 50, cas("c", 7), ok(Reply::Stored));
    assert_violation(&h);
}

#[test]
fn cas_stored_after_an_intervening_write() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, Call::Gets, hit_token("a", 7));
    h.push(2, "k", 40, 50, set("b"), ok(Reply::Stored));
    h.push(1, "k", 60, 70, cas("c", 7), ok(Reply::Stored));
    assert_violation(&h);
}

#[test]
fn cas_exists_with_no_intervening_write() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, Call::Gets, hit_token("a", 7));
    h.push(1, "k", 40, 50, cas("c", 7), ok(Reply::Exists));
    assert_violation(&h);
}

#[test]
fn one_token_for_two_versions() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, Call::Gets, hit_token("a", 7));
    h.push(1, "k", 40, 50, set("a"), ok(Reply::Stored));
    h.push(1, "k", 60, 70, Call::Gets, hit_token("a", 7));
    assert_violation(&h);
}

#[test]
fn two_tokens_for_one_version() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, Call::Gets, hit_token("a", 7));
    h.push(2, "k", 40, 50, Call::Gets, hit_token("a", 8));
    assert_violation(&h);
}

#[test]
fn two_increments_answer_the_same_number() {
    let mut h = History::new();
    h.push(1, "n", 0, 10, set("10"), ok(Reply::Stored));
    h.push(1, "n", 20, 30, Call::Incr(1), ok(Reply::Number(11)));
    h.push(2, "n", 25, 35, Call::Incr(1), ok(Reply::Number(11)));
    assert_violation(&h);
}

#[test]
fn increment_result_fits_no_order() {
    // 10 + 5 and + 1 in either order gives 15/16 or 11/16; 12 fits neither.
    let mut h = History::new();
    h.push(1, "n", 0, 10, set("10"), ok(Reply::Stored));
    h.push(1, "n", 20, 30, Call::Incr(5), ok(Reply::Number(16)));
    h.push(2, "n", 20, 30, Call::Incr(1), ok(Reply::Number(12)));
    assert_violation(&h);
}

#[test]
fn decrement_below_zero_or_of_text() {
    let mut h = History::new();
    h.push(1, "n", 0, 10, set("3"), ok(Reply::Stored));
    h.push(
        1,
        "n",
        20,
        30,
        Call::Decr(5),
        ok(Reply::Number(u64::MAX - 1)),
    );
    assert_violation(&h);

    let mut h = History::new();
    h.push(1, "t", 0, 10, set("abc"), ok(Reply::Stored));
    h.push(1, "t", 20, 30, Call::Incr(1), ok(Reply::Number(1)));
    assert_violation(&h);
}

#[test]
fn read_of_a_value_never_written() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(2, "k", 5, 15, Call::Get, hit("z"));
    assert_violation(&h);
}

#[test]
fn read_of_a_write_that_definitely_failed() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), Outcome::Failed);
    h.push(2, "k", 20, 30, Call::Get, hit("a"));
    assert_violation(&h);
}

#[test]
fn read_of_a_write_not_yet_invoked() {
    let mut h = History::new();
    h.push(2, "k", 0, 10, Call::Get, hit("a"));
    h.push(1, "k", 20, 30, set("a"), ok(Reply::Stored));
    assert_violation(&h);
}

#[test]
fn add_stored_twice() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, Call::Add("a".into()), ok(Reply::Stored));
    h.push(2, "k", 5, 15, Call::Add("b".into()), ok(Reply::Stored));
    assert_violation(&h);
}

#[test]
fn deleted_twice() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, Call::Delete, ok(Reply::Deleted));
    h.push(2, "k", 20, 30, Call::Delete, ok(Reply::Deleted));
    assert_violation(&h);
}

#[test]
fn a_violation_names_its_key_only() {
    let mut h = History::new();
    h.push(1, "good", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "good", 20, 30, Call::Get, hit("a"));
    h.push(2, "bad", 0, 10, set("x"), ok(Reply::Stored));
    h.push(2, "bad", 20, 30, Call::Get, ok(Reply::Miss));
    let report = check(&h);
    let verdicts: Vec<(&[u8], bool)> = report
        .keys
        .iter()
        .map(|k| (k.key.as_slice(), k.verdict == Verdict::Linearizable))
        .collect();
    assert_eq!(verdicts, vec![(&b"bad"[..], false), (&b"good"[..], true)]);
    let text = report.explain(&h).to_string();
    assert!(text.contains("NOT linearizable"), "{text}");
}

// ------------------------------------------------ linearizability: accepted

#[test]
fn overlapping_writes_in_either_order() {
    for (first, second) in [("a", "b"), ("b", "a")] {
        let mut h = History::new();
        h.push(1, "k", 0, 20, set("a"), ok(Reply::Stored));
        h.push(2, "k", 5, 25, set("b"), ok(Reply::Stored));
        h.push(3, "k", 10, 30, Call::Get, hit(first));
        h.push(3, "k", 40, 50, Call::Get, hit(second));
        assert_linearizable(&h);
    }
}

#[test]
fn read_overlapping_a_write_sees_old_or_new() {
    for seen in [ok(Reply::Miss), hit("a")] {
        let mut h = History::new();
        h.push(1, "k", 0, 20, set("a"), ok(Reply::Stored));
        h.push(2, "k", 5, 15, Call::Get, seen);
        assert_linearizable(&h);
    }
}

#[test]
fn unknown_write_that_took_effect() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, set("b"), Outcome::Unknown);
    h.push(2, "k", 1_000, 1_010, Call::Get, hit("b"));
    assert_linearizable(&h);
}

#[test]
fn unknown_write_that_did_not_take_effect() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, set("b"), Outcome::Unknown);
    h.push(2, "k", 1_000, 1_010, Call::Get, hit("a"));
    assert_linearizable(&h);
}

#[test]
fn unknown_write_takes_effect_late_but_not_before_invoke() {
    // Seen after a later write: it took effect after that one. Seen before
    // it was invoked: impossible.
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), Outcome::Unknown);
    h.push(2, "k", 20, 30, set("b"), ok(Reply::Stored));
    h.push(2, "k", 40, 50, Call::Get, hit("a"));
    assert_linearizable(&h);

    let mut h = History::new();
    h.push(2, "k", 0, 10, Call::Get, hit("a"));
    h.push(1, "k", 20, 30, set("a"), Outcome::Unknown);
    assert_violation(&h);
}

#[test]
fn unknown_increment_counts_once_or_not_at_all() {
    for (seen, good) in [(11, true), (10, true), (12, false)] {
        let mut h = History::new();
        h.push(1, "n", 0, 10, set("10"), ok(Reply::Stored));
        h.push(1, "n", 20, 30, Call::Incr(1), Outcome::Unknown);
        h.push(2, "n", 40, 50, Call::Get, hit(&format!("{seen:<2}")));
        assert_eq!(check(&h).is_linearizable(), good, "saw {seen}");
    }
}

#[test]
fn cas_with_a_token_from_gets() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(1, "k", 20, 30, Call::Gets, hit_token("a", 7));
    h.push(1, "k", 40, 50, cas("b", 7), ok(Reply::Stored));
    h.push(2, "k", 45, 55, cas("c", 7), ok(Reply::Exists));
    h.push(2, "k", 60, 70, Call::Gets, hit_token("b", 9));
    h.push(1, "k", 80, 90, Call::Delete, ok(Reply::Deleted));
    h.push(1, "k", 100, 110, cas("d", 9), ok(Reply::NotFound));
    assert_linearizable(&h);
}

#[test]
fn cas_racing_a_set_either_way() {
    // The set may land before the cas (EXISTS) or after it (STORED).
    for reply in [Reply::Stored, Reply::Exists] {
        let mut h = History::new();
        h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
        h.push(1, "k", 20, 30, Call::Gets, hit_token("a", 7));
        h.push(1, "k", 40, 60, cas("b", 7), ok(reply));
        h.push(2, "k", 45, 55, set("c"), ok(Reply::Stored));
        assert_linearizable(&h);
    }
}

#[test]
fn counters_as_memcached_keeps_them() {
    let mut h = History::new();
    h.push(1, "n", 0, 10, set("10"), ok(Reply::Stored));
    h.push(1, "n", 20, 30, Call::Decr(1), ok(Reply::Number(9)));
    h.push(1, "n", 40, 50, Call::Get, hit("9 ")); // rewritten in place, padded
    h.push(1, "n", 60, 70, Call::Decr(100), ok(Reply::Number(0)));
    h.push(
        1,
        "n",
        80,
        90,
        set(&u64::MAX.to_string()),
        ok(Reply::Stored),
    );
    h.push(1, "n", 100, 110, Call::Incr(2), ok(Reply::Number(1)));
    h.push(1, "t", 0, 10, set("abc"), ok(Reply::Stored));
    h.push(1, "t", 20, 30, Call::Incr(1), ok(Reply::NonNumeric));
    h.push(1, "m", 0, 10, Call::Incr(1), ok(Reply::NotFound));
    assert_linearizable(&h);
}

#[test]
fn append_prepend_replace_add() {
    let mut h = History::new();
    h.push(
        1,
        "k",
        0,
        10,
        Call::Append("x".into()),
        ok(Reply::NotStored),
    );
    h.push(
        1,
        "k",
        20,
        30,
        Call::Replace("x".into()),
        ok(Reply::NotStored),
    );
    h.push(1, "k", 40, 50, Call::Add("b".into()), ok(Reply::Stored));
    h.push(1, "k", 60, 70, Call::Append("c".into()), ok(Reply::Stored));
    h.push(1, "k", 80, 90, Call::Prepend("a".into()), ok(Reply::Stored));
    h.push(1, "k", 100, 110, Call::Get, hit("abc"));
    h.push(
        1,
        "k",
        120,
        130,
        Call::Add("z".into()),
        ok(Reply::NotStored),
    );
    h.push(
        1,
        "k",
        140,
        150,
        Call::Replace("d".into()),
        ok(Reply::Stored),
    );
    h.push(1, "k", 160, 170, Call::Get, hit("d"));
    assert_linearizable(&h);
}

#[test]
fn failed_and_unknown_reads_are_ignored() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored));
    h.push(2, "k", 20, 30, Call::Get, Outcome::Failed);
    h.push(2, "k", 40, 50, Call::Get, Outcome::Unknown);
    assert_linearizable(&h);
}

#[test]
fn search_is_bounded() {
    // Many concurrent unknown writes and no way to place the last read:
    // the search must stop at the limit and say so.
    let mut h = History::new();
    for i in 0..30 {
        h.push(i, "k", 0, 1, set(&format!("v{i}")), Outcome::Unknown);
    }
    h.push(99, "k", 10, 20, Call::Get, hit("never"));
    let report = linearizable::check(&h, Limits { max_states: 1_000 });
    assert!(report.is_inconclusive(), "{}", report.explain(&h));
    assert!(!report.is_linearizable() && !report.is_violation());
}

// ---------------------------------------------------- sequential/sessions

/// Two connections on one key; op ids in the comments.
fn two_sessions() -> History {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored)); // 0
    h.push(2, "k", 5, 15, set("b"), ok(Reply::Stored)); // 1
    h.push(1, "k", 20, 30, Call::Get, hit("b")); // 2
    h.push(2, "k", 20, 30, Call::Get, hit("b")); // 3
    h.push(1, "k", 40, 50, Call::Incr(1), ok(Reply::NonNumeric)); // 4
    h.push(2, "k", 40, 50, Call::Delete, ok(Reply::Deleted)); // 5
    h.push(2, "k", 60, 70, Call::Get, ok(Reply::Miss)); // 6
    h
}

fn logs(orders: &[&[OpId]]) -> Vec<ReplicaLog> {
    orders
        .iter()
        .zip(1..)
        .map(|(order, node)| ReplicaLog {
            node,
            applied: order.to_vec(),
        })
        .collect()
}

#[test]
fn sessions_accept_one_order_and_lagging_prefixes() {
    let h = two_sessions();
    let report = session::check_sequential(&h, &logs(&[&[0, 1, 4, 5], &[0, 1, 4], &[0]]));
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.reads_checked, 3);
}

#[test]
fn sessions_reject_diverging_orders() {
    let h = two_sessions();
    let report = session::check_sequential(&h, &logs(&[&[0, 1, 4, 5], &[1, 0]]));
    assert_eq!(
        report.violations,
        vec![SessionViolation::OrderDiverged {
            node: 2,
            longest_node: 1,
            index: 0,
            ours: 1,
            theirs: 0
        }]
    );
}

#[test]
fn sessions_reject_lost_duplicated_and_failed_writes() {
    let mut h = two_sessions();
    let failed = h.push(3, "k", 80, 90, set("f"), Outcome::Failed);
    let report = session::check_sequential(&h, &logs(&[&[0, 1, 1, 5, failed]]));
    assert!(
        report
            .violations
            .contains(&SessionViolation::LostWrite { op: 4 }),
        "{report}"
    );
    assert!(report.violations.contains(&SessionViolation::AppliedTwice {
        op: 1,
        first: 1,
        second: 2
    }));
    assert!(
        report
            .violations
            .contains(&SessionViolation::FailedWriteApplied {
                op: failed,
                index: 4
            })
    );
}

#[test]
fn sessions_reject_a_read_that_is_not_a_write() {
    let h = two_sessions();
    let report = session::check_sequential(&h, &logs(&[&[0, 2, 1]]));
    assert_eq!(
        report.violations,
        vec![SessionViolation::NotAWrite { node: 1, op: 2 }]
    );
}

#[test]
fn sessions_reject_a_stale_read_of_ones_own_write() {
    // Order b, a: connection 2 wrote b, then a landed after it; connection
    // 2's read of b is fine, but connection 1 reads b after its own a.
    let h = two_sessions();
    let report = session::check_sequential(&h, &logs(&[&[1, 0, 4, 5]]));
    assert_eq!(
        report.violations,
        vec![SessionViolation::StaleRead {
            op: 2,
            floor: 2,
            newest: 1
        }]
    );
}

#[test]
fn sessions_reject_non_monotonic_reads() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored)); // 0
    h.push(1, "k", 20, 30, set("b"), ok(Reply::Stored)); // 1
    h.push(2, "k", 40, 50, Call::Get, hit("b")); // 2
    h.push(2, "k", 60, 70, Call::Get, hit("a")); // 3: back in time
    let report = session::check_sequential(&h, &logs(&[&[0, 1]]));
    assert_eq!(
        report.violations,
        vec![SessionViolation::StaleRead {
            op: 3,
            floor: 2,
            newest: 1
        }]
    );
    // Reading a then b is fine, however late in real time.
    h.op_mut(2).outcome = hit("a");
    h.op_mut(3).outcome = hit("b");
    assert!(session::check_sequential(&h, &logs(&[&[0, 1]])).is_ok());
}

#[test]
fn sessions_reject_replies_the_order_contradicts() {
    let mut h = History::new();
    h.push(1, "n", 0, 10, set("10"), ok(Reply::Stored)); // 0
    h.push(1, "n", 20, 30, Call::Incr(1), ok(Reply::Number(11))); // 1
    h.push(2, "n", 20, 30, Call::Incr(1), ok(Reply::Number(11))); // 2
    let report = session::check_sequential(&h, &logs(&[&[0, 1, 2]]));
    assert_eq!(
        report.violations,
        vec![SessionViolation::ReplyContradictsOrder { op: 2, index: 2 }]
    );
}

#[test]
fn sessions_reject_a_write_ordered_before_what_its_session_saw() {
    let mut h = History::new();
    h.push(1, "k", 0, 10, set("a"), ok(Reply::Stored)); // 0
    h.push(2, "k", 20, 30, Call::Get, hit("a")); // 1
    h.push(2, "j", 40, 50, set("x"), ok(Reply::Stored)); // 2
    let report = session::check_sequential(&h, &logs(&[&[2, 0]]));
    assert_eq!(
        report.violations,
        vec![SessionViolation::WriteBeforeSeen {
            op: 2,
            index: 0,
            floor: 2
        }]
    );
}

#[test]
fn sessions_reject_a_phantom_read() {
    let mut h = two_sessions();
    h.op_mut(3).outcome = hit("zzz");
    let report = session::check_sequential(&h, &logs(&[&[0, 1, 4, 5]]));
    assert_eq!(
        report.violations,
        vec![SessionViolation::PhantomRead { op: 3 }]
    );
}
