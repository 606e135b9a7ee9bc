//! `Cluster`: the one handle the node uses for writes, membership changes and status.
//!
//! Writes and membership changes only succeed on the leader. A follower that receives one
//! forwards it to the leader over the cluster RPC port (mutual TLS), so the admin API and the CLI
//! work against any node. The leader executes it locally; it never forwards again, so a stale
//! view of leadership costs a retry, never a loop.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use openraft::error::RaftError;
use openraft::{ChangeMembers, ServerState};
use portcullis_proto::cluster::ForwardPayload;
use serde::{Deserialize, Serialize};

use crate::batch::{map_write_err, Batcher};
use crate::metrics::RaftMetricsSink;
use crate::network::{decode, encode, Network};
use crate::state::{Command, Response};

pub use crate::error::ClusterError;
use crate::store::SharedState;
use crate::types::{NodeId, NodeInfo, Raft, RaftMetrics};

/// How long a leader-only request waits for a leader to appear before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardRequest {
    Write(Command),
    AddLearner {
        id: NodeId,
        node: NodeInfo,
        blocking: bool,
    },
    Promote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
    /// Sent by the leader to every voter during a leadership transfer.
    SetElect {
        enabled: bool,
    },
    TransferLeader {
        to: NodeId,
    },
    /// Asks the leader for an index that a linearizable read must wait for.
    ReadIndex,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Written { log_index: u64, response: Response },
    Membership { log_index: u64 },
    ReadIndex { index: u64 },
    Done,
}

/// A member as `cluster status` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub id: NodeId,
    pub voter: bool,
    pub node: NodeInfo,
}

#[derive(Clone)]
pub struct Cluster {
    pub id: NodeId,
    pub raft: Raft,
    pub shared: SharedState,
    network: Network,
    metrics: RaftMetricsSink,
    batcher: Batcher,
}

