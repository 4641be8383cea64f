//! memcached 1.6.18's command rules, as pure functions: given a key's live
//! value (or none), the request and a clock reading, what the client is
//! answered and what happens to the key.
//!
//! Every store that decides outcomes itself calls these: the embedded store
//! (`backend::embedded`) and the replicated modes (`consistency`). It owns
//! the rules and nothing else: no clock is read here (time is an argument),
//! no I/O, no locks, no randomness, so the same inputs always give the same
//! [`Outcome`]. The caller owns where values live, memory budgets, CAS
//! numbering and flush moments; it applies the [`Effect`].
//!
//! Times are milliseconds on a caller's [`Clock`]; a deadline is the clock
//! reading at which a value stops being visible.
//!
//! The meta commands' rules are in [`meta`].
//!
//! May use: `protocol`, `bytes`, `itoa`.

pub mod meta;

use bytes::{Bytes, BytesMut};

use crate::protocol::{ArithOp, ClientError, Exptime, REALTIME_MAXDELTA, Response, StoreOp};

/// A clock reading, and the unix time at the clock's zero, so absolute
/// exptimes (> 30 days) can be placed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub now_ms: u64,
    pub unix_ms_at_zero: u64,
}

impl Clock {
    /// A clock that counts unix milliseconds (`unix_ms_at_zero` = 0).
    pub fn unix(now_unix_ms: u64) -> Clock {
        Clock {
            now_ms: now_unix_ms,
            unix_ms_at_zero: 0,
        }
    }

    /// The deadline a client's exptime sets, as memcached reads it: 0 never
    /// (`None`); negative: already expired (`Some(0)`); up to
    /// [`REALTIME_MAXDELTA`]: relative seconds from now; beyond: absolute
    /// unix seconds, placed on this clock (saturating, so a unix time before
    /// the clock's zero is `Some(0)`, already expired).
    pub fn deadline(&self, exptime: Exptime) -> Option<u64> {
        if exptime == 0 {
            None
        } else if exptime < 0 {
            Some(0)
        } else if exptime <= REALTIME_MAXDELTA {
            let ms = exptime.unsigned_abs().saturating_mul(1000);
            Some(self.now_ms.saturating_add(ms))
        } else {
            let unix_ms = exptime.unsigned_abs().saturating_mul(1000);
            Some(unix_ms.saturating_sub(self.unix_ms_at_zero))
        }
    }

    /// True when a deadline has passed at `now_ms` (deadline <= now).
    pub fn expired(&self, deadline: Option<u64>) -> bool {
        deadline.is_some_and(|d| d <= self.now_ms)
    }
}

/// A key's live value as the rules see it (the caller passes `None` for a
/// missing, expired or flushed key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub flags: u32,
    pub data: Bytes,
    pub deadline: Option<u64>,
    pub cas: u64,
}

/// A value to store; the caller assigns its CAS / version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewValue {
    pub flags: u32,
    pub data: Bytes,
    pub deadline: Option<u64>,
}

/// What a command does to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing changes.
    Keep,
    /// The key now holds this value (new CAS).
    Put(NewValue),
    /// Only the deadline changes (touch, gat): memcached keeps the CAS.
    Touch { deadline: Option<u64> },
    /// The key's value goes (delete; a store or touch whose deadline has
    /// already passed; a too-large set).
    Remove,
}

/// The client's answer and the effect on the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Response,
    pub effect: Effect,
}

impl Outcome {
    fn keep(reply: Response) -> Outcome {
        Outcome {
            reply,
            effect: Effect::Keep,
        }
    }
}

/// `reply`, storing `value`; a value stored already expired is linked by
/// memcached and never shown, which is the key's old value gone.
fn put(reply: Response, value: NewValue, clock: Clock) -> Outcome {
    let effect = if clock.expired(value.deadline) {
        Effect::Remove
    } else {
        Effect::Put(value)
    };
    Outcome { reply, effect }
}

