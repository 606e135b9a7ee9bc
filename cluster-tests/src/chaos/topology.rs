//! Network namespaces, veth links and a bridge for a chaos run, plus nftables partitions.
//!
//! Layout (all names start with [`PREFIX`], so `portcullis-chaos cleanup` finds leftovers):
//!
//! ```text
//!  root namespace (harness, admin clients)     pcchaos-hub            pcchaos-n<i> (gateway i)
//!  pcchaos0 10.77.0.1/24 <--veth--> h0 --+                          eth0 10.77.0.(10+i)/24
//!  pcchaos-client  eth0 10.77.0.3 <--> c0 --br0-- n<i> <--veth-->    (admin, HTTPS)
//!  pcchaos-cvm     eth0 10.77.0.4 <--> v0 --+                       pcchaos-w<i> 10.99.0.<i>/24
//!  (demo app)                                                        (TUN: cluster RPC, the WAN)
//!  harness process: reads/writes every pcchaos-w<i> fd (link.rs: delay, jitter, loss)
//! ```
//!
//! The bridge lives in its own namespace, so deleting that namespace removes the bridge and every
//! veth pair with it; the TUN devices disappear when the harness closes their fds or their
//! namespace is deleted. Partitions are nftables `input` drops inside the node namespaces (on
//! both the LAN and the WAN source addresses); clients (10.77.0.1, 10.77.0.3) and the CVM
//! (10.77.0.4) are never cut off, so they can observe a minority's answers.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The nftables table of [`Topology::drop_https`] (no `-`: nft identifiers).
const DROP_HTTPS_TABLE: &str = "pcchaos_https";

/// Prefix of every namespace and root-namespace link the harness creates.
pub const PREFIX: &str = "pcchaos";
pub const HUB: &str = "pcchaos-hub";
pub const ROOT_LINK: &str = "pcchaos0";
pub const HARNESS_IP: &str = "10.77.0.1";
/// The data-plane probe's clients run here (link.rs `run_in_netns`).
pub const CLIENT_NS: &str = "pcchaos-client";
pub const CLIENT_IP: &str = "10.77.0.3";
/// The demo app (the CVM workload behind the gateways) runs here.
pub const CVM_NS: &str = "pcchaos-cvm";
pub const CVM_IP: &str = "10.77.0.4";
/// The HTTPS port every gateway of the topology listens on (at its node address).
pub const GATEWAY_HTTPS_PORT: u16 = 8443;

pub fn node_ns(id: u64) -> String {
    format!("{PREFIX}-n{id}")
}

pub fn node_ip(id: u64) -> String {
    format!("10.77.0.{}", 10 + id)
}

/// Node `id`'s address on the emulated WAN (its TUN device), used for cluster RPC.
pub fn wan_ip(id: u64) -> std::net::Ipv4Addr {
    // Node ids are 1..=7 (scenario validation), so this never truncates.
    std::net::Ipv4Addr::new(10, 99, 0, id.min(254) as u8)
}

