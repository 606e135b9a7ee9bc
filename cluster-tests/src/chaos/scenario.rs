//! Scenario files: what cluster to build, how long to run, which clients, which faults when.
//!
//! Every field is checked before anything starts (unknown fields are errors, so a typo cannot
//! silently disable a fault), and every error names the field, e.g. `faults[2].target`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A scenario as written in `cluster-tests/scenarios/<name>.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in the report.
    pub name: String,
    /// Gateway nodes (3-7), each in its own network namespace.
    pub nodes: u64,
    /// How long the workload and the fault schedule run, in seconds.
    pub duration_secs: u64,
    /// Seed for every random choice (workload, fault targets). `--seed` overrides it.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Regions, assigned to nodes round-robin.
    #[serde(default = "default_regions")]
    pub regions: Vec<String>,
    #[serde(default)]
    pub clients: Clients,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub debug: Debug,
    #[serde(default)]
    pub disk: Disk,
    /// Static WAN conditions between regions (cluster RPC goes through link.rs).
    #[serde(default)]
    pub links: Links,
    /// What the run must show: `linearizable` (the default), or `violation` for scenarios that
    /// run a deliberately broken build and pass only if the checker catches it, or
    /// `majority-outage` for scenarios that break the majority side's data plane on purpose
    /// (`[debug] drop_majority_https`) and pass only if the data-plane check catches it.
    #[serde(default)]
    pub expect: Expect,
    /// Longest a gateway on the majority side of a partition may go without a successful HTTPS
    /// probe while the partition is in force (ms); above it the run fails (outage.rs).
    #[serde(default = "default_max_majority_outage_ms")]
    pub max_majority_outage_ms: u64,
    #[serde(default)]
    pub faults: Vec<Fault>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    #[default]
    Linearizable,
    Violation,
    MajorityOutage,
}

fn default_seed() -> u64 {
    1
}

/// The data plane serves from each node's local replicated state and needs no leader or
/// quorum, so a majority-side gateway should see no outage at all during a partition. What a
/// healthy gateway still shows is the probe's own granularity: one probe every 100 ms on a
/// fresh TLS connection, so consecutive successes are 100-250 ms apart: 105-187 ms measured
/// on majority-side gateways during partitions (ci, partitions-5), up to ~370 ms on unaffected
/// gateways of a debug build sharing 2 cores with 5 nodes and the harness (docs/chaos.md).
/// 1000 ms leaves room for that jitter while still failing on any real interruption: a single
/// timed-out probe (1 s timeout) already exceeds it.
pub const DEFAULT_MAX_MAJORITY_OUTAGE_MS: u64 = 1000;

fn default_max_majority_outage_ms() -> u64 {
    DEFAULT_MAX_MAJORITY_OUTAGE_MS
}

/// Bounds of `max_majority_outage_ms`: below two probe periods even a healthy gateway fails
/// (successes are at least one period apart, plus jitter); above a minute the check means
/// nothing for faults that last seconds.
pub const MAX_MAJORITY_OUTAGE_RANGE: std::ops::RangeInclusive<u64> = 200..=60_000;

fn default_regions() -> Vec<String> {
    vec!["eu-west".into(), "us-east".into(), "ap-south".into()]
}

/// The workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Clients {
    /// Concurrent client processes (1-64).
    pub count: u64,
    /// Registers the clients share (1-100); few keys mean more contention.
    pub keys: u64,
    /// Fraction of operations that are reads (0-1); the rest are CAS and blind writes.
    pub read_ratio: f64,
    /// Fraction of writes that are blind (no `expect`); the rest are CAS.
    pub blind_write_ratio: f64,
    /// Per-operation timeout; a timed-out operation is indeterminate.
    pub op_timeout_ms: u64,
    /// Pause between one client's operations.
    pub think_ms: u64,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            count: 5,
            keys: 3,
            read_ratio: 0.5,
            blind_write_ratio: 0.2,
            op_timeout_ms: 1500,
            think_ms: 20,
        }
    }
}

/// Raft timing for every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        // Same as `portcullis up`: failover well under the 5 s target on a local bridge.
        Timing {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
        }
    }
}

