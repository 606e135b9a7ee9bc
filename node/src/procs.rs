//! Process checks by pid, for the local launcher (`up`/`down`), the demo app and `cvm-agent`
//! (which exit with the processes they were started beside) and the test harness. A leaf: it
//! imports nothing of the crate.

use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Is `pid` a live portcullis process (and not a recycled pid)?
pub fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if kill(Pid::from_raw(raw), None).is_err() {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        // An empty command line means the process is between fork and exec: it exists.
        Ok(cmd) => {
            (cmd.is_empty() || String::from_utf8_lossy(&cmd).contains("portcullis")) && !zombie(pid)
        }
        Err(_) => false,
    }
}

/// Is `pid` a process (of any program) that has not finished? The test harness asks the same.
pub fn running(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}/stat")).exists() && !zombie(pid)
}

/// A finished process. A main thread that has exited shows `Z` while the
/// other threads still tear down and hold the process's files (a node's sled
/// lock among them), so it is only finished once it is the last task left.
fn zombie(pid: u32) -> bool {
    let leader_gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    leader_gone && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) <= 1
}