/// A new deadline on an existing value (touch, gat).
fn retime(deadline: Option<u64>, clock: Clock) -> Effect {
    if clock.expired(deadline) {
        Effect::Remove
    } else {
        Effect::Touch { deadline }
    }
}

/// `set add replace append prepend cas` with its data block.
///
/// add: `NOT_STORED` when live. replace, append, prepend: `NOT_STORED` when
/// missing; append and prepend keep the old flags and deadline and ignore the
/// request's. cas: `NOT_FOUND` when missing, `EXISTS` when `cas_unique`
/// differs from the item's. Otherwise `STORED`, even when the deadline has
/// already passed (then the effect is [`Effect::Remove`]).
pub fn store(
    op: StoreOp,
    current: Option<&Item>,
    flags: u32,
    exptime: Exptime,
    data: Bytes,
    cas_unique: u64,
    clock: Clock,
) -> Outcome {
    let fresh = |data: Bytes| NewValue {
        flags,
        data,
        deadline: clock.deadline(exptime),
    };
    match (op, current) {
        (StoreOp::Set, _) | (StoreOp::Add, None) => put(Response::Stored, fresh(data), clock),
        (StoreOp::Add, Some(_)) => Outcome::keep(Response::NotStored),
        (StoreOp::Replace, None) | (StoreOp::Append | StoreOp::Prepend, None) => {
            Outcome::keep(Response::NotStored)
        }
        (StoreOp::Replace, Some(_)) => put(Response::Stored, fresh(data), clock),
        (StoreOp::Append | StoreOp::Prepend, Some(old)) => {
            let mut joined = BytesMut::with_capacity(old.data.len().saturating_add(data.len()));
            let (first, second) = if op == StoreOp::Append {
                (&old.data, &data)
            } else {
                (&data, &old.data)
            };
            joined.extend_from_slice(first);
            joined.extend_from_slice(second);
            let value = NewValue {
                flags: old.flags,
                data: joined.freeze(),
                deadline: old.deadline,
            };
            put(Response::Stored, value, clock)
        }
        (StoreOp::Cas, None) => Outcome::keep(Response::NotFound),
        (StoreOp::Cas, Some(old)) if old.cas != cas_unique => Outcome::keep(Response::Exists),
        (StoreOp::Cas, Some(_)) => put(Response::Stored, fresh(data), clock),
    }
}

/// A storage command whose data block is over the item size limit:
/// `SERVER_ERROR object too large for cache`. A `set` also removes the old
/// value, so stale data does not outlive the failed overwrite; the other
/// commands leave the key alone.
pub fn too_large(op: StoreOp, current: Option<&Item>) -> Outcome {
    let effect = if op == StoreOp::Set && current.is_some() {
        Effect::Remove
    } else {
        Effect::Keep
    };
    Outcome {
        reply: ClientError::TooLarge.into(),
        effect,
    }
}

/// `incr`/`decr`: the new number, stored keeping the flags and deadline;
/// `NOT_FOUND` when missing; `CLIENT_ERROR cannot increment or decrement
/// non-numeric value` when the value is not a number.
pub fn arith(op: ArithOp, current: Option<&Item>, delta: u64) -> Outcome {
    let Some(old) = current else {
        return Outcome::keep(Response::NotFound);
    };
    let Some((n, data)) = apply_delta(&old.data, op, delta) else {
        return Outcome::keep(ClientError::NonNumeric.into());
    };
    Outcome {
        reply: Response::Number(n),
        effect: Effect::Put(NewValue {
            flags: old.flags,
            data,
            deadline: old.deadline,
        }),
    }
}

/// `delete`: `DELETED` and the value goes, or `NOT_FOUND`.
pub fn delete(current: Option<&Item>) -> Outcome {
    match current {
        Some(_) => Outcome {
            reply: Response::Deleted,
            effect: Effect::Remove,
        },
        None => Outcome::keep(Response::NotFound),
    }
}

