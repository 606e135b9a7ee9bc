//! t60: bad input is refused with a clear message and writes nothing — admin calls without or
//! with a wrong token, invalid app names and ports, malformed configs, peers without a cluster
//! certificate, and garbage bytes on every port.

use std::io::Write;
use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, portcullis_bin, show, wait_for, TestCluster};
use portcullis_proto::admin::admin_client::AdminClient;
use portcullis_proto::admin::Empty;
use portcullis_proto::cluster::cluster_rpc_client::ClusterRpcClient;
use portcullis_proto::cluster::IdentityRequest;
use portcullis_raft::tls;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn admin_and_config_bad_input() {
    let c = TestCluster::up(3);
    let ids = c.ids();
    wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });
    let out = c.cli(&["app", "create", "keep", "--port", "80"]);
    assert!(out.status.success(), "{}", show(&out));
    let applied_before = c.status(1).expect("status").last_applied;

    phase("wrong token");
    let out = std::process::Command::new(portcullis_bin())
        .args([
            "--admin",
            &c.node(1).admin_addr,
            "--token",
            "not-the-token-at-all",
            "app",
            "list",
        ])
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid bearer token"),
        "{}",
        show(&out)
    );

    phase("no token (raw gRPC)");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr = c.node(1).admin_addr.clone();
    let code = rt.block_on(async move {
        let mut client = AdminClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        client
            .list_apps(Empty {})
            .await
            .expect_err("must be refused")
            .code()
    });
    assert_eq!(code, tonic::Code::Unauthenticated);

    phase("invalid app names and ports");
    for (args, needle) in [
        (
            vec!["app", "create", "Bad_Name", "--port", "80"],
            "Bad_Name",
        ),
        (
            vec!["app", "create", "web-8080", "--port", "80"],
            "web-8080",
        ),
        (vec!["app", "create", "ok", "--port", "0"], "port"),
        (vec!["app", "create", "ok", "--port", "70000"], "70000"),
        (
            vec!["app", "create", "ok", "--port", "80", "--port", "80"],
            "port",
        ),
        (
            vec!["app", "create", "ok", "--port", "80", "--lb", "random"],
            "random",
        ),
        (
            vec!["app", "create", "keep", "--port", "80"],
            "already exists",
        ),
        (vec!["app", "delete", "nope"], "not found"),
    ] {
        let out = c.cli(&args);
        assert!(
            !out.status.success(),
            "{args:?} should fail: {}",
            show(&out)
        );
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: message should mention {needle:?}: {}",
            show(&out)
        );
    }

    phase("nothing was written");
    let apps: Vec<String> = c
        .apps_at(2)
        .expect("apps")
        .into_iter()
        .map(|a| a.name)
        .filter(|n| n != "demo")
        .collect();
    assert_eq!(apps, ["keep"]);
    let after = c.status(1).expect("status").last_applied;
    // Invalid input never reaches the log. The two commands that are valid on their own but not
    // against the state (a duplicate create, a delete of a missing app) are committed as no-ops.
    assert!(
        after <= applied_before + 2,
        "log grew from {applied_before} to {after}"
    );

    phase("malformed configs exit 64 and name the field");
    let dir = tempfile::tempdir().expect("tmp");
    for (text, field) in [
        ("node_id = 0\nregion = \"x\"\n", "node_id"),
        ("node_id = 1\nregion = \"x\"\nbogus = 1\n", "bogus"),
        (
            "node_id = 1\nregion = \"x\"\n[cluster]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
            "admin.token_file",
        ),
        ("node_id = [\n", "invalid"),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).expect("write");
        for sub in [
            vec!["check-config", p.to_str().expect("utf8")],
            vec!["node", "--config", p.to_str().expect("utf8")],
        ] {
            let out = std::process::Command::new(portcullis_bin())
                .args(&sub)
                .output()
                .expect("run");
            assert_eq!(
                out.status.code(),
                Some(64),
                "{sub:?} {text:?}: {}",
                show(&out)
            );
            assert!(
                stderr(&out).contains(field),
                "{text:?} should name {field}: {}",
                show(&out)
            );
        }
    }

    phase("the example config in the repo is valid");
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/examples/node.toml");
    let out = std::process::Command::new(portcullis_bin())
        .arg("check-config")
        .arg(&example)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    phase("a node refuses to start without an admin token");
    let node1_cfg = std::fs::read_to_string(&c.node(1).config).expect("config");
    let empty_token = dir.path().join("empty.token");
    std::fs::write(&empty_token, "").expect("write");
    // Private, as a token file must be: the length check is what this phase is about.
    std::fs::set_permissions(
        &empty_token,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let cfg = node1_cfg
        .lines()
        .map(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            match key {
                "token_file" => format!("token_file = {:?}", empty_token.display().to_string()),
                // Node 1 is running: free ports, so the token check is what fails.
                "listen" => format!("{key} = \"127.0.0.1:0\""),
                "https_listen" => format!("{key} = \"127.0.0.2:0\""),
                "http_listen" => format!("{key} = \"127.0.0.3:0\""),
                _ => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg_path = c.node(1).config.with_file_name("no-token.toml");
    std::fs::write(&cfg_path, cfg).expect("write");
    let out = std::process::Command::new(portcullis_bin())
        .args(["node", "--config"])
        .arg(&cfg_path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("token"), "{}", show(&out));
}

#[test]
fn cluster_port_requires_a_cluster_certificate() {
    let c = TestCluster::up(3);
    let ids = c.ids();
    wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });
    let pki = c.path().join("pki");
    let read = |p: &str| std::fs::read_to_string(pki.join(p)).expect("read pki file");
    let ca = read("ca.pem");
    let node1 = Identity::from_pem(read("node-1/cert.pem"), read("node-1/key.pem"));
    let foreign_ca = tls::generate_ca("other").expect("ca");
    let foreign = tls::issue_node_cert(&foreign_ca.cert_pem, &foreign_ca.key_pem, 1).expect("cert");
    let foreign = Identity::from_pem(foreign.cert_pem, foreign.key_pem);
    let target = c.node(2).rpc_addr.clone();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let call = |identity: Option<Identity>, expect_name: u64| {
        let ca = ca.clone();
        let target = target.clone();
        rt.block_on(async move {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(tls::node_server_name(expect_name));
            if let Some(id) = identity {
                tls = tls.identity(id);
            }
            let ch = Endpoint::from_shared(format!("https://{target}"))
                .expect("endpoint")
                .tls_config(tls)
                .expect("tls")
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(3));
            let ch = match ch.connect().await {
                Ok(ch) => ch,
                Err(e) => return Err(format!("connect: {e:?}")),
            };
            ClusterRpcClient::new(ch)
                .identity(IdentityRequest {})
                .await
                .map(|r| r.into_inner().node_id)
                .map_err(|e| format!("{e:?}"))
        })
    };

    phase("a valid cluster certificate, dialing node 2 by its name: accepted");
    assert_eq!(call(Some(node1.clone()), 2), Ok(2));
    phase("no client certificate: refused");
    assert!(call(None, 2).is_err());
    phase("a certificate from another CA: refused");
    assert!(call(Some(foreign), 2).is_err());
    phase("node 2's address answering where node 3 was expected: refused");
    assert!(call(Some(node1), 3).is_err());

    phase("garbage bytes on the cluster and admin ports do not disturb the node");
    for addr in [c.node(2).rpc_addr.clone(), c.node(2).admin_addr.clone()] {
        for payload in [
            &b"\x16\x03\x01\xff\xffgarbage"[..],
            &[0u8; 4096][..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                let _ = s.write_all(payload);
            }
        }
    }
    let out = c.cli_at(2, &["app", "create", "still-fine", "--port", "80"]);
    assert!(out.status.success(), "{}", show(&out));
}
