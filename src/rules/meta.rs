//! memcached 1.6.18's meta command rules (`mg ms md ma`), as pure
//! functions over a key's live value and the marks only the meta protocol
//! sees (stale, win token sent). Like the text rules, no clock is read and
//! nothing is stored here: the caller passes the time and carries out the
//! [`MetaEffect`], assigning CAS values and keeping hit / last-access
//! metadata itself.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Clock, Item, NewValue, apply_delta, store};
use crate::protocol::{
    ArithOp, ClientError, ItemView, MetaCode, MetaRequest, Response, SetMode, StoreOp, TtlChanges,
};

/// The bytes memcached 1.6.18 charges an item (`me`'s `size=`): its
/// 48-byte header, the key and a NUL, the value and its `\r\n`, the CAS,
/// and the client flags when they are not 0.
pub fn memcached_item_size(key_len: usize, data_len: usize, flags: u32) -> usize {
    48 + key_len + 1 + data_len + 2 + 8 + if flags == 0 { 0 } else { 4 }
}

/// The slab class memcached 1.6.18 (defaults `-n 48 -f 1.25`) puts an item
/// of `size` bytes in (`me`'s `cls=`).
pub fn memcached_slab_class(size: usize) -> u32 {
    let mut chunk = 96f64;
    for class in 1..63 {
        let mut aligned = chunk as usize;
        if !aligned.is_multiple_of(8) {
            aligned += 8 - aligned % 8;
        }
        if size <= aligned {
            return class;
        }
        chunk = aligned as f64 * 1.25;
    }
    63
}

/// What the meta protocol marks on an item besides its value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    /// Invalidated (`md I`, or an `ms I` with an older CAS): `mg` shows `X`.
    pub stale: bool,
    /// A client was handed the recache token (`W`); others see `Z`.
    pub token_sent: bool,
}

/// A key's live value as the meta rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub item: &'a Item,
    pub marks: Marks,
}

/// What a meta command does to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaEffect {
    Keep,
    /// A new value under a new CAS, with these marks.
    Put {
        value: NewValue,
        marks: Marks,
    },
    /// The same value and CAS; new deadline and marks.
    Mark {
        deadline: Option<u64>,
        marks: Marks,
    },
    /// The same value; new deadline and marks, and a new CAS (`md I`).
    Invalidate {
        deadline: Option<u64>,
        marks: Marks,
    },
    Remove,
}

/// The decision of one meta command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaOutcome {
    /// The status, or the error line memcached answers.
    pub code: Result<MetaCode, ClientError>,
    pub effect: MetaEffect,
    /// True when the request's `q` hides this answer.
    pub hidden: bool,
    /// The deadline before this command (for a `t` before `T` or `N`).
    pub deadline_before: Option<u64>,
    /// `mg`: an item was created by `N`; `W`, `X`, `Z` to append.
    pub created: bool,
    pub won: bool,
    pub stale: bool,
    pub token_was_sent: bool,
    /// `ma`: the number now stored.
    pub number: Option<u64>,
}

impl MetaOutcome {
    fn new(code: Result<MetaCode, ClientError>, effect: MetaEffect) -> MetaOutcome {
        MetaOutcome {
            code,
            effect,
            hidden: false,
            deadline_before: None,
            created: false,
            won: false,
            stale: false,
            token_was_sent: false,
            number: None,
        }
    }
}

/// A value stored with a deadline already passed is linked and never
/// shown: the key's old value is gone.
fn put(value: NewValue, marks: Marks, clock: Clock) -> MetaEffect {
    if clock.expired(value.deadline) {
        MetaEffect::Remove
    } else {
        MetaEffect::Put { value, marks }
    }
}

