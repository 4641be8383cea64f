//! The bounds every request is checked against, in one value.

/// memcached's fixed key limit, in bytes.
pub const KEY_MAX_BYTES: usize = 250;

/// The longest whole non-get line memcached 1.6.18 answers: its read
/// buffer (16384 bytes) less the `\r\n`.
pub const MEMCACHED_MAX_LINE_BYTES: usize = 16 * 1024 - 2;

/// Limits applied by the parser. Every one of them bounds memory that a
/// client can make memdial hold before a request is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes (memcached: 250).
    pub max_key_bytes: usize,
    /// Largest value a storage command may carry (memcached `-I`, 1 MiB).
    pub item_size_max: usize,
    /// Longest command line other than the `get` family, `\r\n` excluded,
    /// whole or partial. memcached answers a whole line that fits its 16 KiB
    /// read buffer with its `\r\n` (16,382 bytes) and hangs up on a longer
    /// one; it also hangs up on a partial line past 2048 bytes, which
    /// depends on how the line was cut into packets, so memdial waits for
    /// a partial line up to this same limit.
    pub max_line_bytes: usize,
    /// Longest `get`/`gets`/`gat`/`gats` line (multi-get lines are long).
    pub max_get_line_bytes: usize,
    /// Most keys in one `get` family request. memcached has no such limit;
    /// the default lets every key that fits a default get line through.
    pub max_keys_per_get: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: KEY_MAX_BYTES,
            item_size_max: 1024 * 1024,
            max_line_bytes: MEMCACHED_MAX_LINE_BYTES,
            max_get_line_bytes: 256 * 1024,
            // A key and its space take at least two bytes.
            max_keys_per_get: 128 * 1024,
        }
    }
}
