//! openraft storage v2 on sled: the log store (`LogStore`) and the state machine (`StateMachine`).
//!
//! Durability: sled 0.34's `flush()` ends in `sync_file_range`, which does not persist file
//! metadata and is not a real fsync. Every I/O that openraft must see as durable (log append,
//! vote, truncate, purge, committed index, snapshot) is followed by `sync_data()` (fdatasync) on the database
//! file before it is reported done. Appends are group-committed: a flusher task collects the
//! completion callbacks of every append that arrived while the previous fsync ran, syncs once,
//! then completes them in order.
//!
//! The state machine lives in memory (`SharedState`); its durable form is the latest snapshot,
//! stored in sled. On start, openraft replays the log from that snapshot up to the saved
//! committed index, so nothing acknowledged is lost.

// openraft's trait signatures fix the error type (`StorageError`, ~224 bytes); helpers return it
// too rather than boxing and unboxing at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    StorageIOError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::changes::{ChangeCursor, Delta, Journal};
pub use crate::snapshot_format::Applied;
use crate::state::{ClusterState, Command, Response};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote,
};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

fn io_err(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn read_logs_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_logs_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

/// The sled database plus the handle used to fsync it.
#[derive(Clone)]
struct Durable {
    db: sled::Db,
    file: Arc<File>,
}

impl Durable {
    /// sled flush, then a real fdatasync. Blocking: call from `spawn_blocking`.
    ///
    /// `sync_data` persists the file's data and the metadata needed to read it back (its size
    /// when it grew), which is all recovery needs; skipping the timestamp-only inode update
    /// `sync_all` would also journal saves a journal commit per write on ext4/xfs.
    fn sync_blocking(&self) -> io::Result<()> {
        self.db.flush().map_err(io::Error::other)?;
        self.file.sync_data()
    }

    async fn sync(&self) -> io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.sync_blocking())
            .await
            .map_err(io::Error::other)?
    }
}

/// Opens (or creates) the sled database at `dir` and returns the log store and the state machine.
pub async fn open(dir: &Path) -> Result<(LogStore, StateMachine), StoreError> {
    let db = sled::Config::new()
        .path(dir)
        .open()
        .map_err(|e| StoreError::Open(dir.to_path_buf(), e.to_string()))?;
    // sled 0.34 keeps its data in `<dir>/db`.
    let file = File::open(dir.join("db"))
        .map_err(|e| StoreError::Open(dir.to_path_buf(), e.to_string()))?;
    let durable = Durable {
        db: db.clone(),
        file: Arc::new(file),
    };
    let open_tree = |name: &str| {
        db.open_tree(name)
            .map_err(|e| StoreError::Open(dir.to_path_buf(), e.to_string()))
    };
    let logs = open_tree("logs")?;
    let meta = open_tree("meta")?;
    let sm_tree = open_tree("sm")?;

    let (flush_tx, flush_rx) = mpsc::unbounded_channel();
    tokio::spawn(flusher(durable.clone(), flush_rx));
    let log = LogStore {
        durable: durable.clone(),
        logs,
        meta,
        flush_tx,
    };

    let sm = StateMachine::open(durable, sm_tree)?;
    Ok((log, sm))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store at {0}: {1}")]
    Open(PathBuf, String),
    #[error("stored snapshot is corrupt: {0}")]
    CorruptSnapshot(String),
}