/// `touch`: `TOUCHED` with the new deadline (the CAS is kept), or
/// `NOT_FOUND`. A deadline already passed still answers `TOUCHED`, and the
/// value goes.
pub fn touch(current: Option<&Item>, exptime: Exptime, clock: Clock) -> Outcome {
    match current {
        Some(_) => Outcome {
            reply: Response::Touched,
            effect: retime(clock.deadline(exptime), clock),
        },
        None => Outcome::keep(Response::NotFound),
    }
}

/// gat/gats for one key: the effect on that key (the caller returns
/// `current` as the value if it is `Some`). A deadline already passed still
/// returns the value this time, and the value goes.
pub fn gat(current: Option<&Item>, exptime: Exptime, clock: Clock) -> Effect {
    match current {
        Some(_) => retime(clock.deadline(exptime), clock),
        None => Effect::Keep,
    }
}

/// `flush_all [delay]`: `None` = at once; `Some(deadline on this clock)` =
/// delayed. A delay <= 0, or one that places the flush at or before now (an
/// absolute time already past), means at once.
pub fn flush_at(delay: Option<Exptime>, clock: Clock) -> Option<u64> {
    let at = clock.deadline(delay.filter(|&d| d > 0)?)?;
    (at > clock.now_ms).then_some(at)
}

