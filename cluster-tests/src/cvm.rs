//! CVM-side helpers for the tunnel tests: agent configurations, one-shot registrations, and
//! child processes whose output goes to a log file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use portcullis_test_support::wggo::{self, Netns, WgGo, WgGoSpec};

use crate::harness::{portcullis_bin, run, TestCluster};

/// `portcullis <args>` in the background, stdout and stderr to `log`.
pub fn spawn_logged(args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    Command::new(portcullis_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn")
}

/// `portcullis demo-app` on a free local port as instance `instance` of `app` (region
/// us-east), output to `log`, plus `extra` arguments; returns the process and its port once it
/// listens.
pub fn spawn_demo_app(log: &Path, app: &str, instance: &str, extra: &[&str]) -> (Child, u16) {
    let mut args = vec![
        "demo-app",
        "--listen",
        "127.0.0.1:0",
        "--name",
        app,
        "--region",
        "us-east",
        "--instance-id",
        instance,
    ];
    args.extend_from_slice(extra);
    let child = spawn_logged(&args, log);
    let port = crate::harness::wait_for(
        "demo app listening",
        std::time::Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(log).ok()?;
            let addr = text
                .split_once("listening on ")?
                .1
                .split_whitespace()
                .next()?;
            addr.rsplit_once(':')?.1.parse().ok()
        },
    );
    (child, port)
}

/// What a `cvm-agent` configuration says about the CVM.
pub struct AgentSpec<'a> {
    /// Credential directory (from `portcullis cvm credential`), relative to the cluster dir.
    pub cred: &'a str,
    pub app: &'a str,
    pub instance: &'a str,
    /// WireGuard key file, created by the agent on first start.
    pub wg_key: &'a str,
    pub expose: &'a [u16],
    pub reregister_secs: u64,
}

/// Writes a `cvm-agent` configuration listing every node of `tc` and returns its path.
pub fn agent_config(tc: &TestCluster, spec: &AgentSpec<'_>) -> PathBuf {
    let expose: Vec<String> = spec.expose.iter().map(u16::to_string).collect();
    let cluster: Vec<String> = tc
        .ids()
        .iter()
        .map(|id| format!("\"{id}@{}\"", tc.node(*id).rpc_addr))
        .collect();
    let text = format!(
        "cluster = [{}]\nca_cert = \"{cred}/ca.pem\"\ncert = \"{cred}/cert.pem\"\nkey = \"{cred}/key.pem\"\n\
         app = \"{app}\"\ninstance_id = \"{instance}\"\nregion = \"us-east\"\nexpose = [{expose}]\n\
         wg_key = \"{wg_key}\"\nreregister_secs = {every}\n",
        cluster.join(", "),
        cred = spec.cred,
        app = spec.app,
        instance = spec.instance,
        expose = expose.join(", "),
        wg_key = spec.wg_key,
        every = spec.reregister_secs,
    );
    let path = tc.path().join(format!(
        "agent-{}-{}-{}.toml",
        spec.instance,
        spec.app,
        spec.cred.replace('/', "_")
    ));
    std::fs::write(&path, text).expect("write agent config");
    path
}