/// Node `id`'s TUN device name (also in the root namespace while it is being created).
pub fn wan_dev(id: u64) -> String {
    format!("{PREFIX}-w{id}")
}

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside namespace `ns`, feeding `stdin`.
fn sh_in_with_input(ns: &str, args: &[&str], stdin: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {} in {ns}", args.join(" ")))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` in {ns} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Bare network namespaces for a test (loopback up), deleted on drop, pass or fail, and so their
/// TUN devices; any left by an earlier run that was killed are deleted first.
pub struct ScratchNamespaces(Vec<String>);

impl ScratchNamespaces {
    pub fn create(names: &[&str]) -> anyhow::Result<Self> {
        let g = ScratchNamespaces(names.iter().map(|n| n.to_string()).collect());
        g.delete();
        for ns in names {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(g)
    }

    fn delete(&self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}

impl Drop for ScratchNamespaces {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Whether we run as root (namespaces and nftables need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The namespaces and links of one run; removed on drop.
pub struct Topology {
    pub nodes: Vec<u64>,
    torn_down: bool,
}

impl Topology {
    /// Creates the hub, the harness link and one namespace per node. Removes leftovers of an
    /// earlier run first (their names would collide).
    pub fn create(nodes: u64) -> anyhow::Result<Topology> {
        cleanup_all();
        // From here on, a failure half-way drops `t`, which removes what was built.
        let mut t = Topology {
            nodes: Vec::new(),
            torn_down: false,
        };
        sh(&["ip", "netns", "add", HUB])?;
        in_ns(HUB, &["ip", "link", "set", "lo", "up"])?;
        in_ns(HUB, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(HUB, &["ip", "link", "set", "br0", "up"])?;
        // The hub's own address: not used by the run (the demo app lives in the CVM namespace),
        // but it lets one ping every namespace from the hub when debugging a topology.
        in_ns(HUB, &["ip", "addr", "add", "10.77.0.2/24", "dev", "br0"])?;
        // Harness side: veth from the root namespace into the hub.
        sh(&[
            "ip", "link", "add", ROOT_LINK, "type", "veth", "peer", "name", "h0", "netns", HUB,
        ])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{HARNESS_IP}/24"),
            "dev",
            ROOT_LINK,
        ])?;
        sh(&["ip", "link", "set", ROOT_LINK, "up"])?;
        in_ns(HUB, &["ip", "link", "set", "h0", "master", "br0"])?;
        in_ns(HUB, &["ip", "link", "set", "h0", "up"])?;
        // Client and CVM namespaces, one veth each into the bridge.
        for (ns, hub_end, ip) in [(CLIENT_NS, "c0", CLIENT_IP), (CVM_NS, "v0", CVM_IP)] {
            sh(&["ip", "netns", "add", ns])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
            in_ns(
                HUB,
                &[
                    "ip", "link", "add", hub_end, "type", "veth", "peer", "name", "eth0", "netns",
                    ns,
                ],
            )?;
            in_ns(HUB, &["ip", "link", "set", hub_end, "master", "br0"])?;
            in_ns(HUB, &["ip", "link", "set", hub_end, "up"])?;
            in_ns(
                ns,
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
            in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
        }
        for id in 1..=nodes {
            let ns = node_ns(id);
            sh(&["ip", "netns", "add", &ns])?;
            t.nodes.push(id);
            in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
            let hub_end = format!("n{id}");
            in_ns(
                HUB,
                &[
                    "ip", "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0", "netns",
                    &ns,
                ],
            )?;
            in_ns(HUB, &["ip", "link", "set", &hub_end, "master", "br0"])?;
            in_ns(HUB, &["ip", "link", "set", &hub_end, "up"])?;
            in_ns(
                &ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", node_ip(id)),
                    "dev",
                    "eth0",
                ],
            )?;
            in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
        }
        Ok(t)
    }

    /// Installs a partition: every `(from, to)` pair stops delivering packets from `from` to
    /// `to` (an nftables input drop in `to`'s namespace). Replaces any earlier partition.
    pub fn partition(&self, blocked: &BTreeSet<(u64, u64)>) -> anyhow::Result<()> {
        self.heal()?;
        for to in &self.nodes {
            let srcs: Vec<String> = blocked
                .iter()
                .filter(|(_, t)| t == to)
                // Both addresses: cluster RPC comes over the WAN, anything else over the LAN.
                .flat_map(|(f, _)| [node_ip(*f), wan_ip(*f).to_string()])
                .collect();
            if srcs.is_empty() {
                continue;
            }
            let rules = format!(
                "table inet pcchaos {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  ip saddr {{ {} }} drop\n }}\n}}\n",
                srcs.join(", ")
            );
            sh_in_with_input(&node_ns(*to), &["nft", "-f", "-"], &rules)?;
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> anyhow::Result<()> {
        for id in &self.nodes {
            // Absent table: nothing to heal there.
            let _ = in_ns(
                &node_ns(*id),
                &["nft", "delete", "table", "inet", "pcchaos"],
            );
        }
        Ok(())
    }

    /// Test-only (`[debug] drop_majority_https`): gateway `id` drops incoming client HTTPS
    /// (TCP to the edge port), as if its edge stopped serving. Its own nftables table, so
    /// installing and healing partitions leaves it alone.
    pub fn drop_https(&self, id: u64) -> anyhow::Result<()> {
        let rules = format!(
            "table inet {DROP_HTTPS_TABLE} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  tcp dport {GATEWAY_HTTPS_PORT} drop\n }}\n}}\n"
        );
        sh_in_with_input(&node_ns(id), &["nft", "-f", "-"], &rules)
    }

    /// Undoes [`Topology::drop_https`] on every node.
    pub fn undrop_https(&self) -> anyhow::Result<()> {
        for id in &self.nodes {
            // Absent table: that node was not the one.
            let _ = in_ns(
                &node_ns(*id),
                &["nft", "delete", "table", "inet", DROP_HTTPS_TABLE],
            );
        }
        Ok(())
    }

    /// Takes node `id`'s links (LAN and, if it exists, WAN) down or up.
    pub fn set_link(&self, id: u64, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        in_ns(&node_ns(id), &["ip", "link", "set", "eth0", state])?;
        let wan = wan_dev(id);
        if in_ns(&node_ns(id), &["ip", "link", "show", &wan]).is_ok() {
            // The IPv4 address survives down/up and its subnet route returns with the link.
            in_ns(&node_ns(id), &["ip", "link", "set", &wan, state])?;
        }
        Ok(())
    }

    /// Kills every process left in the node namespaces and deletes namespaces and links.
    pub fn teardown(&mut self) {
        if !self.torn_down {
            cleanup_all();
            self.torn_down = true;
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// Removes everything a chaos run may have left behind: processes inside `pcchaos-*`
/// namespaces (SIGKILL), the namespaces, and the harness link. Returns what it removed.
pub fn cleanup_all() -> Vec<String> {
    let mut removed = Vec::new();
    let list = sh(&["ip", "netns", "list"]).unwrap_or_default();
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue;
        }
        let pids = sh(&["ip", "netns", "pids", name]).unwrap_or_default();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // A stopped process must be continued to die promptly? SIGKILL works on stopped
            // processes too; no SIGCONT needed.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            removed.push(format!("process {pid} in {name}"));
        }
        if sh(&["ip", "netns", "delete", name]).is_ok() {
            removed.push(format!("namespace {name}"));
        }
    }
    // tmpfs data dirs of runs that died before their guards ran.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(fs), Some(point)) = (f.next(), f.next()) else {
            continue;
        };
        if fs == "tmpfs" && point.contains("/pcchaos-") && sh(&["umount", "-l", point]).is_ok() {
            removed.push(format!("mount {point}"));
        }
    }
    // The harness link, and a TUN device caught in the root namespace between its creation and
    // its move (it goes away with our fd, but a stray persistent one would block the next run).
    let links = sh(&["ip", "-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "3: pcchaos0@if2: <...>" -> "pcchaos0"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with(PREFIX) && sh(&["ip", "link", "delete", name]).is_ok() {
            removed.push(format!("link {name}"));
        }
    }
    removed
}