/// Group commit: one fsync for every append callback queued while the previous one ran.
async fn flusher(durable: Durable, mut rx: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let res = durable.sync().await;
        for cb in batch {
            let r = match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            cb.log_io_completed(r);
        }
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft log and vote, in sled.
#[derive(Clone)]
pub struct LogStore {
    durable: Durable,
    logs: sled::Tree,
    meta: sled::Tree,
    flush_tx: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    fn get_meta<T: for<'a> Deserialize<'a>>(&self, k: &[u8]) -> Result<Option<T>, StorageError> {
        let Some(v) = self
            .meta
            .get(k)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        bincode::deserialize(&v)
            .map(Some)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn put_meta<T: Serialize>(&self, k: &[u8], v: &T) -> Result<(), StorageError> {
        let bytes =
            bincode::serialize(v).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.meta
            .insert(k, bytes)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.durable
            .sync()
            .await
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.logs.range::<[u8; 8], _>((start, end)) {
            let (_, v) = item.map_err(read_logs_err)?;
            out.push(bincode::deserialize(&v).map_err(read_logs_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self.logs.last().map_err(read_logs_err)? {
            Some((_, v)) => Some(
                bincode::deserialize::<Entry>(&v)
                    .map_err(read_logs_err)?
                    .log_id,
            ),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not fsynced on its own: losing the latest committed index only means replaying a
        // little less on restart; the next append or vote sync persists it anyway.
        let bytes = bincode::serialize(&committed)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.meta
            .insert(KEY_COMMITTED, bytes)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let bytes = bincode::serialize(&e).map_err(write_logs_err)?;
            batch.insert(&key(e.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(write_logs_err)?;
        if let Err(mpsc::error::SendError(cb)) = self.flush_tx.send(callback) {
            // The flusher is gone (runtime shutting down): sync inline rather than lie.
            cb.log_io_completed(self.durable.sync().await);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let keys: Vec<_> = self
            .logs
            .range(key(log_id.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(write_logs_err)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.logs.apply_batch(batch).map_err(write_logs_err)?;
        self.durable.sync().await.map_err(write_logs_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two steps leaves extra entries, never
        // a log whose start is unknown.
        self.put_meta(KEY_LAST_PURGED, &log_id).await?;
        let keys: Vec<_> = self
            .logs
            .range(..=key(log_id.index))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(write_logs_err)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.logs.apply_batch(batch).map_err(write_logs_err)?;
        self.durable.sync().await.map_err(write_logs_err)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// Read access to the applied state for the data plane and admin reads. Readers take the lock
/// briefly and never across an `.await`.
#[derive(Clone)]
pub struct SharedState {
    inner: Arc<RwLock<Applied>>,
    changed: watch::Sender<u64>,
    /// Which keys each applied entry touched (`changes`); written under `inner`'s write lock.
    journal: Arc<Mutex<Journal>>,
}

impl SharedState {
    /// A standalone state, not backed by Raft: for tests of code that only reads the state.
    pub fn detached(state: ClusterState) -> Self {
        let (changed, _) = watch::channel(0);
        SharedState {
            inner: Arc::new(RwLock::new(Applied {
                state,
                ..Default::default()
            })),
            changed,
            journal: Arc::default(),
        }
    }

    /// Replaces the state of a detached instance and notifies subscribers (tests only).
    pub fn replace_detached(&self, state: ClusterState) {
        let index = {
            let mut a = self.write();
            a.state = state;
            self.journal().everything();
            a.last_applied.map(|l| l.index).unwrap_or(0) + 1
        };
        self.notify(index);
    }

    /// Applies one command to a detached instance, journaling it as the state machine does,
    /// and notifies subscribers (tests and measurements of incremental consumers).
    pub fn apply_detached(&self, cmd: &Command) -> Response {
        let (index, resp) = {
            let mut a = self.write();
            let index = a.last_applied.map(|l| l.index).unwrap_or(0) + 1;
            let resp = self.apply_journaled(&mut a, index, cmd);
            (index, resp)
        };
        self.notify(index);
        resp
    }

    /// `ClusterState::apply` plus the journal entry; the caller holds the write lock.
    fn apply_journaled(&self, a: &mut Applied, index: u64, cmd: &Command) -> Response {
        let mut touched = Vec::new();
        crate::changes::touched(&a.state, cmd, &mut touched);
        let resp = a.state.apply(index, cmd);
        self.journal().record(touched);
        resp
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read access plus what changed since `cursor` (`None` for a first read), and the cursor
    /// for the next call. Both come from one read lock, so they agree with each other.
    pub fn read_changes(
        &self,
        cursor: Option<ChangeCursor>,
    ) -> (RwLockReadGuard<'_, Applied>, Delta, ChangeCursor) {
        let applied = self.read();
        let (delta, next) = self.journal().since(cursor);
        (applied, delta, next)
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Ticks with the last applied index whenever the state changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self, index: u64) {
        self.changed.send_replace(index);
    }
}

pub struct StateMachine {
    shared: SharedState,
    durable: Durable,
    tree: sled::Tree,
    snapshot_seq: Arc<AtomicU64>,
}

impl StateMachine {
    fn open(durable: Durable, tree: sled::Tree) -> Result<Self, StoreError> {
        let mut applied = Applied::default();
        if let Some(bytes) = tree
            .get(KEY_SNAPSHOT)
            .map_err(|e| StoreError::CorruptSnapshot(e.to_string()))?
        {
            let snap: StoredSnapshot = bincode::deserialize(&bytes)
                .map_err(|e| StoreError::CorruptSnapshot(e.to_string()))?;
            applied = crate::snapshot_format::decode(&snap.data)
                .map_err(|e| StoreError::CorruptSnapshot(e.to_string()))?;
        }
        let index = applied.last_applied.map(|l| l.index).unwrap_or(0);
        let (changed, _) = watch::channel(index);
        Ok(StateMachine {
            shared: SharedState {
                inner: Arc::new(RwLock::new(applied)),
                changed,
                journal: Arc::default(),
            },
            durable,
            tree,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    async fn persist_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let bytes = bincode::serialize(snap)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        self.tree
            .insert(KEY_SNAPSHOT, bytes)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        self.durable
            .sync()
            .await
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))
    }
}

/// Builds a snapshot from the applied state at the moment it is called.
pub struct SnapshotBuilder {
    shared: SharedState,
    durable: Durable,
    tree: sled::Tree,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (data, meta) = {
            let applied = self.shared.read();
            let data = crate::snapshot_format::encode(&applied)
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            let last = applied.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
                None => format!("--{}", self.seq),
            };
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: applied.last_membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let sm = StateMachine {
            shared: self.shared.clone(),
            durable: self.durable.clone(),
            tree: self.tree.clone(),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        };
        sm.persist_snapshot(&stored).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.shared.read();
        Ok((a.last_applied, a.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut last = None;
        {
            let mut a = self.shared.write();
            for entry in entries {
                a.last_applied = Some(entry.log_id);
                last = Some(entry.log_id.index);
                let resp = match entry.payload {
                    EntryPayload::Blank => Response::Ok,
                    EntryPayload::Normal(cmd) => {
                        self.shared
                            .apply_journaled(&mut a, entry.log_id.index, &cmd)
                    }
                    EntryPayload::Membership(m) => {
                        a.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::Ok
                    }
                };
                out.push(resp);
            }
        }
        if let Some(i) = last {
            self.shared.notify(i);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            durable: self.durable.clone(),
            tree: self.tree.clone(),
            seq: self.snapshot_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let applied = crate::snapshot_format::decode(&data)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
        self.persist_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        let index = applied.last_applied.map(|l| l.index).unwrap_or(0);
        {
            let mut a = self.shared.write();
            *a = applied;
            self.shared.journal().everything();
        }
        self.shared.notify(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let Some(bytes) = self
            .tree
            .get(KEY_SNAPSHOT)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        let snap: StoredSnapshot = bincode::deserialize(&bytes)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta: snap.meta,
            snapshot: Box::new(Cursor::new(snap.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir()
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
            let (log, sm) = open(dir.path())
                .await
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's storage conformance suite.
    #[test]
    fn openraft_suite() -> Result<(), StorageError> {
        Suite::test_all(SledBuilder)
    }

    /// A reopened store sees the vote, the log and the snapshot written before it was closed.
    #[tokio::test]
    async fn reopen_keeps_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _sm) = open(dir.path()).await.expect("open");
            log.save_vote(&Vote::new(3, 1)).await.expect("vote");
        }
        // The flusher task of the first instance holds the database until it sees its channel
        // close; wait for that instead of guessing a delay.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (mut log, _sm) = loop {
            match open(dir.path()).await {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "store still locked");
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        assert_eq!(log.read_vote().await.expect("read"), Some(Vote::new(3, 1)));
    }
}
