//! The linearizability checker: Wing & Gong's search for a linearization,
//! with Lowe's memoisation of (set of operations linearized, model state),
//! run separately for each key.
//!
//! ## The search
//!
//! A history is linearizable when its operations can be put in one order
//! that respects real time (if `a` completed before `b` was invoked, `a`
//! comes first) and in which the [`KeyState`] model gives every operation
//! the reply it got. The search builds that order from the front: an
//! operation may come next when it was invoked no later than the earliest
//! completion among the operations not yet placed (otherwise that one
//! should have come first). It tries each such candidate the model accepts,
//! and backtracks on a dead end. Two partial orders that placed the same set
//! of operations and left the model in the same state have the same future,
//! so each (set, state) pair is explored once.
//!
//! Equal times count as overlapping: an operation invoked at the very
//! nanosecond another completed may be ordered either way. (The clock
//! cannot tell which happened first; the checker gives the benefit of the
//! doubt rather than invent a violation.)
//!
//! Unknown operations complete at +∞: they never force anything to wait
//! for them, and the search succeeds once every operation with a reply is
//! placed — the unknown ones left over simply never took effect.
//!
//! ## Bounded
//!
//! The search is exponential in the worst case (many overlapping
//! operations, many unknown writes). [`Limits::max_states`] caps the number
//! of (set, state) pairs explored for a key; past it the key's verdict is
//! [`Verdict::Inconclusive`], never a hang and never a false verdict.
//!
//! Two things keep ordinary histories near one state per operation: a read
//! that the current state already answers is placed at once without
//! branching (see `harmless_read`), and the memo hashes the learnt CAS
//! tokens by a digest. Measured (release build, shared 2-core machine;
//! `tests/history.rs` `timing_*` and `scaling_*`): 5 keys, 3 clients,
//! 1,000 operations check in under 1 ms; one key with 1,000 operations
//! needs ~1,000-3,000 states up to 8 concurrent clients, ~30,000 at 10,
//! ~360,000 (1-3 s) at 15, and passes the default limit of 500,000 at 20
//! (about 200 MB and 3-5 s spent). Harnesses should keep the number of
//! clients per key modest, or raise the limit knowingly.

use std::collections::HashSet;
use std::fmt;

use super::model::KeyState;
use super::{History, Nanos, Op, OpId, Outcome, Printable};

/// Bounds on the search.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// (set, state) pairs explored per key before giving up.
    pub max_states: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_states: 500_000,
        }
    }
}

/// The verdict for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    NotLinearizable(Violation),
    /// The search hit [`Limits::max_states`] first.
    Inconclusive,
}

/// Why a key's history is not linearizable, from the longest partial
/// linearization the search found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The longest valid prefix of a linearization found, in order.
    pub linearized: Vec<OpId>,
    /// What the key held after that prefix.
    pub state: Option<Vec<u8>>,
    /// The operations with a reply that could have come next in real time
    /// but whose reply the model contradicts there.
    pub stuck: Vec<OpId>,
}

/// The result for one key.
#[derive(Debug, Clone)]
pub struct KeyReport {
    pub key: Vec<u8>,
    /// Operations searched (with a reply, or unknown writes).
    pub ops: usize,
    /// (set, state) pairs explored.
    pub states: usize,
    pub verdict: Verdict,
}

/// The result for a whole history: one report per key.
#[derive(Debug, Clone)]
pub struct Report {
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// Every key linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.keys.iter().all(|k| k.verdict == Verdict::Linearizable)
    }

    /// Some key proved not linearizable.
    pub fn is_violation(&self) -> bool {
        self.keys
            .iter()
            .any(|k| matches!(k.verdict, Verdict::NotLinearizable(_)))
    }

    /// No violation found, but some key's search was cut short.
    pub fn is_inconclusive(&self) -> bool {
        !self.is_violation() && self.keys.iter().any(|k| k.verdict == Verdict::Inconclusive)
    }

    /// A readable account: one line per key, and for a violating key the
    /// prefix that worked and the operations that could not follow it.
    pub fn explain<'a>(&'a self, history: &'a History) -> Explain<'a> {
        Explain {
            report: self,
            history,
        }
    }
}

/// See [`Report::explain`].
pub struct Explain<'a> {
    report: &'a Report,
    history: &'a History,
}