/// `mg`: a hit returns its flags (the caller renders them); `T` sets a new
/// deadline; `N` creates an empty item on a miss and wins the recache
/// token; `R` wins it when the remaining TTL is below its own; a stale
/// item whose token was not yet sent wins it too. A miss is hidden by `q`.
pub fn get(req: &MetaRequest, current: Option<Current<'_>>, clock: Clock) -> MetaOutcome {
    let code = if req.flags.value {
        MetaCode::Va
    } else {
        MetaCode::Hd
    };
    let Some(cur) = current else {
        let Some(vivify) = req.flags.vivify else {
            let mut out = MetaOutcome::new(Ok(MetaCode::En), MetaEffect::Keep);
            out.hidden = req.flags.quiet;
            return out;
        };
        // The stub is created never expiring; `N` (and `T`, in flag order)
        // then set its deadline.
        let mut deadline = None;
        for t in &req.tokens {
            match t[0] {
                b'T' => deadline = req.flags.ttl.and_then(|e| clock.deadline(e)),
                b'N' => deadline = clock.deadline(vivify),
                _ => {}
            }
        }
        let value = NewValue {
            flags: 0,
            data: Bytes::new(),
            deadline,
        };
        let marks = Marks {
            stale: false,
            token_sent: true,
        };
        let mut out = MetaOutcome::new(Ok(code), put(value, marks, clock));
        out.created = true;
        out.won = true;
        return out;
    };
    let mut deadline = cur.item.deadline;
    let mut won = false;
    for t in &req.tokens {
        match t[0] {
            b'T' => deadline = req.flags.ttl.and_then(|e| clock.deadline(e)),
            b'R' => {
                let recache = req.flags.recache.and_then(|e| clock.deadline(e));
                if !cur.marks.token_sent
                    && let (Some(d), Some(r)) = (deadline, recache)
                    && d < r
                {
                    won = true;
                }
            }
            _ => {}
        }
    }
    if cur.marks.stale && !cur.marks.token_sent {
        won = true;
    }
    let marks = Marks {
        stale: cur.marks.stale,
        token_sent: cur.marks.token_sent || won,
    };
    let effect = if clock.expired(deadline) {
        MetaEffect::Remove
    } else if deadline != cur.item.deadline || marks != cur.marks {
        MetaEffect::Mark { deadline, marks }
    } else {
        MetaEffect::Keep
    };
    let mut out = MetaOutcome::new(Ok(code), effect);
    out.deadline_before = cur.item.deadline;
    out.won = won;
    out.stale = cur.marks.stale;
    out.token_was_sent = cur.marks.token_sent;
    out
}

/// `ms`: the mode picks the text command (`C` turns set and replace into
/// `cas`); append and prepend refuse a CAS that does not match (`EX`); with
/// `I`, a CAS older than the item's still stores, keeping the item's
/// deadline, and marks the value stale. `HD` is hidden by `q`.
pub fn set(req: &MetaRequest, current: Option<Current<'_>>, clock: Clock) -> MetaOutcome {
    let mode = req.set_mode().unwrap_or(SetMode::Set);
    let cas = req.flags.compare_cas;
    let op = match mode {
        SetMode::Set | SetMode::Replace if cas.is_some() => StoreOp::Cas,
        SetMode::Set => StoreOp::Set,
        SetMode::Replace => StoreOp::Replace,
        SetMode::Add => StoreOp::Add,
        SetMode::Append => StoreOp::Append,
        SetMode::Prepend => StoreOp::Prepend,
    };
    let flags = req.flags.client_flags.unwrap_or(0);
    let exptime = req.flags.ttl.unwrap_or(0);
    let asked = cas.unwrap_or(0);
    let done = |code: MetaCode, effect| {
        let mut out = MetaOutcome::new(Ok(code), effect);
        out.hidden = req.flags.quiet && code == MetaCode::Hd;
        out
    };
    if let Some(cur) = current {
        let old = cur.item;
        let mismatch = asked != 0 && asked != old.cas;
        if matches!(op, StoreOp::Append | StoreOp::Prepend) && mismatch {
            return done(MetaCode::Ex, MetaEffect::Keep);
        }
        if op == StoreOp::Cas && req.flags.invalidate && asked != 0 && asked < old.cas {
            let value = NewValue {
                flags,
                data: req.data.clone(),
                deadline: old.deadline,
            };
            let marks = Marks {
                stale: true,
                token_sent: cur.marks.token_sent,
            };
            return done(MetaCode::Hd, put(value, marks, clock));
        }
    }
    let item = current.map(|c| c.item);
    let text = store(op, item, flags, exptime, req.data.clone(), asked, clock);
    let code = match text.reply {
        Response::Stored => MetaCode::Hd,
        Response::NotStored => MetaCode::Ns,
        Response::Exists => MetaCode::Ex,
        _ => MetaCode::Nf,
    };
    let effect = match text.effect {
        super::Effect::Put(value) => MetaEffect::Put {
            value,
            marks: Marks::default(),
        },
        super::Effect::Remove => MetaEffect::Remove,
        super::Effect::Keep | super::Effect::Touch { .. } => MetaEffect::Keep,
    };
    done(code, effect)
}

