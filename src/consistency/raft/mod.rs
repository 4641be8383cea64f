//! The ordered modes, `linearizable` and `sequential`, on Raft (openraft,
//! pinned in `Cargo.toml`; this module is the only one that names it).
//!
//! Every write goes through the log: a node proposes a client's batch of
//! writes as one [`Command`] (or forwards it to the leader), and answers
//! once it is committed and applied. The state machine (`state.rs`)
//! applies commands to the node's store with the shared command rules.
//!
//! A client's batch (its pipelined requests) that holds a write goes
//! through the log whole, its reads included: one commit answers it, and
//! each read sees the state at its place in the batch. A batch of reads
//! only never goes through the log. `linearizable`: the leader confirms it
//! still leads (a heartbeat round to a quorum) and names its commit index;
//! the node that serves the read, leader or follower, waits until it has
//! applied that far, then reads its own store. `sequential`: a node reads
//! its own store once it has applied everything the client's connection
//! has already seen ([`Session::seen`]).
//!
//! Meta commands follow their text twins (`meta.rs`): `ms md ma` write;
//! `me`, `mn` and an `mg` that changes nothing read. An `mg` with `T` or `N`
//! writes; any other `mg` is tried as a read, and when the replica shows it
//! would change the item (win a recache token) the batch goes through the
//! log instead, where the state machine decides it again.
//!
//! Failures are honest: a write that was never proposed answers
//! [`NOT_APPLIED`]; one proposed whose outcome could not be learnt in time
//! answers [`OUTCOME_UNKNOWN`]; a read that cannot be served answers
//! [`READ_FAILED`]. Never a false `STORED` or `NOT_STORED`.
//!
//! | file | part |
//! |---|---|
//! | `mod.rs` | the pipeline, the peer handler, start-up and status |
//! | `batch.rs` | group commit: the writes of many connections in one entry |
//! | `command.rs` | the log's payload and the messages between nodes |
//! | `state.rs` | the state machine over the store; snapshots |
//! | `meta.rs` | meta commands: decided from a key's record, answered |
//! | `record.rs` | the stored header (log index, CAS, deadline) |
//! | `log_store.rs` | the durable Raft log and vote |
//! | `network.rs` | Raft's RPCs over the cluster transport |

// openraft's error types are large by design, and its traits return them.
#![allow(clippy::result_large_err)]

mod batch;
pub mod command;
pub mod log_store;
mod meta;
mod network;
pub mod record;
pub mod state;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Pipeline, Session, StoreStatus};
use crate::BoxFuture;
use crate::backend::Backend;
use crate::cluster::{Cluster, Handler, Liveness};
use crate::metrics::{Verdict, reg};
use crate::protocol::{MetaCmd, MetaCode, MetaReply, Request, Response};
use crate::time::unix_ms;
use command::{Applied, Command, Forwarded, Rpc, RpcReply, decode, encode};
use log_store::LogStore;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use state::StateMachine;

openraft::declare_raft_types!(
    /// The ordered modes' Raft types: the log carries [`Command`]s, and
    /// applying one answers [`Applied`].
    pub TypeConfig:
        D = Command,
        R = Applied,
);

/// A write that was never proposed: it did not happen.
pub const NOT_APPLIED: &str = "no leader reachable; write not applied";

/// A write proposed whose outcome could not be learnt in time: it may or
/// may not have happened, and a later read tells.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown; write may or may not have been applied";

/// A read that could not be served within the deadline (no quorum, or the
/// replica is behind).
pub const READ_FAILED: &str = "no quorum; read not served";

/// How long to wait before asking again when no leader is known.
const LEADER_POLL: Duration = Duration::from_millis(20);

