//! The WireGuard path end to end (issue 4): a 3-node cluster from `portcullis up`, a demo app
//! behind `portcullis cvm-agent`, and curl through every gateway reaching it over the tunnel
//! (the instance has a tunnel address and no plain backend address). Then the registration
//! refusals: duplicate key, another app's instance id, a credential for another app, a node
//! certificate posing as a CVM, and a CVM credential on the Raft RPCs.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use portcullis_cluster_tests::cvm::{self, register_once, spawn_logged, AgentSpec, WithChildren};
use portcullis_cluster_tests::harness::{phase, portcullis_bin, run, show, wait_for, TestCluster};
use portcullis_proto::cluster::cluster_rpc_client::ClusterRpcClient;
use portcullis_proto::cluster::RaftPayload;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

type Tunnel = WithChildren;

/// An agent configuration for this test's cluster, renewing every 5 s.
fn agent_config(
    t: &Tunnel,
    cred: &str,
    app: &str,
    instance: &str,
    wg_key: &str,
    expose: &[u16],
) -> PathBuf {
    cvm::agent_config(
        &t.tc,
        &AgentSpec {
            cred,
            app,
            instance,
            wg_key,
            expose,
            reregister_secs: 5,
        },
    )
}

fn curl(t: &Tunnel, node: u64, host: &str) -> Option<(u16, String)> {
    cvm::curl_https(&t.tc, node, host, "/")
}