impl fmt::Display for Explain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Enough of the prefix to see how the key got where it is.
        const TAIL: usize = 8;
        for key in &self.report.keys {
            write!(
                f,
                "key {:?}: {} ops, {} states: ",
                Printable(&key.key),
                key.ops,
                key.states
            )?;
            match &key.verdict {
                Verdict::Linearizable => writeln!(f, "linearizable")?,
                Verdict::Inconclusive => writeln!(f, "inconclusive (state limit)")?,
                Verdict::NotLinearizable(v) => {
                    writeln!(
                        f,
                        "NOT linearizable; longest linearization found has {} ops, ending:",
                        v.linearized.len()
                    )?;
                    for &id in &v.linearized[v.linearized.len().saturating_sub(TAIL)..] {
                        writeln!(f, "    {}", self.history.op(id))?;
                    }
                    match &v.state {
                        Some(d) => writeln!(f, "  key then holds {:?}", Printable(d))?,
                        None => writeln!(f, "  key then missing")?,
                    }
                    writeln!(f, "  and none of these can come next:")?;
                    for &id in &v.stuck {
                        writeln!(f, "    {}", self.history.op(id))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Checks every key of `history`.
pub fn check(history: &History, limits: Limits) -> Report {
    Report {
        keys: history
            .by_key()
            .into_iter()
            .map(|(key, ops)| check_key(key, &ops, limits))
            .collect(),
    }
}

/// An operation as the search sees it.
struct Entry<'a> {
    op: &'a Op,
    /// Has a reply: must be linearized.
    required: bool,
    /// +∞ for unknown operations.
    complete: Nanos,
}

/// A set of entries, by index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn with(&self, i: usize) -> Bits {
        let mut b = self.clone();
        b.0[i / 64] |= 1 << (i % 64);
        b
    }
}

/// A node of the depth-first search.
struct Frame {
    done: Bits,
    state: KeyState,
    /// The entry whose linearization made this frame (none at the root).
    via: Option<usize>,
    /// Entries linearized, and how many of them are required.
    depth: usize,
    required_done: usize,
    /// The earliest completion among entries not yet linearized: an entry
    /// invoked after it cannot come next.
    horizon: Nanos,
    /// The first entry not yet linearized (all before it are).
    open: usize,
    /// The next entry to try from here.
    next: usize,
}

/// Checks the operations of one key.
pub fn check_key(key: &[u8], ops: &[&Op], limits: Limits) -> KeyReport {
    let mut entries: Vec<Entry<'_>> = ops
        .iter()
        .filter_map(|op| match op.outcome {
            Outcome::Ok(_) => Some(Entry {
                op,
                required: true,
                complete: op.complete,
            }),
            // An unknown write may have taken effect at any time after it
            // was invoked; an unknown read tells nothing.
            Outcome::Unknown if op.call.is_write() => Some(Entry {
                op,
                required: false,
                complete: Nanos::MAX,
            }),
            Outcome::Unknown | Outcome::Failed => None,
        })
        .collect();
    entries.sort_by_key(|e| (e.op.invoke, e.op.id));
    let required = entries.iter().filter(|e| e.required).count();
    let (verdict, states) = search(&entries, required, limits);
    KeyReport {
        key: key.to_vec(),
        ops: entries.len(),
        states,
        verdict,
    }
}

/// The first entry not in `done`, searching from `from`.
fn first_open(done: &Bits, from: usize, len: usize) -> usize {
    (from..len).find(|&i| !done.has(i)).unwrap_or(len)
}

/// The earliest completion among required entries not in `done`, looking
/// from `from` (all before it are done). Entries are sorted by invoke and
/// complete no earlier than they are invoked, so the scan stops at the first
/// entry invoked after the minimum found so far.
fn horizon(entries: &[Entry<'_>], done: &Bits, from: usize) -> Nanos {
    let mut min = Nanos::MAX;
    for (i, e) in entries.iter().enumerate().skip(from) {
        if e.op.invoke > min {
            break;
        }
        if e.required && !done.has(i) {
            min = min.min(e.complete);
        }
    }
    min
}

/// The frame after linearizing entry `i` of `parent`, leaving `state`.
fn child(entries: &[Entry<'_>], parent: &Frame, i: usize, state: KeyState) -> Frame {
    let done = parent.done.with(i);
    let open = first_open(&done, parent.open, entries.len());
    Frame {
        horizon: horizon(entries, &done, open),
        done,
        state,
        via: Some(i),
        depth: parent.depth + 1,
        required_done: parent.required_done + usize::from(entries[i].required),
        open,
        next: open,
    }
}

/// The search proper. Returns the verdict and the number of states seen.
fn search(entries: &[Entry<'_>], required: usize, limits: Limits) -> (Verdict, usize) {
    let root_done = Bits::new(entries.len());
    let root = Frame {
        horizon: horizon(entries, &root_done, 0),
        done: root_done,
        state: KeyState::missing(),
        via: None,
        depth: 0,
        required_done: 0,
        open: 0,
        next: 0,
    };
    let mut seen: HashSet<(Bits, KeyState)> = HashSet::new();
    let mut stack = vec![root];
    // The deepest frame reached (by required entries placed), as the path
    // to it and its state: the diagnosis when no linearization exists.
    let mut best: Option<(usize, usize, Vec<usize>, KeyState)> = None;

    while let Some(top) = stack.last_mut() {
        if top.required_done == required {
            return (Verdict::Linearizable, seen.len());
        }
        if seen.len() > limits.max_states {
            return (Verdict::Inconclusive, seen.len());
        }
        let mut children = Vec::new();
        if top.next == top.open {
            // First visit: a harmless read, if there is one, is the only
            // child worth trying (see `harmless_read`).
            if let Some(i) = harmless_read(entries, top) {
                top.next = entries.len();
                let next = child(entries, top, i, top.state.clone());
                if seen.insert((next.done.clone(), next.state.clone())) {
                    children.push(next);
                }
            }
        }
        // Otherwise expand the next candidate the model accepts and that
        // leads somewhere new; siblings (several successor states) go on
        // the stack together and are explored in turn.
        while children.is_empty() && top.next < entries.len() {
            let i = top.next;
            top.next += 1;
            let entry = &entries[i];
            if entry.op.invoke > top.horizon {
                top.next = entries.len(); // sorted by invoke: none later can come next
                break;
            }
            if top.done.has(i) {
                continue;
            }
            for state in top.state.step(&entry.op.call, entry.op.reply()) {
                let next = child(entries, top, i, state);
                if seen.insert((next.done.clone(), next.state.clone())) {
                    children.push(next);
                }
            }
        }
        if children.is_empty() {
            let dead = stack.pop().expect("the loop saw a top frame");
            let rank = (dead.required_done, dead.depth);
            if best.as_ref().is_none_or(|b| rank > (b.0, b.1)) {
                best = Some((rank.0, rank.1, path(&stack, &dead), dead.state));
            }
        } else {
            stack.extend(children);
        }
    }
    let (_, _, via, state) = best.expect("the root frame is a dead end at least");
    let done = via.iter().fold(Bits::new(entries.len()), |d, &i| d.with(i));
    let horizon = horizon(entries, &done, 0);
    let stuck = entries
        .iter()
        .enumerate()
        .filter(|(i, e)| e.required && !done.has(*i) && e.op.invoke <= horizon)
        .map(|(_, e)| e.op.id)
        .collect();
    let violation = Violation {
        linearized: via.iter().map(|&i| entries[i].op.id).collect(),
        state: state.data.map(|d| d.to_vec()),
        stuck,
    };
    (Verdict::NotLinearizable(violation), seen.len())
}

/// A read that may come next and that the model answers as it was
/// answered without learning anything (a `get`, or a `gets` whose token is
/// already pinned to the current version). If any linearization continues
/// from this frame, one continues with this read first: it changes no
/// state, nothing not yet placed had to precede it (it is invoked before
/// the horizon), and moving it forward breaks no real-time order of what it
/// preceded. So the search tries it alone, which collapses the branching
/// that concurrent reads cause.
fn harmless_read(entries: &[Entry<'_>], frame: &Frame) -> Option<usize> {
    entries
        .iter()
        .enumerate()
        .skip(frame.open)
        .take_while(|(_, e)| e.op.invoke <= frame.horizon)
        .find(|(i, e)| {
            e.required
                && !e.op.call.is_write()
                && !frame.done.has(*i)
                && frame.state.step(&e.op.call, e.op.reply()) == [frame.state.clone()]
        })
        .map(|(i, _)| i)
}

/// The entries linearized on the way to `last`, in order. The stack holds
/// `last`'s ancestors, interleaved with siblings still to explore; the
/// parent of a frame at depth `d` is the nearest frame below it at `d - 1`.
fn path(stack: &[Frame], last: &Frame) -> Vec<usize> {
    let mut via: Vec<usize> = last.via.into_iter().collect();
    let mut depth = last.depth;
    for frame in stack.iter().rev() {
        if depth > 0 && frame.depth == depth - 1 {
            via.extend(frame.via);
            depth -= 1;
        }
    }
    via.reverse();
    via
}