/// The longest the log's clock lags the leader's while nothing is written
/// (`RaftMode::keep_time`). memcached's own clock moves once a second.
const QUIET: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// `true` for `sequential`, `false` for `linearizable`.
    pub sequential: bool,
    /// This node's log, vote, state and snapshot.
    pub data_dir: PathBuf,
    /// Every member (this node included) and its internal address.
    pub members: Vec<(u32, String)>,
    pub cluster_name: String,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// The most a client request waits for its outcome.
    pub request_timeout: Duration,
    /// A snapshot is taken after this many log entries since the last.
    pub snapshot_after: u64,
    /// Entries kept in the log behind the last snapshot, so a follower a
    /// little behind catches up from the log rather than a snapshot.
    pub keep_after_snapshot: u64,
    /// How often the store is checked for a restart that lost its data.
    pub store_check_interval: Duration,
    /// How long the store keeps a value past its deadline (`state.rs`).
    pub expired_kept: Duration,
    /// The largest item the store takes (`limits.item_size_max`).
    pub item_size_max: usize,
}

/// Why a write or a read failed.
#[derive(Debug)]
enum Failure {
    NotApplied,
    Unknown(String),
    Read(String),
}

impl Failure {
    /// What went wrong, for the log.
    fn reason(&self) -> &str {
        match self {
            Failure::NotApplied => "no leader",
            Failure::Unknown(e) | Failure::Read(e) => e,
        }
    }

    fn response(&self) -> Response {
        Response::server_error(match self {
            Failure::NotApplied => NOT_APPLIED,
            Failure::Unknown(_) => OUTCOME_UNKNOWN,
            Failure::Read(_) => READ_FAILED,
        })
    }
}

/// The ordered modes' metrics (`memdial_raft_*`).
struct RaftMetrics {
    term: IntGauge,
    leader: IntGauge,
    is_leader: IntGauge,
    last_log_index: IntGauge,
    applied_index: IntGauge,
    snapshot_index: IntGauge,
    peer_matched: IntGaugeVec,
    /// Times this node saw the term change (an election happened).
    elections: IntCounter,
    snapshots_built: IntGauge,
    snapshots_installed: IntGauge,
    store_rebuilds: IntGauge,
    behind: IntGauge,
    /// How far the log's clock is behind this node's (ms).
    clock_lag: IntGauge,
    /// From handing a log entry to Raft to its commit and apply.
    proposal_seconds: Histogram,
    /// The stages of a proposal, for reading where it waits: each sync of
    /// this node's log, each apply of committed entries to the store, and
    /// (on a follower) each AppendEntries from the leader, its sync
    /// included.
    log_sync_seconds: Histogram,
    apply_seconds: Histogram,
    append_rpc_seconds: Histogram,
}

impl RaftMetrics {
    fn register(r: &Registry) -> prometheus::Result<RaftMetrics> {
        let gauge = |name: &str, help: &str| reg(r, IntGauge::new(name, help)?);
        // 100 µs to about 3 s.
        let histogram = |name: &str, help: &str| {
            let buckets = prometheus::exponential_buckets(0.0001, 2.0, 16)?;
            reg(
                r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
            )
        };
        Ok(RaftMetrics {
            term: gauge("raft_term", "The Raft term this node is in")?,
            leader: gauge("raft_leader", "The leader this node knows (0: none)")?,
            is_leader: gauge("raft_is_leader", "1 while this node leads")?,
            last_log_index: gauge("raft_last_log_index", "The last index in this node's log")?,
            applied_index: gauge(
                "raft_applied_index",
                "The last log index applied to the store",
            )?,
            snapshot_index: gauge("raft_snapshot_index", "The log index of the last snapshot")?,
            peer_matched: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "raft_peer_matched_index",
                        "On the leader: the last log index each peer has",
                    ),
                    &["peer"],
                )?,
            )?,
            elections: reg(
                r,
                IntCounter::new("raft_term_changes_total", "Elections this node has seen")?,
            )?,
            snapshots_built: gauge(
                "raft_snapshots_built",
                "Snapshots this node built since start",
            )?,
            snapshots_installed: gauge(
                "raft_snapshots_installed",
                "Snapshots from the leader this node installed since start",
            )?,
            store_rebuilds: gauge(
                "raft_store_rebuilds",
                "Times the store was found restarted and rebuilt since start",
            )?,
            behind: gauge(
                "raft_behind",
                "Times this replica fell behind the log's clock and decided in memory",
            )?,
            clock_lag: gauge(
                "raft_clock_lag_ms",
                "How far the log's clock (which decides expiry) is behind this node's",
            )?,
            proposal_seconds: histogram(
                "raft_proposal_duration_seconds",
                "One log entry (many clients' writes) from proposal to commit and apply",
            )?,
            log_sync_seconds: histogram(
                "raft_log_sync_duration_seconds",
                "One fdatasync of this node's Raft log",
            )?,
            apply_seconds: histogram(
                "raft_apply_duration_seconds",
                "One apply of committed entries to this node's store",
            )?,
            append_rpc_seconds: histogram(
                "raft_append_rpc_duration_seconds",
                "On a follower: one AppendEntries from the leader, its log sync included",
            )?,
        })
    }
}

