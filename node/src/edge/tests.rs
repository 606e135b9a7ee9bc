//! The edge in-process: real sockets on 127.0.0.1:0, a real demo-app backend, rustls and
//! tungstenite clients. Cluster-level tests (curl, openssl, three nodes) are in
//! `cluster-tests/tests/t60_data_plane.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use portcullis_raft::state::{App, Certificate, Instance};
use portcullis_raft::ClusterState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use super::*;
use crate::config::EdgeConfig;

pub(super) const BASE: &str = "t.test";

pub(super) struct Env {
    pub(super) https: SocketAddr,
    http: SocketAddr,
    pub(super) roots: rustls::RootCertStore,
    pub(super) metrics: Arc<EdgeMetrics>,
    pub(super) shutdown: CancellationToken,
    /// The replicated state the edge serves from; `apply_detached` changes it.
    shared: SharedState,
    _dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn free_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr")
}

/// An edge with app `demo` (one in-process demo-app instance) and a wildcard certificate.
pub(super) async fn start(tune: impl FnOnce(&mut EdgeConfig)) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = crate::pki::init_dev_ca(dir.path()).expect("dev ca");
    let leaf = crate::pki::issue_dev_cert(dir.path(), &[format!("*.{BASE}")]).expect("leaf");
    let backend = free_addr().await;
    let args = crate::cli::demo::DemoArgs {
        listen: vec![backend],
        name: "demo".into(),
        region: "r1".into(),
        instance_id: Some("i1".into()),
        tls_cert: None,
        tls_key: None,
        exit_with: vec![],
    };
    tokio::spawn(crate::cli::demo::run(args));
    for _ in 0..100 {
        if TcpStream::connect(backend).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut state = ClusterState::default();
    state.apps.insert(
        "demo".into(),
        App {
            name: "demo".into(),
            ports: vec![80],
            lb: "round-robin".into(),
            revision: 1,
        },
    );
    state.instances.insert(
        "i1".into(),
        Instance {
            instance_id: "i1".into(),
            app: "demo".into(),
            region: "r1".into(),
            backend_addr: Some(backend.to_string()),
            ..Default::default()
        },
    );
    let name = format!("*.{BASE}");
    state
        .certificates
        .insert(name.clone(), stored_certificate(name, leaf));
    let shared = SharedState::detached(state);

    let mut cfg = EdgeConfig {
        base_domains: vec![BASE.into()],
        access_log: false,
        ..Default::default()
    };
    cfg.https_listen = "127.0.0.1:0".parse().expect("addr");
    cfg.http_listen = "127.0.0.1:0".parse().expect("addr");
    tune(&mut cfg);
    let listeners = EdgeListeners::bind(&cfg).await.expect("bind");
    let (https, http) = (
        listeners.https.local_addr().expect("a"),
        listeners.http.local_addr().expect("a"),
    );
    let metrics = Arc::new(EdgeMetrics::default());
    let edge = Edge::new(
        cfg,
        &shared,
        Arc::new(upstream::TcpUpstream),
        metrics.clone(),
        Arc::new(acme_hook::NoAcme),
    )
    .expect("edge");
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    edge.spawn(listeners, shared.clone(), &tracker, shutdown.clone());

    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read_to_string(ca).expect("ca");
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.expect("cert")).expect("add");
    }
    Env {
        https,
        http,
        roots,
        metrics,
        shutdown,
        shared,
        _dir: dir,
    }
}

impl Env {
    async fn tls_over(
        &self,
        tcp: TcpStream,
        host: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("name");
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
    }