/// `md`: `NF` on a miss, `EX` when `C` does not match; with `I` the value
/// stays, marked stale under a new CAS (and `T`'s deadline if given),
/// otherwise it goes. `HD` is hidden by `q`.
pub fn delete(req: &MetaRequest, current: Option<Current<'_>>, clock: Clock) -> MetaOutcome {
    let Some(cur) = current else {
        return MetaOutcome::new(Ok(MetaCode::Nf), MetaEffect::Keep);
    };
    if req.flags.compare_cas.is_some_and(|c| c != cur.item.cas) {
        return MetaOutcome::new(Ok(MetaCode::Ex), MetaEffect::Keep);
    }
    let effect = if req.flags.invalidate {
        let deadline = match req.flags.ttl {
            Some(e) => clock.deadline(e),
            None => cur.item.deadline,
        };
        if clock.expired(deadline) {
            MetaEffect::Remove
        } else {
            MetaEffect::Invalidate {
                deadline,
                marks: Marks {
                    stale: true,
                    token_sent: false,
                },
            }
        }
    } else {
        MetaEffect::Remove
    };
    let mut out = MetaOutcome::new(Ok(MetaCode::Hd), effect);
    out.hidden = req.flags.quiet;
    out
}

/// `ma`: incr (wrapping) or decr (stopping at 0) by `D` (default 1); `NF`
/// on a miss unless `N` creates the counter at `J` (default 0); `EX` when
/// a non-zero `C` does not match; memcached's non-numeric error otherwise.
/// `T` (and `N` on a created counter), in flag order, set the deadline.
/// Success is hidden by `q`, except for a created counter.
pub fn arith(req: &MetaRequest, current: Option<Current<'_>>, clock: Clock) -> MetaOutcome {
    let code = if req.flags.value {
        MetaCode::Va
    } else {
        MetaCode::Hd
    };
    let deadline_after = |mut deadline: Option<u64>, created: bool| {
        for t in &req.tokens {
            match t[0] {
                b'T' => deadline = req.flags.ttl.and_then(|e| clock.deadline(e)),
                b'N' if created => deadline = req.flags.vivify.and_then(|e| clock.deadline(e)),
                _ => {}
            }
        }
        deadline
    };
    let Some(cur) = current else {
        let Some(_) = req.flags.vivify else {
            return MetaOutcome::new(Ok(MetaCode::Nf), MetaEffect::Keep);
        };
        let n = req.flags.initial.unwrap_or(0);
        let value = NewValue {
            flags: 0,
            data: Bytes::copy_from_slice(itoa::Buffer::new().format(n).as_bytes()),
            deadline: deadline_after(None, true),
        };
        let mut out = MetaOutcome::new(Ok(code), put(value, Marks::default(), clock));
        out.created = true;
        out.number = Some(n);
        return out;
    };
    let old = cur.item;
    let non_numeric = || MetaOutcome::new(Err(ClientError::NonNumeric), MetaEffect::Keep);
    if old.data.is_empty() {
        return non_numeric();
    }
    if req
        .flags
        .compare_cas
        .is_some_and(|c| c != 0 && c != old.cas)
    {
        return MetaOutcome::new(Ok(MetaCode::Ex), MetaEffect::Keep);
    }
    let op = if req.increments().unwrap_or(true) {
        ArithOp::Incr
    } else {
        ArithOp::Decr
    };
    let Some((n, data)) = apply_delta(&old.data, op, req.flags.delta.unwrap_or(1)) else {
        return non_numeric();
    };
    let value = NewValue {
        flags: old.flags,
        data,
        deadline: deadline_after(old.deadline, false),
    };
    let mut out = MetaOutcome::new(Ok(code), put(value, cur.marks, clock));
    out.hidden = req.flags.quiet;
    out.deadline_before = old.deadline;
    out.number = Some(n);
    out
}

/// Whole seconds left until `deadline` (rounded up, as memcached's
/// once-a-second clock shows it right after a store); `None` never.
pub fn secs_left(deadline: Option<u64>, now_ms: u64) -> Option<i64> {
    deadline.map(|d| {
        let ms = i128::from(d) - i128::from(now_ms);
        let secs = if ms > 0 { (ms + 999) / 1000 } else { ms / 1000 };
        i64::try_from(secs).unwrap_or(i64::MAX)
    })
}

