//! Group commit above Raft. openraft 0.9.25's core syncs the leader's log
//! once per proposal and handles the next only after that sync, so a
//! proposal per client batch would cap writes at one sync each. Instead,
//! the writes of every connection waiting at the same moment travel in one
//! log entry: each keeps its own order and gets its own replies back, and
//! the entry applies them one connection after another, as consecutive
//! entries would. Under load, batches grow by themselves: while
//! [`IN_FLIGHT`] proposals wait for their commit, new writes queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::TypeConfig;
use super::command::{Applied, Command, Forwarded, held_back};
use super::state::Held;
use crate::protocol::Request;
use crate::time::unix_ms;
use openraft::error::{ClientWriteError, RaftError};

/// Proposals waiting for their commit at once.
const IN_FLIGHT: usize = 4;

/// Writes gathered into one entry at most.
const MAX_WRITES: usize = 1024;

/// Writes waiting to be proposed.
const QUEUE: usize = 4096;

struct Waiting {
    writes: Vec<Request>,
    reply: oneshot::Sender<Forwarded>,
}

/// The proposer of one node.
pub struct Batcher {
    queue: mpsc::Sender<Waiting>,
}

impl Batcher {
    /// Starts proposing through `raft`; each entry gets `timeout` to commit.
    pub fn start(
        raft: openraft::Raft<TypeConfig>,
        held: Arc<Held>,
        timeout: Duration,
        latency: prometheus::Histogram,
    ) -> Batcher {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, held, rx, timeout, latency));
        Batcher { queue }
    }

    /// Proposes `writes` (with others' waiting at the same time) and waits
    /// for the outcome until `deadline`.
    pub async fn propose(&self, writes: Vec<Request>, deadline: Instant) -> Forwarded {
        let (reply, outcome) = oneshot::channel();
        let queued = tokio::time::timeout_at(deadline, self.queue.send(Waiting { writes, reply }));
        match queued.await {
            Ok(Ok(())) => {}
            // Never handed to Raft: not applied.
            Ok(Err(_)) | Err(_) => return Forwarded::NotLeader { leader: None },
        }
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Forwarded::Unknown("the proposer stopped".into()),
            Err(_) => Forwarded::Unknown("not committed within the deadline".into()),
        }
    }
}

async fn run(
    raft: openraft::Raft<TypeConfig>,
    held: Arc<Held>,
    mut rx: mpsc::Receiver<Waiting>,
    timeout: Duration,
    latency: prometheus::Histogram,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot lets more writes gather behind the first.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut n = first.writes.len();
        let mut group = vec![first];
        while n < MAX_WRITES {
            match rx.try_recv() {
                Ok(w) => {
                    n += w.writes.len();
                    group.push(w);
                }
                Err(_) => break,
            }
        }
        let (raft, held, latency) = (raft.clone(), held.clone(), latency.clone());
        tokio::spawn(async move {
            let timer = latency.start_timer();
            propose(&raft, &held, group, timeout).await;
            timer.observe_duration();
            drop(permit);
        });
    }
}

/// Proposes the group's writes as one entry and hands each batch its
/// replies.
async fn propose(
    raft: &openraft::Raft<TypeConfig>,
    held: &Arc<Held>,
    group: Vec<Waiting>,
    timeout: Duration,
) {
    let lens: Vec<usize> = group.iter().map(|w| w.writes.len()).collect();
    let total: usize = lens.iter().sum();
    let mut all = Vec::with_capacity(total);
    let mut replies = Vec::with_capacity(group.len());
    for w in group {
        all.extend(w.writes);
        replies.push(w.reply);
    }
    let writes: Vec<Request> = all.iter().filter(|r| !held_back(r)).cloned().collect();
    // Held until the proposal ends, however it ends.
    let ticket = (writes.len() < all.len()).then(|| held.hold(all.into()));
    let cmd = Command {
        now_ms: unix_ms(),
        ticket: ticket.as_ref().map_or(0, |t| t.id),
        writes,
    };
    let outcome = match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
        Ok(Ok(r)) if r.data.replies.len() == total => {
            let mut all = r.data.replies.into_iter();
            for (reply, len) in replies.into_iter().zip(lens) {
                let applied = Applied {
                    replies: all.by_ref().take(len).collect(),
                };
                let _ = reply.send(Forwarded::Applied {
                    index: r.log_id.index,
                    applied,
                });
            }
            return;
        }
        Ok(Ok(r)) => Forwarded::Unknown(format!(
            "applying the entry answered {} replies for {total} writes",
            r.data.replies.len()
        )),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Forwarded::NotLeader {
                leader: f.leader_id,
            }
        }
        Ok(Err(e)) => Forwarded::Unknown(e.to_string()),
        Err(_) => Forwarded::Unknown("not committed within the deadline".into()),
    };
    drop(ticket);
    for reply in replies {
        let _ = reply.send(outcome.clone());
    }
}
