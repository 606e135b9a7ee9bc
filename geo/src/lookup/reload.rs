//! Re-opening the database when its file changes, without making lookups wait.
//!
//! Lookups read an `ArcSwap<GeoDb>`: a lock-free load, never a syscall. Checking the file is a
//! separate call ([`ReloadingGeoDb::maybe_reload`]) that a background thread makes (see
//! [`ReloadingGeoDb::spawn_watcher`]), rate-limited to one `stat` per interval. A reload reads
//! and validates the whole new file before swapping it in, so a half-written or wrong file
//! leaves the old database serving; the next check tries again.

use std::fs::{File, Metadata};
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, TryLockError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use super::{io_error, GeoDb, GeoDbError, Location};

/// What a reload check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The last check was less than the interval ago; nothing was looked at.
    NotDue,
    /// Another thread is checking or reloading right now.
    Busy,
    /// The file has the same modification time, size and inode as the loaded one.
    Unchanged,
    /// A new database was read, validated and swapped in.
    Reloaded,
}

/// What identifies one version of the file. The inode catches an atomic `mv` of a file whose
/// modification time happens to equal the old one's (e.g. unpacked with `tar` or `cp -p`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(meta: &Metadata) -> FileStamp {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        }
    }
}

/// A [`GeoDb`] that follows its file. Share it as `Arc<ReloadingGeoDb>`.
pub struct ReloadingGeoDb {
    path: PathBuf,
    current: ArcSwap<GeoDb>,
    interval: Duration,
    /// Nanoseconds after `epoch` before which [`Self::maybe_reload`] returns `NotDue`.
    next_check: AtomicU64,
    epoch: Instant,
    /// The stamp of the loaded file; the mutex also serialises reloads.
    stamp: Mutex<FileStamp>,
    generation: AtomicU64,
}

impl std::fmt::Debug for ReloadingGeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingGeoDb")
            .field("path", &self.path)
            .field("interval", &self.interval)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl ReloadingGeoDb {
    /// Opens the database at `path` (failing like [`GeoDb::open`]); the file will be checked
    /// for changes at most once per `interval`.
    pub fn open(path: impl Into<PathBuf>, interval: Duration) -> Result<Self, GeoDbError> {
        let path = path.into();
        let (db, stamp) = read_db(&path)?;
        let epoch = Instant::now();
        Ok(ReloadingGeoDb {
            current: ArcSwap::from_pointee(db),
            next_check: AtomicU64::new(nanos(interval)),
            epoch,
            interval,
            stamp: Mutex::new(stamp),
            generation: AtomicU64::new(1),
            path,
        })
    }

    /// Looks `ip` up in the current database; lock-free, no I/O.
    pub fn lookup(&self, ip: IpAddr) -> Option<Location> {
        self.current.load().lookup(ip)
    }

    /// The current database, for callers that make several lookups against one version.
    pub fn current(&self) -> Arc<GeoDb> {
        self.current.load_full()
    }

    /// 1 after opening, +1 per successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The watched path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The minimum time between two checks of the file.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Checks the file if the interval has passed since the last check, and reloads it if it
    /// changed. Cheap when not due: one atomic load. Never waits for another checker.
    pub fn maybe_reload(&self) -> Result<ReloadOutcome, GeoDbError> {
        let now = nanos(self.epoch.elapsed());
        if now < self.next_check.load(Ordering::Relaxed) {
            return Ok(ReloadOutcome::NotDue);
        }
        self.next_check
            .store(now.saturating_add(nanos(self.interval)), Ordering::Relaxed);
        self.reload_if_changed()
    }

    /// Checks the file now, ignoring the interval (e.g. on SIGHUP), and reloads it if it
    /// changed. On error the old database stays in service.
    pub fn reload_if_changed(&self) -> Result<ReloadOutcome, GeoDbError> {
        let mut stamp = match self.stamp.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => return Ok(ReloadOutcome::Busy),
            // A panic mid-reload left no partial state behind: the swap is the last step.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| io_error(&self.path, e))?;
        if FileStamp::of(&meta) == *stamp {
            return Ok(ReloadOutcome::Unchanged);
        }
        let (db, new_stamp) = read_db(&self.path)?;
        self.current.store(Arc::new(db));
        *stamp = new_stamp;
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(ReloadOutcome::Reloaded)
    }

    /// Starts a thread that calls [`Self::maybe_reload`] every interval and logs the result.
    /// The thread stops when the returned [`Watcher`] is dropped or the database is dropped.
    pub fn spawn_watcher(self: &Arc<Self>) -> std::io::Result<Watcher> {
        let (stop, stopped) = mpsc::channel::<()>();
        let db: Weak<ReloadingGeoDb> = Arc::downgrade(self);
        // Never spin: a zero interval still sleeps a little between checks.
        let period = self.interval.max(Duration::from_millis(10));
        let thread = std::thread::Builder::new()
            .name("geo-reload".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    let Some(db) = db.upgrade() else { break };
                    let path = db.path.display();
                    match db.maybe_reload() {
                        Ok(ReloadOutcome::Reloaded) => tracing::info!(
                            %path,
                            generation = db.generation(),
                            database_type = db.current().database_type(),
                            "geo database reloaded"
                        ),
                        Ok(_) => {}
                        // The old database keeps serving; say so once per failed check.
                        Err(error) => tracing::warn!(%path, %error, "geo database reload failed"),
                    }
                }
            })?;
        Ok(Watcher {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Stops the reload thread when dropped (waiting for a reload in progress to finish).
#[derive(Debug)]
pub struct Watcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // A panicked watcher has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

/// Reads the file through one handle so the stamp describes exactly the bytes parsed.
fn read_db(path: &Path) -> Result<(GeoDb, FileStamp), GeoDbError> {
    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    let db = GeoDb::from_bytes(bytes, path)?;
    Ok((db, FileStamp::of(&meta)))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