pub struct RaftMode {
    id: u64,
    raft: openraft::Raft<TypeConfig>,
    sm: Arc<StateMachine>,
    batcher: batch::Batcher,
    /// Read-index rounds started, and the last one's number and answer.
    rounds_started: AtomicU64,
    last_round: tokio::sync::Mutex<Option<(u64, Result<u64, String>)>>,
    backend: Arc<dyn Backend>,
    cluster: Arc<Cluster>,
    settings: RaftSettings,
    metrics: RaftMetrics,
}

impl RaftMode {
    /// Opens the node's log and state machine and starts Raft. The store
    /// must answer: it is checked (and rebuilt if it lost its data) first.
    pub async fn start(
        backend: Arc<dyn Backend>,
        cluster: Arc<Cluster>,
        registry: &Registry,
        settings: RaftSettings,
    ) -> anyhow::Result<Arc<RaftMode>> {
        let metrics = RaftMetrics::register(registry)?;
        let id = u64::from(cluster.node_id());
        let log = LogStore::<TypeConfig>::open(settings.data_dir.join("log"))?;
        log.reader().observe_syncs(metrics.log_sync_seconds.clone());
        let sm = StateMachine::open(
            backend.clone(),
            &settings.data_dir.join("state"),
            log.reader(),
            settings.expired_kept,
            settings.item_size_max,
        )
        .await?;
        sm.observe_applies(metrics.apply_seconds.clone());
        let ms = |d: Duration| d.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: settings.cluster_name.clone(),
            heartbeat_interval: ms(settings.heartbeat_interval),
            election_timeout_min: ms(settings.election_timeout_min),
            election_timeout_max: ms(settings.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_after),
            max_in_snapshot_log_to_keep: settings.keep_after_snapshot,
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        }
        .validate()?;
        let network = network::Network {
            cluster: cluster.clone(),
        };
        let raft = openraft::Raft::new(id, Arc::new(config), network, log, sm.clone()).await?;
        let batcher = batch::Batcher::start(
            raft.clone(),
            sm.held.clone(),
            settings.request_timeout,
            metrics.proposal_seconds.clone(),
        );
        Ok(Arc::new(RaftMode {
            id,
            raft,
            sm,
            batcher,
            rounds_started: AtomicU64::new(0),
            last_round: tokio::sync::Mutex::new(None),
            backend,
            cluster,
            settings,
            metrics,
        }))
    }

    /// Forms the cluster on its first start, watches the store, and runs
    /// until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> std::io::Result<()> {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = async {
                self.form_cluster().await;
                self.watch_store().await
            } => {}
            _ = self.refresh_metrics() => {}
            _ = self.keep_time() => {}
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not stop cleanly");
        }
        Ok(())
    }

    /// The member with the lowest id forms the cluster from the config,
    /// once: when its own log is empty and no peer it can reach has joined
    /// a cluster, and at least a majority (itself included) answered. The
    /// others wait to be contacted by the leader.
    async fn form_cluster(&self) {
        let members: BTreeMap<u64, BasicNode> = self
            .settings
            .members
            .iter()
            .map(|(id, addr)| (u64::from(*id), BasicNode { addr: addr.clone() }))
            .collect();
        if members.keys().next() != Some(&self.id) {
            return;
        }
        loop {
            match self.raft.is_initialized().await {
                Ok(true) | Err(_) => return,
                Ok(false) => {}
            }
            let mut pristine = 1;
            let mut formed = false;
            for peer in self.cluster.peer_ids() {
                let answer = self
                    .cluster
                    .request(peer, encode(&Rpc::Initialized), Duration::from_secs(1))
                    .await
                    .map(|b| decode::<RpcReply>(&b));
                match answer {
                    Ok(Ok(RpcReply::Initialized(false))) => pristine += 1,
                    Ok(Ok(RpcReply::Initialized(true))) => formed = true,
                    _ => {}
                }
            }
            if formed {
                tracing::info!("a peer already belongs to a cluster; not forming one");
                return;
            }
            if pristine * 2 > members.len() {
                match self.raft.initialize(members.clone()).await {
                    Ok(()) => tracing::info!(
                        members = ?members.keys().collect::<Vec<_>>(),
                        "formed the cluster from the config"
                    ),
                    Err(e) => tracing::info!(error = %e, "not forming the cluster"),
                }
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Keeps the gauges current, and counts term changes, until dropped.
    async fn refresh_metrics(&self) {
        let mut rx = self.raft.metrics();
        let mut term = rx.borrow().current_term;
        loop {
            {
                let m = rx.borrow_and_update().clone();
                let g = &self.metrics;
                if m.current_term != term {
                    g.elections.inc();
                    term = m.current_term;
                }
                let as_i64 = |v: Option<u64>| v.map_or(0, |v| v as i64);
                g.term.set(m.current_term as i64);
                g.leader.set(as_i64(m.current_leader));
                g.is_leader.set(i64::from(m.state == ServerState::Leader));
                g.last_log_index.set(as_i64(m.last_log_index));
                g.applied_index.set(as_i64(m.last_applied.map(|l| l.index)));
                g.snapshot_index.set(as_i64(m.snapshot.map(|l| l.index)));
                if let Some(r) = &m.replication {
                    for (peer, matched) in r.iter() {
                        g.peer_matched
                            .with_label_values(&[&peer.to_string()])
                            .set(as_i64(matched.map(|l| l.index)));
                    }
                }
                let c = &self.sm.counts;
                g.snapshots_built
                    .set(c.snapshots_built.load(Ordering::Relaxed) as i64);
                g.snapshots_installed
                    .set(c.snapshots_installed.load(Ordering::Relaxed) as i64);
                g.store_rebuilds
                    .set(c.store_rebuilds.load(Ordering::Relaxed) as i64);
                g.behind.set(c.behind.load(Ordering::Relaxed) as i64);
                g.clock_lag
                    .set(unix_ms().saturating_sub(self.sm.clock_ms()) as i64);
            }
            // At most ten refreshes a second, however busy the log is.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Checks the store every `store_check_interval`, and at once when a
    /// read or an apply found it without its mark, and rebuilds it when it
    /// lost its data (memcached restarted).
    async fn watch_store(&self) {
        let mut tick = tokio::time::interval(self.settings.store_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.sm.lost.notified() => {}
            }
            if let Err(e) = self.sm.check_store().await {
                tracing::debug!(error = %e, "cannot check the store yet");
                // Not at once again: the store may be down.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// On the leader: proposes an empty entry whenever the log's clock
    /// (the state machine's, which reads judge expiry by) has fallen
    /// [`QUIET`] behind, so values expire while nothing is written.
    async fn keep_time(&self) {
        loop {
            tokio::time::sleep(QUIET / 4).await;
            let behind = unix_ms().saturating_sub(self.sm.clock_ms());
            if behind < QUIET.as_millis() as u64 || self.leader().await != Some(self.id) {
                continue;
            }
            let deadline = Instant::now() + self.settings.request_timeout;
            if let Forwarded::Unknown(e) = self.batcher.propose(Vec::new(), deadline).await {
                tracing::debug!(error = %e, "a clock entry was not committed");
            }
        }
    }

    /// Proposes a client batch on this node (its writes grouped with
    /// others waiting, its reads held here; `batch.rs`), waiting until
    /// `deadline` for the outcome.
    async fn propose_here(&self, batch: Vec<Request>, deadline: Instant) -> Forwarded {
        self.batcher.propose(batch, deadline).await
    }

    /// Proposes a client batch through the leader, wherever it is. Returns
    /// the log index of its writes and its replies.
    async fn propose(
        &self,
        batch: Vec<Request>,
        deadline: Instant,
    ) -> Result<(u64, Applied), Failure> {
        loop {
            let outcome = match self.leader().await {
                Some(l) if l == self.id => self.propose_here(batch.clone(), deadline).await,
                Some(l) => self.forward(l, &batch, deadline).await,
                None => Forwarded::NotLeader { leader: None },
            };
            match outcome {
                Forwarded::Applied { index, applied } => return Ok((index, applied)),
                Forwarded::Unknown(e) => return Err(Failure::Unknown(e)),
                // Not proposed anywhere: try again while there is time.
                Forwarded::NotLeader { .. } => {
                    if Instant::now() + LEADER_POLL >= deadline {
                        return Err(Failure::NotApplied);
                    }
                    tokio::time::sleep(LEADER_POLL).await;
                }
            }
        }
    }

    /// Sends `batch` to the leader `leader` to propose. Anything but its
    /// answer leaves the outcome unknown: the request may have reached it.
    async fn forward(&self, leader: u64, batch: &[Request], deadline: Instant) -> Forwarded {
        let Ok(peer) = u32::try_from(leader) else {
            return Forwarded::NotLeader { leader: None };
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        let body = encode(&Rpc::Forward(batch.to_vec()));
        match self.cluster.request(peer, body, wait).await {
            Ok(answer) => match decode::<RpcReply>(&answer) {
                Ok(RpcReply::Forward(f)) => f,
                Ok(other) => Forwarded::Unknown(format!("unexpected answer {other:?}")),
                Err(e) => Forwarded::Unknown(e),
            },
            Err(e) => Forwarded::Unknown(e.to_string()),
        }
    }

    async fn leader(&self) -> Option<u64> {
        self.raft.current_leader().await
    }

    /// On the leader: confirms leadership with a quorum and returns the
    /// index a linearizable read must wait for.
    async fn read_index_here(&self) -> Result<u64, String> {
        let (read, _applied) = self
            .raft
            .get_read_log_id()
            .await
            .map_err(|e| e.to_string())?;
        Ok(read.map_or(0, |l| l.index))
    }

    /// Waits until this node has applied `index`, within `deadline`.
    async fn applied(&self, index: u64, deadline: Instant) -> Result<(), Failure> {
        if self.sm.applied_index() >= index {
            return Ok(());
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(wait))
            .applied_index_at_least(Some(index), "read")
            .await
            .map(|_| ())
            .map_err(|e| Failure::Read(e.to_string()))
    }

    /// What must hold before a read is served from the local store.
    async fn before_read(&self, session: &Session, deadline: Instant) -> Result<(), Failure> {
        if self.settings.sequential {
            return self.applied(session.seen(), deadline).await;
        }
        loop {
            match tokio::time::timeout_at(deadline, self.read_index()).await {
                Ok(Ok(index)) => return self.applied(index, deadline).await,
                Err(_) => return Err(Failure::Read("no read index within the deadline".into())),
                Ok(Err(e)) => {
                    if Instant::now() + LEADER_POLL >= deadline {
                        return Err(Failure::Read(e));
                    }
                    tokio::time::sleep(LEADER_POLL).await;
                }
            }
        }
    }

    /// The read index for a linearizable read that arrived now. Reads
    /// share rounds: one waits for the next round to start after it
    /// arrived (a round that started earlier could predate a write the
    /// read must see), and every read waiting then takes that round's
    /// answer. So a leader runs one quorum round per batch of reads, not
    /// one per read.
    async fn read_index(&self) -> Result<u64, String> {
        let arrived = self.rounds_started.load(Ordering::SeqCst);
        let mut last = self.last_round.lock().await;
        if let Some((round, answer)) = &*last
            && *round > arrived
        {
            return answer.clone();
        }
        let round = self.rounds_started.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = match tokio::time::timeout(
            self.settings.request_timeout,
            self.read_index_round(),
        )
        .await
        {
            Ok(answer) => answer,
            Err(_) => Err("no read index within the deadline".to_string()),
        };
        *last = Some((round, answer.clone()));
        answer
    }

    /// One round: the leader's read index, asked of the leader if this
    /// node is not it.
    async fn read_index_round(&self) -> Result<u64, String> {
        match self.leader().await {
            Some(l) if l == self.id => self.read_index_here().await,
            Some(l) => {
                let wait = self.settings.request_timeout;
                let answer = self
                    .cluster
                    .request(l as u32, encode(&Rpc::ReadIndex), wait)
                    .await
                    .map_err(|e| e.to_string())?;
                match decode::<RpcReply>(&answer)? {
                    RpcReply::ReadIndex(r) => r,
                    other => Err(format!("unexpected answer {other:?}")),
                }
            }
            None => Err("no leader".to_string()),
        }
    }

    /// Serves a batch of reads from this replica. `None` when one of them
    /// (an `mg` that wins a recache token, say) would change state: then
    /// the batch must go through the log instead, and nothing was seen.
    async fn reads(
        &self,
        session: &mut Session,
        reads: &[Request],
        deadline: Instant,
    ) -> Option<Vec<Response>> {
        let mn = || Response::Meta(MetaReply::new(MetaCode::Mn, ""));
        if reads.iter().all(|r| matches!(r, Request::MetaNoop)) {
            // Nothing to read: on a minority too, as memcached answers.
            return Some(reads.iter().map(|_| mn()).collect());
        }
        // `mn` reads nothing: it answers whatever became of the reads.
        let failed = |e: Response| -> Vec<Response> {
            reads
                .iter()
                .map(|r| match r {
                    Request::MetaNoop => mn(),
                    _ => e.clone(),
                })
                .collect()
        };
        if let Err(f) = self.before_read(session, deadline).await {
            tracing::debug!(reason = f.reason(), "read not served");
            return Some(failed(f.response()));
        }
        // Everything applied now is what these reads may see.
        let seen = self.sm.applied_index();
        let out = match tokio::time::timeout_at(deadline, self.sm.reads(reads)).await {
            Ok(Ok(answers)) => answers.into_iter().collect::<Option<Vec<_>>>()?,
            Ok(Err(e)) => failed(e.to_response()),
            // The store is being rebuilt.
            Err(_) => failed(Response::server_error(READ_FAILED)),
        };
        session.saw(seen);
        Some(out)
    }

    /// Runs a batch that writes as one command in the log.
    async fn through_log(
        &self,
        session: &mut Session,
        writes: Vec<Request>,
        deadline: Instant,
        out: &mut Vec<Response>,
    ) {
        let n = writes.len();
        // `mn` changes nothing: it answers `MN` whatever became of the rest.
        let noops: Vec<bool> = writes
            .iter()
            .map(|w| matches!(w, Request::MetaNoop))
            .collect();
        let failed = |e: Response| {
            noops.iter().map(move |&noop| {
                if noop {
                    Response::Meta(MetaReply::new(MetaCode::Mn, ""))
                } else {
                    e.clone()
                }
            })
        };
        match self.propose(writes, deadline).await {
            Ok((index, applied)) if applied.replies.len() == n => {
                if self.settings.sequential {
                    // Answer once applied here too; if that takes too long
                    // the write still happened, and the session makes this
                    // client's next read wait for it.
                    let _ = self.applied(index, deadline).await;
                }
                session.saw(index);
                out.extend(applied.replies);
            }
            Ok((_, applied)) => {
                tracing::error!(
                    sent = n,
                    got = applied.replies.len(),
                    "applying a command answered the wrong number of replies"
                );
                out.extend(failed(Response::server_error(OUTCOME_UNKNOWN)));
            }
            Err(f) => {
                tracing::debug!(reason = f.reason(), "write failed");
                out.extend(failed(f.response()));
            }
        }
    }

    fn role(&self) -> &'static str {
        match self.raft.metrics().borrow().state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }
}

/// A request that may be served without the log: `get`/`gets`, `mn`, `me`,
/// and an `mg` that sets no TTL and vivifies nothing (one that would win a
/// recache token is found out when it is read, and goes through the log).
fn is_read(r: &Request) -> bool {
    match r {
        Request::Get { .. } | Request::MetaNoop => true,
        Request::Meta(m) => match m.cmd {
            MetaCmd::Debug => true,
            MetaCmd::Get => m.flags.ttl.is_none() && m.flags.vivify.is_none(),
            MetaCmd::Set | MetaCmd::Delete | MetaCmd::Arith => false,
        },
        _ => false,
    }
}

impl Pipeline for RaftMode {
    fn execute<'a>(
        &'a self,
        session: &'a mut Session,
        requests: Vec<Request>,
    ) -> BoxFuture<'a, Vec<Response>> {
        Box::pin(async move {
            let deadline = Instant::now() + self.settings.request_timeout;
            if requests.iter().all(is_read)
                && let Some(out) = self.reads(session, &requests, deadline).await
            {
                return out;
            }
            let mut out = Vec::with_capacity(requests.len());
            self.through_log(session, requests, deadline, &mut out)
                .await;
            out
        })
    }

    fn store_status(&self) -> StoreStatus {
        StoreStatus::of(&*self.backend)
    }

    /// This node's own store alone.
    fn admin<'a>(&'a self, request: &'a crate::protocol::AdminRequest) -> BoxFuture<'a, Response> {
        super::admin_on(&*self.backend, request)
    }

    /// Ready while a leader is known; peers not up are notes.
    fn readiness(&self) -> Verdict {
        let m = self.raft.metrics().borrow().clone();
        let mut reasons = Vec::new();
        if m.current_leader.is_none() {
            reasons.push("raft: no leader known (an election is under way, or no quorum)".into());
        }
        let notes = self
            .cluster
            .view()
            .iter()
            .filter(|p| p.liveness != Liveness::Up)
            .map(|p| format!("peer {} is {}", p.id, p.liveness.as_str()))
            .collect();
        Verdict { reasons, notes }
    }

    fn cluster_stats(&self) -> Vec<(String, String)> {
        let m = self.raft.metrics().borrow().clone();
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let counts = &self.sm.counts;
        let node = vec![
            ("raft_role".to_string(), self.role().to_string()),
            ("raft_term".to_string(), m.current_term.to_string()),
            ("raft_leader".to_string(), opt(m.current_leader)),
            ("raft_last_log_index".to_string(), opt(m.last_log_index)),
            (
                "raft_applied_index".to_string(),
                opt(m.last_applied.map(|l| l.index)),
            ),
            (
                "raft_snapshot_index".to_string(),
                opt(m.snapshot.map(|l| l.index)),
            ),
            (
                "raft_snapshots_built".to_string(),
                counts.snapshots_built.load(Ordering::Relaxed).to_string(),
            ),
            (
                "raft_snapshots_installed".to_string(),
                counts
                    .snapshots_installed
                    .load(Ordering::Relaxed)
                    .to_string(),
            ),
            (
                "raft_store_rebuilds".to_string(),
                counts.store_rebuilds.load(Ordering::Relaxed).to_string(),
            ),
            (
                "raft_behind".to_string(),
                counts.behind.load(Ordering::Relaxed).to_string(),
            ),
            ("raft_clock_ms".to_string(), self.sm.clock_ms().to_string()),
        ];
        let matched: BTreeMap<u64, Option<u64>> = m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
            .unwrap_or_default();
        let mode = if self.settings.sequential {
            "sequential"
        } else {
            "linearizable"
        };
        self.cluster
            .stats(mode, node, |peer| match matched.get(&u64::from(peer)) {
                Some(index) => vec![("raft_matched_index".to_string(), opt(*index))],
                None => Vec::new(),
            })
    }
}

impl Handler for RaftMode {
    fn on_message(&self, peer: u32, _body: Bytes) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            Err(format!(
                "peer {peer} sent a one-way message; the ordered modes send only requests"
            ))
        })
    }

    fn on_request(&self, _peer: u32, body: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let reply = match decode::<Rpc>(&body)? {
                Rpc::Append(r) => {
                    let _timer = self.metrics.append_rpc_seconds.start_timer();
                    RpcReply::Append(self.raft.append_entries(r).await)
                }
                Rpc::Vote(r) => RpcReply::Vote(self.raft.vote(r).await),
                Rpc::Snapshot(r) => RpcReply::Snapshot(self.raft.install_snapshot(r).await),
                Rpc::Forward(batch) => {
                    let deadline = Instant::now() + self.settings.request_timeout;
                    RpcReply::Forward(self.propose_here(batch, deadline).await)
                }
                // Followers' reads share rounds with this node's own.
                Rpc::ReadIndex => RpcReply::ReadIndex(match self.leader().await {
                    Some(l) if l == self.id => self.read_index().await,
                    _ => Err("not the leader".to_string()),
                }),
                Rpc::Initialized => {
                    RpcReply::Initialized(self.raft.is_initialized().await.unwrap_or(true))
                }
            };
            Ok(encode(&reply))
        })
    }
}

