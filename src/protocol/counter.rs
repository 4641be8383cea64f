//! `incr`/`decr` on a stored value, as memcached computes them. Shared by
//! every store that computes arithmetic itself (the embedded store, the
//! replicated modes).

use bytes::{Bytes, BytesMut};

use super::ArithOp;

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
    use super::*;

    #[test]
    fn memcached_counter_rules() {
        assert_eq!(parse_counter(b" 5"), Some(5));
        assert_eq!(parse_counter(b"+7  "), Some(7));
        for bad in [&b""[..], b"-5", b" 5a", b"184467440737095516150", b"5\t"] {
            assert_eq!(parse_counter(bad), None, "{bad:?}");
        }
        assert_eq!(
            apply_delta(b"10", ArithOp::Decr, 10),
            Some((0, Bytes::from_static(b"0 ")))
        );
        assert_eq!(
            apply_delta(b"99", ArithOp::Incr, 1),
            Some((100, Bytes::from_static(b"100")))
        );
        let (n, data) = apply_delta(b"18446744073709551615", ArithOp::Incr, 1).unwrap();
        assert_eq!((n, data.len()), (0, 20));
    }
}
