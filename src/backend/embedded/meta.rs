//! The embedded store's meta commands: what `mg ms md ma me` answer and do
//! is decided by [`crate::rules::meta`]; this carries it out on a shard and
//! writes the reply, keeping the per-item metadata (hit, last access, stale
//! and token marks, base64 key) that only the meta protocol shows.

use bytes::{BufMut, Bytes, BytesMut};

use super::{EmbeddedStore, Entry, EntryMeta, Shard, Tally, View, cost, out_of_memory};
use crate::protocol::{
    ItemView, MetaCmd, MetaCode, MetaReply, MetaRequest, Response, base64_encode,
};
use crate::rules::Item;
use crate::rules::meta::{self as rules, Current, MetaEffect};

fn reply(code: MetaCode, rest: BytesMut, value: Option<Bytes>) -> Response {
    Response::Meta(MetaReply {
        code,
        rest: rest.freeze(),
        value,
    })
}

impl EmbeddedStore {
    pub(super) fn meta(&self, req: &MetaRequest) -> Response {
        match req.cmd {
            MetaCmd::Get => self.meta_get(req),
            MetaCmd::Set => self.meta_set(req),
            MetaCmd::Delete => self.meta_delete(req),
            MetaCmd::Arith => self.meta_arith(req),
            MetaCmd::Debug => self.meta_debug(req),
        }
    }

    /// The live item under the request's key, copied with its metadata.
    fn meta_current(&self, shard: &mut Shard, key: &[u8], view: View) -> Option<(Item, EntryMeta)> {
        shard
            .live(key, view, &self.tally)
            .map(|entry| (entry.item.clone(), entry.meta))
    }

    /// Carries out a meta effect; returns the CAS of the value now under
    /// the key (0 if none was written).
    fn meta_apply(
        &self,
        shard: &mut Shard,
        req: &MetaRequest,
        effect: MetaEffect,
        kept: Option<EntryMeta>,
        view: View,
    ) -> u64 {
        let now = view.clock.now_ms;
        match effect {
            MetaEffect::Keep => 0,
            MetaEffect::Put { value, marks } => {
                let cas = self.next_cas();
                let mut meta = kept.unwrap_or_else(|| EntryMeta::new(now));
                meta.marks = marks;
                if kept.is_none() {
                    // Only an item `ms` allocates carries the request's
                    // base64 mark; append, prepend and vivified items are
                    // allocated without it.
                    meta.key_binary = req.flags.base64
                        && req.cmd == MetaCmd::Set
                        && matches!(
                            req.set_mode(),
                            Some(crate::protocol::SetMode::Set)
                                | Some(crate::protocol::SetMode::Add)
                                | Some(crate::protocol::SetMode::Replace)
                        );
                }
                let entry = Entry {
                    item: Item {
                        flags: value.flags,
                        data: Bytes::copy_from_slice(&value.data),
                        deadline: value.deadline,
                        cas,
                    },
                    stored_at: now,
                    meta,
                };
                shard.insert(Bytes::copy_from_slice(&req.key), entry, view, &self.tally);
                cas
            }
            MetaEffect::Mark { deadline, marks } => {
                if let Some(entry) = shard.items.peek_mut(&req.key[..]) {
                    entry.item.deadline = deadline;
                    entry.meta.marks = marks;
                    return entry.item.cas;
                }
                0
            }
            MetaEffect::Invalidate { deadline, marks } => {
                let cas = self.next_cas();
                if let Some(entry) = shard.items.peek_mut(&req.key[..]) {
                    entry.item.deadline = deadline;
                    entry.item.cas = cas;
                    entry.meta.marks = marks;
                }
                cas
            }
            MetaEffect::Remove => {
                shard.remove(&req.key);
                0
            }
        }
    }

    fn meta_get(&self, req: &MetaRequest) -> Response {
        let view = self.view();
        let now = view.clock.now_ms;
        let mut shard = self.shard(&req.key);
        let current = self.meta_current(&mut shard, &req.key, view);
        let out = rules::get(
            req,
            current.as_ref().map(|(item, meta)| Current {
                item,
                marks: meta.marks,
            }),
            view.clock,
        );
        if out.hidden {
            return Response::Quiet;
        }
        let code = match out.code {
            Ok(code) => code,
            Err(e) => return e.into(),
        };
        if code == MetaCode::En {
            return reply(code, req.status_flags(0), None);
        }
        let created = out.created;
        let cas = self.meta_apply(&mut shard, req, out.effect.clone(), None, view);
        let (item, meta) = match current {
            Some(c) => c,
            None => (
                Item {
                    flags: 0,
                    data: Bytes::new(),
                    deadline: None,
                    cas,
                },
                EntryMeta {
                    key_binary: req.flags.base64,
                    ..EntryMeta::new(now)
                },
            ),
        };
        if !req.flags.no_bump
            && let Some(entry) = shard.items.peek_mut(&req.key[..])
        {
            entry.meta.bump(now);
        }
        let changes = rules::ttl_changes(req, view.clock, created);
        let item_view = ItemView {
            key: &req.key,
            key_binary: meta.key_binary,
            cas: item.cas,
            client_flags: item.flags,
            size: item.data.len(),
            ttl: rules::secs_left(item.deadline, now),
            last_access: now.saturating_sub(meta.accessed_at) / 1000,
            fetched: meta.fetched,
        };
        let mut rest = req.hit_flags(&item_view, changes);
        rules::put_marks(&mut rest, out.token_was_sent, out.stale, out.won);
        let value = req.flags.value.then(|| item.data.clone());
        reply(code, rest, value)
    }

