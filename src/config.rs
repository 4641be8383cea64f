//! `proxy.yaml`: the schema, its defaults, `validate()`, and the merge of
//! command-line overrides. Uses serde, clap (for the consistency value on
//! the command line) and `protocol::Limits`, which it fills in; nothing
//! else of the crate.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::Limits;

/// The largest value a cluster can replicate: each travels between peers in
/// one frame of the internal protocol.
pub const MAX_CLUSTER_ITEM_BYTES: usize = 32 * 1024 * 1024;

/// The largest config file read: a path to something endless (`/dev/zero`)
/// or huge is refused instead of filling memory.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// How the nodes of a cluster agree on writes (see `docs/design.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    Linearizable,
    Sequential,
    Eventual,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Linearizable => "linearizable",
            Consistency::Sequential => "sequential",
            Consistency::Eventual => "eventual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub nodes: Vec<NodeConfig>,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub backend: BackendConfig,
    pub runtime: RuntimeConfig,
}

/// How the node's tasks are scheduled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run the node: 1 runs every task on one thread (no
    /// cross-thread wake-ups), more share the tasks out (work-stealing);
    /// 0 picks 1 for a process that runs one node (`serve`) and one per
    /// core for one that runs a whole cluster (`cluster`).
    pub worker_threads: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// Shared secret the peers prove to each other on the internal port.
    pub secret: String,
    pub consistency: Consistency,
    /// How often a node sends each peer a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a peer is suspect.
    pub suspect_after_ms: u64,
    /// Silence after which a peer is down.
    pub down_after_ms: u64,
    /// Longest wait between attempts to reach a peer.
    pub reconnect_max_ms: u64,
    pub peer_connect_timeout_ms: u64,
    /// Writes kept for peers to resume from; a peer further behind gets a
    /// full resync.
    pub replication_backlog: usize,
    /// The same window's bound in bytes of keys and values.
    pub replication_backlog_bytes: usize,
    /// Most entries in one replication frame.
    pub replication_batch: usize,
    /// Least time between two replication messages to a peer, unless the
    /// second is full (`replication_batch` entries): writes gather in the
    /// meantime, and the peer applies them in one store exchange instead
    /// of many. 0 sends each write as soon as the previous message is
    /// acknowledged.
    pub replication_linger_ms: u64,
    /// How long a delete's tombstone is kept (a partition longer than this
    /// may bring a deleted key back).
    pub tombstone_grace_ms: u64,
    /// How often a node checks that its backing store did not restart.
    pub store_check_interval_ms: u64,
    /// How often a node compares its replica with each peer's (a digest
    /// exchange, then a repair of what differs), ±20%; 0 never does.
    pub anti_entropy_interval_ms: u64,
    /// Ordered modes: where each node keeps its Raft log, vote, state and
    /// snapshots, `<data_dir>/node-<id>` unless the node names its own.
    pub data_dir: String,
    /// Ordered modes: how often the leader sends Raft heartbeats.
    pub raft_heartbeat_interval_ms: u64,
    /// Ordered modes: a follower that hears no leader for a random time in
    /// this range starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Ordered modes: the most a client request waits for its outcome.
    pub request_timeout_ms: u64,
    /// Ordered modes: a snapshot is taken after this many log entries.
    pub snapshot_after_entries: u64,
    /// Ordered modes: log entries kept behind the last snapshot.
    pub log_kept_after_snapshot: u64,
    /// Ordered modes: how long the store keeps a value past its deadline,
    /// so that a replica a little behind still decides by it. A replica
    /// more than half of this behind decides in memory until it catches
    /// up (docs/consistency.md).
    pub expired_kept_ms: u64,
}

/// A TCP address as `host:port`, the host an IP address or a name:
/// `127.0.0.1:8000`, `[::1]:8000`, `memdial-1:7000`. A name is resolved
/// when the address is used, never by the config: a listen address when it
/// is bound, a peer's or memcached's at every (re)connect, so a peer whose
/// name now points elsewhere (a restarted container) is found again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct HostPort {
    /// An IP address (IPv6 without brackets) or a host name.
    host: String,
    port: u16,
}

