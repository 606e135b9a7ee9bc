//! Outside programs: finding them ([`find_bin`]), and the outside load generators wrk (HTTP/1.1)
//! and h2load (HTTP/2), the clients the data-plane issue names, with their output read into the
//! same [`Stats`] as this binary's own samples. C and single-threaded by default, they leave the
//! target more of the machine than this binary's client does, so their figures are higher;
//! both are reported.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};

use super::load::LoadOptions;
use super::processes::tree_cpu;
use super::stats::{Run, Stats};
use super::target::{Mode, Target, APP, REQUEST_TIMEOUT, START_TIMEOUT};

/// `name` as given if it contains a slash, else the first match on PATH or in the sbin
/// directories (Debian installs nginx and HAProxy there, off a non-root user's PATH).
pub fn find_bin(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The outside load tools found for this run, and their files.
pub struct Tools {
    wrk: Option<PathBuf>,
    h2load: Option<PathBuf>,
    wrk_script: PathBuf,
    h2load_log: PathBuf,
}

impl Tools {
    /// The tools found (`None`: not found, or its mode not asked for), with their files in
    /// `dir`; writes wrk's script there.
    pub fn new(wrk: Option<PathBuf>, h2load: Option<PathBuf>, dir: &Path) -> anyhow::Result<Tools> {
        let wrk_script = dir.join("wrk.lua");
        std::fs::write(&wrk_script, WRK_SCRIPT)?;
        Ok(Tools {
            wrk,
            h2load,
            wrk_script,
            h2load_log: dir.join("h2load.log"),
        })
    }
}

/// wrk resolves the URL's host itself and has no `--resolve`; the script points every thread
/// at the target's address while the URL keeps the name for SNI and Host. At the end it prints
/// wrk's whole latency distribution (each distinct µs value and its count), so rounds merge
/// into one hdrhistogram exactly as this binary's own samples do.
const WRK_SCRIPT: &str = r#"
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(os.getenv("BENCH_IP"), os.getenv("BENCH_PORT"))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.timeout, e.status))
  for i = 1, #latency do
    local v, n = latency(i)
    if n > 0 then io.write(string.format("HIST %d %d\n", v, n)) end
  end
end
"#;

/// Runs `mode`'s tool against `t` for `secs` seconds and reads its samples.
async fn tool_run(
    tools: &Tools,
    t: &Target,
    mode: Mode,
    o: &LoadOptions,
    secs: u64,
) -> anyhow::Result<Stats> {
    let url = format!("https://{APP}.portcullis.localhost:{}/", t.addr.port());
    let threads = o.tool_threads.clamp(1, o.connections).to_string();
    let conns = o.connections.to_string();
    let mut cmd = match mode {
        Mode::Wrk => {
            let mut c = tokio::process::Command::new(tools.wrk.as_ref().context("wrk")?);
            c.args(["-t", &threads, "-c", &conns, "-d", &format!("{secs}s")])
                .args(["--timeout", &format!("{}s", REQUEST_TIMEOUT.as_secs())])
                .arg("-s")
                .arg(&tools.wrk_script)
                .arg(&url)
                .env("BENCH_IP", t.addr.ip().to_string())
                .env("BENCH_PORT", t.addr.port().to_string());
            c
        }
        Mode::H2load => {
            // h2load appends to its log.
            match std::fs::remove_file(&tools.h2load_log) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            let mut c = tokio::process::Command::new(tools.h2load.as_ref().context("h2load")?);
            c.args(["-t", &threads, "-c", &conns, "-m", &o.streams.to_string()])
                .args(["-D", &secs.to_string()])
                .arg(format!("--connect-to={}", t.addr))
                .arg(format!("--log-file={}", tools.h2load_log.display()))
                .arg(&url);
            c
        }
        _ => bail!("{mode:?} is driven by this binary"),
    };
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let limit = Duration::from_secs(secs) + START_TIMEOUT;
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("{} ran past {limit:?}", mode.label()))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            mode.label(),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    match mode {
        Mode::Wrk => wrk_stats(&stdout),
        _ => h2load_stats(&stdout, &std::fs::read_to_string(&tools.h2load_log)?),
    }
}

fn wrk_stats(stdout: &str) -> anyhow::Result<Stats> {
    let mut st = Stats::new();
    let mut result = None;
    for line in stdout.lines() {
        let mut f = line.split_whitespace();
        let tag = f.next();
        let nums: Vec<u64> = f
            .map(str::parse)
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        match (tag, nums.as_slice()) {
            (Some("HIST"), &[v, n]) => st.hist.saturating_record_n(v.max(1), n),
            (Some("RESULT"), &[_, _, connect, read, write, timeout, status]) => {
                result = Some((connect + read + write + timeout, status))
            }
            _ => {}
        }
    }
    let Some((socket, status)) = result else {
        bail!("wrk printed no result (is the script running?): {stdout}");
    };
    // wrk counts a non-2xx/3xx answer as a completed request (its latency is in the
    // histogram) and separately as a status error; both kinds are errors here.
    st.errors = socket + status;
    if st.errors > 0 {
        st.first_error = Some(format!(
            "wrk: {socket} socket errors, {status} non-2xx/3xx answers"
        ));
    }
    Ok(st)
}

/// h2load's summary has no percentiles; its per-request log (start µs, status, µs to the end of
/// the response) has every sample.
fn h2load_stats(stdout: &str, log: &str) -> anyhow::Result<Stats> {
    let mut st = Stats::new();
    let mut other = 0u64;
    for line in log.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match (f.get(1), f.get(2).and_then(|v| v.parse::<u64>().ok())) {
            (Some(&"200"), Some(us)) => st.hist.saturating_record(us.max(1)),
            _ => other += 1,
        }
    }
    // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    let done = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" done")))
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("h2load printed no request counts: {stdout}"))?;
    st.errors = done.saturating_sub(st.hist.len()).max(other);
    if st.errors > 0 {
        st.first_error = Some(format!(
            "h2load: {} of {done} requests did not end in a 200",
            st.errors
        ));
    }
    Ok(st)
}

/// A tool's warm-up is a run of its own: wrk has no warm-up phase, and h2load's would leave its
/// CPU time inside the window this one measures.
pub async fn measure_tool(
    tools: &Tools,
    t: &Target,
    mode: Mode,
    o: &LoadOptions,
) -> anyhow::Result<Run> {
    if o.warmup > 0 {
        tool_run(tools, t, mode, o, o.warmup).await?;
    }
    let before = tree_cpu(t.pid);
    let stats = tool_run(tools, t, mode, o, o.duration).await?;
    let cpu = before.zip(tree_cpu(t.pid)).map(|(b, e)| e - b);
    Ok(Run {
        stats,
        secs: o.duration as f64,
        cpu,
    })
}