    async fn tls(&self, host: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.https).await.expect("connect");
        self.tls_over(tcp, host, &[b"http/1.1"])
            .await
            .expect("handshake")
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` and returns the whole response.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, host: &str, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A dev certificate for `name` as the replicated store holds it (key unsealed).
pub(super) fn stored_certificate(name: String, leaf: portcullis_raft::tls::Issued) -> Certificate {
    Certificate {
        name: name.clone(),
        names: vec![name],
        chain_pem: leaf.cert_pem,
        key: leaf.key_pem.into_bytes(),
        key_encryption: "none".into(),
        not_after: 1,
        issuer: "test".into(),
    }
}

fn body_json(resp: &str) -> serde_json::Value {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

#[tokio::test]
async fn proxies_over_tls_with_forwarded_headers() {
    let env = start(|_| {}).await;
    let resp = get(
        env.tls(&format!("demo.{BASE}")).await,
        &format!("demo.{BASE}"),
        "/x",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{resp}"
    );
    let v = body_json(&resp);
    assert_eq!(v["instance_id"], "i1");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-host"], format!("demo.{BASE}"));
}

#[tokio::test]
async fn websocket_upgrade_echoes_through_the_edge() {
    let env = start(|_| {}).await;
    let host = format!("demo.{BASE}");
    let tls = env.tls(&host).await;
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("wss://{host}/ws"), tls)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}")))
            .await
            .expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("reply in time")
            .expect("open")
            .expect("frame");
        assert_eq!(reply, Message::text(format!("i1: hello {i}")));
    }
    ws.close(None).await.expect("close");
}

#[tokio::test]
async fn proxy_protocol_only_from_trusted_peers() {
    let host = format!("demo.{BASE}");
    let header = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\n";

    let trusted = start(|c| c.proxy_protocol_from = vec!["127.0.0.1/32".into()]).await;
    let mut tcp = TcpStream::connect(trusted.https).await.expect("connect");
    tcp.write_all(header).await.expect("proxy header");
    let resp = get(
        trusted
            .tls_over(tcp, &host, &[b"http/1.1"])
            .await
            .expect("handshake"),
        &host,
        "/",
    )
    .await;
    assert_eq!(
        body_json(&resp)["headers"]["x-forwarded-for"],
        "203.0.113.9",
        "{resp}"
    );
    // A trusted peer may also connect without a header.
    let resp = get(trusted.tls(&host).await, &host, "/").await;
    assert_eq!(body_json(&resp)["headers"]["x-forwarded-for"], "127.0.0.1");

    let untrusted = start(|_| {}).await;
    let mut tcp = TcpStream::connect(untrusted.https).await.expect("connect");
    tcp.write_all(header).await.expect("proxy header");
    assert!(
        untrusted
            .tls_over(tcp, &host, &[b"http/1.1"])
            .await
            .is_err(),
        "PROXY header from an untrusted peer must be refused"
    );
}

#[tokio::test]
async fn slow_header_client_is_cut_while_others_are_served() {
    let env = start(|c| c.header_read_timeout_ms = 300).await;
    let host = format!("demo.{BASE}");
    let mut slow = env.tls(&host).await;
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n").as_bytes())
        .await
        .expect("partial headers");
    let resp = get(env.tls(&host).await, &host, "/").await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "others keep being served: {resp}"
    );
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the slow client was not disconnected");
    assert!(
        !String::from_utf8_lossy(&buf).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

#[tokio::test]
async fn per_ip_connection_limit() {
    let env = start(|c| c.max_connections_per_ip = 2).await;
    let host = format!("demo.{BASE}");
    let a = env.tls(&host).await;
    let b = env.tls(&host).await;
    let tcp = TcpStream::connect(env.https).await.expect("connect");
    assert!(
        env.tls_over(tcp, &host, &[b"http/1.1"]).await.is_err(),
        "third connection from one IP refused"
    );
    let rejected = env
        .metrics
        .limit_rejections
        .get_or_create(&crate::metrics::ReasonLabels {
            reason: "connections_per_ip",
        })
        .get();
    assert_eq!(rejected, 1);
    drop((a, b));
    // Slots come back when connections close; wait for the server to notice.
    let mut ok = false;
    for _ in 0..100 {
        let tcp = TcpStream::connect(env.https).await.expect("connect");
        if env.tls_over(tcp, &host, &[b"http/1.1"]).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slots were not released");
}

#[tokio::test]
async fn unknown_sni_without_certificate_fails_handshake_and_plain_port_redirects() {
    let env = start(|_| {}).await;
    let tcp = TcpStream::connect(env.https).await.expect("connect");
    assert!(env
        .tls_over(tcp, "other.example", &[b"http/1.1"])
        .await
        .is_err());
    let tcp = TcpStream::connect(env.http).await.expect("connect");
    let resp = get(tcp, &format!("demo.{BASE}"), "/p?q=1").await;
    assert!(resp.starts_with("HTTP/1.1 308"), "{resp}");
    assert!(
        resp.contains(&format!(
            "location: https://demo.{BASE}:{}/p?q=1",
            env.https.port()
        )),
        "{resp}"
    );
}

#[tokio::test]
async fn oversized_client_hello_is_refused() {
    let env = start(|c| c.max_client_hello_bytes = 16 * 1024).await;
    let mut tcp = TcpStream::connect(env.https).await.expect("connect");
    // A handshake record header announcing a large record, then a stream of bytes.
    let mut junk = vec![22u8, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
    junk.resize(20 * 1024, 0);
    let _ = tcp.write_all(&junk).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "connection should be closed: {n:?}"
    );
    let limit = env
        .metrics
        .limit_rejections
        .get_or_create(&crate::metrics::ReasonLabels {
            reason: "client_hello_too_large",
        })
        .get();
    assert_eq!(limit, 1);
}

#[tokio::test]
async fn a_keep_alive_connection_follows_route_changes() {
    // Each connection remembers its last route while the routing snapshot is unchanged; a
    // change must still reach the next request of an open connection.
    let env = start(|_| {}).await;
    let host = format!("demo.{BASE}");
    let (mut sender, _conn) = keep_alive(&env, &host).await;
    let get = |sender: &mut hyper::client::conn::http1::SendRequest<String>| {
        let req = hyper::Request::get("/x")
            .header(hyper::header::HOST, host.as_str())
            .body(String::new())
            .expect("request");
        let sent = sender.send_request(req);
        async move { sent.await.expect("response").status().as_u16() }
    };
    for _ in 0..3 {
        assert_eq!(get(&mut sender).await, 200);
    }
    // Without its instance the app has nothing to serve (503). Without the app, the name has
    // no route: 404 on a new connection, 421 on the open one, whose TLS name chose a route that
    // is gone. A connection that kept its old route would still answer 503.
    use portcullis_raft::state::Command;
    for (cmd, status) in [
        (
            Command::RemoveInstance {
                instance_id: "i1".into(),
            },
            (503, 503),
        ),
        (
            Command::DeleteApp {
                name: "demo".into(),
            },
            (404, 421),
        ),
    ] {
        let (fresh, open) = status;
        env.shared.apply_detached(&cmd);
        // A new connection shows when the edge has rebuilt.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let resp = get_on_new_connection(&env, &host).await;
            if resp.starts_with(&format!("HTTP/1.1 {fresh}")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never rebuilt: {resp}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            get(&mut sender).await,
            open,
            "the open connection saw {cmd:?}"
        );
    }
}

async fn get_on_new_connection(env: &Env, host: &str) -> String {
    get(env.tls(host).await, host, "/x").await
}

/// An HTTP/1.1 keep-alive connection to `host`, and the task that drives it (finished once
/// the connection is closed).
async fn keep_alive(
    env: &Env,
    host: &str,
) -> (
    hyper::client::conn::http1::SendRequest<String>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let io = hyper_util::rt::TokioIo::new(env.tls(host).await);
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("handshake");
    (sender, tokio::spawn(conn))
}

#[tokio::test]
async fn a_keep_alive_connection_counts_each_request_into_its_own_series() {
    // A connection keeps the metric handles of its last request; a request with another
    // status must still count into its own series.
    let env = start(|c| c.max_request_body_bytes = 4).await;
    let host = format!("demo.{BASE}");
    let (mut sender, _conn) = keep_alive(&env, &host).await;
    for body in ["", "", "over four bytes", "", ""] {
        let req = hyper::Request::post("/x")
            .header(hyper::header::HOST, host.as_str())
            .body(body.to_string())
            .expect("request");
        let status = sender.send_request(req).await.expect("response").status();
        let want = if body.is_empty() { 200 } else { 413 };
        assert_eq!(status.as_u16(), want, "body {body:?}");
    }
    let count = |status| {
        env.metrics
            .requests
            .get_or_create(&crate::metrics::RequestLabels {
                app: "demo".into(),
                status,
            })
            .get()
    };
    assert_eq!((count(200), count(413)), (4, 1));
    let http11 = env
        .metrics
        .requests_by_protocol
        .get_or_create(&crate::metrics::ProtocolLabels {
            protocol: "http/1.1",
        })
        .get();
    assert_eq!(http11, 5);
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    // Reads and writes only flag activity; the connection's tick reads the clock. A busy
    // connection must outlive the idle timeout, and a quiet one must be closed soon after it.
    // Long enough that a loaded CI machine's late timers do not make the busy part idle.
    let idle = Duration::from_millis(1000);
    let env = start(|c| c.idle_timeout_ms = idle.as_millis() as u64).await;
    let host = format!("demo.{BASE}");
    let (mut sender, closed) = keep_alive(&env, &host).await;
    let opened = std::time::Instant::now();
    let mut last_answer = opened;
    // Busy for two idle timeouts: a request every fifth of one.
    while opened.elapsed() < idle * 2 {
        let req = hyper::Request::get("/x")
            .header(hyper::header::HOST, host.as_str())
            .body(String::new())
            .expect("request");
        let status = sender
            .send_request(req)
            .await
            .expect("busy connection served");
        assert_eq!(status.status().as_u16(), 200);
        last_answer = std::time::Instant::now();
        tokio::time::sleep(idle / 5).await;
    }
    assert!(!closed.is_finished(), "closed while busy");
    // Then quiet: closed after the timeout (a tick or two later here; the bound is for a
    // loaded CI machine).
    tokio::time::timeout(idle * 10, closed)
        .await
        .expect("an idle connection stayed open")
        .expect("connection task")
        .expect("clean close");
    // The edge's last byte left a little before the client read it.
    let quiet = last_answer.elapsed();
    assert!(
        quiet + Duration::from_millis(10) >= idle,
        "closed {quiet:?} after the last answer"
    );
}

fn limit_count(env: &Env, reason: &'static str) -> u64 {
    env.metrics
        .limit_rejections
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .get()
}

/// Waits (bounded) for the server to close `tcp`: `true` if it did.
async fn closed_by_server(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn silent_connections_count_against_the_per_ip_limit_from_accept() {
    // The ClientHello deadline is far off: before the fix, silent connections took no per-IP
    // slot until then.
    let env = start(|c| {
        c.max_connections_per_ip = 2;
        c.client_hello_timeout_ms = 60_000;
    })
    .await;
    let a = TcpStream::connect(env.https).await.expect("a");
    let b = TcpStream::connect(env.https).await.expect("b");
    let mut c = TcpStream::connect(env.https).await.expect("c");
    assert!(
        closed_by_server(&mut c, Duration::from_secs(5)).await,
        "a third connection from one address was kept while two silent ones held the quota"
    );
    assert_eq!(limit_count(&env, "connections_per_ip"), 1);
    // The plain port is charged at accept as well, from the same quota.
    let mut p = TcpStream::connect(env.http).await.expect("plain");
    assert!(closed_by_server(&mut p, Duration::from_secs(5)).await);
    drop((a, b));
    let host = format!("demo.{BASE}");
    let mut served = false;
    for _ in 0..100 {
        let tcp = TcpStream::connect(env.https).await.expect("connect");
        if let Ok(tls) = env.tls_over(tcp, &host, &[b"http/1.1"]).await {
            served = get(tls, &host, "/").await.starts_with("HTTP/1.1 200");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "slots were not released");
}

#[tokio::test]
async fn a_trusted_proxy_sender_is_charged_per_named_client_before_the_client_hello() {
    let env = start(|c| {
        c.proxy_protocol_from = vec!["127.0.0.1/32".into()];
        c.max_connections_per_ip = 2;
        c.client_hello_timeout_ms = 60_000;
    })
    .await;
    let header = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 5555 443\r\n");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut t = TcpStream::connect(env.https).await.expect("connect");
        t.write_all(header("203.0.113.7").as_bytes())
            .await
            .expect("header");
        held.push(t);
    }
    // A third for the same client: one of the three is refused right after its header, with
    // no ClientHello. Which one is up to the scheduler (each header is read by the
    // connection's own task), so the test waits for the first the server closes.
    let mut third = TcpStream::connect(env.https).await.expect("connect");
    third
        .write_all(header("203.0.113.7").as_bytes())
        .await
        .expect("header");
    held.push(third);
    let first_closed = futures::future::select_all(
        held.iter_mut()
            .map(|t| Box::pin(closed_by_server(t, Duration::from_secs(5)))),
    )
    .await
    .0;
    assert!(
        first_closed,
        "three connections for 203.0.113.7 (limit 2) all waited for their ClientHello"
    );
    assert_eq!(limit_count(&env, "connections_per_ip"), 1);
    // The balancer's own address is not capped by its clients' connections: another client
    // behind it, and the balancer itself without a header, are served.
    let host = format!("demo.{BASE}");
    let mut tcp = TcpStream::connect(env.https).await.expect("connect");
    tcp.write_all(header("203.0.113.8").as_bytes())
        .await
        .expect("header");
    let tls = env
        .tls_over(tcp, &host, &[b"http/1.1"])
        .await
        .expect("handshake");
    let resp = get(tls, &host, "/").await;
    assert_eq!(
        body_json(&resp)["headers"]["x-forwarded-for"],
        "203.0.113.8"
    );
    let resp = get(env.tls(&host).await, &host, "/").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(held);
}

#[tokio::test]
async fn the_plain_port_redirects_only_hosts_the_gateway_serves() {
    let env = start(|_| {}).await;
    for (host, want) in [
        (format!("demo.{BASE}"), "HTTP/1.1 308"),
        // No app by that name, but the wildcard certificate covers it: HTTPS answers there.
        (format!("nosuchapp.{BASE}"), "HTTP/1.1 308"),
        ("elsewhere.example".to_string(), "HTTP/1.1 404"),
        (format!("a.b.{BASE}"), "HTTP/1.1 404"),
    ] {
        let tcp = TcpStream::connect(env.http).await.expect("connect");
        let resp = get(tcp, &host, "/x").await;
        assert!(resp.starts_with(want), "{host}: {resp}");
        if want.ends_with("404") {
            assert!(!resp.to_ascii_lowercase().contains("location:"), "{resp}");
        }
    }
    // ACME HTTP-01 stays reachable for any host (NoAcme: no such challenge).
    let tcp = TcpStream::connect(env.http).await.expect("connect");
    let resp = get(tcp, "elsewhere.example", "/.well-known/acme-challenge/t").await;
    assert!(resp.contains("no such challenge"), "{resp}");
}

#[tokio::test]
async fn client_sent_forwarding_claims_and_host_userinfo_do_not_reach_the_backend() {
    let env = start(|_| {}).await;
    let host = format!("demo.{BASE}");
    let mut tls = env.tls(&host).await;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: user:secret@{host}\r\nX-Real-IP: 198.51.100.1\r\n\
         X-Forwarded-Port: 1\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let resp = String::from_utf8_lossy(&out).into_owned();
    let h = &body_json(&resp)["headers"];
    assert_eq!(h["host"], host.as_str(), "{resp}");
    assert_eq!(h["x-forwarded-host"], host.as_str(), "{resp}");
    assert!(!h.to_string().contains("secret"), "{resp}");
    assert_eq!(h["x-real-ip"], "127.0.0.1", "{resp}");
    assert!(h.get("x-forwarded-port").is_none(), "{resp}");
}

#[tokio::test]
async fn a_request_chunk_size_with_a_sign_is_a_client_error() {
    let env = start(|_| {}).await;
    let host = format!("demo.{BASE}");
    for size in ["+5", "-5"] {
        let mut tls = env.tls(&host).await;
        let req = format!(
            "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
             {size}\r\nhello\r\n0\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out).into_owned();
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
            "{size}: {resp}"
        );
        assert!(
            !resp.contains("\"body_bytes\":5"),
            "{size}: forwarded: {resp}"
        );
    }
}
