//! Starting the processes of a local cluster (nodes, demo apps, demo agents): detached from the
//! terminal, output into a log file. A leaf.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// Starts `cmd` with stdin closed and stdout and stderr appended to a fresh `log`, in its own
/// process group: a Ctrl-C in the terminal reaches the launcher, which then stops the nodes in
/// order, instead of killing them all mid-write. `what` names it in errors.
pub fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {what}"))
}
