//! The sequential-mode checker: one write order for every replica, and
//! session guarantees for every connection.
//!
//! ## Input
//!
//! Besides the [`History`], each replica's applied write order
//! ([`ReplicaLog`]): the write operations it applied, by [`OpId`], oldest
//! first. The harness builds it from what the node reports (its Raft log or
//! state machine), mapping entries back to operations — with unique values,
//! [`History::writer_of`] does that for storage commands.
//!
//! Every write command a client got a reply to is in the order, whatever
//! the reply (an `add` that answered `NOT_STORED` was decided by the
//! replicated state machine too, so it was replicated); a failed one is
//! not; an unknown one may be.
//!
//! ## Rules
//!
//! 1. **One order.** Let `L` be the longest replica log. Every other log is a
//!    prefix of `L`: a node that lags has applied less, never something
//!    else. `L` holds no operation twice and only writes of this history.
//! 2. **No lost or phantom writes.** Every acknowledged write is in `L`; no
//!    failed write is.
//! 3. **Replies match the order.** Replaying `L` through the one-key model
//!    gives each acknowledged write the reply it got. (An unknown `cas` in
//!    `L` may have stored or not; the replay keeps both possibilities.)
//! 4. **Sessions.** A read "saw prefix `q`" of `L` when the key's value
//!    after the first `q` writes is what it returned. Per connection, in
//!    invoke order, with `floor` = the longest prefix the connection has
//!    seen or written so far (starting at 0):
//!    - a read must have seen some prefix `q >= floor` (monotonic reads,
//!      read-your-writes); the smallest such `q` becomes the new floor —
//!      the smallest, so that the checker never blames a connection for a
//!      choice it made itself;
//!    - an acknowledged write at position `p` of `L` must come after what
//!      the connection already saw (`p >= floor`), and raises the floor to
//!      `p + 1`.
//!
//! Limits: reads are not pinned to the node the connection was on (a read
//! of a prefix longer than that node's log would pass); the CAS tokens
//! `gets` returned are not checked here (the replay only requires that one
//! token never stores twice); unknown writes do not raise the floor (the
//! connection never learnt where they landed).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use super::model::KeyState;
use super::{Call, History, OpId, Outcome, Reply};

/// The write order one replica applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLog {
    pub node: u32,
    pub applied: Vec<OpId>,
}

/// One broken rule (numbers as in the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionViolation {
    /// Rule 1: `node` applied `ours` at `index` where the longest log
    /// (`longest_node`'s) has `theirs`.
    OrderDiverged {
        node: u32,
        longest_node: u32,
        index: usize,
        ours: OpId,
        theirs: OpId,
    },
    /// Rule 1: the same operation twice in the longest log.
    AppliedTwice {
        op: OpId,
        first: usize,
        second: usize,
    },
    /// Rule 1: a log names an operation that is not a write of the history.
    NotAWrite { node: u32, op: OpId },
    /// Rule 2.
    LostWrite { op: OpId },
    /// Rule 2.
    FailedWriteApplied { op: OpId, index: usize },
    /// Rule 3: no replay of the order before `index` gives `op` its reply.
    ReplyContradictsOrder { op: OpId, index: usize },
    /// Rule 4: the read returned a value the key held only in prefixes
    /// shorter than `floor`; `newest` is the longest such prefix.
    StaleRead {
        op: OpId,
        floor: usize,
        newest: usize,
    },
    /// Rule 4: the read returned a value the key never held in the order.
    PhantomRead { op: OpId },
    /// Rule 4: the write was applied at `index`, before a prefix
    /// (`floor`) its own connection had already seen.
    WriteBeforeSeen {
        op: OpId,
        index: usize,
        floor: usize,
    },
}

/// Everything the sequential checker found.
#[derive(Debug, Clone, Default)]
pub struct SessionReport {
    /// Length of the longest replica log.
    pub order_len: usize,
    /// Acknowledged reads checked against the order.
    pub reads_checked: usize,
    pub violations: Vec<SessionViolation>,
}

impl SessionReport {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for SessionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "write order of {} entries, {} reads checked, {} violations",
            self.order_len,
            self.reads_checked,
            self.violations.len()
        )?;
        for v in &self.violations {
            writeln!(f, "  {v:?}")?;
        }
        Ok(())
    }
}

/// What a key may hold after some prefix of the order. Several states only
/// after an unknown `cas`; capped so that a run full of them stays cheap.
type States = Vec<KeyState>;

/// The values a key may hold (`None`: missing).
type Held = Vec<Option<Arc<[u8]>>>;

/// A key's history along the order: (first prefix length, values held
/// from there until the next segment's start).
type Segments = Vec<(usize, Held)>;

/// For one key, each value it may hold (`None`: missing) and the indexes
/// of the segments that may hold it, in order.
type Holders<'a> = HashMap<Option<&'a [u8]>, Vec<usize>>;

/// Past this many possible states of a key, the replay forgets tokens and
/// versions (keeping only the values), which can only make it more
/// permissive.
const MAX_STATES: usize = 64;

