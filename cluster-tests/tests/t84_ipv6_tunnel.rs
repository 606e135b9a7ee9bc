//! IPv6 CVM tunnel pools (issue 4): on a 3-node cluster the operator switches the pool to an
//! IPv6 /64 with `portcullis cvm pool set`; a `cvm-agent` registers, gets an address in that
//! range, and curl through every gateway reaches its app over the IPv6 tunnel (each gateway
//! speaks from its own `fd70:6f72:7463::<id>`). Re-registration keeps the address; a pool change
//! is refused while the instance holds it; malformed or overlapping ranges are refused with a
//! reason. As root, a CVM running wireguard-go on an IPv6 address (configured from
//! `--print-wg-config`) is reached through every gateway too, and through each gateway it can
//! neither reach the agent's CVM nor spoof its address (the gateway's `not_for_us` and
//! `spoofed_source` counters rise); otherwise that phase prints why it was skipped.

use std::net::{IpAddr, SocketAddr};

use std::time::Duration;

use portcullis_cluster_tests::cvm::{
    agent_config, curl_https as curl, gateway_peers, handshaken_peers, issue_credential,
    register_once, spawn_demo_app, spawn_logged, start_wggo_cvm, wait_served, wg_event,
    wg_event_now, wg_quick_address, AgentSpec, WithChildren,
};
use portcullis_cluster_tests::harness::{phase, show, wait_for, TestCluster};
use portcullis_test_support::wggo;

const POOL: &str = "fd00:1:2::/64";

/// `portcullis --json cvm pool` as (cidr, allocated, capacity).
fn pool(tc: &TestCluster) -> (String, u64, u64) {
    let out = tc.cli(&["--json", "cvm", "pool"]);
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    (
        v["cidr"].as_str().expect("cidr").to_string(),
        v["allocated"].as_u64().expect("allocated"),
        v["capacity"].as_u64().expect("capacity"),
    )
}