/// The writes in the Raft log at `dir` (a stopped node's), one line each:
/// `index<TAB>command<TAB>key<TAB>data`, data as text (lossy) for storage
/// commands and empty otherwise. Reads in the log are left out (`get`,
/// `me`; an `mg` there may have changed its key, so it is listed). For tests
/// that check every replica applied the same writes in the same order.
pub async fn log_lines(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use openraft::{EntryPayload, RaftLogReader};
    let mut log = LogStore::<TypeConfig>::open(dir)?;
    let mut lines = Vec::new();
    for entry in log.try_get_log_entries(..).await? {
        let EntryPayload::Normal(cmd) = entry.payload else {
            continue;
        };
        for w in &cmd.writes {
            let (key, data): (&[u8], &[u8]) = match w {
                Request::Get { .. } => continue,
                Request::Store { key, data, .. } => (key, data),
                Request::TooLarge { key, .. }
                | Request::Arith { key, .. }
                | Request::Delete { key, .. }
                | Request::Touch { key, .. } => (key, b""),
                Request::Meta(m) if m.cmd != MetaCmd::Debug => (&m.key, &m.data),
                Request::Gat { .. }
                | Request::FlushAll { .. }
                | Request::Meta(_)
                | Request::MetaNoop => (b"", b""),
            };
            lines.push(format!(
                "{}\t{}\t{}\t{}",
                entry.log_id.index,
                w.command().as_str(),
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(data)
            ));
        }
    }
    Ok(lines)
}