/// Why a `host:port` does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("`{0}` has no port (expected host:port)")]
    MissingPort(String),
    #[error("`{0}` has no valid port (expected a number 0-65535)")]
    BadPort(String),
    #[error("`{0}` has no host (expected host:port)")]
    MissingHost(String),
    #[error(
        "`{0}` has an invalid host (an IP, [IPv6], or a name of letters, digits, `-`, `.`, `_`)"
    )]
    BadHost(String),
}

impl HostPort {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address when the host is an IP, `None` for a name.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    /// What tokio's `bind`/`connect` take: an IP is used as is, a name is
    /// resolved on every call.
    pub fn target(&self) -> (&str, u16) {
        (&self.host, self.port)
    }
}

impl FromStr for HostPort {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<HostPort, AddrError> {
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (v6, port) = rest
                    .split_once(']')
                    .ok_or_else(|| AddrError::BadHost(s.into()))?;
                v6.parse::<Ipv6Addr>()
                    .map_err(|_| AddrError::BadHost(s.into()))?;
                let port = port
                    .strip_prefix(':')
                    .ok_or_else(|| AddrError::MissingPort(s.into()))?;
                (v6, port)
            }
            None => {
                let (host, port) = s
                    .rsplit_once(':')
                    .ok_or_else(|| AddrError::MissingPort(s.into()))?;
                if host.contains(':') {
                    // A bare IPv6 address: which colon starts the port?
                    return Err(AddrError::BadHost(s.into()));
                }
                (host, port)
            }
        };
        if host.is_empty() {
            return Err(AddrError::MissingHost(s.into()));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
        if !host.chars().all(name_char) || host.starts_with(['-', '.']) {
            return Err(AddrError::BadHost(s.into()));
        }
        if port.is_empty() {
            return Err(AddrError::MissingPort(s.into()));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| AddrError::BadPort(s.into()))?;
        Ok(HostPort {
            host: host.into(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    /// Parsed inside the scalar's visit, so that a YAML error names the
    /// field (`nodes[1].internal: ...`), which a `try_from` would not.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HostPort, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HostPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("host:port")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<HostPort, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl From<HostPort> for String {
    fn from(a: HostPort) -> String {
        a.to_string()
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> HostPort {
        HostPort {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One node: where it listens and which memcached backs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u32,
    /// memcached-protocol port for clients.
    pub client: HostPort,
    /// Port for peer traffic (never for clients): this node listens on it
    /// and its peers dial it.
    pub internal: HostPort,
    /// HTTP port for `/metrics`, `/health` and `/ready`.
    pub admin: HostPort,
    /// `host:port` of this node's memcached (a [`HostPort`], kept as text);
    /// absent = the embedded store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memcached: Option<String>,
    /// Ordered modes: this node's data directory; absent =
    /// `<cluster.data_dir>/node-<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest value, in bytes (memcached `-I`).
    pub item_size_max: usize,
    /// Longest command line other than the `get` family (memcached's own
    /// limit, 16,382 bytes, by default).
    pub max_line_bytes: usize,
    /// Longest `get`/`gets`/`gat`/`gats` line.
    pub max_get_line_bytes: usize,
    /// Most keys in one get line (memcached has none; the default takes
    /// every key a default get line holds).
    pub max_keys_per_get: usize,
    /// Client connections open at once; more are answered
    /// `ERROR Too many open connections` and closed.
    pub max_connections: usize,
    /// Requests taken from one connection's buffer per batch.
    pub max_pipeline_depth: usize,
    /// Memory for the embedded store's items.
    pub embedded_memory_bytes: usize,
    /// Replies of one connection produced and not yet written: past this a
    /// connection's replies are written before more of its requests run,
    /// and nothing more is read from it until they are.
    pub connection_reply_buffer_bytes: usize,
    /// The same across all connections of a node: past it, connections wait
    /// before running more requests until replies drain.
    pub node_reply_buffer_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Close a client connection idle this long; 0 never does.
    pub idle_timeout_ms: u64,
    /// Close a client that has taken none of its replies for this long
    /// (its writes made no progress); 0 never does.
    pub write_stall_timeout_ms: u64,
    pub backend_connect_timeout_ms: u64,
    pub backend_request_timeout_ms: u64,
    /// Longest wait for a free pooled backend connection.
    pub backend_pool_wait_ms: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Connections to each node's memcached that carry every client's
    /// requests, multiplexed; 0 sends each client batch alone on a pooled
    /// connection instead (`pool_size` of them).
    pub multiplexed_connections: usize,
    /// Pooled connections to each node's memcached, when
    /// `multiplexed_connections` is 0.
    pub pool_size: usize,
    /// Send consecutive `get`s (or `gets`) queued on a multiplexed
    /// connection as one multi-key line, and split its reply by key
    /// (`backend/mux.rs`). Needs a backend that answers a multi-key `get`
    /// in key order, as memcached does.
    pub join_gets: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: "memdial".into(),
            secret: "change-me".into(),
            consistency: Consistency::Eventual,
            heartbeat_interval_ms: 200,
            suspect_after_ms: 1000,
            down_after_ms: 3000,
            reconnect_max_ms: 2000,
            peer_connect_timeout_ms: 1000,
            replication_backlog: 100_000,
            replication_backlog_bytes: 64 * 1024 * 1024,
            replication_batch: 512,
            replication_linger_ms: 5,
            tombstone_grace_ms: 600_000,
            store_check_interval_ms: 1000,
            anti_entropy_interval_ms: 30_000,
            data_dir: "memdial-data".into(),
            raft_heartbeat_interval_ms: 100,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            request_timeout_ms: 3000,
            snapshot_after_entries: 50_000,
            log_kept_after_snapshot: 5_000,
            expired_kept_ms: 60_000,
        }
    }
}

impl NodeConfig {
    /// Node `id` on the default ports of `DESIGN.md` (8000+, 7000+, 9000+).
    pub fn local(id: u32) -> NodeConfig {
        let port = |base: u16| {
            let offset = u16::try_from(id.saturating_sub(1)).unwrap_or(0);
            HostPort::from(SocketAddr::from((
                [127, 0, 0, 1],
                base.saturating_add(offset),
            )))
        };
        NodeConfig {
            id,
            client: port(8000),
            internal: port(7000),
            admin: port(9000),
            memcached: None,
            data_dir: None,
        }
    }
}

impl Default for Config {
    /// One node on 127.0.0.1:8000 with the embedded store.
    fn default() -> Self {
        Config {
            cluster: ClusterConfig::default(),
            nodes: vec![NodeConfig::local(1)],
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            backend: BackendConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        LimitsConfig {
            item_size_max: l.item_size_max,
            max_line_bytes: l.max_line_bytes,
            max_get_line_bytes: l.max_get_line_bytes,
            max_keys_per_get: l.max_keys_per_get,
            max_connections: 1024,
            max_pipeline_depth: 128,
            embedded_memory_bytes: 64 * 1024 * 1024,
            connection_reply_buffer_bytes: 4 * 1024 * 1024,
            node_reply_buffer_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            idle_timeout_ms: 0,
            write_stall_timeout_ms: 30_000,
            backend_connect_timeout_ms: 1000,
            backend_request_timeout_ms: 2000,
            backend_pool_wait_ms: 1000,
            shutdown_grace_ms: 5000,
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            multiplexed_connections: 2,
            pool_size: 16,
            join_gets: true,
        }
    }
}

/// A config that cannot be used, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes, the most a config may hold")]
    TooLarge { path: String },
    #[error("parsing {path}")]
    Parse {
        path: String,
        source: serde_yaml_ng::Error,
    },
    #[error("invalid config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let read_error = |source| ConfigError::Read {
            path: shown.clone(),
            source,
        };
        // One byte past the cap tells a file at the cap from a larger one.
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(read_error)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: shown });
        }
        let config = Config::from_yaml(&text).map_err(|source| ConfigError::Parse {
            path: shown,
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Config, serde_yaml_ng::Error> {
        serde_yaml_ng::from_str(text)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }

    /// Checks what serde cannot: ranges, uniqueness, cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster.name.is_empty() {
            return Err(invalid("cluster.name", "must not be empty"));
        }
        if self.nodes.is_empty() {
            return Err(invalid("nodes", "at least one node is needed"));
        }
        let mut seen_ids = std::collections::HashSet::new();
        let mut seen_addrs = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.id == 0 {
                return Err(invalid(format!("nodes[{i}].id"), "must be at least 1"));
            }
            if !seen_ids.insert(n.id) {
                return Err(invalid(
                    format!("nodes[{i}].id"),
                    format!("{} is used twice", n.id),
                ));
            }
            for (name, addr) in [
                ("client", &n.client),
                ("internal", &n.internal),
                ("admin", &n.admin),
            ] {
                // Only the text is compared: two names for one address are
                // found when the second bind fails.
                if addr.port() != 0 && !seen_addrs.insert(addr) {
                    return Err(invalid(
                        format!("nodes[{i}].{name}"),
                        format!("{addr} is used twice"),
                    ));
                }
            }
            if self.nodes.len() > 1 && n.internal.port() == 0 {
                return Err(invalid(
                    format!("nodes[{i}].internal"),
                    "port 0 cannot be dialled by peers",
                ));
            }
            if let Some(m) = &n.memcached {
                match m.parse::<HostPort>() {
                    Err(e) => return Err(invalid(format!("nodes[{i}].memcached"), e.to_string())),
                    Ok(a) if a.port() == 0 => {
                        return Err(invalid(
                            format!("nodes[{i}].memcached"),
                            "port 0 cannot be dialled",
                        ));
                    }
                    Ok(_) => {}
                }
            }
        }
        let l = &self.limits;
        let positive = [
            ("limits.item_size_max", l.item_size_max),
            ("limits.max_line_bytes", l.max_line_bytes),
            ("limits.max_get_line_bytes", l.max_get_line_bytes),
            ("limits.max_keys_per_get", l.max_keys_per_get),
            ("limits.max_connections", l.max_connections),
            ("limits.max_pipeline_depth", l.max_pipeline_depth),
            ("limits.embedded_memory_bytes", l.embedded_memory_bytes),
            (
                "limits.connection_reply_buffer_bytes",
                l.connection_reply_buffer_bytes,
            ),
            ("limits.node_reply_buffer_bytes", l.node_reply_buffer_bytes),
            ("backend.pool_size", self.backend.pool_size),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if l.item_size_max > 1024 * 1024 * 1024 {
            return Err(invalid("limits.item_size_max", "must be at most 1 GiB"));
        }
        if l.node_reply_buffer_bytes < l.connection_reply_buffer_bytes {
            return Err(invalid(
                "limits.node_reply_buffer_bytes",
                "must be at least limits.connection_reply_buffer_bytes",
            ));
        }
        if l.node_reply_buffer_bytes > u32::MAX as usize {
            return Err(invalid(
                "limits.node_reply_buffer_bytes",
                "must be below 4 GiB",
            ));
        }
        if l.max_line_bytes < 512 {
            return Err(invalid("limits.max_line_bytes", "must be at least 512"));
        }
        if l.max_get_line_bytes < l.max_line_bytes {
            return Err(invalid(
                "limits.max_get_line_bytes",
                "must be at least limits.max_line_bytes",
            ));
        }
        let c = &self.cluster;
        for (field, v) in [
            ("cluster.heartbeat_interval_ms", c.heartbeat_interval_ms),
            ("cluster.reconnect_max_ms", c.reconnect_max_ms),
            ("cluster.peer_connect_timeout_ms", c.peer_connect_timeout_ms),
            ("cluster.replication_backlog", c.replication_backlog as u64),
            (
                "cluster.replication_backlog_bytes",
                c.replication_backlog_bytes as u64,
            ),
            ("cluster.replication_batch", c.replication_batch as u64),
            ("cluster.store_check_interval_ms", c.store_check_interval_ms),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if c.suspect_after_ms <= c.heartbeat_interval_ms {
            return Err(invalid(
                "cluster.suspect_after_ms",
                "must exceed cluster.heartbeat_interval_ms",
            ));
        }
        if c.down_after_ms <= c.suspect_after_ms {
            return Err(invalid(
                "cluster.down_after_ms",
                "must exceed cluster.suspect_after_ms",
            ));
        }
        for (field, v) in [
            (
                "cluster.raft_heartbeat_interval_ms",
                c.raft_heartbeat_interval_ms,
            ),
            ("cluster.request_timeout_ms", c.request_timeout_ms),
            ("cluster.snapshot_after_entries", c.snapshot_after_entries),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if c.expired_kept_ms < 10_000 {
            return Err(invalid(
                "cluster.expired_kept_ms",
                "must be at least 10000 (10 s)",
            ));
        }
        if c.election_timeout_min_ms < 2 * c.raft_heartbeat_interval_ms {
            return Err(invalid(
                "cluster.election_timeout_min_ms",
                "must be at least twice cluster.raft_heartbeat_interval_ms",
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(invalid(
                "cluster.election_timeout_max_ms",
                "must exceed cluster.election_timeout_min_ms",
            ));
        }
        if c.replication_linger_ms >= c.heartbeat_interval_ms {
            return Err(invalid(
                "cluster.replication_linger_ms",
                "must be less than cluster.heartbeat_interval_ms",
            ));
        }
        if c.anti_entropy_interval_ms != 0 && c.anti_entropy_interval_ms < 100 {
            return Err(invalid(
                "cluster.anti_entropy_interval_ms",
                "must be 0 (never) or at least 100",
            ));
        }
        if self.nodes.len() > 1 && self.limits.item_size_max > MAX_CLUSTER_ITEM_BYTES {
            return Err(invalid(
                "limits.item_size_max",
                "must be at most 32 MiB in a cluster (values travel between peers in one frame)",
            ));
        }
        if self.nodes.len() > 1 && c.secret.is_empty() {
            return Err(invalid("cluster.secret", "must not be empty"));
        }
        let t = &self.timeouts;
        for (field, v) in [
            (
                "timeouts.backend_connect_timeout_ms",
                t.backend_connect_timeout_ms,
            ),
            (
                "timeouts.backend_request_timeout_ms",
                t.backend_request_timeout_ms,
            ),
            ("timeouts.backend_pool_wait_ms", t.backend_pool_wait_ms),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        Ok(())
    }

    /// The node with this id.
    pub fn node(&self, id: u32) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| invalid("--node", format!("no node with id {id} in nodes")))
    }

    /// Where node `id` keeps its Raft data (ordered modes).
    pub fn data_dir(&self, id: u32) -> Result<std::path::PathBuf, ConfigError> {
        let node = self.node(id)?;
        Ok(match &node.data_dir {
            Some(dir) => dir.into(),
            None => std::path::Path::new(&self.cluster.data_dir).join(format!("node-{id}")),
        })
    }

    /// File descriptors one node needs besides its client connections:
    /// listeners, backend pool, peer links, admin requests, refusals in
    /// flight and the runtime's own.
    pub fn fds_besides_clients(&self) -> u64 {
        64 + self
            .backend
            .pool_size
            .max(self.backend.multiplexed_connections) as u64
            + 4 * self.nodes.len() as u64
    }

    pub fn protocol_limits(&self) -> Limits {
        Limits {
            item_size_max: self.limits.item_size_max,
            max_line_bytes: self.limits.max_line_bytes,
            max_get_line_bytes: self.limits.max_get_line_bytes,
            max_keys_per_get: self.limits.max_keys_per_get,
            ..Limits::default()
        }
    }
}

impl TimeoutsConfig {
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms))
    }

    pub fn write_stall_timeout(&self) -> Option<Duration> {
        (self.write_stall_timeout_ms > 0)
            .then(|| Duration::from_millis(self.write_stall_timeout_ms))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_is_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(Config::from_yaml(&c.to_yaml()).unwrap(), c);
    }

    #[test]
    fn the_repo_proxy_yaml_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.node(1).unwrap().client.port(), 8000);
        assert_eq!(
            c.node(3).unwrap().memcached.as_deref(),
            Some("127.0.0.1:11203")
        );
    }

    #[test]
    fn addresses_take_ips_and_host_names() {
        for (text, host, port) in [
            ("127.0.0.1:8000", "127.0.0.1", 8000),
            ("0.0.0.0:0", "0.0.0.0", 0),
            ("[::1]:7000", "::1", 7000),
            ("localhost:11211", "localhost", 11211),
            ("memdial-1:7000", "memdial-1", 7000),
            (
                "memcached_1.internal.example:11211",
                "memcached_1.internal.example",
                11211,
            ),
        ] {
            let a: HostPort = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((a.host(), a.port()), (host, port), "{text}");
            assert_eq!(a.to_string(), text, "displays as written");
        }
        let ip: HostPort = "[::1]:7000".parse().unwrap();
        assert_eq!(ip.socket_addr(), Some("[::1]:7000".parse().unwrap()));
        let name: HostPort = "memdial-1:7000".parse().unwrap();
        assert_eq!(name.socket_addr(), None);
        for (text, want) in [
            ("memdial-1", AddrError::MissingPort("memdial-1".into())),
            ("memdial-1:", AddrError::MissingPort("memdial-1:".into())),
            ("[::1]", AddrError::MissingPort("[::1]".into())),
            (":7000", AddrError::MissingHost(":7000".into())),
            (
                "memdial-1:70000",
                AddrError::BadPort("memdial-1:70000".into()),
            ),
            ("memdial-1:x", AddrError::BadPort("memdial-1:x".into())),
            ("::1:7000", AddrError::BadHost("::1:7000".into())),
            ("[nope]:7000", AddrError::BadHost("[nope]:7000".into())),
            ("mem dial:7000", AddrError::BadHost("mem dial:7000".into())),
            ("http://x:7000", AddrError::BadHost("http://x:7000".into())),
        ] {
            assert_eq!(text.parse::<HostPort>(), Err(want), "{text}");
        }
    }

    #[test]
    fn a_config_naming_hosts_loads_and_round_trips() {
        let yaml = "cluster:\n  secret: s\nnodes:\n\
                    - {id: 1, client: 0.0.0.0:8000, internal: memdial-1:7000, admin: '[::]:9000', memcached: memcached-1:11211}\n\
                    - {id: 2, client: 0.0.0.0:8001, internal: memdial-2:7001, admin: 0.0.0.0:9001, memcached: 'memcached-2:11211'}\n";
        let c = Config::from_yaml(yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.node(1).unwrap().internal.target(), ("memdial-1", 7000));
        assert_eq!(c.node(1).unwrap().admin.target(), ("::", 9000));
        assert_eq!(Config::from_yaml(&c.to_yaml()).unwrap(), c);
        assert!(
            c.to_yaml().contains("internal: memdial-2:7001"),
            "{}",
            c.to_yaml()
        );
        // A parse error names the field.
        let bad = yaml.replace("internal: memdial-2:7001", "internal: memdial-2");
        let err = Config::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.contains("nodes[1].internal"), "{err}");
        assert!(err.contains("has no port"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::from_yaml("limits:\n  item_size_maxx: 5\n").unwrap_err();
        assert!(err.to_string().contains("item_size_maxx"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut c = Config::default();
        c.limits.max_pipeline_depth = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("limits.max_pipeline_depth")
        );
        let mut c = Config::default();
        c.nodes.push(NodeConfig::local(1));
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("nodes[1].id")
        );
        let mut c = Config::default();
        c.cluster.anti_entropy_interval_ms = 10;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cluster.anti_entropy_interval_ms")
        );
        c.cluster.anti_entropy_interval_ms = 0;
        c.validate().unwrap();
        let mut c = Config::default();
        c.cluster.replication_linger_ms = c.cluster.heartbeat_interval_ms;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cluster.replication_linger_ms")
        );
        c.cluster.replication_linger_ms = 0;
        c.validate().unwrap();
        let mut c = Config::default();
        c.nodes[0].memcached = Some("nohost".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("nodes[0].memcached")
        );
        for (memcached, reason) in [
            ("memcached-1", "has no port"),
            ("memcached-1:0", "port 0"),
            (":11211", "has no host"),
        ] {
            let mut c = Config::default();
            c.nodes[0].memcached = Some(memcached.into());
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("nodes[0].memcached") && err.contains(reason),
                "{err}"
            );
        }
        let mut c = Config::default();
        c.nodes.push(NodeConfig::local(2));
        c.nodes[1].internal = "memdial-2:0".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("nodes[1].internal"), "{err}");
        let mut c = Config::default();
        c.nodes.push(NodeConfig::local(2));
        c.nodes[1].client = "memdial-1:7000".parse().unwrap();
        c.nodes[0].internal = "memdial-1:7000".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("nodes[1].client"), "{err}");
        let mut c = Config::default();
        let mut n2 = NodeConfig::local(2);
        n2.admin = c.nodes[0].client.clone();
        c.nodes.push(n2);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("nodes[1].admin")
        );
    }
}
