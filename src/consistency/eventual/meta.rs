//! Meta commands in eventual mode. Each is decided by the same rules as on
//! a single node ([`crate::rules::meta`]) over the local replica, and its
//! effect is carried out like its text twin's: `ms` like set/add/append/…,
//! `md` like delete, `ma` like incr/decr, an `mg` that changes the TTL or
//! vivifies like touch or add. So every meta write is versioned, logged
//! and replicated as theirs are (last writer wins).
//!
//! What only the meta protocol shows is not replicated and not kept at all
//! here (`docs/consistency.md`): stale marks and win tokens (`md I` bumps
//! the version and keeps the value, but `mg` shows no `X`, `W` or `Z`
//! after it; `N` and `R` win every time they apply), and hit-before /
//! last-access (`h0`, `l0`). A base64 key must decode to bytes a text key
//! may hold, since the store is reached through the text protocol.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Current, Eventual};
use crate::backend::BackendError;
use crate::protocol::{
    ClientError, ItemView, MetaCmd, MetaCode, MetaReply, MetaRequest, Response, base64_encode,
};
use crate::rules::meta::{self as rules, Marks, MetaEffect, MetaOutcome};
use crate::rules::{Clock, Effect, Item};
use crate::time::unix_ms;

fn reply(code: MetaCode, rest: BytesMut, value: Option<Bytes>) -> Response {
    Response::Meta(MetaReply {
        code,
        rest: rest.freeze(),
        value,
    })
}

/// The text rules' effect for a meta effect: the value and its deadline
/// are what replicate.
fn text_effect(effect: MetaEffect, item: Option<&Item>) -> Effect {
    match effect {
        MetaEffect::Keep => Effect::Keep,
        MetaEffect::Put { value, .. } => Effect::Put(value),
        MetaEffect::Remove => Effect::Remove,
        MetaEffect::Mark { deadline, .. } if item.is_some_and(|i| i.deadline != deadline) => {
            Effect::Touch { deadline }
        }
        MetaEffect::Mark { .. } => Effect::Keep,
        // Re-written under a new version: a new CAS, as memcached gives.
        MetaEffect::Invalidate { deadline, .. } => Effect::Touch { deadline },
    }
}

impl Eventual {
    /// Runs one meta request on the local replica, logging its writes.
    pub(super) async fn meta(&self, req: MetaRequest) -> Result<Response, BackendError> {
        if req.key.iter().any(|&b| b <= b' ' || b == 0x7f) {
            return Ok(ClientError::BadCommandLine.into());
        }
        let clock = Clock::unix(unix_ms());
        let _g = self.stripe(&req.key).lock().await;
        let cur = self.live(&req.key, true).await?;
        let item = cur.as_ref().map(Current::item);
        let current = item.as_ref().map(|item| rules::Current {
            item,
            marks: Marks::default(),
        });
        let out = match req.cmd {
            MetaCmd::Get => rules::get(&req, current, clock),
            MetaCmd::Set => rules::set(&req, current, clock),
            MetaCmd::Delete => rules::delete(&req, current, clock),
            MetaCmd::Arith => rules::arith(&req, current, clock),
            MetaCmd::Debug => return Ok(debug(&req, item.as_ref(), clock)),
        };
        let code = match out.code {
            Ok(code) => code,
            Err(e) => return Ok(e.into()),
        };
        // A write decided on a CAS compare stays conditional on the CAS it
        // was decided on, as the text `cas` does.
        let guard = match (&out.effect, req.flags.compare_cas, &item) {
            (MetaEffect::Put { .. }, Some(_), Some(item)) => Some(item.cas),
            _ => None,
        };
        let effect = text_effect(out.effect.clone(), item.as_ref());
        let wrote = !matches!(effect, Effect::Keep);
        let written = self
            .carry_out(
                &req.key,
                cur,
                crate::rules::Outcome {
                    reply: Response::Stored,
                    effect,
                },
                guard,
            )
            .await?;
        if written != Response::Stored {
            // The store's CAS moved between the read and the write.
            return Ok(reply(MetaCode::Ex, req.status_flags(0), None));
        }
        if out.hidden {
            return Ok(Response::Quiet);
        }
        let after = if wrote && req.tokens.iter().any(|t| t[0] == b'c') {
            self.live(&req.key, true).await?
        } else {
            None
        };
        let new_cas = after.and_then(|c| c.cas).unwrap_or(0);
        Ok(self.answer(&req, code, &out, item.as_ref(), new_cas, clock))
    }

    /// The reply line (and value) for a decided meta request.
    fn answer(
        &self,
        req: &MetaRequest,
        code: MetaCode,
        out: &MetaOutcome,
        item: Option<&Item>,
        new_cas: u64,
        clock: Clock,
    ) -> Response {
        let now = clock.now_ms;
        match (req.cmd, code) {
            (MetaCmd::Get, MetaCode::Hd | MetaCode::Va) => {
                let empty = Item {
                    flags: 0,
                    data: Bytes::new(),
                    deadline: None,
                    cas: new_cas,
                };
                let item = item.unwrap_or(&empty);
                let view = ItemView {
                    key: &req.key,
                    key_binary: req.flags.base64,
                    cas: item.cas,
                    client_flags: item.flags,
                    size: item.data.len(),
                    ttl: rules::secs_left(item.deadline, now),
                    last_access: 0,
                    fetched: false,
                };
                let mut rest = req.hit_flags(&view, rules::ttl_changes(req, clock, out.created));
                if out.won {
                    rest.put_slice(b" W");
                }
                let value = req.flags.value.then(|| item.data.clone());
                reply(code, rest, value)
            }
            (MetaCmd::Arith, MetaCode::Hd | MetaCode::Va) => {
                let n = out.number.unwrap_or(0);
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
            (MetaCmd::Set, MetaCode::Hd) => reply(code, req.status_flags(new_cas), None),
            _ => reply(code, req.status_flags(0), None),
        }
    }
}

/// `me`: the fields memcached writes, from the replica's value (size and
/// class as memcached sizes the value); `la` and `fetch` are not kept in
/// this mode (0, `no`).
fn debug(req: &MetaRequest, item: Option<&Item>, clock: Clock) -> Response {
    let Some(item) = item else {
        return reply(MetaCode::En, BytesMut::new(), None);
    };
    let key = if req.flags.base64 {
        base64_encode(&req.key).into_bytes()
    } else {
        req.key.to_vec()
    };
    let exp = rules::secs_left(item.deadline, clock.now_ms).map_or(-1, |s| -s);
    let size = rules::memcached_item_size(req.key.len(), item.data.len(), item.flags);
    let mut rest = BytesMut::new();
    rest.put_u8(b' ');
    rest.put_slice(&key);
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