/// The instance's tunnel address from `cvm show`.
fn tunnel_ip(tc: &TestCluster, instance: &str) -> Option<IpAddr> {
    let out = tc.cli(&["--json", "cvm", "show", instance]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["tunnel_ip"].as_str()?.parse().ok()
}

/// `pool set CIDR` must fail, and its error must say `why`.
fn refused(tc: &TestCluster, cidr: &str, why: &str) {
    let out = tc.cli(&["cvm", "pool", "set", cidr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pool set {cidr} was accepted");
    assert!(
        err.contains(why),
        "pool set {cidr}: expected {why:?} in:\n{err}"
    );
    println!("pool set {cidr}: refused: {}", err.trim());
}

fn in_pool(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.segments()[..4] == [0xfd00, 1, 2, 0])
}

#[test]
fn ipv6_pool_reaches_cvms_through_every_gateway() {
    let mut c = WithChildren::new(TestCluster::up(3));
    let dir = c.tc.path().to_path_buf();

    phase("the demo instances of `portcullis up` hold IPv4 addresses; delete their app");
    let (cidr, _, capacity) = pool(&c.tc);
    assert_eq!(cidr, "100.64.0.0/10");
    assert_eq!(capacity, (1 << 22) - 2);
    let out = c.tc.cli(&["app", "delete", "demo"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_for("no address held", Duration::from_secs(10), || {
        (pool(&c.tc).1 == 0).then_some(())
    });

    phase("malformed and overlapping ranges are refused with a reason");
    refused(&c.tc, "fd00:1:2::5/64", "host bits are set");
    refused(
        &c.tc,
        "fd70:6f72:7463::/64",
        "overlaps the gateway tunnel addresses",
    );
    refused(
        &c.tc,
        "198.18.0.0/16",
        "overlaps the gateway tunnel addresses",
    );
    refused(&c.tc, "fd00:1:2::", "expected ADDRESS/PREFIX");
    refused(&c.tc, "not-an-ip/64", "not an IPv4 or IPv6 address");
    refused(&c.tc, "fd00:1:2::/127", "fewer than 2 host addresses");
    refused(&c.tc, "fe80::/64", "not a unicast range");
    assert_eq!(pool(&c.tc).0, "100.64.0.0/10", "refusals changed nothing");

    phase(&format!("portcullis cvm pool set {POOL}"));
    let out = c.tc.cli(&["cvm", "pool", "set", POOL]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", text.trim());
    assert!(
        text.contains(&format!(
            "tunnel pool {POOL}: 0 allocated, capacity {}",
            u64::MAX - 1
        )),
        "{text}"
    );
    // Every node sees the new pool (the CLI reads from whichever node answers).
    for id in c.tc.ids() {
        wait_for(
            &format!("node {id} shows the IPv6 pool"),
            Duration::from_secs(10),
            || {
                let out = c.tc.cli_at(id, &["cvm", "pool"]);
                String::from_utf8_lossy(&out.stdout)
                    .contains(POOL)
                    .then_some(())
            },
        );
    }

    phase("a cvm-agent registers and gets an address in the IPv6 pool");
    let (app, app_port) = spawn_demo_app(&dir.join("web6-app.log"), "web", "web-v6", &[]);
    c.children.push(app);
    let out =
        c.tc.cli(&["app", "create", "web", "--port", &app_port.to_string()]);
    assert!(out.status.success(), "{}", show(&out));
    issue_credential(&c.tc, "web", "cvm-web");
    let cfg = agent_config(
        &c.tc,
        &AgentSpec {
            cred: "cvm-web",
            app: "web",
            instance: "web-v6",
            wg_key: "web-v6.wg.key",
            expose: &[app_port],
            reregister_secs: 5,
        },
    );
    let agent_log = dir.join("agent-web-v6.log");
    c.children.push(spawn_logged(
        &["cvm-agent", "--config", cfg.to_str().expect("utf8")],
        &agent_log,
    ));
    wait_for("agent tunnel up", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&agent_log).ok()?;
        text.contains("tunnel up").then_some(())
    });
    let ip = tunnel_ip(&c.tc, "web-v6").expect("web-v6 has a tunnel address");
    assert!(in_pool(ip), "{ip} is not in {POOL}");
    // No plain backend: the gateways can only reach it through the tunnel.
    let out = c.tc.cli(&["--json", "cvm", "show", "web-v6"]);
    let inst: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(inst["backend_addr"].as_str(), Some(""), "{inst}");
    let out = c.tc.cli(&["cvm", "list", "--app", "web"]);
    assert!(out.status.success(), "{}", show(&out));
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("web-v6") && list.contains(&ip.to_string()),
        "{list}"
    );
    println!("web-v6 registered at {ip}:\n{}", list.trim());

    phase("curl through each of the 3 gateways reaches web-v6 over the IPv6 tunnel");
    let host = "web.portcullis.localhost";
    for id in c.tc.ids() {
        let body = wait_served(&c.tc, id, host, "/");
        assert!(
            body.contains("\"instance_id\": \"web-v6\""),
            "node {id}: {body}"
        );
        println!("node {id}: 200 from web-v6 at [{ip}]:{app_port}");
    }

    phase("re-registration keeps the address; the wg-quick config uses /128 everywhere");
    let wgq = register_once(&cfg).expect("re-register");
    assert!(wgq.contains(&format!("Address = {ip}/128")), "{wgq}");
    assert_eq!(wgq.matches("[Peer]").count(), 3, "{wgq}");
    for id in c.tc.ids() {
        assert!(
            wgq.contains(&format!("AllowedIPs = fd70:6f72:7463::{id}/128")),
            "{wgq}"
        );
    }
    assert!(!wgq.contains("/32"), "{wgq}");
    assert_eq!(tunnel_ip(&c.tc, "web-v6"), Some(ip));
    let (_, allocated, _) = pool(&c.tc);
    assert_eq!(allocated, 1);

    phase("changing the pool is refused while the instance holds an address");
    refused(&c.tc, "fd00:9::/64", "strand");
    refused(&c.tc, "100.64.0.0/10", "web-v6");
    assert_eq!(pool(&c.tc).0, POOL);
    // Setting the current pool again is harmless.
    let out = c.tc.cli(&["cvm", "pool", "set", POOL]);
    assert!(out.status.success(), "{}", show(&out));

    phase("wireguard-go as an IPv6 CVM");
    match wggo::skip_reason() {
        Some(why) => println!("SKIPPED wireguard-go IPv6 CVM phase: {why}"),
        None => wireguard_go_cvm(&c.tc, SocketAddr::new(ip, app_port)),
    }

    phase("with the agent stopped and its instance removed, the pool can change back");
    for ch in &mut c.children {
        let _ = ch.kill();
        let _ = ch.wait();
    }
    c.children.clear();
    for instance in ["web-v6", "wgo-v6"] {
        // wgo-v6 exists only when the root phase ran.
        let _ = c.tc.cli(&["cvm", "remove", instance]);
    }
    wait_for("no address held", Duration::from_secs(10), || {
        (pool(&c.tc).1 == 0).then_some(())
    });
    let out = c.tc.cli(&["cvm", "pool", "set", "100.64.0.0/10"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(pool(&c.tc).0, "100.64.0.0/10");
}

/// A CVM with its own WireGuard (wireguard-go on a TUN device in a network namespace) on an
/// IPv6 tunnel address, configured only from `cvm-agent --print-wg-config`, serving HTTP on that
/// address; curl through every gateway reaches it. Then isolation over IPv6 through the real
/// gateways: the CVM routes `other` (the agent's CVM) through one gateway at a time, and then
/// spoofs `other`'s address as its source; each gateway drops both and counts them. (t83 shows
/// the same for IPv4 with a sniffer on the victim.)
fn wireguard_go_cvm(tc: &TestCluster, other: SocketAddr) {
    let out = tc.cli(&["app", "create", "wgo", "--port", "8080"]);
    assert!(out.status.success(), "{}", show(&out));
    issue_credential(tc, "wgo", "cvm-wgo");
    let cfg = agent_config(
        tc,
        &AgentSpec {
            cred: "cvm-wgo",
            app: "wgo",
            instance: "wgo-v6",
            wg_key: "wgo-v6.wg.key",
            expose: &[8080],
            reregister_secs: 30,
        },
    );
    let conf = register_once(&cfg).expect("registration");
    let (address, tunnel_ip) = wg_quick_address(&conf);
    assert!(in_pool(tunnel_ip) && address.ends_with("/128"), "{address}");

    let sfx = wggo::suffix();
    let cvm = start_wggo_cvm(tc, &conf, format!("pc6cvm-{sfx}"), format!("pc6cvm{sfx}"))
        .expect("wireguard-go CVM");
    let (ns, ifname) = (&cvm.ns, cvm.ifname.as_str());
    let www = tempfile::tempdir().expect("tempdir");
    std::fs::write(www.path().join("hello.txt"), "hello over IPv6\n").expect("file");
    let _http = wggo::http_server(&ns.name, tunnel_ip, 8080, www.path()).expect("http server");

    let host = "wgo.portcullis.localhost";
    for id in tc.ids() {
        let body = wait_served(tc, id, host, "/hello.txt");
        assert_eq!(body, "hello over IPv6\n");
        println!("node {id}: 200 from wireguard-go at [{tunnel_ip}]:8080");
    }
    // wireguard-go completed a handshake with every gateway.
    assert_eq!(handshaken_peers(ifname), 3, "handshakes per gateway");

    let victim = format!("{}/128", other.ip());
    let url = format!("http://{other}/");
    for (id, g) in gateway_peers(&conf) {
        let own = format!("{}/128", g.tunnel_ip);
        let allow = |ips: &str| {
            wggo::run(
                "wg",
                &["set", ifname, "peer", &g.public_key, "allowed-ips", ips],
            )
            .expect("wg set allowed-ips");
        };

        // Cryptokey routing sends the other CVM's address to this gateway only.
        let before = wg_event_now(tc, id, "not_for_us");
        allow(&format!("{own},{victim}"));
        wggo::ns_exec(
            &ns.name,
            &["ip", "-6", "route", "replace", &victim, "dev", ifname],
        )
        .expect("route to the other CVM");
        let after = wait_for(
            &format!("gateway {id} drops a packet meant for {}", other.ip()),
            Duration::from_secs(20),
            || {
                let got = wggo::ns_exec(&ns.name, &["curl", "-g", "-s", "-m", "1", &url]);
                assert!(
                    got.is_err(),
                    "reached {other} through gateway {id}: {got:?}"
                );
                wg_event(tc, id, "not_for_us").filter(|v| *v > before)
            },
        );
        println!("gateway {id}: not_for_us {before} -> {after}, {url} unreachable");
        wggo::ns_exec(
            &ns.name,
            &["ip", "-6", "route", "del", &victim, "dev", ifname],
        )
        .expect("drop the route");
        allow(&own);

        // The CVM claims the other CVM's address as its source toward this gateway.
        let before = wg_event_now(tc, id, "spoofed_source");
        wggo::ns_exec(
            &ns.name,
            &["ip", "-6", "addr", "add", &victim, "dev", ifname, "nodad"],
        )
        .expect("add the spoofed address");
        let gw_url = format!("http://[{}]:80/", g.tunnel_ip);
        let src = other.ip().to_string();
        let after = wait_for(
            &format!("gateway {id} drops packets spoofing {src}"),
            Duration::from_secs(20),
            || {
                let _ = wggo::ns_exec(
                    &ns.name,
                    &["curl", "-g", "-s", "-m", "1", "--interface", &src, &gw_url],
                );
                wg_event(tc, id, "spoofed_source").filter(|v| *v > before)
            },
        );
        println!("gateway {id}: spoofed_source {before} -> {after}");
        wggo::ns_exec(
            &ns.name,
            &["ip", "-6", "addr", "del", &victim, "dev", ifname],
        )
        .expect("remove the spoofed address");
    }
    // The other CVM is still served through every gateway: nothing above disturbed it.
    for id in tc.ids() {
        let r = curl(tc, id, "web.portcullis.localhost", "/");
        assert!(
            matches!(r, Some((200, _))),
            "node {id} after the attacks: {r:?}"
        );
    }
}