#[test]
fn http_through_every_gateway_reaches_a_cvm_over_wireguard() {
    let mut t = Tunnel::new(TestCluster::up(3));
    let dir = t.tc.path().to_path_buf();

    phase("a demo app on a local port, its app, a CVM credential");
    // Two local services: plain HTTP (the app's default port) and one that terminates TLS
    // itself, reached by TLS passthrough, so the gateway relays raw TCP bytes over the tunnel.
    let pki = dir.join("pki");
    let wildcard = pki.join("dev-wildcard.pem");
    let wildcard_key = pki.join("dev-wildcard.key");
    let mut ports = Vec::new();
    let tls_args = [
        "--tls-cert",
        wildcard.to_str().expect("utf8"),
        "--tls-key",
        wildcard_key.to_str().expect("utf8"),
    ];
    for (log, extra) in [("web-1.log", &[][..]), ("web-1-tls.log", &tls_args[..])] {
        let (app, port) = cvm::spawn_demo_app(&dir.join(log), "web", "web-1", extra);
        t.children.push(app);
        ports.push(port);
    }
    let (app_port, tls_port) = (ports[0], ports[1]);
    let out = t.tc.cli(&[
        "app",
        "create",
        "web",
        "--port",
        &app_port.to_string(),
        "--port",
        &tls_port.to_string(),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    for (app, out_dir) in [("web", "cvm-web"), ("other", "cvm-other")] {
        let out = run(Command::new(portcullis_bin())
            .args(["cvm", "credential", "--pki"])
            .arg(&pki)
            .args(["--app", app, "--out"])
            .arg(dir.join(out_dir)));
        assert!(out.status.success(), "{}", show(&out));
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("cvm-web/key.pem"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "credential key must be 0600");

    phase("cvm-agent registers and exposes the app over the tunnel");
    let cfg = agent_config(&t, "cvm-web", "web", "web-1", "web-1.wg.key", &ports);
    let agent_log = dir.join("agent-web-1.log");
    t.children.push(spawn_logged(
        &["cvm-agent", "--config", cfg.to_str().expect("utf8")],
        &agent_log,
    ));
    wait_for("agent tunnel up", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&agent_log).ok()?;
        text.contains("tunnel up").then_some(())
    });
    let out = t.tc.cli(&["--json", "cvm", "show", "web-1"]);
    assert!(out.status.success(), "{}", show(&out));
    let inst: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let tunnel_ip = inst["tunnel_ip"].as_str().expect("tunnel_ip").to_string();
    assert!(tunnel_ip.starts_with("100."), "tunnel ip {tunnel_ip}");
    assert_eq!(
        inst["backend_addr"].as_str().unwrap_or(""),
        "",
        "no plain backend: {inst}"
    );

    phase("curl through each of the 3 gateways reaches web-1 via WireGuard");
    let host = "web.portcullis.localhost";
    for id in t.tc.ids() {
        let body = cvm::wait_served(&t.tc, id, host, "/");
        assert!(
            body.contains("\"instance_id\": \"web-1\""),
            "node {id}: {body}"
        );
        println!("node {id}: 200 from web-1 over the tunnel");
    }
    phase("TLS passthrough: raw TCP bytes through the gateway and the tunnel, TLS ends in the CVM");
    let pt_host = format!("web-{tls_port}s.portcullis.localhost");
    for id in t.tc.ids() {
        let body = wait_for(
            &format!("node {id} passes {pt_host} through"),
            Duration::from_secs(20),
            || match curl(&t, id, &pt_host) {
                Some((200, body)) => Some(body),
                _ => None,
            },
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            (v["tls"].as_bool(), v["port"].as_u64()),
            (Some(true), Some(u64::from(tls_port))),
            "{body}"
        );
    }

    let metrics = t.tc.metrics(1);
    let handshakes = metrics
        .lines()
        .find(|l| l.starts_with("portcullis_wg_events_total{event=\"handshakes_completed\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        handshakes >= 1,
        "node 1 metrics show no WireGuard handshake:\n{metrics}"
    );

    phase("re-registration keeps the address; --print-wg-config lists every gateway");
    let wgq = register_once(&cfg).expect("re-register");
    assert!(wgq.contains(&format!("Address = {tunnel_ip}/32")), "{wgq}");
    assert_eq!(wgq.matches("[Peer]").count(), 3, "{wgq}");
    for id in 1..=3 {
        assert!(
            wgq.contains(&format!("AllowedIPs = 198.18.0.{id}/32")),
            "{wgq}"
        );
    }

    phase("renewals with a fresh stamp are answered from the applied state, without a Raft write");
    let applied = |t: &Tunnel| t.tc.status(1).expect("status of node 1").last_applied;
    let before = applied(&t);
    for _ in 0..3 {
        let again = register_once(&cfg).expect("renewal");
        assert!(
            again.contains(&format!("Address = {tunnel_ip}/32")),
            "{again}"
        );
    }
    // The running agents (this one, and `up`'s demo agents) renew meanwhile too.
    assert_eq!(
        applied(&t),
        before,
        "a fresh renewal was written through Raft"
    );

    phase("refused: the same WireGuard key for another instance");
    let dup = agent_config(&t, "cvm-web", "web", "web-2", "web-1.wg.key", &[app_port]);
    let e = register_once(&dup).expect_err("duplicate key must be refused");
    assert!(e.contains("already registered"), "{e}");

    phase("refused: another app's instance id");
    let out = t.tc.cli(&["app", "create", "other", "--port", "8080"]);
    assert!(out.status.success(), "{}", show(&out));
    let steal = agent_config(&t, "cvm-other", "other", "web-1", "steal.wg.key", &[8080]);
    let e = register_once(&steal).expect_err("another app's instance id must be refused");
    assert!(e.contains("belongs to app"), "{e}");

    phase("refused: a credential issued for another app");
    let wrong = agent_config(&t, "cvm-other", "web", "web-3", "web-3.wg.key", &[app_port]);
    let e = register_once(&wrong).expect_err("credential for another app must be refused");
    assert!(e.contains("PermissionDenied") && e.contains("other"), "{e}");

    phase("refused: a node certificate used as a CVM credential");
    let node_cred = dir.join("node-cred");
    std::fs::create_dir_all(&node_cred).expect("dir");
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("node-1/cert.pem", "cert.pem"),
        ("node-1/key.pem", "key.pem"),
    ] {
        std::fs::copy(pki.join(from), node_cred.join(to)).expect("copy");
    }
    let posing = agent_config(&t, "node-cred", "web", "web-4", "web-4.wg.key", &[app_port]);
    let e = register_once(&posing).expect_err("node certificate must be refused");
    assert!(e.contains("CVM credential"), "{e}");

    phase("refused: a CVM credential on the Raft RPCs");
    let read = |p: PathBuf| std::fs::read_to_string(p).expect("read pem");
    let ca = read(pki.join("ca.pem"));
    let cvm_id = Identity::from_pem(
        read(dir.join("cvm-web/cert.pem")),
        read(dir.join("cvm-web/key.pem")),
    );
    let node_id = Identity::from_pem(
        read(pki.join("node-1/cert.pem")),
        read(pki.join("node-1/key.pem")),
    );
    let rpc = t.tc.node(2).rpc_addr.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let vote = |identity: Identity| {
        let ca = ca.clone();
        let rpc = rpc.clone();
        rt.block_on(async move {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(identity)
                .domain_name(portcullis_raft::tls::node_server_name(2));
            let ch = Endpoint::from_shared(format!("https://{rpc}"))
                .expect("endpoint")
                .tls_config(tls)
                .expect("tls")
                .timeout(Duration::from_secs(3))
                .connect()
                .await
                .expect("connect");
            // Garbage payload: a node certificate gets past the role check and fails decoding.
            ClusterRpcClient::new(ch)
                .vote(RaftPayload {
                    data: vec![1, 2, 3],
                })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        })
    };
    assert_eq!(vote(cvm_id), Err(tonic::Code::PermissionDenied));
    assert_ne!(vote(node_id), Err(tonic::Code::PermissionDenied));

    phase("the tunnel still serves after the refusals");
    assert_eq!(curl(&t, 2, host).map(|(c, _)| c), Some(200));

    phase(
        "gateway node 3 restarts (SIGKILL): its tunnel comes back, the agent does nothing special",
    );
    t.tc.kill(3);
    t.tc.start_node(3);
    let start = std::time::Instant::now();
    wait_for(
        "node 3 serves through the tunnel again",
        Duration::from_secs(90),
        || matches!(curl(&t, 3, host), Some((200, _))).then_some(()),
    );
    println!(
        "node 3 back on the tunnel {:?} after restart",
        start.elapsed()
    );
}