/// Reads a counter as memcached's `strtoull` does: optional leading spaces,
/// an optional `+`, decimal digits, then only spaces. `None` for anything
/// else, a sign, or a value above `u64::MAX`.
pub fn parse_counter(data: &[u8]) -> Option<u64> {
    let start = data.iter().position(|&b| b != b' ').unwrap_or(data.len());
    let rest = &data[start..];
    let rest = rest.strip_prefix(b"+").unwrap_or(rest);
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    let (digits, tail) = rest.split_at(end);
    if digits.is_empty() || tail.iter().any(|&b| b != b' ') {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Applies `op` to the counter in `old`: incr wraps at 2^64, decr stops at
/// 0. Returns the new number and the bytes to store: memcached rewrites the
/// number in place, padded with spaces, when it is not longer than the old
/// value. `None` when `old` is not a number.
pub fn apply_delta(old: &[u8], op: ArithOp, delta: u64) -> Option<(u64, Bytes)> {
    let value = parse_counter(old)?;
    let n = match op {
        ArithOp::Incr => value.wrapping_add(delta),
        ArithOp::Decr => value.saturating_sub(delta),
    };
    let mut buf = itoa::Buffer::new();
    let text = buf.format(n).as_bytes();
    let data = if text.len() <= old.len() {
        let mut padded = BytesMut::with_capacity(old.len());
        padded.extend_from_slice(text);
        padded.resize(old.len(), b' ');
        padded.freeze()
    } else {
        Bytes::copy_from_slice(text)
    };
    Some((n, data))
}

#[cfg(test)]
mod tests {
    //! Each fact here was checked against memcached 1.6.18 (`memcached -p
    //! PORT -U 0`); the wire exchange is quoted where it is not obvious.

    use super::*;
    use crate::protocol::ErrorReply;

    /// A store clock 5 s after its zero, which was unix time 1_700_000_000.
    const CLOCK: Clock = Clock {
        now_ms: 5_000,
        unix_ms_at_zero: 1_700_000_000_000,
    };
    const NOW: u64 = CLOCK.now_ms;
    const DAY_30_MS: u64 = 2_592_000_000;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn item(flags: u32, data: &str, deadline: Option<u64>, cas: u64) -> Item {
        Item {
            flags,
            data: b(data),
            deadline,
            cas,
        }
    }

    fn value(flags: u32, data: &str, deadline: Option<u64>) -> Effect {
        Effect::Put(NewValue {
            flags,
            data: b(data),
            deadline,
        })
    }

    fn outcome(reply: Response, effect: Effect) -> Outcome {
        Outcome { reply, effect }
    }

    fn keep(reply: Response) -> Outcome {
        outcome(reply, Effect::Keep)
    }

    #[test]
    fn unix_clock_has_its_zero_at_the_epoch() {
        assert_eq!(
            Clock::unix(1_234),
            Clock {
                now_ms: 1_234,
                unix_ms_at_zero: 0
            }
        );
        // On it an absolute exptime is simply unix seconds in milliseconds.
        let clock = Clock::unix(1_700_000_000_000);
        assert_eq!(clock.deadline(1_700_000_100), Some(1_700_000_100_000));
        assert_eq!(
            clock.deadline(REALTIME_MAXDELTA + 1),
            Some(2_592_001_000),
            "1970, long past"
        );
    }

    #[test]
    fn exptime_becomes_a_deadline_as_memcached_reads_it() {
        // (exptime, deadline on CLOCK, expired at once)
        let cases: [(Exptime, Option<u64>, bool); 11] = [
            // 0: never expires.
            (0, None, false),
            // Negative: already expired (`set k 0 -1 1` then `get k` -> END).
            (-1, Some(0), true),
            (i64::MIN, Some(0), true),
            // Relative seconds from now.
            (1, Some(NOW + 1_000), false),
            (100, Some(NOW + 100_000), false),
            // 30 days exactly is still relative (`set m 0 2592000 1` is kept).
            (REALTIME_MAXDELTA, Some(NOW + DAY_30_MS), false),
            // One more second is an absolute unix time in 1970: expired
            // (`set m1 0 2592001 1` then `get m1` -> END).
            (REALTIME_MAXDELTA + 1, Some(0), true),
            // An absolute time in the past (2001): expired.
            (1_000_000_000, Some(0), true),
            // Absolute times placed on a clock whose zero is not the epoch.
            (1_700_000_100, Some(100_000), false),
            (1_700_000_005, Some(5_000), true),
            // Saturates rather than wrapping.
            (i64::MAX, Some(u64::MAX - CLOCK.unix_ms_at_zero), false),
        ];
        for (exptime, deadline, expired) in cases {
            assert_eq!(CLOCK.deadline(exptime), deadline, "exptime {exptime}");
            assert_eq!(
                CLOCK.expired(CLOCK.deadline(exptime)),
                expired,
                "exptime {exptime}"
            );
        }
        let late = Clock {
            now_ms: u64::MAX - 10,
            unix_ms_at_zero: 0,
        };
        assert_eq!(late.deadline(REALTIME_MAXDELTA), Some(u64::MAX));
    }

    #[test]
    fn a_deadline_has_passed_when_it_is_reached() {
        assert!(!CLOCK.expired(None));
        assert!(!CLOCK.expired(Some(NOW + 1)));
        assert!(CLOCK.expired(Some(NOW)));
        assert!(CLOCK.expired(Some(NOW - 1)));
        assert!(CLOCK.expired(Some(0)));
    }

    #[test]
    fn store_answers_by_command_and_presence() {
        let live = item(1, "old", Some(NOW + 60_000), 7);
        let stored = || outcome(Response::Stored, value(3, "new", Some(NOW + 10_000)));
        // (op, current, cas_unique, outcome)
        let cases = [
            (StoreOp::Set, None, 0, stored()),
            (StoreOp::Set, Some(&live), 0, stored()),
            (StoreOp::Add, None, 0, stored()),
            (StoreOp::Add, Some(&live), 0, keep(Response::NotStored)),
            (StoreOp::Replace, None, 0, keep(Response::NotStored)),
            (StoreOp::Replace, Some(&live), 0, stored()),
            (StoreOp::Append, None, 0, keep(Response::NotStored)),
            (StoreOp::Prepend, None, 0, keep(Response::NotStored)),
            (StoreOp::Cas, None, 7, keep(Response::NotFound)),
            (StoreOp::Cas, Some(&live), 8, keep(Response::Exists)),
            (StoreOp::Cas, Some(&live), 0, keep(Response::Exists)),
            (StoreOp::Cas, Some(&live), 7, stored()),
        ];
        for (op, current, cas_unique, expected) in cases {
            let got = store(op, current, 3, 10, b("new"), cas_unique, CLOCK);
            assert_eq!(got, expected, "{op:?} on {current:?} cas {cas_unique}");
        }
    }

    #[test]
    fn append_and_prepend_keep_the_old_flags_and_deadline() {
        // `set a 5 100 1` x, `append a 9 -1 1` y, `get a` -> `VALUE a 5 2` xy
        let old = item(5, "x", Some(NOW + 100_000), 3);
        for (op, data) in [(StoreOp::Append, "xy"), (StoreOp::Prepend, "yx")] {
            for exptime in [-1, 0, 10, REALTIME_MAXDELTA + 1] {
                assert_eq!(
                    store(op, Some(&old), 9, exptime, b("y"), 0, CLOCK),
                    outcome(Response::Stored, value(5, data, Some(NOW + 100_000))),
                    "{op:?} exptime {exptime}"
                );
            }
        }
        let immortal = item(5, "x", None, 3);
        assert_eq!(
            store(StoreOp::Append, Some(&immortal), 0, 10, b("y"), 0, CLOCK),
            outcome(Response::Stored, value(5, "xy", None))
        );
    }

    #[test]
    fn a_store_already_expired_answers_stored_and_removes() {
        // `set e 0 -1 1` -> STORED, `get e` -> END, `add e 0 0 1` -> STORED;
        // `replace r 0 -1 1` -> STORED and r is gone; so for `cas`.
        let live = item(0, "v", None, 13);
        let removed = outcome(Response::Stored, Effect::Remove);
        for exptime in [-1, REALTIME_MAXDELTA + 1, 1_000_000_000, 1_700_000_005] {
            for (op, current, cas_unique) in [
                (StoreOp::Set, None, 0),
                (StoreOp::Set, Some(&live), 0),
                (StoreOp::Add, None, 0),
                (StoreOp::Replace, Some(&live), 0),
                (StoreOp::Cas, Some(&live), 13),
            ] {
                assert_eq!(
                    store(op, current, 0, exptime, b("w"), cas_unique, CLOCK),
                    removed,
                    "{op:?} exptime {exptime}"
                );
            }
            // A refused store changes nothing, whatever its exptime
            // (`add z 0 -1 1` on a live z -> NOT_STORED, z still there).
            assert_eq!(
                store(StoreOp::Add, Some(&live), 0, exptime, b("w"), 0, CLOCK),
                keep(Response::NotStored)
            );
            assert_eq!(
                store(StoreOp::Cas, Some(&live), 0, exptime, b("w"), 999, CLOCK),
                keep(Response::Exists)
            );
        }
    }

    #[test]
    fn store_deadlines_at_the_edges() {
        let set = |exptime| store(StoreOp::Set, None, 0, exptime, b("v"), 0, CLOCK);
        assert_eq!(set(0), outcome(Response::Stored, value(0, "v", None)));
        assert_eq!(
            set(REALTIME_MAXDELTA),
            outcome(Response::Stored, value(0, "v", Some(NOW + DAY_30_MS)))
        );
        assert_eq!(
            set(REALTIME_MAXDELTA + 1),
            outcome(Response::Stored, Effect::Remove)
        );
        assert_eq!(
            set(1_700_000_006),
            outcome(Response::Stored, value(0, "v", Some(6_000)))
        );
    }

    #[test]
    fn too_large_answers_server_error_and_a_set_drops_the_old_value() {
        // `set big 0 0 2000000` over a live big -> SERVER_ERROR object too
        // large for cache, then `get big` -> END; `add`/`append` over a
        // live key leave it.
        let reply = Response::Error(ErrorReply::Server("object too large for cache".into()));
        let live = item(0, "v", None, 1);
        assert_eq!(
            too_large(StoreOp::Set, Some(&live)),
            outcome(reply.clone(), Effect::Remove)
        );
        assert_eq!(too_large(StoreOp::Set, None), keep(reply.clone()));
        for op in [
            StoreOp::Add,
            StoreOp::Replace,
            StoreOp::Append,
            StoreOp::Prepend,
            StoreOp::Cas,
        ] {
            assert_eq!(too_large(op, Some(&live)), keep(reply.clone()), "{op:?}");
            assert_eq!(too_large(op, None), keep(reply.clone()), "{op:?}");
        }
    }

    #[test]
    fn arith_wraps_floors_and_pads() {
        use ArithOp::{Decr, Incr};
        // (stored, op, delta, reply, stored after)
        let cases = [
            ("99", Incr, 1, 100, "100"),
            // `set n 0 0 2` 10, `decr n 10` -> 0, `get n` -> "0 "
            ("10", Decr, 10, 0, "0 "),
            // `set d 0 0 3` 100, `decr d 95` -> 5, `get d` -> "5  "
            ("100", Decr, 95, 5, "5  "),
            ("0", Decr, 1, 0, "0"),
            ("5", Decr, u64::MAX, 0, "0"),
            // `incr w 1` on 18446744073709551615 -> 0, padded to 20 bytes
            ("18446744073709551615", Incr, 1, 0, "0                   "),
            ("1", Incr, u64::MAX, 0, "0"),
            ("2", Incr, u64::MAX, 1, "1"),
            ("0", Incr, u64::MAX, u64::MAX, "18446744073709551615"),
            // A leading space and `+` are read as strtoull does.
            (" 5", Incr, 1, 6, "6 "),
            ("+7  ", Incr, 1, 8, "8   "),
            ("007", Incr, 1, 8, "8  "),
        ];
        for (old, op, delta, n, after) in cases {
            let current = item(77, old, Some(NOW + 1_000), 4);
            assert_eq!(
                arith(op, Some(&current), delta),
                outcome(Response::Number(n), value(77, after, Some(NOW + 1_000))),
                "{old:?} {op:?} {delta}"
            );
        }
        for op in [Incr, Decr] {
            assert_eq!(arith(op, None, 1), keep(Response::NotFound));
            let non_numeric = Response::Error(ErrorReply::Client(
                "cannot increment or decrement non-numeric value".into(),
            ));
            for bad in ["abc", "-5", " 5a", "", "+", "5 5", "18446744073709551616"] {
                let current = item(0, bad, None, 1);
                assert_eq!(
                    arith(op, Some(&current), 1),
                    keep(non_numeric.clone()),
                    "{bad:?}"
                );
            }
        }
    }

    #[test]
    fn counters_parse_as_strtoull() {
        for (text, n) in [
            (&b"5"[..], 5),
            (b" 5", 5),
            (b"+7  ", 7),
            (b"  +5 ", 5),
            (b"007", 7),
            (b"18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_counter(text), Some(n), "{text:?}");
        }
        for bad in [
            &b""[..],
            b"   ",
            b"+",
            b"+ 5",
            b"-5",
            b" 5a",
            b"5 5",
            b"5\t",
            b"5\r\n",
            b"18446744073709551616",
            b"184467440737095516150",
        ] {
            assert_eq!(parse_counter(bad), None, "{bad:?}");
        }
        assert_eq!(apply_delta(b"x", ArithOp::Incr, 1), None);
        assert_eq!(
            apply_delta(b"10", ArithOp::Decr, 10),
            Some((0, Bytes::from_static(b"0 ")))
        );
    }

    #[test]
    fn delete_removes_a_live_value() {
        let live = item(0, "v", None, 1);
        assert_eq!(
            delete(Some(&live)),
            outcome(Response::Deleted, Effect::Remove)
        );
        assert_eq!(delete(None), keep(Response::NotFound));
    }

    #[test]
    fn touch_sets_a_deadline_and_a_past_one_removes() {
        let live = item(0, "v", Some(NOW + 1_000), 8);
        let touched = |effect| outcome(Response::Touched, effect);
        // (exptime, outcome)
        let cases = [
            (0, touched(Effect::Touch { deadline: None })),
            (
                100,
                touched(Effect::Touch {
                    deadline: Some(NOW + 100_000),
                }),
            ),
            (
                REALTIME_MAXDELTA,
                touched(Effect::Touch {
                    deadline: Some(NOW + DAY_30_MS),
                }),
            ),
            (
                1_700_000_100,
                touched(Effect::Touch {
                    deadline: Some(100_000),
                }),
            ),
            // `touch t -1` -> TOUCHED, `get t` -> END
            (-1, touched(Effect::Remove)),
            (REALTIME_MAXDELTA + 1, touched(Effect::Remove)),
            (1_700_000_005, touched(Effect::Remove)),
        ];
        for (exptime, expected) in cases {
            assert_eq!(touch(Some(&live), exptime, CLOCK), expected, "{exptime}");
            assert_eq!(
                touch(None, exptime, CLOCK),
                keep(Response::NotFound),
                "{exptime}"
            );
        }
    }

    #[test]
    fn gat_sets_a_deadline_and_a_past_one_removes() {
        // `gat -1 k` returns k's value, then `get k` -> END.
        let live = item(0, "v", None, 8);
        let cases = [
            (0, Effect::Touch { deadline: None }),
            (
                100,
                Effect::Touch {
                    deadline: Some(NOW + 100_000),
                },
            ),
            (-1, Effect::Remove),
            (REALTIME_MAXDELTA + 1, Effect::Remove),
        ];
        for (exptime, expected) in cases {
            assert_eq!(gat(Some(&live), exptime, CLOCK), expected, "{exptime}");
            assert_eq!(gat(None, exptime, CLOCK), Effect::Keep, "{exptime}");
        }
    }

    #[test]
    fn flush_all_delay() {
        let cases = [
            (None, None),
            (Some(0), None),
            (Some(-5), None),
            (Some(10), Some(NOW + 10_000)),
            (Some(REALTIME_MAXDELTA), Some(NOW + DAY_30_MS)),
            // Absolute times: the future is a delayed flush, the past (or
            // now) is a flush at once.
            (Some(1_700_000_020), Some(20_000)),
            (Some(1_700_000_005), None),
            (Some(REALTIME_MAXDELTA + 1), None),
        ];
        for (delay, expected) in cases {
            assert_eq!(flush_at(delay, CLOCK), expected, "{delay:?}");
        }
    }

    #[test]
    fn the_same_inputs_give_the_same_outcome_and_time_is_only_the_argument() {
        let live = item(2, "12", Some(40_000), 5);
        for clock in [
            Clock::unix(0),
            CLOCK,
            Clock {
                now_ms: 123_456_789,
                unix_ms_at_zero: 42,
            },
        ] {
            for _ in 0..3 {
                let set = store(StoreOp::Set, Some(&live), 1, 10, b("x"), 0, clock);
                assert_eq!(
                    set,
                    outcome(Response::Stored, value(1, "x", Some(clock.now_ms + 10_000)))
                );
                assert_eq!(
                    store(StoreOp::Append, Some(&live), 1, 10, b("x"), 0, clock),
                    store(StoreOp::Append, Some(&live), 1, 10, b("x"), 0, clock)
                );
                assert_eq!(
                    arith(ArithOp::Incr, Some(&live), 1),
                    arith(ArithOp::Incr, Some(&live), 1)
                );
                assert_eq!(touch(Some(&live), 10, clock), touch(Some(&live), 10, clock));
                assert_eq!(gat(Some(&live), 10, clock), gat(Some(&live), 10, clock));
                assert_eq!(flush_at(Some(10), clock), Some(clock.now_ms + 10_000));
            }
        }
        // The inputs are only read.
        assert_eq!(live, item(2, "12", Some(40_000), 5));
    }
}