/// `wg setconf` accepts the wg-quick file minus wg-quick's own keys (what `wg-quick strip` does).
pub fn strip_wg_quick(conf: &str) -> String {
    conf.lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            !matches!(key, "Address" | "MTU" | "DNS" | "Table" | "SaveConfig")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The `Address = IP/PREFIX` of a wg-quick configuration from `cvm-agent --print-wg-config`:
/// the whole value (for `ip addr add`) and the tunnel IP.
pub fn wg_quick_address(conf: &str) -> (String, std::net::IpAddr) {
    let address = conf
        .lines()
        .find_map(|l| l.strip_prefix("Address = "))
        .expect("Address line")
        .trim()
        .to_string();
    let ip = address
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("tunnel ip");
    (address, ip)
}

/// One registration through the agent (`--print-wg-config`): Ok(wg-quick config) or Err(stderr).
pub fn register_once(config: &Path) -> Result<String, String> {
    let out = run(Command::new(portcullis_bin())
        .args(["cvm-agent", "--print-wg-config", "--config"])
        .arg(config));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// `portcullis cvm credential --app APP` into `<cluster dir>/<out>`.
pub fn issue_credential(tc: &TestCluster, app: &str, out: &str) {
    let o = run(Command::new(portcullis_bin())
        .args(["cvm", "credential", "--pki"])
        .arg(tc.path().join("pki"))
        .args(["--app", app, "--out"])
        .arg(tc.path().join(out)));
    assert!(o.status.success(), "{}", crate::harness::show(&o));
}

/// A cluster and the processes a test started beside it (demo apps, agents): on drop the
/// processes are killed first, then the cluster is brought down.
pub struct WithChildren {
    pub tc: TestCluster,
    pub children: Vec<Child>,
}

impl WithChildren {
    pub fn new(tc: TestCluster) -> Self {
        WithChildren {
            tc,
            children: Vec::new(),
        }
    }
}

impl Drop for WithChildren {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.tc.down();
    }
}

/// curl `https://<host><path>` through node `id`'s HTTPS edge, trusting the dev CA:
/// (status, body), or None when curl got no HTTP answer.
pub fn curl_https(tc: &TestCluster, id: u64, host: &str, path: &str) -> Option<(u16, String)> {
    curl_https_timeout(tc, id, host, path, 5)
}

/// [`curl_https`] with a whole-request limit of `secs` seconds.
pub fn curl_https_timeout(
    tc: &TestCluster,
    id: u64,
    host: &str,
    path: &str,
    secs: u64,
) -> Option<(u16, String)> {
    let https = &tc.node(id).https_addr;
    let port = https.rsplit_once(':').map(|(_, p)| p)?;
    let out = run(Command::new("curl")
        .args([
            "-s",
            "-m",
            &secs.to_string(),
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(tc.path().join("pki/dev-ca.pem"))
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}{path}")));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

/// One gateway peer of a CVM's wg-quick configuration.
#[derive(Clone, Debug)]
pub struct GatewayPeer {
    pub public_key: String,
    pub tunnel_ip: std::net::IpAddr,
}

/// The `[Peer]` sections of a wg-quick configuration, by the node id in the agent's
/// `# gateway node <id> (...)` comment that precedes each.
pub fn gateway_peers(conf: &str) -> std::collections::BTreeMap<u64, GatewayPeer> {
    let mut out = std::collections::BTreeMap::new();
    let mut id = None;
    let mut key = None;
    for line in conf.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# gateway node ") {
            id = rest.split_whitespace().next().and_then(|s| s.parse().ok());
        } else if let Some(k) = line.strip_prefix("PublicKey = ") {
            key = Some(k.trim().to_string());
        } else if let Some(a) = line.strip_prefix("AllowedIPs = ") {
            let ip = a.split('/').next().and_then(|s| s.trim().parse().ok());
            if let (Some(id), Some(public_key), Some(tunnel_ip)) = (id.take(), key.take(), ip) {
                out.insert(
                    id,
                    GatewayPeer {
                        public_key,
                        tunnel_ip,
                    },
                );
            }
        }
    }
    out
}

/// The exported counter `portcullis_wg_events_total{event="<event>"}` of node `id`, or `None`
/// if the node's /metrics did not answer or does not have it.
pub fn wg_event(tc: &TestCluster, id: u64, event: &str) -> Option<u64> {
    let prefix = format!("portcullis_wg_events_total{{event=\"{event}\"}} ");
    tc.metrics(id)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

pub fn wg_event_now(tc: &TestCluster, id: u64, event: &str) -> u64 {
    crate::harness::wait_for(
        &format!("node {id} exports wg event {event}"),
        std::time::Duration::from_secs(10),
        || wg_event(tc, id, event),
    )
}

/// Waits (up to 30 s: routes and tunnels come up asynchronously) until node `id` answers
/// `https://<host><path>` with 200, and returns the body.
pub fn wait_served(tc: &TestCluster, id: u64, host: &str, path: &str) -> String {
    crate::harness::wait_for(
        &format!("node {id} serves {host}{path}"),
        std::time::Duration::from_secs(30),
        || match curl_https(tc, id, host, path)? {
            (200, body) => Some(body),
            _ => None,
        },
    )
}

/// How many of interface `ifname`'s WireGuard peers have completed a handshake.
pub fn handshaken_peers(ifname: &str) -> usize {
    let hs = wggo::run("wg", &["show", ifname, "latest-handshakes"]).expect("wg show");
    hs.lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|t| t != "0"))
        .count()
}

/// A CVM that brings its own WireGuard: wireguard-go on a TUN device in its own network
/// namespace. Field order is drop order: wireguard-go, then the namespace.
pub struct WgGoCvm {
    pub wg: WgGo,
    pub ns: Netns,
    pub ifname: String,
}

/// Brings up wireguard-go in a new namespace `ns_name` on interface `ifname`, configured only
/// from the agent's wg-quick output `conf` (`cvm-agent --print-wg-config`), as wg-quick would:
/// the interface address, keys and peers (`wg setconf`), and a route per gateway address.
pub fn start_wggo_cvm(
    tc: &TestCluster,
    conf: &str,
    ns_name: String,
    ifname: String,
) -> anyhow::Result<WgGoCvm> {
    let (address, _) = wg_quick_address(conf);
    let ns = Netns::new(ns_name)?;
    let wg = WgGo::start(WgGoSpec {
        ifname: &ifname,
        cidr: &address,
        ns: &ns.name,
        udp_in_ns: false,
        mtu: 1420,
    })?;
    let setconf = tc.path().join(format!("{ifname}.setconf"));
    std::fs::write(&setconf, strip_wg_quick(conf))?;
    wggo::run(
        "wg",
        &["setconf", &ifname, setconf.to_str().context("utf8 path")?],
    )?;
    for line in conf.lines().filter_map(|l| l.strip_prefix("AllowedIPs = ")) {
        wggo::ns_exec(
            &ns.name,
            &["ip", "route", "add", line.trim(), "dev", &ifname],
        )?;
    }
    Ok(WgGoCvm { wg, ns, ifname })
}
