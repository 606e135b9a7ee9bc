//! The WAF audit log: one JSON line per inspected request that matched a rule (or every
//! inspected request, with `waf.audit_all`), appended to a file by a thread of its own.
//!
//! The request path never writes a file: it hands the record to a bounded queue and moves on.
//! When the disk falls behind and the queue is full, records are dropped and counted
//! (`portcullis_waf_audit_dropped_total`) rather than slowing requests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use serde::Serialize;

use super::verdict::Matched;

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// RFC 3339, UTC.
    pub ts: String,
    pub request_id: String,
    pub node: u64,
    pub app: String,
    pub host: String,
    pub client_ip: String,
    pub method: String,
    pub uri: String,
    pub protocol: &'static str,
    pub mode: &'static str,
    pub paranoia: u8,
    /// `pass`, `detected`, `blocked`; `over_budget_pass` / `over_budget_blocked` (evaluation
    /// outran the budget); `unavailable_pass` / `unavailable_blocked` (no rule set could run).
    pub action: &'static str,
    /// The status the client got when the WAF answered (403, 413, 503), else `null`.
    pub status: Option<u16>,
    pub anomaly_score: u32,
    pub rules: Vec<Matched>,
    pub eval_us: u64,
}

/// Queue depth between requests and the writer thread.
const QUEUE: usize = 8192;

pub struct AuditLog {
    tx: SyncSender<Record>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl AuditLog {
    /// Opens (appends to) `path` and starts the writer thread.
    pub fn open(
        path: &Path,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let p = path.to_path_buf();
        std::thread::Builder::new()
            .name("waf-audit".into())
            .spawn(move || write_loop(file, p, rx))?;
        Ok(AuditLog { tx, dropped })
    }

    /// Queues a record; never blocks.
    pub fn log(&self, r: Record) {
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn write_loop(file: std::fs::File, path: PathBuf, rx: Receiver<Record>) {
    let mut out = std::io::BufWriter::new(file);
    let mut failed = false;
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile goes out in one write and one flush.
        for r in std::iter::once(first).chain(rx.try_iter()) {
            let line = serde_json::to_string(&r).unwrap_or_default();
            if let Err(e) = writeln!(out, "{line}") {
                if !failed {
                    tracing::error!(path = %path.display(), error = %e, "WAF audit log write failed");
                    failed = true;
                }
            }
        }
        if let Err(e) = out.flush() {
            if !failed {
                tracing::error!(path = %path.display(), error = %e, "WAF audit log write failed");
                failed = true;
            }
        }
    }
}
