//! The sequential specification of one memcached key: what a single
//! memcached 1.6 answers to each command, given what the key holds.
//!
//! ## CAS tokens
//!
//! The store hands out tokens the checker cannot predict (memcached counts
//! per instance; memdial uses its own versions). What any correct store
//! guarantees is: every write that takes effect gives the item a new token,
//! never reused, and every `gets` of the same item state returns the same
//! token. So the model keeps a *version* — the number of writes that took
//! effect on this key so far — and learns a one-to-one map token ↔ version
//! while the search runs:
//!
//! - a `gets` that returned token `T` while the model is at version `v`
//!   pins `T ↦ v`; it contradicts the model if `T` was already pinned to
//!   another version, or `v` already has another token;
//! - a `cas` with a pinned token stores iff the pin is the current version,
//!   and must answer `EXISTS` otherwise (`NOT_FOUND` on a missing key);
//! - a `cas` with a token nobody pinned yet (taken from another key, or
//!   invented) may store — which pins it to the current version, so the
//!   same token can never store twice — or answer `EXISTS`. The `EXISTS`
//!   case is not checked further: that is the one place the model is more
//!   permissive than the store.
//!
//! The map is part of the state the search memoises, since it decides what
//! later `cas` commands may answer.
//!
//! ## Counters
//!
//! `incr`/`decr` as memcached: the value must be a decimal number (leading
//! spaces, an optional `+`, digits, trailing spaces, at most `u64::MAX`);
//! `incr` wraps at 2^64, `decr` stops at 0; the new number is written in
//! place padded with spaces when it is not longer than the old value
//! (decrementing `10` by 1 leaves `9 `), as memcached and memdial store it.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::{Call, Reply};

/// What one key holds, as far as the answers to later commands depend on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyState {
    /// The value, or `None` when the key is missing.
    pub data: Option<Arc<[u8]>>,
    /// Writes that took effect so far: the item's version.
    pub version: u32,
    /// Tokens learnt so far, as (token, version), sorted by token. Shared
    /// between states until one learns a new token.
    tokens: Arc<Vec<(u64, u32)>>,
    /// An order-independent digest of `tokens`, so that hashing a state
    /// (the search does it for every state it meets) does not walk a map
    /// that grows with the history.
    tokens_digest: u64,
}

impl Hash for KeyState {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.data.hash(state);
        self.version.hash(state);
        self.tokens.len().hash(state);
        self.tokens_digest.hash(state);
    }
}

