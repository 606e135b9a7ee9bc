//! Drives real `portcullis` processes: start a cluster with `portcullis up --detach`, run CLI
//! commands against it, kill and restart nodes, and wait for conditions.
//!
//! The harness only uses the binary's public contract (CLI flags, `--json` output,
//! `cluster.json`), never the node's Rust API, so the tests also prove that contract.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `portcullis` binary under test: `$PORTCULLIS_BIN`, or the workspace's own build (built
/// on first use, so `cargo test` alone is enough).
pub fn portcullis_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PORTCULLIS_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let status = Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "portcullis-node",
                "--bin",
                "portcullis",
            ])
            .current_dir(&root)
            .status()
            .expect("run cargo build for the portcullis binary");
        assert!(status.success(), "building the portcullis binary failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("portcullis")
    })
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    pub region: String,
    pub admin_addr: String,
    pub https_addr: String,
    pub http_addr: String,
    pub rpc_addr: String,
    pub pid: u32,
    pub config: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClusterJson {
    pub token_file: PathBuf,
    pub ca_cert: PathBuf,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MemberStatus {
    pub id: u64,
    pub region: String,
    pub voter: bool,
    pub rpc_addr: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub last_applied: u64,
    #[serde(default)]
    pub snapshot_index: u64,
    #[serde(default)]
    pub purged_index: u64,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct AppJson {
    pub name: String,
    pub ports: Vec<u32>,
    pub lb: String,
}

/// Logs a test phase, in the style of openraft's cluster tests.
pub fn phase(msg: &str) {
    eprintln!("--- {msg}");
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A local cluster, stopped (and its directory removed) on drop.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub info: ClusterJson,
    /// Processes started by `start_node` (restarts), reaped on drop.
    children: Vec<std::process::Child>,
}

impl TestCluster {
    pub fn up(nodes: u64) -> Self {
        Self::up_with(nodes, &[])
    }

    /// `portcullis up --detach --nodes N <extra>`.
    pub fn up_with(nodes: u64, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-test-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new(portcullis_bin())
            .args([
                "up",
                "--detach",
                "--nodes",
                &nodes.to_string(),
                "--state-dir",
            ])
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run portcullis up");
        assert!(
            out.status.success(),
            "portcullis up failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let info = read_cluster_json(dir.path());
        TestCluster {
            dir,
            info,
            children: Vec::new(),
        }
    }

    pub fn node(&self, id: u64) -> &NodeEntry {
        self.info
            .nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn ids(&self) -> Vec<u64> {
        self.info.nodes.iter().map(|n| n.id).collect()
    }

    /// `portcullis --cluster DIR <args>`: the first answering node serves it.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(portcullis_bin())
            .arg("--cluster")
            .arg(self.dir.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run portcullis cli")
    }

    /// `portcullis --admin <node> --token-file <token> <args>`: one specific node.
    pub fn cli_at(&self, id: u64, args: &[&str]) -> Output {
        Command::new(portcullis_bin())
            .args(["--admin", &self.node(id).admin_addr, "--token-file"])
            .arg(&self.info.token_file)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run portcullis cli")
    }

    pub fn status(&self, id: u64) -> Option<Status> {
        let out = self.cli_at(id, &["cluster", "status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The leader every live node in `ids` agrees on, if they agree.
    pub fn agreed_leader(&self, ids: &[u64]) -> Option<u64> {
        let mut leader = None;
        for id in ids {
            let l = self.status(*id)?.leader_id?;
            if leader.is_some_and(|x| x != l) {
                return None;
            }
            leader = Some(l);
        }
        leader
    }

    pub fn apps_at(&self, id: u64) -> Option<Vec<AppJson>> {
        let out = self.cli_at(id, &["app", "list", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn signal(&self, id: u64, sig: &str) {
        let pid = self.node(id).pid;
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig} {pid} failed");
    }

    /// SIGKILLs node `id` and waits until its process is gone.
    pub fn kill(&mut self, id: u64) {
        self.signal(id, "KILL");
        let pid = self.node(id).pid;
        self.reap(pid);
        wait_for(
            &format!("node {id} (pid {pid}) to exit"),
            Duration::from_secs(10),
            || (!alive(pid)).then_some(()),
        );
    }

    /// SIGTERMs node `id` and waits for it to exit.
    pub fn stop(&mut self, id: u64) {
        self.signal(id, "TERM");
        let pid = self.node(id).pid;
        wait_for(
            &format!("node {id} (pid {pid}) to exit"),
            Duration::from_secs(20),
            || {
                self.reap(pid);
                (!alive(pid)).then_some(())
            },
        );
    }

    fn reap(&mut self, pid: u32) {
        for c in self.children.iter_mut().filter(|c| c.id() == pid) {
            let _ = c.try_wait();
        }
    }

    /// Starts node `id` again from its config, with the same data directory.
    pub fn start_node(&mut self, id: u64) {
        let node = self.node(id).clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.config.with_file_name("node.log"))
            .expect("open node log");
        let child = Command::new(portcullis_bin())
            .args(["node", "--config"])
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start node");
        let pid = child.id();
        self.children.push(child);
        if let Some(n) = self.info.nodes.iter_mut().find(|n| n.id == id) {
            n.pid = pid;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status(id).is_none() {
            if Instant::now() >= deadline || !alive(pid) {
                let log = self.node_log(id);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "node {id} (pid {pid}) admin API did not answer after restart (alive: {}); log tail:\n{}",
                    alive(pid),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A certificate for `names` (CN `cn`) from the cluster's development CA, made with the
    /// openssl CLI: `<stem>.pem` and `<stem>.key` in the cluster directory. Returns (cert, key).
    pub fn issue_dev_cert(&self, cn: &str, names: &[&str], stem: &str) -> (PathBuf, PathBuf) {
        let dir = self.path();
        let key = dir.join(format!("{stem}.key"));
        let csr = dir.join(format!("{stem}.csr"));
        let crt = dir.join(format!("{stem}.pem"));
        let ext = dir.join(format!("{stem}.ext"));
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth\n",
                san.join(",")
            ),
        )
        .expect("write openssl extensions");
        let out = run(Command::new("openssl")
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-subj"])
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr));
        assert!(out.status.success(), "openssl req: {}", show(&out));
        let pki = dir.join("pki");
        let out = run(Command::new("openssl")
            .args(["x509", "-req", "-days", "30", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(pki.join("dev-ca.pem"))
            .arg("-CAkey")
            .arg(pki.join("dev-ca.key"))
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&crt));
        assert!(out.status.success(), "openssl x509: {}", show(&out));
        (crt, key)
    }

    /// `portcullis cert import --name NAME --cert CRT --key KEY` through any node; asserts it
    /// succeeded.
    pub fn import_cert(&self, name: &str, crt: &Path, key: &Path) {
        let (crt, key) = (
            crt.to_str().expect("utf-8 path"),
            key.to_str().expect("utf-8 path"),
        );
        let out = self.cli(&[
            "cert", "import", "--name", name, "--cert", crt, "--key", key,
        ]);
        assert!(out.status.success(), "cert import {name}: {}", show(&out));
    }

    /// Node `id`'s `/metrics` text (empty if it does not answer).
    pub fn metrics(&self, id: u64) -> String {
        let token = std::fs::read_to_string(&self.info.token_file).unwrap_or_default();
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "-H"])
            .arg(format!("Authorization: Bearer {}", token.trim()))
            .arg(format!("http://{}/metrics", self.node(id).admin_addr))
            .stdin(Stdio::null())
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    pub fn node_log(&self, id: u64) -> String {
        std::fs::read_to_string(self.node(id).config.with_file_name("node.log")).unwrap_or_default()
    }

    /// `portcullis down` for this cluster: stops the demo apps and agents `up` started (and the
    /// nodes), so a test's guard can run it before the harness kills what is left.
    pub fn down(&self) {
        down(self.path());
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A node started outside `up`, for membership tests: credentials issued from the cluster CA,
/// free ports, data plane and WireGuard off. Killed on drop.
pub struct ExtraNode {
    pub id: u64,
    pub rpc_addr: String,
    pub admin_addr: String,
    token_file: PathBuf,
    child: std::process::Child,
}

impl ExtraNode {
    /// `portcullis --admin <this node> --token-file <token> <args>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(portcullis_bin())
            .args(["--admin", &self.admin_addr, "--token-file"])
            .arg(&self.token_file)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run portcullis cli")
    }
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> String {
    portcullis_node::cli::ports::reserve_tcp()
        .and_then(|l| l.local_addr())
        .expect("free port")
        .to_string()
}

impl TestCluster {
    /// Issues a certificate for node `id` with `cluster issue-cert` and starts it with an empty
    /// store. It is not a member until someone adds it.
    pub fn start_extra_node(&self, id: u64, region: &str) -> ExtraNode {
        let pki = self.path().join("pki");
        let out = self.cli(&[
            "cluster",
            "issue-cert",
            "--pki",
            pki.to_str().expect("utf8 path"),
            "--node-id",
            &id.to_string(),
        ]);
        assert!(out.status.success(), "{}", show(&out));
        let dir = self.path().join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (rpc, admin) = (free_addr(), free_addr());
        let config = format!(
            "node_id = {id}\nregion = \"{region}\"\ndata_dir = \"data\"\n\
             [cluster]\nlisten = \"{rpc}\"\nca_cert = \"../pki/ca.pem\"\n\
             cert = \"../pki/node-{id}/cert.pem\"\nkey = \"../pki/node-{id}/key.pem\"\n\
             heartbeat_ms = 100\nelection_timeout_min_ms = 500\nelection_timeout_max_ms = 1000\n\
             [admin]\nlisten = \"{admin}\"\ntoken_file = \"../pki/admin.token\"\n\
             [secrets]\ndata_key_file = \"../pki/data.key\"\n\
             [edge]\nenabled = false\n[wg]\nenabled = false\n"
        );
        std::fs::write(dir.join("config.toml"), config).expect("write config");
        let log = std::fs::File::create(dir.join("node.log")).expect("log");
        let child = Command::new(portcullis_bin())
            .args(["node", "--config"])
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start extra node");
        ExtraNode {
            id,
            rpc_addr: rpc,
            admin_addr: admin,
            token_file: pki.join("admin.token"),
            child,
        }
    }

    /// Asserts that every app named in `acked` is present on every node (through each node's
    /// linearizable `app list`).
    pub fn assert_apps_on_every_node(&self, acked: &std::collections::BTreeSet<String>) {
        for id in self.ids() {
            let present: std::collections::BTreeSet<String> = wait_for(
                &format!("node {id} app list"),
                Duration::from_secs(20),
                || Some(self.apps_at(id)?.into_iter().map(|a| a.name).collect()),
            );
            let missing: Vec<_> = acked.difference(&present).collect();
            assert!(
                missing.is_empty(),
                "node {id} is missing acknowledged writes {missing:?}"
            );
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &self.info.nodes {
            if alive(n.pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &n.pid.to_string()])
                    .status();
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn read_cluster_json(dir: &Path) -> ClusterJson {
    let text = std::fs::read_to_string(dir.join("cluster.json")).expect("read cluster.json");
    serde_json::from_str(&text).expect("parse cluster.json")
}

/// Is `pid` running (not gone, not a zombie)? A process whose main thread has exited counts as
/// running until its last thread is gone, because those threads still hold its files (the sled
/// lock among them).
pub fn alive(pid: u32) -> bool {
    portcullis_node::procs::running(pid)
}

/// Runs an outside command with no stdin and collects its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run command")
}

/// A free loopback TCP port (released before returning).
pub fn free_port() -> u16 {
    portcullis_node::cli::ports::reserve_tcp()
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Stdout and stderr of a command, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `portcullis down --state-dir DIR`, ignoring its outcome (a guard's last word).
pub fn down(state_dir: &Path) {
    let _ = Command::new(portcullis_bin())
        .args(["down", "--state-dir"])
        .arg(state_dir)
        .output();
}

/// Runs [`down`] for a state directory when dropped: clusters a test starts with `up` must not
/// outlive it when an assertion fails.
pub struct DownOnDrop(pub PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        down(&self.0);
    }
}
