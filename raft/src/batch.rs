//! Write batching on the leader.
//!
//! openraft 0.9 handles client writes one entry at a time: every write costs its own trip
//! through the Raft core, its own log append and its own replication bookkeeping. Under load that
//! caps throughput well below what the disk allows. The batcher keeps a few proposals in flight;
//! writes that arrive while all of them are busy are folded into one `Command::Batch` entry and
//! answered individually from the entry's `Response::Batch`. A lone write is proposed as is, so an
//! idle cluster pays no extra latency.

use std::sync::Arc;
use std::time::Instant;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::ClusterError;
use crate::metrics::RaftMetricsSink;
use crate::state::{Command, Response};
use crate::types::{NodeId, NodeInfo, Raft};

/// Proposals in flight at once. More overlaps disk syncs; fewer makes larger batches.
const MAX_IN_FLIGHT: usize = 4;
/// Commands folded into one entry.
const MAX_BATCH: usize = 512;
/// Approximate serialized size of one batch entry; keeps log values well under sled's 128 KiB.
const MAX_BATCH_BYTES: u64 = 96 * 1024;

pub(crate) type WriteResult = Result<(u64, Response), ClusterError>;
type Pending = (Command, oneshot::Sender<WriteResult>);

#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl Batcher {
    pub(crate) fn spawn(raft: Raft, metrics: RaftMetricsSink) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(raft, metrics, rx));
        Batcher { tx }
    }

    pub(crate) async fn write(&self, cmd: Command) -> WriteResult {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((cmd, tx))
            .await
            .map_err(|_| ClusterError::Raft("write batcher stopped".into()))?;
        rx.await
            .map_err(|_| ClusterError::Raft("write batcher dropped the request".into()))?
    }
}

async fn run(raft: Raft, metrics: RaftMetricsSink, mut rx: mpsc::Receiver<Pending>) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a permit is what lets a batch build up behind busy proposals.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = size_of(&first.0);
        // A batch never nests another batch (validation would refuse the whole entry).
        let lone = matches!(first.0, Command::Batch(_));
        let mut batch = vec![first];
        while !lone && batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) if matches!(p.0, Command::Batch(_)) => {
                    // Keep it for the next round rather than nesting it.
                    let raft = raft.clone();
                    let metrics = metrics.clone();
                    tokio::spawn(async move { propose(&raft, &metrics, vec![p]).await });
                    break;
                }
                Ok(p) => {
                    bytes += size_of(&p.0);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            propose(&raft, &metrics, batch).await;
            drop(permit);
        });
    }
}

fn size_of(cmd: &Command) -> u64 {
    bincode::serialized_size(cmd).unwrap_or(MAX_BATCH_BYTES)
}

async fn propose(raft: &Raft, metrics: &RaftMetricsSink, mut batch: Vec<Pending>) {
    let started = Instant::now();
    if batch.len() == 1 {
        if let Some((cmd, tx)) = batch.pop() {
            let r = raft
                .client_write(cmd)
                .await
                .map(|r| (r.log_id.index, r.data))
                .map_err(map_write_err);
            metrics.commit_latency(started.elapsed().as_secs_f64());
            let _ = tx.send(r);
        }
        return;
    }
    let (cmds, txs): (Vec<Command>, Vec<oneshot::Sender<WriteResult>>) = batch.into_iter().unzip();
    let n = cmds.len();
    match raft.client_write(Command::Batch(cmds)).await {
        Ok(r) => {
            metrics.commit_latency(started.elapsed().as_secs_f64());
            let index = r.log_id.index;
            match r.data {
                Response::Batch(rs) if rs.len() == n => {
                    for (tx, resp) in txs.into_iter().zip(rs) {
                        let _ = tx.send(Ok((index, resp)));
                    }
                }
                Response::Rejected(reason) => {
                    for tx in txs {
                        let _ = tx.send(Ok((index, Response::Rejected(reason.clone()))));
                    }
                }
                other => {
                    for tx in txs {
                        let _ = tx.send(Err(ClusterError::Raft(format!(
                            "batch answered with {other:?}"
                        ))));
                    }
                }
            }
        }
        Err(e) => {
            let e = map_write_err(e);
            for tx in txs {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

pub(crate) fn map_write_err(
    e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>,
) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ClusterError::NotLeader(f.leader_id)
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ClusterError::Rejected(c.to_string())
        }
        other => ClusterError::Raft(other.to_string()),
    }
}