    fn meta_set(&self, req: &MetaRequest) -> Response {
        let view = self.view();
        let mut shard = self.shard(&req.key);
        if cost(req.key.len(), req.data.len()) > shard.limit {
            // As memcached: the failed write takes the old value with it.
            shard.remove(&req.key);
            Tally::add(&self.tally.outofmemory, 1);
            return out_of_memory();
        }
        let current = self.meta_current(&mut shard, &req.key, view);
        let out = rules::set(
            req,
            current.as_ref().map(|(item, meta)| Current {
                item,
                marks: meta.marks,
            }),
            view.clock,
        );
        if let MetaEffect::Put { value, .. } = &out.effect
            && cost(req.key.len(), value.data.len()) > shard.limit
        {
            return reply(MetaCode::Ns, req.status_flags(0), None);
        }
        let stored = out.code == Ok(MetaCode::Hd);
        let cas = match out.effect {
            // Stored already expired: linked under a CAS, never shown.
            MetaEffect::Remove => {
                shard.remove(&req.key);
                self.next_cas()
            }
            effect => self.meta_apply(&mut shard, req, effect, None, view),
        };
        if stored {
            self.total_items
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if out.hidden {
            return Response::Quiet;
        }
        let code = out.code.unwrap_or(MetaCode::Ns);
        reply(code, req.status_flags(if stored { cas } else { 0 }), None)
    }

    fn meta_delete(&self, req: &MetaRequest) -> Response {
        let view = self.view();
        let mut shard = self.shard(&req.key);
        let current = self.meta_current(&mut shard, &req.key, view);
        let out = rules::delete(
            req,
            current.as_ref().map(|(item, meta)| Current {
                item,
                marks: meta.marks,
            }),
            view.clock,
        );
        self.meta_apply(&mut shard, req, out.effect.clone(), None, view);
        if out.hidden {
            return Response::Quiet;
        }
        let code = out.code.unwrap_or(MetaCode::Nf);
        reply(code, req.status_flags(0), None)
    }

    fn meta_arith(&self, req: &MetaRequest) -> Response {
        let view = self.view();
        let mut shard = self.shard(&req.key);
        let current = self.meta_current(&mut shard, &req.key, view);
        let out = rules::arith(
            req,
            current.as_ref().map(|(item, meta)| Current {
                item,
                marks: meta.marks,
            }),
            view.clock,
        );
        let code = match out.code {
            Ok(code) => code,
            Err(e) => return e.into(),
        };
        if let MetaEffect::Put { value, .. } = &out.effect
            && cost(req.key.len(), value.data.len()) > shard.limit
        {
            Tally::add(&self.tally.outofmemory, 1);
            return Response::server_error("out of memory");
        }
        let Some(n) = out.number else {
            return reply(code, req.status_flags(0), None);
        };
        // A number that fits the old value is rewritten in place and the
        // item keeps its metadata; a longer one is a new item.
        let kept = current.as_ref().and_then(|(old, meta)| match &out.effect {
            MetaEffect::Put { value, .. } if value.data.len() <= old.data.len() => Some(*meta),
            _ => None,
        });
        let cas = match out.effect.clone() {
            MetaEffect::Remove => {
                shard.remove(&req.key);
                self.next_cas()
            }
            effect => self.meta_apply(&mut shard, req, effect, kept, view),
        };
        if out.hidden {
            return Response::Quiet;
        }
        let (rest, value) = rules::arith_reply(
            req,
            code,
            n,
            cas,
            out.deadline_before,
            out.created,
            view.clock,
        );
        reply(code, rest, value)
    }

    /// `me`: `ME <key> exp= la= cas= fetch= cls= size=` as memcached
    /// writes it (its slab class and item size computed as memcached
    /// sizes items), or `EN`. No bump.
    fn meta_debug(&self, req: &MetaRequest) -> Response {
        let view = self.view();
        let now = view.clock.now_ms;
        let mut shard = self.shard(&req.key);
        let Some((item, meta)) = self.meta_current(&mut shard, &req.key, view) else {
            return reply(MetaCode::En, BytesMut::new(), None);
        };
        let mut rest = BytesMut::new();
        rest.put_u8(b' ');
        if meta.key_binary {
            rest.put_slice(base64_encode(&req.key).as_bytes());
        } else {
            rest.put_slice(&req.key);
        }
        let exp = rules::secs_left(item.deadline, now).map_or(-1, |s| -s);
        let size = rules::memcached_item_size(req.key.len(), item.data.len(), item.flags);
        let line = format!(
            " exp={exp} la={} cas={} fetch={} cls={} size={size}",
            now.saturating_sub(meta.accessed_at) / 1000,
            item.cas,
            if meta.fetched { "yes" } else { "no" },
            rules::memcached_slab_class(size),
        );
        rest.put_slice(line.as_bytes());
        reply(MetaCode::Me, rest, None)
    }
}

#[cfg(test)]
mod tests {
    //! What the differential test cannot pin down: values that read the
    //! clock (`t`, `l`, `me`'s `exp=` and `la=`), on a paused clock.

