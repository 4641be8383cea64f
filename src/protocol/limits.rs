//! The bounds every request is checked against, in one value.

/// memcached's fixed key limit, in bytes.
pub const KEY_MAX_BYTES: usize = 250;

/// Limits applied by the parser. Every one of them bounds memory that a
/// client can make memdial hold before a request is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes (memcached: 250).
    pub max_key_bytes: usize,
    /// Largest value a storage command may carry (memcached `-I`, 1 MiB).
    pub item_size_max: usize,
    /// Longest command line other than the `get` family, `\r\n` excluded.
    /// memcached closes a connection whose partial line passes 2048 bytes.
    pub max_line_bytes: usize,
    /// Longest `get`/`gets`/`gat`/`gats` line (multi-get lines are long).
    pub max_get_line_bytes: usize,
    /// Most keys in one `get` family request.
    pub max_keys_per_get: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: KEY_MAX_BYTES,
            item_size_max: 1024 * 1024,
            max_line_bytes: 2048,
            max_get_line_bytes: 256 * 1024,
            max_keys_per_get: 10_000,
        }
    }
}
