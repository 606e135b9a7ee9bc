//! A CVM that brings its own WireGuard (issue 4): wireguard-go on a TUN device in the CVM's own
//! network namespace, configured from `cvm-agent --print-wg-config`, with an HTTP server bound
//! only on its tunnel address. curl through every gateway of a 3-node cluster reaches it. Needs
//! root (namespaces, TUN); prints why and passes vacuously otherwise.

use portcullis_cluster_tests::cvm::{
    agent_config, handshaken_peers, issue_credential, register_once, start_wggo_cvm, wait_served,
    wg_quick_address, AgentSpec,
};
use portcullis_cluster_tests::harness::{phase, show, TestCluster};
use portcullis_test_support::wggo;

#[test]
fn gateways_reach_a_cvm_running_wireguard_go() {
    if let Some(why) = wggo::skip_reason() {
        eprintln!("SKIPPED gateways_reach_a_cvm_running_wireguard_go: {why}");
        return;
    }
    let tc = TestCluster::up(3);
    let out = tc.cli(&["app", "create", "wgo", "--port", "8080"]);
    assert!(out.status.success(), "{}", show(&out));
    issue_credential(&tc, "wgo", "cvm-wgo");

    phase("register the CVM once and take its wg-quick configuration");
    let cfg = agent_config(
        &tc,
        &AgentSpec {
            cred: "cvm-wgo",
            app: "wgo",
            instance: "wgo-1",
            wg_key: "wgo-1.wg.key",
            expose: &[8080],
            reregister_secs: 30,
        },
    );
    let conf = register_once(&cfg).expect("registration");
    let (_, tunnel_ip) = wg_quick_address(&conf);

    phase("wireguard-go in the CVM namespace takes that configuration");
    let sfx = wggo::suffix();
    let cvm = start_wggo_cvm(&tc, &conf, format!("pccvm-{sfx}"), format!("pccvm{sfx}"))
        .expect("wireguard-go CVM");
    let (ns, ifname) = (&cvm.ns, &cvm.ifname);
    let www = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        www.path().join("hello.txt"),
        "hello from a wireguard-go CVM\n",
    )
    .expect("file");
    let _http = wggo::http_server(&ns.name, tunnel_ip, 8080, www.path()).expect("http server");

    phase("curl through each gateway reaches the HTTP server on the CVM's tunnel address");
    for id in tc.ids() {
        let body = wait_served(&tc, id, "wgo.portcullis.localhost", "/hello.txt");
        assert_eq!(body, "hello from a wireguard-go CVM\n");
        println!("node {id}: 200 from wireguard-go at {tunnel_ip}");
    }
    // wireguard-go saw a handshake from every gateway it has as a peer.
    assert_eq!(handshaken_peers(ifname), 3, "handshakes per gateway");
}
