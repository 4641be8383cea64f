//! Meta commands (`mg ms md ma me`) in the ordered modes: what each one
//! decides and answers, from a key's replicated record only.
//!
//! The decision is [`crate::rules::meta`]'s (the same rules as a single
//! node and eventual mode); this turns it into a [`Change`] of the key's
//! [`Record`](super::record::Record) (value, CAS, deadline, and the marks
//! the meta protocol shows: stale, recache token handed out, base64 key),
//! which the state machine carries out at the request's place in the log,
//! and writes the reply as memcached 1.6.18 does once it knows the CAS the
//! change made.
//!
//! Replicated, so the same on every node: CAS (`c`, `C`, `E` is refused
//! by 1.6.18's parser), client flags, TTL (`t`, `T`, `N`, `R`, by the
//! log's clock), size, value, opaque, `k` and `b`, `q`, and the stale and
//! win marks (`X`, `W`, `Z`). Not kept at all: hit-before and last access
//! (`h0`, `l0`; `me` shows `fetch=no la=0`): keeping them would make every
//! read a log write (`docs/consistency.md`).

use bytes::{BufMut, Bytes, BytesMut};

use super::record::MetaMarks;
use crate::protocol::{
    ItemView, MetaCmd, MetaCode, MetaReply, MetaRequest, Response, SetMode, base64_encode,
};
use crate::rules::meta::{self as rules, Current, MetaEffect, MetaOutcome};
use crate::rules::{Clock, Item, NewValue};

/// A key's live value, as the state machine holds it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub item: Item,
    pub meta: MetaMarks,
}

/// What a meta command does to its key's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Keep,
    /// A new value under a new CAS.
    Put {
        value: NewValue,
        meta: MetaMarks,
    },
    /// The same value and CAS; a new deadline and marks.
    Mark {
        deadline: Option<u64>,
        meta: MetaMarks,
    },
    /// The same value under a new CAS; a new deadline and marks (`md I`).
    Invalidate {
        deadline: Option<u64>,
        meta: MetaMarks,
    },
    Remove,
}

/// A decided meta request: its change, and what the reply needs.
#[derive(Debug, Clone)]
pub struct Decided {
    pub change: Change,
    outcome: Option<MetaOutcome>,
}

impl Decided {
    /// True when answering changes nothing: a read may answer it from a
    /// replica without the log.
    pub fn reads_only(&self) -> bool {
        self.change == Change::Keep
    }

    /// True when the request stored a value (`ms` answering `HD`): its
    /// reply names a CAS even when the value was born expired.
    pub fn stored(&self) -> bool {
        self.outcome
            .as_ref()
            .is_some_and(|o| o.code == Ok(MetaCode::Hd))
    }
}

fn reply(code: MetaCode, rest: BytesMut, value: Option<Bytes>) -> Response {
    Response::Meta(MetaReply {
        code,
        rest: rest.freeze(),
        value,
    })
}

/// Decides `req` over the key's live value `current` at `clock` (the
/// log's).
pub fn decide(req: &MetaRequest, current: Option<&Stored>, clock: Clock) -> Decided {
    let cur = current.map(|s| Current {
        item: &s.item,
        marks: s.meta.marks,
    });
    let binary = current.is_some_and(|s| s.meta.key_binary);
    let outcome = match req.cmd {
        MetaCmd::Get => rules::get(req, cur, clock),
        MetaCmd::Set => rules::set(req, cur, clock),
        MetaCmd::Delete => rules::delete(req, cur, clock),
        MetaCmd::Arith => rules::arith(req, cur, clock),
        MetaCmd::Debug => {
            return Decided {
                change: Change::Keep,
                outcome: None,
            };
        }
    };
    let change = match outcome.effect.clone() {
        MetaEffect::Keep => Change::Keep,
        MetaEffect::Remove => Change::Remove,
        MetaEffect::Put { value, marks } => {
            // As memcached allocates items: `ms` set/add/replace keeps the
            // request's base64 mark; append, prepend and vivified items do
            // not; a number `ma` rewrites in place keeps the item's.
            let key_binary = match req.cmd {
                MetaCmd::Set => {
                    req.flags.base64
                        && matches!(
                            req.set_mode(),
                            Some(SetMode::Set | SetMode::Add | SetMode::Replace)
                        )
                }
                MetaCmd::Arith => current
                    .is_some_and(|s| s.meta.key_binary && value.data.len() <= s.item.data.len()),
                _ => false,
            };
            Change::Put {
                value,
                meta: MetaMarks { marks, key_binary },
            }
        }
        MetaEffect::Mark { deadline, marks } => Change::Mark {
            deadline,
            meta: MetaMarks {
                marks,
                key_binary: binary,
            },
        },
        MetaEffect::Invalidate { deadline, marks } => Change::Invalidate {
            deadline,
            meta: MetaMarks {
                marks,
                key_binary: binary,
            },
        },
    };
    Decided {
        change,
        outcome: Some(outcome),
    }
}

