//! wireguard-go on a TUN device inside a network namespace, driven only through the `ip`, `wg`
//! and `wireguard-go` programs (no unsafe code, no netlink in-process). Everything is torn down
//! in `Drop`, also when a test fails.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use portcullis_wg::PublicKey;

/// Why these tests cannot run here, or `None` if they can.
pub fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces and TUN devices need uid 0".into());
    }
    for tool in ["wireguard-go", "wg", "ip"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{tool} not found (apt-get install -y wireguard-go wireguard-tools iproute2)"
            ));
        }
    }
    None
}

pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// A network namespace that is deleted on drop (which also destroys its interfaces).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        // A leftover from a crashed earlier run would make `add` fail.
        let _ = run("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns_exec(&ns.name, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A child process killed (by its own pid) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One wireguard-go interface.
pub struct WgGo {
    pub ifname: String,
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub tunnel_ip: IpAddr,
    // Field order is drop order: the process before the namespace.
    _proc: Proc,
    _dir: tempfile::TempDir,
}

pub struct WgGoSpec<'a> {
    pub ifname: &'a str,
    /// Address with prefix, e.g. "10.77.0.2/24".
    pub cidr: &'a str,
    /// Namespace the TUN device ends up in.
    pub ns: &'a str,
    /// Run the wireguard-go process (hence its UDP socket) inside `ns` too. When false, the
    /// process and its UDP socket stay in the root namespace (reachable on 127.0.0.1) and only
    /// the TUN device moves into `ns`.
    pub udp_in_ns: bool,
    pub mtu: u16,
}

impl WgGo {
    pub fn start(spec: WgGoSpec<'_>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let key = run("wg", &["genkey"])?;
        let key_path = dir.path().join("private.key");
        std::fs::write(&key_path, format!("{key}\n"))?;
        let public_key: PublicKey = run_stdin("wg", &["pubkey"], &key)?.parse()?;

        let sock = format!("/var/run/wireguard/{}.sock", spec.ifname);
        let _ = std::fs::remove_file(&sock);
        let mut cmd = if spec.udp_in_ns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", spec.ns, "wireguard-go", "-f", spec.ifname]);
            c
        } else {
            let mut c = Command::new("wireguard-go");
            c.args(["-f", spec.ifname]);
            c
        };
        let child = cmd
            .env("LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning wireguard-go")?;
        let proc = Proc(child);
        wait_path(Path::new(&sock), Duration::from_secs(5))?;

        run(
            "wg",
            &[
                "set",
                spec.ifname,
                "private-key",
                key_path.to_str().context("temp path")?,
                "listen-port",
                "0",
            ],
        )?;
        let listen_port: u16 = run("wg", &["show", spec.ifname, "listen-port"])?.parse()?;
        if !spec.udp_in_ns {
            run("ip", &["link", "set", spec.ifname, "netns", spec.ns])?;
        }
        let mtu = spec.mtu.to_string();
        ns_exec(spec.ns, &["ip", "link", "set", spec.ifname, "mtu", &mtu])?;
        ns_exec(
            spec.ns,
            &["ip", "addr", "add", spec.cidr, "dev", spec.ifname],
        )?;
        ns_exec(spec.ns, &["ip", "link", "set", spec.ifname, "up"])?;
        let tunnel_ip: IpAddr = spec.cidr.split('/').next().context("cidr")?.parse()?;
        Ok(Self {
            ifname: spec.ifname.to_string(),
            public_key,
            listen_port,
            tunnel_ip,
            _proc: proc,
            _dir: dir,
        })
    }

    /// Adds a peer (`wg set ... peer`).
    pub fn add_peer(
        &self,
        key: &PublicKey,
        allowed: &str,
        endpoint: Option<SocketAddr>,
    ) -> Result<()> {
        let key = key.to_base64();
        let mut args = vec!["set", &self.ifname, "peer", &key, "allowed-ips", allowed];
        let ep;
        if let Some(e) = endpoint {
            ep = e.to_string();
            args.extend_from_slice(&["endpoint", &ep]);
        }
        run("wg", &args)?;
        Ok(())
    }

    pub fn udp_addr_loopback(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listen_port))
    }
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_path(p: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !p.exists() {
        if start.elapsed() > timeout {
            bail!("{} did not appear within {timeout:?}", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `python3 -m http.server` bound on `ip:port` inside `ns`, serving `dir`.
pub fn http_server(ns: &str, ip: IpAddr, port: u16, dir: &Path) -> Result<Proc> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-m", "http.server"])
        .args(["--bind", &ip.to_string(), &port.to_string()])
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning python3 -m http.server")?;
    Ok(Proc(child))
}

/// A unique short suffix for interface and namespace names (interface names max 15 bytes).
pub fn suffix() -> String {
    format!("{}", std::process::id() % 100_000)
}

/// Two namespaces joined by a veth pair (`<veth>.1` ↔ `<veth>.2`, /24), each with a wireguard-go
/// interface (`<tunnel>.1` ↔ `<tunnel>.2`, /24) whose UDP runs over the veth: the
/// wireguard-go ↔ wireguard-go reference path of the benchmarks. `tag` (at most 4 bytes) keeps
/// names apart between drivers. Field order is drop order: interfaces, then namespaces.
pub struct WgGoPair {
    pub wg_a: WgGo,
    pub wg_b: WgGo,
    pub ns_a: Netns,
    pub ns_b: Netns,
}

impl WgGoPair {
    pub fn new(tag: &str, veth: [u8; 3], tunnel: [u8; 3]) -> Result<Self> {
        let sfx = suffix();
        let ns_a = Netns::new(format!("pc{tag}-a-{sfx}"))?;
        let ns_b = Netns::new(format!("pc{tag}-b-{sfx}"))?;
        let (va, vb) = (format!("pc{tag}va{sfx}"), format!("pc{tag}vb{sfx}"));
        run(
            "ip",
            &["link", "add", &va, "type", "veth", "peer", "name", &vb],
        )?;
        run("ip", &["link", "set", &va, "netns", &ns_a.name])?;
        run("ip", &["link", "set", &vb, "netns", &ns_b.name])?;
        let [v0, v1, v2] = veth;
        let [t0, t1, t2] = tunnel;
        for (ns, dev, host) in [(&ns_a.name, &va, 1), (&ns_b.name, &vb, 2)] {
            let cidr = format!("{v0}.{v1}.{v2}.{host}/24");
            ns_exec(ns, &["ip", "addr", "add", &cidr, "dev", dev])?;
            ns_exec(ns, &["ip", "link", "set", dev, "up"])?;
        }
        let start = |ns: &Netns, side: &str, host: u8| {
            WgGo::start(WgGoSpec {
                ifname: &format!("pc{tag}g{side}{sfx}"),
                cidr: &format!("{t0}.{t1}.{t2}.{host}/24"),
                ns: &ns.name,
                udp_in_ns: true,
                mtu: 1420,
            })
        };
        let wg_a = start(&ns_a, "a", 1)?;
        let wg_b = start(&ns_b, "b", 2)?;
        wg_a.add_peer(
            &wg_b.public_key,
            &format!("{t0}.{t1}.{t2}.2/32"),
            Some(SocketAddr::from(([v0, v1, v2, 2], wg_b.listen_port))),
        )?;
        wg_b.add_peer(
            &wg_a.public_key,
            &format!("{t0}.{t1}.{t2}.1/32"),
            Some(SocketAddr::from(([v0, v1, v2, 1], wg_a.listen_port))),
        )?;
        Ok(WgGoPair {
            wg_a,
            wg_b,
            ns_a,
            ns_b,
        })
    }
}