/// A well-mixed 64-bit image of one learnt pin (splitmix64's finaliser).
fn mix(token: u64, version: u32) -> u64 {
    let mut z = token ^ (u64::from(version) << 32 | u64::from(version)).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl KeyState {
    /// The key before the run: missing. (Tests start on fresh keys.)
    pub fn missing() -> KeyState {
        KeyState::default()
    }

    /// A key holding `data`, with nothing known about tokens: what a
    /// checker falls back to when it stops tracking versions.
    pub fn holding(data: Option<Arc<[u8]>>) -> KeyState {
        KeyState {
            data,
            ..KeyState::default()
        }
    }

    /// The version `token` was pinned to, if any.
    pub fn token_version(&self, token: u64) -> Option<u32> {
        self.tokens
            .binary_search_by_key(&token, |&(t, _)| t)
            .ok()
            .map(|i| self.tokens[i].1)
    }

    /// This state with `token ↦ current version` learnt; `None` when that
    /// contradicts what was learnt before.
    fn pin(&self, token: u64) -> Option<KeyState> {
        match self.tokens.binary_search_by_key(&token, |&(t, _)| t) {
            Ok(i) => (self.tokens[i].1 == self.version).then(|| self.clone()),
            Err(i) => {
                if self.tokens.iter().any(|&(_, v)| v == self.version) {
                    return None; // this version already has another token
                }
                let mut next = self.clone();
                Arc::make_mut(&mut next.tokens).insert(i, (token, self.version));
                next.tokens_digest = next.tokens_digest.wrapping_add(mix(token, self.version));
                Some(next)
            }
        }
    }

    /// The state after a write that leaves `data` (or removes the key).
    fn written(&self, data: Option<Vec<u8>>) -> KeyState {
        KeyState {
            data: data.map(Arc::from),
            version: self.version + 1,
            tokens: Arc::clone(&self.tokens),
            tokens_digest: self.tokens_digest,
        }
    }

    /// The states `call` may lead to when the store answered `reply`
    /// (`None`: the answer never came, so any answer is allowed). Empty when
    /// a single memcached could not have answered `reply` here. Usually one
    /// state; two only for a `cas` with an unpinned token and no reply.
    pub fn step(&self, call: &Call, reply: Option<&Reply>) -> Vec<KeyState> {
        // The one deterministic answer and the state after it.
        let only = |answer: Reply, next: KeyState| -> Vec<KeyState> {
            if reply.is_none_or(|r| *r == answer) {
                vec![next]
            } else {
                Vec::new()
            }
        };
        let current = self.data.as_deref();
        match call {
            Call::Get | Call::Gets => match (reply, current) {
                (None, _) => vec![self.clone()],
                (Some(Reply::Miss), None) => vec![self.clone()],
                (Some(Reply::Hit { data, token }), Some(cur)) if data.as_slice() == cur => {
                    match token {
                        None => vec![self.clone()],
                        Some(t) => self.pin(*t).into_iter().collect(),
                    }
                }
                _ => Vec::new(),
            },
            Call::Set(data) => only(Reply::Stored, self.written(Some(data.clone()))),
            Call::Add(data) => match current {
                None => only(Reply::Stored, self.written(Some(data.clone()))),
                Some(_) => only(Reply::NotStored, self.clone()),
            },
            Call::Replace(data) => match current {
                None => only(Reply::NotStored, self.clone()),
                Some(_) => only(Reply::Stored, self.written(Some(data.clone()))),
            },
            Call::Append(data) | Call::Prepend(data) => match current {
                None => only(Reply::NotStored, self.clone()),
                Some(cur) => {
                    let joined = if matches!(call, Call::Append(_)) {
                        [cur, data].concat()
                    } else {
                        [data.as_slice(), cur].concat()
                    };
                    only(Reply::Stored, self.written(Some(joined)))
                }
            },
            Call::Cas { data, token } => match current {
                None => only(Reply::NotFound, self.clone()),
                Some(_) => match self.token_version(*token) {
                    Some(v) if v == self.version => {
                        only(Reply::Stored, self.written(Some(data.clone())))
                    }
                    Some(_) => only(Reply::Exists, self.clone()),
                    None => {
                        let mut next = Vec::new();
                        if reply.is_none_or(|r| *r == Reply::Stored) {
                            next.extend(self.pin(*token).map(|p| p.written(Some(data.clone()))));
                        }
                        if reply.is_none_or(|r| *r == Reply::Exists) {
                            next.push(self.clone());
                        }
                        next
                    }
                },
            },
            Call::Incr(delta) | Call::Decr(delta) => match current {
                None => only(Reply::NotFound, self.clone()),
                Some(cur) => match arith(cur, matches!(call, Call::Incr(_)), *delta) {
                    None => only(Reply::NonNumeric, self.clone()),
                    Some((n, stored)) => only(Reply::Number(n), self.written(Some(stored))),
                },
            },
            Call::Delete => match current {
                None => only(Reply::NotFound, self.clone()),
                Some(_) => only(Reply::Deleted, self.written(None)),
            },
        }
    }
}

/// memcached's reading of a value as a counter: leading spaces, an optional
/// `+`, decimal digits, then only spaces; `None` for anything else or a
/// number above `u64::MAX`.
pub fn counter(data: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(data).ok()?.trim_start_matches(' ');
    let text = text.strip_prefix('+').unwrap_or(text);
    let digits = text.trim_end_matches(' ');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `incr` (wrapping) or `decr` (stopping at 0) of the counter in `old`:
/// the new number and the bytes memcached stores, padded with spaces to the
/// old length when the number is not longer.
pub fn arith(old: &[u8], incr: bool, delta: u64) -> Option<(u64, Vec<u8>)> {
    let value = counter(old)?;
    let n = if incr {
        value.wrapping_add(delta)
    } else {
        value.saturating_sub(delta)
    };
    let mut text = n.to_string().into_bytes();
    if text.len() < old.len() {
        text.resize(old.len(), b' ');
    }
    Some((n, text))
}