    use std::time::Duration;

    use super::*;
    use crate::protocol::{Incoming, Limits, Parsed, encode_response, parse_request};

    fn run(s: &EmbeddedStore, line: &str) -> String {
        let Parsed::Request {
            request: Incoming::Data(r),
            ..
        } = parse_request(line.as_bytes(), &Limits::default())
        else {
            panic!("{line:?}")
        };
        let mut out = BytesMut::new();
        encode_response(&s.execute(&r), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_and_last_access_follow_the_clock() {
        let s = EmbeddedStore::new(1 << 24);
        assert_eq!(run(&s, "ms k 1 T100\r\nv\r\n"), "HD\r\n");
        tokio::time::advance(Duration::from_secs(30)).await;
        // First read: fetched, access time kept; `h`/`l` show the state
        // before this read.
        assert_eq!(run(&s, "mg k t h l\r\n"), "HD t70 h0 l30\r\n");
        // Second read: active, access time moves to now.
        assert_eq!(run(&s, "mg k h l\r\n"), "HD h1 l30\r\n");
        assert_eq!(run(&s, "mg k h l\r\n"), "HD h1 l0\r\n");
        tokio::time::advance(Duration::from_secs(5)).await;
        let me = run(&s, "me k\r\n");
        assert!(
            me.starts_with("ME k exp=-65 la=5 cas=1 fetch=yes cls=1 size=61"),
            "{me}"
        );
        // `u` reads without a bump; `T` then `t` shows the new TTL, `t`
        // then `T` the old one.
        assert_eq!(run(&s, "mg k u t T10\r\n"), "HD t65\r\n");
        assert_eq!(run(&s, "mg k T20 t\r\n"), "HD t20\r\n");
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(run(&s, "mg k\r\n"), "EN\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_vivified_counter_reports_its_ttl_after_n() {
        let s = EmbeddedStore::new(1 << 24);
        // As memcached 1.6.18: a `t` before `N` reports -1.
        assert_eq!(run(&s, "ma c v t N300 J5\r\n"), "VA 1 t-1\r\n5\r\n");
        assert_eq!(run(&s, "ma c v t\r\n"), "VA 1 t300\r\n6\r\n");
        assert_eq!(run(&s, "ma c v N300 t\r\n"), "VA 1 t300\r\n7\r\n");
    }

    #[tokio::test]
    async fn what_keeps_and_what_resets_the_hit_mark() {
        // As memcached 1.6.18: touch reads with a bump; a number rewritten
        // in place keeps the item's marks, a longer one is a new item; an
        // item `ms b` allocates keeps its base64 mark, a vivified one not.
        let s = EmbeddedStore::new(1 << 24);
        let fetch = |s: &EmbeddedStore, key: &str| {
            let me = run(s, &format!("me {key}\r\n"));
            me.contains("fetch=yes")
        };
        assert_eq!(run(&s, "ms n 1\r\n1\r\n"), "HD\r\n");
        assert!(!fetch(&s, "n"));
        run(&s, "touch n 100\r\n");
        assert!(fetch(&s, "n"), "touch bumps");
        run(&s, "incr n 2\r\n");
        run(&s, "ma n\r\n");
        assert!(fetch(&s, "n"), "rewritten in place");
        run(&s, "ma n D6\r\n");
        assert!(!fetch(&s, "n"), "10 is longer than 4: a new item");
        assert_eq!(run(&s, "ms YWJj 1 b\r\nx\r\n"), "HD\r\n");
        assert!(run(&s, "me abc\r\n").starts_with("ME YWJj "));
        assert_eq!(run(&s, "ma YWJk b N0\r\n"), "HD\r\n");
        assert!(run(&s, "me abd\r\n").starts_with("ME abd "));
    }
}