/// The reply to `req`, decided as `decided` over `current` (the value
/// before the change), once the change is made: `new_cas` is the CAS it
/// gave (0 when it gave none).
pub fn answer(
    req: &MetaRequest,
    decided: &Decided,
    current: Option<&Stored>,
    new_cas: u64,
    clock: Clock,
) -> Response {
    let Some(out) = &decided.outcome else {
        return debug(req, current, clock);
    };
    let code = match out.code {
        Ok(code) => code,
        Err(e) => return e.into(),
    };
    let now = clock.now_ms;
    match req.cmd {
        MetaCmd::Get => {
            if out.hidden {
                return Response::Quiet;
            }
            if code == MetaCode::En {
                return reply(code, req.status_flags(0), None);
            }
            let (item, key_binary) = match current {
                Some(s) => (s.item.clone(), s.meta.key_binary),
                // Created by `N`: an empty item under the new CAS.
                None => (
                    Item {
                        flags: 0,
                        data: Bytes::new(),
                        deadline: None,
                        cas: new_cas,
                    },
                    req.flags.base64,
                ),
            };
            let view = ItemView {
                key: &req.key,
                key_binary,
                cas: item.cas,
                client_flags: item.flags,
                size: item.data.len(),
                ttl: rules::secs_left(item.deadline, now),
                last_access: 0,
                fetched: false,
            };
            let mut rest = req.hit_flags(&view, rules::ttl_changes(req, clock, out.created));
            rules::put_marks(&mut rest, out.token_was_sent, out.stale, out.won);
            let value = req.flags.value.then(|| item.data.clone());
            reply(code, rest, value)
        }
        MetaCmd::Set => {
            if out.hidden {
                return Response::Quiet;
            }
            let cas = if code == MetaCode::Hd { new_cas } else { 0 };
            reply(code, req.status_flags(cas), None)
        }
        MetaCmd::Delete => {
            if out.hidden {
                return Response::Quiet;
            }
            reply(code, req.status_flags(0), None)
        }
        MetaCmd::Arith => {
            let Some(n) = out.number else {
                return reply(code, req.status_flags(0), None);
            };
            if out.hidden {
                return Response::Quiet;
            }
            let (rest, value) = rules::arith_reply(
                req,
                code,
                n,
                new_cas,
                out.deadline_before,
                out.created,
                clock,
            );
            reply(code, rest, value)
        }
        MetaCmd::Debug => debug(req, current, clock),
    }
}

/// `me`: `ME <key> exp= la= cas= fetch= cls= size=` as memcached writes it
/// (size and class as memcached sizes the client's item, not the stored
/// record), or `EN`. Access is not kept: `la=0 fetch=no`.
fn debug(req: &MetaRequest, current: Option<&Stored>, clock: Clock) -> Response {
    let Some(s) = current else {
        return reply(MetaCode::En, BytesMut::new(), None);
    };
    let item = &s.item;
    let mut rest = BytesMut::new();
    rest.put_u8(b' ');
    if s.meta.key_binary {
        rest.put_slice(base64_encode(&req.key).as_bytes());
    } else {
        rest.put_slice(&req.key);
    }
    let exp = rules::secs_left(item.deadline, clock.now_ms).map_or(-1, |s| -s);
    let size = rules::memcached_item_size(req.key.len(), item.data.len(), item.flags);
    rest.put_slice(
        format!(
            " exp={exp} la=0 cas={} fetch=no cls={} size={size}",
            item.cas,
            rules::memcached_slab_class(size),
        )
        .as_bytes(),
    );
    reply(MetaCode::Me, rest, None)
}

/// A key the store cannot hold: it is reached through the text protocol,
/// whose keys have no spaces or control characters (a base64 key may
/// decode to any bytes).
pub fn storable_key(key: &[u8]) -> bool {
    !key.iter().any(|&b| b <= b' ' || b == 0x7f)
}