/// Checks the sequential-mode rules; see the module docs.
pub fn check_sequential(history: &History, replicas: &[ReplicaLog]) -> SessionReport {
    let mut report = SessionReport::default();
    let Some(longest) = replicas.iter().max_by_key(|r| r.applied.len()) else {
        return report;
    };
    let order = &longest.applied;
    report.order_len = order.len();

    // Rule 1: prefixes of the longest, writes only.
    for replica in replicas {
        for &op in &replica.applied {
            if op >= history.len() || !history.op(op).call.is_write() {
                report.violations.push(SessionViolation::NotAWrite {
                    node: replica.node,
                    op,
                });
            }
        }
        if let Some(index) = (0..replica.applied.len()).find(|&i| replica.applied[i] != order[i]) {
            report.violations.push(SessionViolation::OrderDiverged {
                node: replica.node,
                longest_node: longest.node,
                index,
                ours: replica.applied[index],
                theirs: order[index],
            });
        }
    }
    if !report.is_ok() {
        return report; // the order itself is broken: nothing below would mean much
    }
    let mut position: HashMap<OpId, usize> = HashMap::new();
    for (index, &op) in order.iter().enumerate() {
        if let Some(&first) = position.get(&op) {
            report.violations.push(SessionViolation::AppliedTwice {
                op,
                first,
                second: index,
            });
        } else {
            position.insert(op, index);
        }
    }

    // Rule 2.
    for op in history.ops().iter().filter(|op| op.call.is_write()) {
        match (&op.outcome, position.get(&op.id)) {
            (Outcome::Ok(_), None) => report
                .violations
                .push(SessionViolation::LostWrite { op: op.id }),
            (Outcome::Failed, Some(&index)) => report
                .violations
                .push(SessionViolation::FailedWriteApplied { op: op.id, index }),
            _ => {}
        }
    }

    // Rule 3: replay, recording for each key the values it may hold from
    // each prefix length on.
    let mut states: HashMap<&[u8], States> = HashMap::new();
    let mut values: HashMap<&[u8], Segments> = HashMap::new();
    for (index, &id) in order.iter().enumerate() {
        let op = history.op(id);
        let now = states
            .entry(op.key.as_slice())
            .or_insert_with(|| vec![KeyState::missing()]);
        let mut next = successors(now, &op.call, op.reply());
        if next.is_empty() {
            report
                .violations
                .push(SessionViolation::ReplyContradictsOrder { op: id, index });
            next = successors(now, &op.call, None); // carry on as if unknown
        }
        *now = next;
        let mut held: Held = Vec::new();
        for s in now.iter() {
            if !held.contains(&s.data) {
                held.push(s.data.clone());
            }
        }
        values
            .entry(op.key.as_slice())
            .or_insert_with(|| vec![(0, vec![None])])
            .push((index + 1, held));
    }

    // For each key and value, the segments that may hold it, in order:
    // a read looks its value up instead of scanning every segment.
    let mut holding: HashMap<&[u8], Holders> = HashMap::new();
    for (key, segments) in &values {
        let by_value = holding.entry(key).or_default();
        for (i, (_, held)) in segments.iter().enumerate() {
            for v in held {
                by_value.entry(v.as_deref()).or_default().push(i);
            }
        }
    }

    // Rule 4.
    for ops in history.by_conn().values() {
        let mut floor = 0;
        for op in ops {
            let Outcome::Ok(reply) = &op.outcome else {
                continue;
            };
            if op.call.is_write() {
                if let Some(&index) = position.get(&op.id) {
                    if index < floor {
                        report.violations.push(SessionViolation::WriteBeforeSeen {
                            op: op.id,
                            index,
                            floor,
                        });
                    }
                    floor = floor.max(index + 1);
                }
                continue;
            }
            report.reads_checked += 1;
            let returned: Option<&[u8]> = match reply {
                Reply::Hit { data, .. } => Some(data),
                Reply::Miss => None,
                _ => {
                    report
                        .violations
                        .push(SessionViolation::PhantomRead { op: op.id });
                    continue;
                }
            };
            let initial = [(0, vec![None])];
            let segments = values
                .get(op.key.as_slice())
                .map_or(&initial[..], Vec::as_slice);
            let never: Vec<usize> = Vec::new();
            let initial_holders = vec![0];
            // The segments (in order) that may hold the value returned.
            let holders = match holding.get(op.key.as_slice()) {
                Some(by_value) => by_value.get(&returned).unwrap_or(&never),
                None if returned.is_none() => &initial_holders,
                None => &never,
            };
            // Segment i covers prefixes [start_i, start_{i+1}).
            let end = |i: usize| segments.get(i + 1).map_or(usize::MAX, |s| s.0);
            // The first holder that ends after the floor (ends grow with i).
            let first = holders.partition_point(|&i| end(i) <= floor);
            let seen = holders.get(first).map(|&i| segments[i].0.max(floor));
            match seen {
                Some(q) => floor = q,
                None => {
                    let older = holders.last().map(|&i| end(i).min(floor) - 1);
                    report.violations.push(match older {
                        Some(newest) => SessionViolation::StaleRead {
                            op: op.id,
                            floor,
                            newest,
                        },
                        None => SessionViolation::PhantomRead { op: op.id },
                    });
                }
            }
        }
    }
    report
}

/// Every state `call` may lead to from any of `states`, deduplicated and
/// capped at [`MAX_STATES`].
fn successors(states: &[KeyState], call: &Call, reply: Option<&Reply>) -> States {
    let mut next: Vec<KeyState> = Vec::new();
    let mut unique = HashSet::new();
    for s in states {
        for n in s.step(call, reply) {
            if unique.insert(n.clone()) {
                next.push(n);
            }
        }
    }
    if next.len() > MAX_STATES {
        let mut values = HashSet::new();
        next.retain(|s| values.insert(s.data.clone()));
        for s in &mut next {
            *s = KeyState::holding(s.data.clone());
        }
    }
    next
}
