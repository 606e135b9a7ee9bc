//! Child processes of a run: [`Proc`] (its own process group, stopped with all its workers on
//! drop), the local cluster's guard [`Cluster`] (`portcullis down`), short commands with a
//! deadline, loopback ports, version lines, the CPU time of a process tree, and the signal that
//! ends a run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use portcullis_node::cli::spawn::spawn_logged;
use tokio::net::TcpStream;

use super::target::START_TIMEOUT;

/// A child in its own process group (so a terminal's Ctrl-C reaches only us and we stop it in
/// order), stopped with SIGTERM then SIGKILL to the whole group on drop — nginx's workers are
/// the master's children and outlive a killed master otherwise.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        let child = spawn_logged(cmd, &log, name)?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections; fails early, with the log, if the child exits.
    pub async fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {addr}:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not listening on {addr} after {START_TIMEOUT:?}:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        };
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (workers that missed the master's signal).
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `portcullis down` for the local cluster on drop.
pub struct Cluster {
    pub bin: PathBuf,
    pub dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .arg("down")
            .arg("--state-dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
    }
}

/// Runs a short command to completion (with a deadline); its output on failure.
pub async fn run_cmd(what: &str, cmd: Command, limit: Duration) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(cmd);
    // A command that overruns its deadline is killed, not left behind.
    cmd.kill_on_drop(true).stdin(Stdio::null());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("{what}: no answer within {limit:?}"))?
        .with_context(|| format!("{what}: start"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A loopback port, held by its listener until the caller drops it.
pub fn reserve() -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    let l = portcullis_node::cli::ports::reserve_tcp().context("reserve a loopback port")?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// The first line a program prints for `arg` (`--version`, `-v`), on stdout or stderr.
pub fn version_line(bin: &Path, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// User + system CPU seconds of `root` and its descendants, from /proc (Linux only).
pub fn tree_cpu(root: u32) -> Option<f64> {
    let mut procs = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesized command name: state, ppid, …; utime and stime are fields
        // 14 and 15 of the whole line (11 and 12 after the name).
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        if let (Some(ppid), Some(u), Some(s)) = (num(1), num(11), num(12)) {
            procs.push((pid, ppid as u32, u + s));
        }
    }
    let mut tree = vec![root];
    let mut ticks = 0;
    while let Some(p) = tree.pop() {
        for &(pid, ppid, t) in &procs {
            if pid == p {
                ticks += t;
            }
            if ppid == p {
                tree.push(pid);
            }
        }
    }
    // /proc counts in USER_HZ, which the kernel fixes at 100 for user space on every
    // architecture (sysconf(_SC_CLK_TCK)).
    Some(ticks as f64 / 100.0)
}

/// Waits for Ctrl-C or SIGTERM and says which came.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}