/// Node data directories.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Disk {
    /// When > 0, every node's data dir is a tmpfs of this many MiB, so `disk-full` can fill it.
    pub tmpfs_mb: u64,
}

/// Baseline WAN conditions, in force for the whole run (faults change them temporarily).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Links {
    /// One-way delay of every link between two different regions.
    pub delay_ms: u64,
    pub jitter_ms: u64,
    pub loss_percent: f64,
    /// Let jitter reorder packets on a link (otherwise each link is first-in first-out).
    pub reorder: bool,
    /// Per region pair overrides (both directions), applied after the defaults above.
    pub pair: Vec<LinkPair>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkPair {
    /// Two regions from `regions` (the same one twice: links inside that region).
    pub between: Vec<String>,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub jitter_ms: u64,
    #[serde(default)]
    pub loss_percent: f64,
    #[serde(default)]
    pub reorder: bool,
}

/// Largest delay or jitter accepted: beyond this Raft only sees a dead link anyway.
pub const MAX_LINK_DELAY_MS: u64 = 10_000;

/// Test-only node switches that break guarantees on purpose.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Debug {
    /// Sets `[debug] unsafe_stale_reads` on every node: `KvGet` skips the linearizable barrier.
    pub unsafe_stale_reads: bool,
    /// Harness-side: during every partition fault, also drop client HTTPS (an nftables input
    /// drop of TCP 8443) on one majority-side gateway, the lowest id, as if its edge stopped
    /// serving. Only for `expect = "majority-outage"`, to show that the check can fail.
    pub drop_majority_https: bool,
}

/// Which node a fault hits, resolved when the fault starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The current leader.
    Leader,
    /// A random node that is not the leader.
    Follower,
    /// Any node, chosen with the seed.
    #[default]
    Random,
    /// Node `id`.
    Node(u64),
}

/// One fault in the schedule. It starts at `at_secs` and is undone `duration_secs` later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Seconds after the workload starts.
    pub at_secs: f64,
    pub kind: FaultKind,
    #[serde(default)]
    pub target: Target,
    /// How long the fault lasts before it is healed (restart, resume, heal, promote).
    #[serde(default = "default_fault_duration")]
    pub duration_secs: f64,
    /// `latency` and `loss`: the two regions whose links (both directions) are affected.
    #[serde(default)]
    pub between: Option<Vec<String>>,
    /// `latency`: one-way delay of those links.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// `latency`: jitter (each packet's delay is uniform in delay ± jitter).
    #[serde(default)]
    pub jitter_ms: Option<u64>,
    /// `loss`: percentage of packets dropped on those links (0-100).
    #[serde(default)]
    pub percent: Option<f64>,
}

fn default_fault_duration() -> f64 {
    5.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the target, restart it after `duration_secs`.
    Kill,
    /// SIGSTOP the target, SIGCONT after `duration_secs`.
    Pause,
    /// Cut the target off from every other node (clients still reach it).
    Isolate,
    /// Split the nodes into a majority and a minority that contains the target.
    MajorityMinority,
    /// The target stops hearing from every other node; they still hear it (nftables input drop).
    OneWay,
    /// Two halves that cannot talk to each other, and the target talks to both.
    Bridge,
    /// Take the target's veth link down, then up again.
    LinkDown,
    /// Remove the target from the cluster, then (after `duration_secs`) add it back as a
    /// learner and promote it.
    Membership,
    /// Fill the target's data dir (a tmpfs, `disk.tmpfs_mb`) until writes fail with ENOSPC;
    /// delete the filler afterwards.
    DiskFull,
    /// Set the one-way delay (and jitter) of the WAN links between two regions, then restore
    /// the baseline (`[links]`).
    Latency,
    /// Drop a percentage of the packets on the WAN links between two regions, then restore.
    Loss,
}

impl FaultKind {
    /// Network faults that cut some nodes off from the others; while they are in force the
    /// majority side's data plane must keep serving (outage.rs).
    pub fn is_partition(self) -> bool {
        matches!(
            self,
            FaultKind::Isolate
                | FaultKind::MajorityMinority
                | FaultKind::OneWay
                | FaultKind::Bridge
                | FaultKind::LinkDown
        )
    }

