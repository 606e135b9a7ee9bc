//! Pinned routes reach only declared ports (issue 14, "How it is proven", second test).
//!
//! On a 1-node cluster from `portcullis up`: app `web` (one declared port) with an instance
//! whose `backend_addr` is `127.0.0.1:<port>`, and app `bare` with an instance whose backend is
//! the bare host `127.0.0.1` (it serves every port its app declares). Every pinned form
//! (`<instance>-<port>`, with and without the `s` and `g` suffixes) and the app form are tried
//! against undeclared ports, the node's admin, cluster RPC, HTTPS and HTTP ports, and a canary
//! listener on loopback. Each answers 404 (or, for a passthrough name, gets no backend), the
//! canary accepts no connection, and the admin listener's request counter moves only by the
//! test's own reads.
//!
//! Then the last line of defence: an operator who declares the node's own admin or RPC port for
//! an app with a loopback backend still gets no route into the gateway (502, counter still).

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portcullis_cluster_tests::cvm::{curl_https, spawn_demo_app, wait_served, WithChildren};
use portcullis_cluster_tests::harness::{phase, show, TestCluster};

const BASE: &str = "portcullis.localhost";

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("host:port")
}

/// A loopback listener that counts the connections it accepts.
fn canary() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind canary");
    let port = l.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if c.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (port, hits)
}

/// `portcullis_admin_requests_total` of node 1 (this read is counted too).
fn admin_requests(tc: &TestCluster) -> u64 {
    let m = tc.metrics(1);
    m.lines()
        .find_map(|l| l.strip_prefix("portcullis_admin_requests_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no portcullis_admin_requests_total in:\n{m}"))
}

/// What a client gets for `https://<host>/` through node 1: the HTTP status, or 0 when no
/// HTTP answer came (a passthrough name whose backend cannot be reached closes the connection).
fn status(tc: &TestCluster, host: &str) -> u16 {
    curl_https(tc, 1, host, "/").map_or(0, |(code, _)| code)
}

#[test]
fn pinned_forms_reach_no_undeclared_port_and_no_gateway_listener() {
    let mut t = WithChildren::new(TestCluster::up(1));
    let (demo, web_port) = spawn_demo_app(&t.tc.path().join("web-1.log"), "web", "web-1", &[]);
    t.children.push(demo);
    let (demo, bare_port) = spawn_demo_app(&t.tc.path().join("bare-1.log"), "bare", "bare-1", &[]);
    t.children.push(demo);
    let tc = &t.tc;
    let node = tc.node(1).clone();
    let (admin, rpc, https, http) = (
        port_of(&node.admin_addr),
        port_of(&node.rpc_addr),
        port_of(&node.https_addr),
        port_of(&node.http_addr),
    );
    let (canary_port, canary_hits) = canary();
    let ok = |args: &[&str]| {
        let out = tc.cli(args);
        assert!(out.status.success(), "{args:?}: {}", show(&out));
    };
    // App `app` on `port`, with one operator-registered instance `<app>-1` at `backend`.
    let app_with_instance = |app: &str, port: u16, backend: &str| {
        ok(&["app", "create", app, "--port", &port.to_string()]);
        let id = format!("{app}-1");
        ok(&[
            "cvm",
            "register",
            "--instance-id",
            &id,
            "--app",
            app,
            "--region",
            "us-east",
            "--backend",
            backend,
        ]);
    };

    phase("web (host:port backend) and bare (bare-host backend), one declared port each");
    for (app, port, backend) in [
        ("web", web_port, format!("127.0.0.1:{web_port}")),
        ("bare", bare_port, "127.0.0.1".to_string()),
    ] {
        app_with_instance(app, port, &backend);
        wait_served(tc, 1, &format!("{app}.{BASE}"), "/");
        wait_served(tc, 1, &format!("{app}-1.{BASE}"), "/");
        wait_served(tc, 1, &format!("{app}-1-{port}.{BASE}"), "/");
    }

    phase("every pinned and app form against undeclared ports and the node's listeners");
    let before = admin_requests(tc);
    let mut tried = 0;
    for port in [admin, rpc, https, http, canary_port, 22, 65535] {
        for name in ["web-1", "bare-1", "web", "bare"] {
            for suffix in ["", "s", "g"] {
                let host = format!("{name}-{port}{suffix}.{BASE}");
                let got = status(tc, &host);
                let refused = if suffix == "s" {
                    // A passthrough name with no route is not terminated here: no HTTP answer.
                    got == 0 || got == 404 || got == 421
                } else {
                    got == 404 || got == 421
                };
                assert!(refused, "{host} answered {got}");
                tried += 1;
            }
        }
    }
    println!("{tried} names refused");
    assert_eq!(
        canary_hits.load(Ordering::SeqCst),
        0,
        "a loopback listener nobody declared was reached"
    );
    assert_eq!(
        admin_requests(tc),
        before + 1,
        "the admin listener answered something besides this test's own metrics reads"
    );

    phase("a declared port that is a gateway listener still reaches nothing");
    for (app, port) in [("selfadmin", admin), ("selfrpc", rpc)] {
        app_with_instance(app, port, "127.0.0.1");
    }
    // The route exists (the app is listed) but the connect is refused by the guard.
    let before = admin_requests(tc);
    for app in ["selfadmin", "selfrpc"] {
        for host in [format!("{app}.{BASE}"), format!("{app}-1.{BASE}")] {
            let got = portcullis_cluster_tests::harness::wait_for(
                &format!("{host} routed"),
                Duration::from_secs(10),
                || Some(status(tc, &host)).filter(|c| *c != 404),
            );
            assert_eq!(got, 502, "{host}");
        }
    }
    assert_eq!(
        admin_requests(tc),
        before + 1,
        "a request through the data plane reached the admin listener"
    );
    let log = tc.node_log(1);
    assert!(
        log.contains("is a gateway listener"),
        "the node log does not name the refused backend"
    );
}