/// The TTLs `T` and (on a created item) `N` set, in seconds, for a `t`
/// written after them.
pub fn ttl_changes(req: &MetaRequest, clock: Clock, created: bool) -> TtlChanges {
    let secs = |e| secs_left(clock.deadline(e), clock.now_ms);
    TtlChanges {
        on_t: req.flags.ttl.map(secs),
        on_n: if created {
            req.flags.vivify.map(secs)
        } else {
            None
        },
    }
}

/// The return flags and value of an `ma` that answered `code` (`HD` or
/// `VA`) with the number `n`: the item's new CAS `cas`, its TTL before
/// (`deadline_before`), whether the request `created` it. Every store and
/// mode answers it the same way.
pub fn arith_reply(
    req: &MetaRequest,
    code: MetaCode,
    n: u64,
    cas: u64,
    deadline_before: Option<u64>,
    created: bool,
    clock: Clock,
) -> (BytesMut, Option<Bytes>) {
    let view = ItemView {
        key: &req.key,
        key_binary: req.flags.base64,
        cas,
        client_flags: 0,
        size: 0,
        ttl: secs_left(deadline_before, clock.now_ms),
        last_access: 0,
        fetched: false,
    };
    let rest = req.hit_flags(&view, ttl_changes(req, clock, created));
    let value = (code == MetaCode::Va)
        .then(|| Bytes::copy_from_slice(itoa::Buffer::new().format(n).as_bytes()));
    (rest, value)
}