    /// Faults installed as the harness's nftables partition table (topology.rs), which is
    /// replaced as a whole: two of them cannot be in force at once.
    pub fn uses_partition_rules(self) -> bool {
        matches!(
            self,
            FaultKind::Isolate
                | FaultKind::MajorityMinority
                | FaultKind::OneWay
                | FaultKind::Bridge
        )
    }

    /// How many of `nodes` nodes this fault takes out of the quorum at worst (killed, paused,
    /// removed, cut off, or with a full disk): overlapping faults must leave a majority.
    pub fn takes_nodes(self, nodes: u64) -> u64 {
        match self {
            FaultKind::MajorityMinority => (nodes - 1) / 2,
            // The bridge node reaches both halves, so every node still reaches a majority.
            FaultKind::Bridge | FaultKind::Latency | FaultKind::Loss => 0,
            _ => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::MajorityMinority => "majority-minority",
            FaultKind::OneWay => "one-way",
            FaultKind::Bridge => "bridge",
            FaultKind::LinkDown => "link-down",
            FaultKind::Membership => "membership",
            FaultKind::DiskFull => "disk-full",
            FaultKind::Latency => "latency",
            FaultKind::Loss => "loss",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {path}: {message}")]
    Parse { path: String, message: String },
    #[error("scenario {path}: field `{field}`: {reason}")]
    Field {
        path: String,
        field: String,
        reason: String,
    },
}

impl Scenario {
    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: p.clone(),
            source,
        })?;
        Scenario::parse(&text, &p)
    }

    /// Parses and validates scenario text; `path` only labels errors.
    pub fn parse(text: &str, path: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        s.validate()
            .map_err(|(field, reason)| ScenarioError::Field {
                path: path.to_string(),
                field,
                reason,
            })?;
        Ok(s)
    }

    /// Cross-field checks. Returns the offending field and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, r: String| Err((f.to_string(), r));
        if self.name.is_empty() {
            return bad("name", "must not be empty".into());
        }
        if !(3..=7).contains(&self.nodes) {
            return bad("nodes", format!("{} is not in 3..=7", self.nodes));
        }
        if self.duration_secs == 0 || self.duration_secs > 3600 {
            return bad(
                "duration_secs",
                format!("{} is not in 1..=3600", self.duration_secs),
            );
        }
        if self.regions.is_empty() || self.regions.iter().any(String::is_empty) {
            return bad("regions", "give at least one non-empty region".into());
        }
        let c = &self.clients;
        if !(1..=64).contains(&c.count) {
            return bad("clients.count", format!("{} is not in 1..=64", c.count));
        }
        if !(1..=100).contains(&c.keys) {
            return bad("clients.keys", format!("{} is not in 1..=100", c.keys));
        }
        if !(0.0..=1.0).contains(&c.read_ratio) {
            return bad(
                "clients.read_ratio",
                format!("{} is not in 0..=1", c.read_ratio),
            );
        }
        if !(0.0..=1.0).contains(&c.blind_write_ratio) {
            return bad(
                "clients.blind_write_ratio",
                format!("{} is not in 0..=1", c.blind_write_ratio),
            );
        }
        if !(50..=60_000).contains(&c.op_timeout_ms) {
            return bad(
                "clients.op_timeout_ms",
                format!("{} is not in 50..=60000", c.op_timeout_ms),
            );
        }
        if !MAX_MAJORITY_OUTAGE_RANGE.contains(&self.max_majority_outage_ms) {
            return bad(
                "max_majority_outage_ms",
                format!(
                    "{} is not in {}..={} (below two 100 ms probe periods even a healthy \
                     gateway fails)",
                    self.max_majority_outage_ms,
                    MAX_MAJORITY_OUTAGE_RANGE.start(),
                    MAX_MAJORITY_OUTAGE_RANGE.end()
                ),
            );
        }
        if self.debug.drop_majority_https != (self.expect == Expect::MajorityOutage) {
            return bad(
                "debug.drop_majority_https",
                "drop_majority_https and expect = \"majority-outage\" go together: the switch \
                 breaks the data plane on purpose, the expectation says the check must catch it"
                    .into(),
            );
        }
        if self.expect == Expect::MajorityOutage
            && !self.faults.iter().any(|f| f.kind.is_partition())
        {
            return bad(
                "expect",
                "majority-outage needs a partition fault (isolate, majority-minority, one-way, \
                 bridge or link-down)"
                    .into(),
            );
        }
        let t = &self.timing;
        if t.heartbeat_ms == 0 || t.election_timeout_min_ms <= t.heartbeat_ms {
            return bad(
                "timing.election_timeout_min_ms",
                "must be greater than timing.heartbeat_ms (> 0)".into(),
            );
        }
        if t.election_timeout_max_ms <= t.election_timeout_min_ms {
            return bad(
                "timing.election_timeout_max_ms",
                "must be greater than timing.election_timeout_min_ms".into(),
            );
        }
        let region_pair = |field: String, between: &[String]| -> Result<(), (String, String)> {
            if between.len() != 2 {
                return Err((field, format!("give two regions, not {}", between.len())));
            }
            for r in between {
                if !self.regions.contains(r) {
                    return Err((
                        field,
                        format!("region {r:?} is not one of regions = {:?}", self.regions),
                    ));
                }
            }
            Ok(())
        };
        let link_values = |field: &str, delay: u64, jitter: u64, loss: f64| {
            if delay > MAX_LINK_DELAY_MS {
                return Err((
                    format!("{field}delay_ms"),
                    format!("{delay} is not in 0..={MAX_LINK_DELAY_MS}"),
                ));
            }
            if jitter > MAX_LINK_DELAY_MS {
                return Err((
                    format!("{field}jitter_ms"),
                    format!("{jitter} is not in 0..={MAX_LINK_DELAY_MS}"),
                ));
            }
            if !(0.0..=100.0).contains(&loss) {
                return Err((
                    format!("{field}loss_percent"),
                    format!("{loss} is not in 0..=100"),
                ));
            }
            Ok(())
        };
        let l = &self.links;
        link_values("links.", l.delay_ms, l.jitter_ms, l.loss_percent)?;
        for (i, p) in l.pair.iter().enumerate() {
            let f = format!("links.pair[{i}].");
            region_pair(format!("{f}between"), &p.between)?;
            link_values(&f, p.delay_ms, p.jitter_ms, p.loss_percent)?;
        }
        let dur = self.duration_secs as f64;
        for (i, f) in self.faults.iter().enumerate() {
            let field = |name: &str| format!("faults[{i}].{name}");
            if !(f.at_secs >= 0.0 && f.at_secs < dur) {
                return bad(
                    &field("at_secs"),
                    format!("{} is not within the run (0..{dur})", f.at_secs),
                );
            }
            if !(f.duration_secs > 0.0 && f.at_secs + f.duration_secs <= dur) {
                return bad(
                    &field("duration_secs"),
                    format!(
                        "{} must be > 0 and the fault must end by duration_secs = {dur}",
                        f.duration_secs
                    ),
                );
            }
            if let Target::Node(id) = f.target {
                if id == 0 || id > self.nodes {
                    return bad(
                        &field("target"),
                        format!("node {id} does not exist (nodes = {})", self.nodes),
                    );
                }
            }
            if f.kind == FaultKind::DiskFull && self.disk.tmpfs_mb == 0 {
                return bad(
                    &field("kind"),
                    "disk-full needs a tmpfs data dir: set [disk] tmpfs_mb".into(),
                );
            }
            let link_fault = matches!(f.kind, FaultKind::Latency | FaultKind::Loss);
            if link_fault {
                let Some(between) = &f.between else {
                    return bad(
                        &field("between"),
                        format!(
                            "{} needs between = [\"region-a\", \"region-b\"]",
                            f.kind.name()
                        ),
                    );
                };
                region_pair(field("between"), between)?;
            } else if f.between.is_some() {
                return bad(
                    &field("between"),
                    "only latency and loss faults take it".into(),
                );
            }
            match f.kind {
                FaultKind::Latency => {
                    let Some(d) = f.delay_ms else {
                        return bad(&field("delay_ms"), "latency needs delay_ms".into());
                    };
                    link_values(&format!("faults[{i}]."), d, f.jitter_ms.unwrap_or(0), 0.0)?;
                    if f.percent.is_some() {
                        return bad(&field("percent"), "only loss faults take it".into());
                    }
                }
                FaultKind::Loss => {
                    let Some(p) = f.percent else {
                        return bad(&field("percent"), "loss needs percent (0-100)".into());
                    };
                    if !(0.0..=100.0).contains(&p) {
                        return bad(&field("percent"), format!("{p} is not in 0..=100"));
                    }
                    if f.delay_ms.is_some() || f.jitter_ms.is_some() {
                        return bad(&field("delay_ms"), "only latency faults take it".into());
                    }
                }
                _ => {
                    if f.delay_ms.is_some() || f.jitter_ms.is_some() || f.percent.is_some() {
                        return bad(
                            &field("kind"),
                            "delay_ms, jitter_ms and percent are for latency and loss faults"
                                .into(),
                        );
                    }
                }
            }
            if f.kind == FaultKind::Bridge && self.nodes < 5 && self.nodes != 3 {
                // With 4 nodes the halves are 1+1 around a pair; allowed but pointless.
                return bad(&field("kind"), "bridge needs 3 or at least 5 nodes".into());
            }
        }
        // Faults may overlap in time, as long as healing one cannot undo the other and a
        // quorum stays possible throughout.
        let overlaps = |a: &Fault, b: &Fault| {
            a.at_secs < b.at_secs + b.duration_secs && b.at_secs < a.at_secs + a.duration_secs
        };
        for (j, b) in self.faults.iter().enumerate() {
            let field = format!("faults[{j}].at_secs");
            for (i, a) in self.faults.iter().enumerate().take(j) {
                if !overlaps(a, b) {
                    continue;
                }
                if a.kind.uses_partition_rules() && b.kind.uses_partition_rules() {
                    return bad(
                        &field,
                        format!(
                            "overlaps faults[{i}]; two partitions ({}, {}) cannot be in force \
                             at once: installing or healing one replaces the other's rules",
                            a.kind.name(),
                            b.kind.name()
                        ),
                    );
                }
                if let (Some(x), Some(y)) = (&a.between, &b.between) {
                    let same = |p: &[String], q: &[String]| {
                        (p[0] == q[0] && p[1] == q[1]) || (p[0] == q[1] && p[1] == q[0])
                    };
                    if same(x, y) {
                        return bad(
                            &field,
                            format!(
                                "overlaps faults[{i}] on the same region pair; healing one \
                                 would restore the links under the other"
                            ),
                        );
                    }
                }
                if let (Target::Node(x), Target::Node(y)) = (&a.target, &b.target) {
                    if x == y && a.kind.takes_nodes(self.nodes) > 0 {
                        return bad(&field, format!("overlaps faults[{i}] on the same node {x}"));
                    }
                }
            }
            // Nodes out of the quorum while `b` starts: the faults in force then (those that
            // started earlier, or at the same time and listed earlier) plus `b` itself.
            let taken: u64 = self
                .faults
                .iter()
                .enumerate()
                .filter(|(i, a)| {
                    *i == j
                        || (overlaps(a, b)
                            && (a.at_secs < b.at_secs || (a.at_secs == b.at_secs && *i < j)))
                })
                .map(|(_, a)| a.kind.takes_nodes(self.nodes))
                .sum();
            let tolerated = (self.nodes - 1) / 2;
            if taken > tolerated {
                return bad(
                    &field,
                    format!(
                        "with the faults in force then, {taken} of {} nodes are down or cut off; \
                         at most {tolerated} may be for a quorum to remain",
                        self.nodes
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
nodes = 3
duration_secs = 30
[clients]
count = 4
[[faults]]
at_secs = 5
kind = "kill"
target = "leader"
duration_secs = 3
[[faults]]
at_secs = 12
kind = "isolate"
target = { node = 2 }
"#;

    #[test]
    fn good_scenario_parses() {
        let s = Scenario::parse(GOOD, "good.toml").expect("valid");
        assert_eq!(s.faults.len(), 2);
        assert_eq!(s.faults[1].target, Target::Node(2));
        assert_eq!(s.clients.keys, 3);
        assert_eq!(s.max_majority_outage_ms, DEFAULT_MAX_MAJORITY_OUTAGE_MS);
        assert_eq!(s.expect, Expect::Linearizable);
        let s = Scenario::parse(
            &GOOD.replace(
                "duration_secs = 30",
                "duration_secs = 30\nmax_majority_outage_ms = 250",
            ),
            "good.toml",
        )
        .expect("valid");
        assert_eq!(s.max_majority_outage_ms, 250);
        let broken = GOOD.replace(
            "duration_secs = 30",
            "duration_secs = 30\nexpect = \"majority-outage\"\n[debug]\ndrop_majority_https = true",
        );
        let s = Scenario::parse(&broken, "broken.toml").expect("valid");
        assert_eq!(s.expect, Expect::MajorityOutage);
    }

    #[test]
    fn link_faults_and_links_parse() {
        let text = GOOD.replace(
            "\"kill\"",
            "\"latency\"\nbetween = [\"eu-west\", \"us-east\"]\ndelay_ms = 80\njitter_ms = 10",
        ) + "\n[links]\ndelay_ms = 20\n[[links.pair]]\nbetween = [\"eu-west\", \"ap-south\"]\ndelay_ms = 60\nloss_percent = 1\n";
        let s = Scenario::parse(&text, "l.toml").expect("valid");
        assert_eq!(s.faults[0].kind, FaultKind::Latency);
        assert_eq!(s.faults[0].delay_ms, Some(80));
        assert_eq!(s.links.delay_ms, 20);
        assert_eq!(s.links.pair[0].delay_ms, 60);
    }

    const OVERLAPPING: &str = r#"
name = "o"
nodes = 5
duration_secs = 60
regions = ["a", "b", "c"]
[[faults]]
at_secs = 1
kind = "latency"
between = ["a", "b"]
delay_ms = 50
duration_secs = 50
[[faults]]
at_secs = 5
kind = "pause"
target = "follower"
duration_secs = 10
[[faults]]
at_secs = 7
kind = "kill"
target = "leader"
duration_secs = 5
[[faults]]
at_secs = 20
kind = "isolate"
target = "follower"
duration_secs = 10
[[faults]]
at_secs = 22
kind = "membership"
target = "follower"
duration_secs = 5
"#;

    #[test]
    fn overlapping_faults_that_leave_a_quorum_are_accepted() {
        let s = Scenario::parse(OVERLAPPING, "o.toml").expect("valid");
        assert_eq!(s.faults.len(), 5);
        // Another link fault on a different pair may overlap the first.
        let other_pair = format!(
            "{OVERLAPPING}[[faults]]\nat_secs = 30\nkind = \"loss\"\nbetween = [\"b\", \"c\"]\npercent = 5\n"
        );
        Scenario::parse(&other_pair, "o.toml").expect("valid");
    }

    #[test]
    fn overlapping_faults_that_conflict_are_rejected() {
        let extra = |f: &str| format!("{OVERLAPPING}[[faults]]\n{f}\n");
        let cases = [
            // Two partitions: healing one would remove the other's rules.
            (
                extra("at_secs = 25\nkind = \"one-way\"\ntarget = \"leader\""),
                "faults[5].at_secs",
                "two partitions",
            ),
            // Same region pair, reversed.
            (
                extra("at_secs = 30\nkind = \"loss\"\nbetween = [\"b\", \"a\"]\npercent = 5"),
                "faults[5].at_secs",
                "same region pair",
            ),
            // isolate + membership + a kill: 3 of 5 nodes out.
            (
                extra("at_secs = 23\nkind = \"kill\"\ntarget = \"leader\""),
                "faults[5].at_secs",
                "3 of 5 nodes",
            ),
            // pause + kill already take 2 of 5; a majority-minority would take 2 more.
            (
                extra("at_secs = 8\nkind = \"majority-minority\"\ntarget = \"leader\"\nduration_secs = 2"),
                "faults[5].at_secs",
                "4 of 5 nodes",
            ),
        ];
        for (text, field, reason) in cases {
            let err = Scenario::parse(&text, "o.toml")
                .expect_err(field)
                .to_string();
            assert!(err.contains(field) && err.contains(reason), "{err:?}");
        }
        // The same node twice (on 3 nodes, also 2 of 3 out).
        let same_node = GOOD
            .replace("target = \"leader\"", "target = { node = 2 }")
            .replace("at_secs = 12", "at_secs = 6");
        let err = Scenario::parse(&same_node, "x.toml")
            .expect_err("same node")
            .to_string();
        assert!(err.contains("faults[1].at_secs"), "{err:?}");
        // Faults that only touch each other's boundary do not overlap.
        let back_to_back = GOOD.replace("at_secs = 12", "at_secs = 8");
        Scenario::parse(&back_to_back, "x.toml").expect("valid");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("count = 4", "count = 4\ncuont = 1"), "cuont"),
            (GOOD.replace("nodes = 3", "nodes = 1"), "`nodes`"),
            (GOOD.replace("\"kill\"", "\"explode\""), "explode"),
            (GOOD.replace("node = 2", "node = 9"), "faults[1].target"),
            (
                GOOD.replace("at_secs = 12", "at_secs = 40"),
                "faults[1].at_secs",
            ),
            (
                GOOD.replace("at_secs = 12", "at_secs = 6"),
                "faults[1].at_secs",
            ),
            (GOOD.replace("\"kill\"", "\"disk-full\""), "faults[0].kind"),
            (GOOD.replace("count = 4", "count = 0"), "clients.count"),
            (GOOD.replace("\"kill\"", "\"latency\""), "faults[0].between"),
            (
                GOOD.replace("\"kill\"", "\"latency\"\nbetween = [\"eu-west\", \"mars\"]"),
                "faults[0].between",
            ),
            (
                GOOD.replace(
                    "\"kill\"",
                    "\"latency\"\nbetween = [\"eu-west\", \"us-east\"]",
                ),
                "faults[0].delay_ms",
            ),
            (
                GOOD.replace(
                    "\"kill\"",
                    "\"loss\"\nbetween = [\"eu-west\", \"us-east\"]\npercent = 120",
                ),
                "faults[0].percent",
            ),
            (
                GOOD.replace("\"kill\"", "\"kill\"\ndelay_ms = 5"),
                "faults[0].kind",
            ),
            (
                format!("{GOOD}\n[links]\ndelay_ms = 99999\n"),
                "links.delay_ms",
            ),
            (
                GOOD.replace("duration_secs = 30", "duration_secs = 30\nmax_majority_outage_ms = 0"),
                "max_majority_outage_ms",
            ),
            (
                GOOD.replace(
                    "duration_secs = 30",
                    "duration_secs = 30\nmax_majority_outage_ms = 100",
                ),
                "max_majority_outage_ms",
            ),
            (
                GOOD.replace(
                    "duration_secs = 30",
                    "duration_secs = 30\nmax_majority_outage_ms = 600000",
                ),
                "max_majority_outage_ms",
            ),
            (
                GOOD.replace(
                    "duration_secs = 30",
                    "duration_secs = 30\nmax_majority_outage_ms = \"1s\"",
                ),
                "max_majority_outage_ms",
            ),
            (
                GOOD.replace("duration_secs = 30", "duration_secs = 30\nexpect = \"majority-outage\""),
                "debug.drop_majority_https",
            ),
            (
                format!("{GOOD}\n[debug]\ndrop_majority_https = true\n"),
                "debug.drop_majority_https",
            ),
            (
                GOOD.replace("\"isolate\"", "\"pause\"").replace(
                    "duration_secs = 30",
                    "duration_secs = 30\nexpect = \"majority-outage\"\n[debug]\ndrop_majority_https = true",
                ),
                "`expect`",
            ),
        ];
        for (text, needle) in cases {
            let err = Scenario::parse(&text, "x.toml")
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle}");
        }
    }
}