impl Cluster {
    pub fn new(
        id: NodeId,
        raft: Raft,
        shared: SharedState,
        network: Network,
        metrics: RaftMetricsSink,
    ) -> Self {
        let batcher = Batcher::spawn(raft.clone(), metrics.clone());
        Cluster {
            id,
            raft,
            shared,
            network,
            metrics,
            batcher,
        }
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    pub fn members(&self) -> Vec<Member> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                voter: voters.contains(id),
                node: node.clone(),
            })
            .collect()
    }

    /// Proposes a validated command through the leader and returns the state machine's answer.
    pub async fn write(&self, cmd: Command) -> Result<(u64, Response), ClusterError> {
        cmd.validate()?;
        match self.leader_op(ForwardRequest::Write(cmd)).await? {
            ForwardReply::Written {
                log_index,
                response,
            } => Ok((log_index, response)),
            other => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Returns once this node's applied state includes every write committed before the call:
    /// the leader confirms its leadership with a quorum (`ensure_linearizable`), and a follower
    /// waits until it has applied up to the index the leader reports.
    pub async fn linearizable_barrier(&self) -> Result<(), ClusterError> {
        let index = match self.leader_op(ForwardRequest::ReadIndex).await? {
            ForwardReply::ReadIndex { index } => index,
            other => return Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
        };
        self.raft
            .wait(Some(LEADER_WAIT))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(())
    }

    /// The last applied log index of `member`, asked over the cluster port (this node's own
    /// without a network call). `limit` bounds the RPC.
    pub async fn applied_index_of(
        &self,
        member: &Member,
        limit: Duration,
    ) -> Result<u64, ClusterError> {
        if member.id == self.id {
            return Ok(self.shared.read().last_applied.map_or(0, |l| l.index));
        }
        let mut client = self
            .network
            .client(member.id, &member.node.rpc_addr)
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let request = portcullis_proto::cluster::IdentityRequest {};
        let reply = match tokio::time::timeout(limit, client.identity(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(ClusterError::Raft(status.message().to_string())),
            Err(_) => {
                return Err(ClusterError::Raft(format!(
                    "identity timed out after {limit:?}"
                )))
            }
        };
        if reply.node_id != member.id {
            return Err(ClusterError::Raft(format!(
                "{} answered as node {}, expected {}",
                member.node.rpc_addr, reply.node_id, member.id
            )));
        }
        Ok(reply.last_applied)
    }

    /// Waits until every voter has applied `index`, polling each over the cluster port, for at
    /// most `limit`. Returns the voters that had not (unreachable or lagging) when time ran out.
    pub async fn wait_applied_on_voters(&self, index: u64, limit: Duration) -> Vec<NodeId> {
        let deadline = Instant::now() + limit;
        let mut pending: Vec<Member> = self.members().into_iter().filter(|m| m.voter).collect();
        let mut delay = Duration::from_millis(20);
        loop {
            let mut still = Vec::new();
            for m in pending {
                let left = deadline.saturating_duration_since(Instant::now());
                let rpc_limit = left.clamp(Duration::from_millis(10), Duration::from_secs(2));
                match self.applied_index_of(&m, rpc_limit).await {
                    Ok(applied) if applied >= index => {}
                    _ => still.push(m),
                }
            }
            pending = still;
            if pending.is_empty() || Instant::now() + delay > deadline {
                return pending.into_iter().map(|m| m.id).collect();
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Bootstraps a new cluster with the given founding voters (this node included).
    pub async fn initialize(
        &self,
        members: BTreeMap<NodeId, NodeInfo>,
    ) -> Result<(), ClusterError> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))
    }

    pub async fn add_learner(
        &self,
        id: NodeId,
        node: NodeInfo,
        blocking: bool,
    ) -> Result<u64, ClusterError> {
        self.membership_op(ForwardRequest::AddLearner { id, node, blocking })
            .await
    }

    pub async fn promote(&self, id: NodeId) -> Result<u64, ClusterError> {
        self.membership_op(ForwardRequest::Promote { id }).await
    }

    pub async fn remove(&self, id: NodeId) -> Result<u64, ClusterError> {
        self.membership_op(ForwardRequest::Remove { id }).await
    }

    pub async fn transfer_leader(&self, to: NodeId) -> Result<u64, ClusterError> {
        self.membership_op(ForwardRequest::TransferLeader { to })
            .await
    }

    async fn membership_op(&self, req: ForwardRequest) -> Result<u64, ClusterError> {
        match self.leader_op(req).await? {
            ForwardReply::Membership { log_index } => Ok(log_index),
            other => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Runs `req` here if this node leads, otherwise forwards it to the leader; waits for a
    /// leader while an election is under way.
    async fn leader_op(&self, req: ForwardRequest) -> Result<ForwardReply, ClusterError> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut rx = self.raft.metrics();
        loop {
            let (leader, node) = {
                let m = rx.borrow_and_update();
                let leader = m.current_leader;
                let node =
                    leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
                (leader, node)
            };
            match (leader, node) {
                (Some(l), _) if l == self.id => match self.execute(req.clone()).await {
                    Err(ClusterError::NotLeader(_)) => {}
                    other => return other,
                },
                (Some(l), Some(node)) => match self.forward(l, &node, &req).await {
                    Err(ClusterError::NotLeader(_)) => {}
                    other => return other,
                },
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClusterError::NoLeader(LEADER_WAIT));
            }
            // Wake on the next metrics change (a new leader) or retry shortly after a failed hop.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.changed()).await;
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        node: &NodeInfo,
        req: &ForwardRequest,
    ) -> Result<ForwardReply, ClusterError> {
        let fwd_err = |reason: String| ClusterError::Forward { leader, reason };
        let mut client = self
            .network
            .client(leader, &node.rpc_addr)
            .map_err(|e| fwd_err(e.to_string()))?;
        let data = encode(req).map_err(|e| fwd_err(e.to_string()))?;
        let mut request = tonic::Request::new(ForwardPayload { data });
        request.set_timeout(LEADER_WAIT);
        let reply = match tokio::time::timeout(LEADER_WAIT, client.forward(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                // The leader we knew is gone; let the retry loop wait for the next one.
                self.metrics.rpc_error(leader, "forward");
                return Err(ClusterError::NotLeader(None));
            }
            Ok(Err(status)) => return Err(fwd_err(status.message().to_string())),
            Err(_) => return Err(fwd_err("timed out".into())),
        };
        let result: Result<ForwardReply, ClusterError> =
            decode(&reply.data).map_err(|e| fwd_err(e.to_string()))?;
        result
    }

    /// Serves a forwarded request on this node. Only `SetElect` is meant for non-leaders.
    pub async fn execute(&self, req: ForwardRequest) -> Result<ForwardReply, ClusterError> {
        match req {
            ForwardRequest::Write(cmd) => {
                cmd.validate()?;
                let (log_index, response) = self.batcher.write(cmd).await?;
                Ok(ForwardReply::Written {
                    log_index,
                    response,
                })
            }
            ForwardRequest::AddLearner { id, node, blocking } => {
                let r = self
                    .raft
                    .add_learner(id, node, blocking)
                    .await
                    .map_err(map_write_err)?;
                Ok(ForwardReply::Membership {
                    log_index: r.log_id.index,
                })
            }
            ForwardRequest::Promote { id } => {
                if !self.members().iter().any(|m| m.id == id) {
                    return Err(ClusterError::UnknownNode(id));
                }
                let r = self
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(map_write_err)?;
                Ok(ForwardReply::Membership {
                    log_index: r.log_id.index,
                })
            }
            ForwardRequest::Remove { id } => {
                let Some(member) = self.members().into_iter().find(|m| m.id == id) else {
                    return Err(ClusterError::UnknownNode(id));
                };
                let change = if member.voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                // `retain = false`: a removed voter leaves entirely instead of staying a learner.
                let r = self
                    .raft
                    .change_membership(change, false)
                    .await
                    .map_err(map_write_err)?;
                Ok(ForwardReply::Membership {
                    log_index: r.log_id.index,
                })
            }
            ForwardRequest::SetElect { enabled } => {
                self.raft.runtime_config().elect(enabled);
                Ok(ForwardReply::Done)
            }
            ForwardRequest::TransferLeader { to } => self.transfer_leader_here(to).await,
            // Leader completeness puts every acknowledged write in the leader's log, but the
            // committed index a restarted leader reloads may lag (openraft does not require it to
            // be durable), so `ensure_linearizable` alone could serve a read that misses an
            // acknowledged write. Waiting for the leader's last log index closes that gap.
            ForwardRequest::ReadIndex => match self.raft.ensure_linearizable().await {
                Ok(log_id) => {
                    let last = self.metrics().last_log_index.unwrap_or(0);
                    Ok(ForwardReply::ReadIndex {
                        index: log_id.map(|l| l.index).unwrap_or(0).max(last),
                    })
                }
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                    f,
                ))) => Err(ClusterError::NotLeader(f.leader_id)),
                Err(e) => Err(ClusterError::Raft(e.to_string())),
            },
        }
    }

    /// openraft 0.9 has no leadership transfer, and followers refuse votes while the leader's
    /// lease holds. So the leader stops every other voter from campaigning, stops its own
    /// heartbeats, and lets the target's election timer win once the lease has run out; then it
    /// restores elections everywhere, whatever the outcome.
    async fn transfer_leader_here(&self, to: NodeId) -> Result<ForwardReply, ClusterError> {
        if self.raft.current_leader().await != Some(self.id) {
            return Err(ClusterError::NotLeader(None));
        }
        let members = self.members();
        let Some(target) = members.iter().find(|m| m.id == to) else {
            return Err(ClusterError::UnknownNode(to));
        };
        if !target.voter {
            return Err(ClusterError::Invalid(format!(
                "node {to} is a learner; promote it first"
            )));
        }
        if to == self.id {
            return Ok(ForwardReply::Membership {
                log_index: self.metrics().last_applied.map(|l| l.index).unwrap_or(0),
            });
        }
        let others: Vec<&Member> = members.iter().filter(|m| m.voter && m.id != to).collect();
        for m in &others {
            self.set_elect(m, false).await;
        }
        self.raft.runtime_config().heartbeat(false);
        let outcome = self.wait_for_leader(to, Duration::from_secs(10)).await;
        self.raft.runtime_config().heartbeat(true);
        for m in &others {
            self.set_elect(m, true).await;
        }
        match outcome {
            Some(index) => Ok(ForwardReply::Membership { log_index: index }),
            None => Err(ClusterError::Raft(format!(
                "node {to} did not take over leadership within 10s"
            ))),
        }
    }

    async fn set_elect(&self, m: &Member, enabled: bool) {
        if m.id == self.id {
            self.raft.runtime_config().elect(enabled);
            return;
        }
        if let Err(e) = self
            .forward(m.id, &m.node, &ForwardRequest::SetElect { enabled })
            .await
        {
            tracing::warn!(peer = m.id, error = %e, "cannot toggle elections during leader transfer");
        }
    }

    async fn wait_for_leader(&self, to: NodeId, within: Duration) -> Option<u64> {
        let mut rx = self.raft.metrics();
        let deadline = Instant::now() + within;
        loop {
            {
                let m = rx.borrow_and_update();
                if m.current_leader == Some(to) && m.state != ServerState::Leader {
                    return Some(m.last_applied.map(|l| l.index).unwrap_or(0));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }
}
