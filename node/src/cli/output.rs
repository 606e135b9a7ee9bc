//! What the operator commands print: `--json` (a contract: ARCHITECTURE.md §8; scripts and
//! tests parse it) or a table for people, and gRPC failures as messages an operator can act on.

use anyhow::bail;
use portcullis_proto::admin::{self as pb};
use serde::Serialize;

use super::args::Global;

pub(super) fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(v)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        // `portcullis … --json | head` closes the pipe early; that is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Turns a gRPC status into an error message an operator can act on.
/// A list command's output: the rows as one JSON array under `--json`, else a line per row.
pub(super) fn print_list<T: Serialize>(
    g: &Global,
    rows: &[T],
    line: impl FnMut(&T),
) -> anyhow::Result<()> {
    if g.json {
        return print_json(&rows);
    }
    rows.iter().for_each(line);
    Ok(())
}

/// Turns a gRPC status into an error message an operator can act on.
pub(super) fn rpc<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    match r {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => bail!("{} ({:?})", s.message(), s.code()),
    }
}

#[derive(Serialize)]
pub(super) struct InstanceOut {
    pub(super) instance_id: String,
    pub(super) app: String,
    pub(super) region: String,
    pub(super) tunnel_ip: String,
    pub(super) wg_public_key: String,
    pub(super) backend_addr: String,
    pub(super) weight: u32,
}

pub(super) fn instance_out(i: pb::Instance) -> InstanceOut {
    InstanceOut {
        instance_id: i.instance_id,
        app: i.app,
        region: i.region,
        tunnel_ip: i.tunnel_ip,
        wg_public_key: i.wg_public_key,
        backend_addr: i.backend_addr,
        weight: i.weight,
    }
}