/// Appends an `mg` hit's marks after its other flags, in memcached's
/// order: `Z` (a recache token was already sent), `X` (stale), `W` (this
/// client won the token).
pub fn put_marks(rest: &mut BytesMut, token_was_sent: bool, stale: bool, won: bool) {
    for (set, flag) in [(token_was_sent, b" Z"), (stale, b" X"), (won, b" W")] {
        if set {
            rest.put_slice(flag);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Facts checked against memcached 1.6.18; the wire exchange is quoted.

    use super::*;
    use crate::protocol::{Incoming, Limits, Parsed, parse_request};

    const CLOCK: Clock = Clock {
        now_ms: 5_000,
        unix_ms_at_zero: 0,
    };

    fn req(line: &str) -> MetaRequest {
        match parse_request(line.as_bytes(), &Limits::default()) {
            Parsed::Request {
                request: Incoming::Data(crate::protocol::Request::Meta(m)),
                ..
            } => *m,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    fn item(data: &str, cas: u64) -> Item {
        Item {
            flags: 0,
            data: Bytes::copy_from_slice(data.as_bytes()),
            deadline: None,
            cas,
        }
    }

    fn cur(item: &Item) -> Option<Current<'_>> {
        Some(Current {
            item,
            marks: Marks::default(),
        })
    }

    #[test]
    fn ms_modes_and_cas() {
        let live = item("x", 7);
        let code = |line: &str, current| set(&req(line), current, CLOCK).code;
        // `ms e 2 ME` on a live key -> NS; `ms nope 1 MA` -> NS.
        assert_eq!(code("ms k 1 ME\r\nv\r\n", cur(&live)), Ok(MetaCode::Ns));
        assert_eq!(code("ms k 1 MA\r\nv\r\n", None), Ok(MetaCode::Ns));
        assert_eq!(code("ms k 1 MR\r\nv\r\n", None), Ok(MetaCode::Ns));
        // `C` turns set into cas: NF on a miss, EX on a mismatch (C0 too).
        assert_eq!(code("ms k 1 C5\r\nv\r\n", None), Ok(MetaCode::Nf));
        assert_eq!(code("ms k 1 C8\r\nv\r\n", cur(&live)), Ok(MetaCode::Ex));
        assert_eq!(code("ms k 1 C0\r\nv\r\n", cur(&live)), Ok(MetaCode::Ex));
        assert_eq!(code("ms k 1 C7\r\nv\r\n", cur(&live)), Ok(MetaCode::Hd));
        // Append refuses a wrong CAS, takes C0; add ignores C.
        assert_eq!(code("ms k 1 MA C9\r\nv\r\n", cur(&live)), Ok(MetaCode::Ex));
        assert_eq!(code("ms k 1 MP C0\r\nv\r\n", cur(&live)), Ok(MetaCode::Hd));
        assert_eq!(code("ms k 1 ME C9\r\nv\r\n", cur(&live)), Ok(MetaCode::Ns));
        // `I` with an older CAS stores, marked stale.
        let out = set(&req("ms k 1 I C3\r\nv\r\n"), cur(&live), CLOCK);
        assert_eq!(out.code, Ok(MetaCode::Hd));
        assert!(matches!(
            out.effect,
            MetaEffect::Put {
                marks: Marks { stale: true, .. },
                ..
            }
        ));
        // `q` hides HD only.
        assert!(set(&req("ms k 1 q\r\nv\r\n"), None, CLOCK).hidden);
        assert!(!set(&req("ms k 1 q ME\r\nv\r\n"), cur(&live), CLOCK).hidden);
    }

    #[test]
    fn md_deletes_or_invalidates() {
        let live = item("x", 7);
        assert_eq!(
            delete(&req("md k q\r\n"), None, CLOCK).code,
            Ok(MetaCode::Nf)
        );
        assert!(
            !delete(&req("md k q\r\n"), None, CLOCK).hidden,
            "NF is always sent"
        );
        assert_eq!(
            delete(&req("md k C1\r\n"), cur(&live), CLOCK).code,
            Ok(MetaCode::Ex)
        );
        let out = delete(&req("md k q\r\n"), cur(&live), CLOCK);
        assert_eq!((out.effect, out.hidden), (MetaEffect::Remove, true));
        let out = delete(&req("md k I T30\r\n"), cur(&live), CLOCK);
        assert_eq!(
            out.effect,
            MetaEffect::Invalidate {
                deadline: Some(35_000),
                marks: Marks {
                    stale: true,
                    token_sent: false
                }
            }
        );
    }

    #[test]
    fn ma_counts_vivifies_and_hides_as_memcached() {
        // `ma nn q` -> NF; `ma nn N0 J5 q` -> HD (a created counter is not
        // hidden); `ma nn q v` -> nothing; `ma nn v` -> VA 1 / 7.
        let r = req("ma k q\r\n");
        assert_eq!(arith(&r, None, CLOCK).code, Ok(MetaCode::Nf));
        let out = arith(&req("ma k N0 J5 q\r\n"), None, CLOCK);
        assert_eq!(
            (out.code, out.hidden, out.number),
            (Ok(MetaCode::Hd), false, Some(5))
        );
        let five = item("5", 1);
        let out = arith(&req("ma k q v\r\n"), cur(&five), CLOCK);
        assert_eq!((out.hidden, out.number), (true, Some(6)));
        let out = arith(&req("ma k MD D100\r\n"), cur(&five), CLOCK);
        assert_eq!(out.number, Some(0));
        let empty = item("", 1);
        assert_eq!(
            arith(&req("ma k\r\n"), cur(&empty), CLOCK).code,
            Err(ClientError::NonNumeric)
        );
        assert_eq!(
            arith(&req("ma k C9\r\n"), cur(&five), CLOCK).code,
            Ok(MetaCode::Ex)
        );
        assert_eq!(
            arith(&req("ma k C0\r\n"), cur(&five), CLOCK).number,
            Some(6)
        );
    }

    #[test]
    fn mg_hands_out_one_recache_token() {
        // `mg viv N30 v` -> VA 0 W; again -> VA 0 Z.
        let out = get(&req("mg k N30 v\r\n"), None, CLOCK);
        assert!(out.created && out.won);
        let stub = item("", 1);
        let sent = Some(Current {
            item: &stub,
            marks: Marks {
                stale: false,
                token_sent: true,
            },
        });
        let out = get(&req("mg k N30 v\r\n"), sent, CLOCK);
        assert!(!out.won && out.token_was_sent);
        // A stale item wins once: `md st I`, `mg st v` -> W X, then Z X.
        let stale = Some(Current {
            item: &stub,
            marks: Marks {
                stale: true,
                token_sent: false,
            },
        });
        let out = get(&req("mg k v\r\n"), stale, CLOCK);
        assert!(out.won && out.stale);
        // `R`: wins when the remaining TTL is below its token.
        let mut ttl = item("r", 1);
        ttl.deadline = Some(CLOCK.now_ms + 100_000);
        assert!(get(&req("mg k R200\r\n"), cur(&ttl), CLOCK).won);
        assert!(!get(&req("mg k R30\r\n"), cur(&ttl), CLOCK).won);
        // A miss is hidden by `q`.
        assert!(get(&req("mg k q\r\n"), None, CLOCK).hidden);
    }
}
