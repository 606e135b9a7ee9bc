//! t90: the chaos harness on a real cluster in network namespaces (root only).
//!
//! - `ci_scenario_passes`: `scenarios/ci.toml` — leader kill, leader pause, leader isolation,
//!   one-way partition, bridge partition, remove + re-add + promote a follower, leader link
//!   down — under a concurrent CAS/read workload; the history must be linearizable, all nodes
//!   must converge and no acknowledged write may be lost.
//! - `broken_stale_reads_are_caught`: nodes with the test-only `[debug] unsafe_stale_reads`
//!   switch; the run passes only if the checker flags a non-linearizable read.
//! - `wan_latency_scenario_passes`: `scenarios/wan-latency.toml` — inter-region latency and
//!   loss on the harness's WAN link layer (cluster RPC over TUN devices), then a leader kill;
//!   the checks must pass and the link layer must have delayed and dropped packets.
//! - `majority_outage_is_caught`: `scenarios/broken-majority-data-plane.toml` — the test-only
//!   harness switch `[debug] drop_majority_https` drops client HTTPS on a majority-side gateway
//!   while a follower is isolated; the run passes only if the majority-side data-plane check
//!   flags that gateway.
//!
//! Every run also checks the majority-side data plane: during each partition fault, every
//! gateway on the majority side must keep serving HTTPS (scenario `max_majority_outage_ms`).
//!
//! All drive the `portcullis-chaos` binary, so its CLI, exit codes and JSON report are tested
//! too. They share namespace names, so they run one at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use portcullis_cluster_tests::chaos::topology::is_root;
use portcullis_cluster_tests::harness::{phase, portcullis_bin, show};

static SERIAL: Mutex<()> = Mutex::new(());

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name)
}

/// Runs a scenario; returns (exit success, report JSON, combined output).
fn run(name: &str, seed: u64) -> (bool, serde_json::Value, String) {
    let report = tempfile::NamedTempFile::new().expect("temp report");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-chaos"))
        .arg("run")
        .arg(scenario(name))
        .args(["--seed", &seed.to_string(), "--portcullis"])
        .arg(portcullis_bin())
        .arg("--report")
        .arg(report.path())
        .output()
        .expect("run portcullis-chaos");
    let text = show(&out);
    eprintln!("{text}");
    let json = std::fs::read_to_string(report.path())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    (out.status.success(), json, text)
}

fn skip_unless_root() -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIP: t90_chaos needs root (network namespaces, veth links, nftables)");
    true
}

fn no_leftovers() {
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    let ns = String::from_utf8_lossy(&ns.stdout);
    assert!(!ns.contains("pcchaos"), "namespaces left behind: {ns}");
    // The harness link and any TUN device of the WAN link layer.
    let link = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(!link.contains("pcchaos"), "links left behind: {link}");
}

#[test]
fn ci_scenario_passes() {
    if skip_unless_root() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    phase("scenarios/ci.toml: kill, pause, partitions, membership change");
    let (ok, r, text) = run("ci.toml", 42);
    assert!(ok, "chaos run failed:\n{text}");
    assert_eq!(r["linearizable"], true, "{text}");
    assert_eq!(r["converged"], true, "{text}");
    assert_eq!(r["final_state_ok"], true, "{text}");
    assert!(
        r["ok"].as_u64().unwrap_or(0) > 500,
        "too few operations: {text}"
    );
    let faults = r["faults"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = faults.iter().filter_map(|f| f["kind"].as_str()).collect();
    for k in ["kill", "pause", "isolate", "membership"] {
        assert!(kinds.contains(&k), "fault {k} did not run: {kinds:?}");
    }
    // Every fault that hit the leader must have produced a new leader among the rest.
    for f in &faults {
        if f["leader_affected"] == true && f["kind"] != "one-way" {
            assert!(
                f["election_ms"].as_u64().is_some(),
                "no new leader after {f}:\n{text}"
            );
        }
    }
    // The majority side kept serving HTTPS through isolate, one-way, bridge and link-down, and
    // the summary says so per gateway.
    let m = &r["majority_data_plane"];
    assert_eq!(m["ok"], true, "{text}");
    let windows = m["windows"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = windows.iter().filter_map(|w| w["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["isolate", "one-way", "bridge", "link-down"],
        "{text}"
    );
    for w in &windows {
        let majority = w["majority"].as_array().map(Vec::len).unwrap_or(0);
        let probed = w["gateways"].as_object().map(|g| g.len()).unwrap_or(0);
        assert!(majority >= 2 && probed == majority, "{w}:\n{text}");
    }
    assert!(
        text.contains("longest majority-side outage per gateway during partitions"),
        "{text}"
    );
    assert!(text.contains("majority side kept serving: yes"), "{text}");
    no_leftovers();
}

#[test]
fn majority_outage_is_caught() {
    if skip_unless_root() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    phase("scenarios/broken-majority-data-plane.toml: the data-plane check must fail");
    let (ok, r, text) = run("broken-majority-data-plane.toml", 3);
    assert!(
        ok,
        "the harness did not catch the majority-side outage:\n{text}"
    );
    let m = &r["majority_data_plane"];
    assert_eq!(m["ok"], false, "{text}");
    // The switch hits the lowest-id majority-side gateway; which nodes that side holds depends
    // on which node led, so take the victim from the report.
    let w = &m["windows"][0];
    let victim = w["majority"][0].as_u64().expect("majority side");
    let outage = w["gateways"][victim.to_string()]["longest_outage_ms"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        outage > m["max_outage_ms"].as_u64().unwrap_or(u64::MAX),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "MAJORITY-SIDE DATA-PLANE OUTAGE: gateway {victim}:"
        )),
        "{text}"
    );
    no_leftovers();
}

#[test]
fn broken_stale_reads_are_caught() {
    if skip_unless_root() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    phase("scenarios/broken-stale-reads.toml: the checker must flag stale reads");
    let (ok, r, text) = run("broken-stale-reads.toml", 7);
    assert!(ok, "the harness did not catch the broken build:\n{text}");
    assert_eq!(r["linearizable"], false, "{text}");
    assert!(text.contains("NOT linearizable"), "{text}");
    no_leftovers();
}

#[test]
fn wan_latency_scenario_passes() {
    if skip_unless_root() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    phase("scenarios/wan-latency.toml: latency and loss between regions, then a leader kill");
    let (ok, r, text) = run("wan-latency.toml", 42);
    assert!(ok, "chaos run failed:\n{text}");
    assert_eq!(r["linearizable"], true, "{text}");
    assert_eq!(r["converged"], true, "{text}");
    assert_eq!(r["final_state_ok"], true, "{text}");
    assert!(
        r["ok"].as_u64().unwrap_or(0) > 100,
        "too few operations: {text}"
    );
    // Raft really went over the link layer, and the loss fault really dropped packets.
    assert!(
        r["wan"]["forwarded"].as_u64().unwrap_or(0) > 1000,
        "cluster RPC did not cross the WAN: {text}"
    );
    assert!(
        r["wan"]["lost"].as_u64().unwrap_or(0) > 0,
        "the loss fault dropped nothing: {text}"
    );
    let faults = r["faults"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = faults.iter().filter_map(|f| f["kind"].as_str()).collect();
    assert_eq!(kinds, ["latency", "loss", "kill"], "{text}");
    for f in &faults {
        if f["leader_affected"] == true {
            assert!(
                f["election_ms"].as_u64().is_some(),
                "no new leader after {f}:\n{text}"
            );
        }
    }
    no_leftovers();
}
