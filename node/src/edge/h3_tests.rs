//! HTTP/3 in-process: the edge of `edge/tests.rs` (a demo-app backend, a wildcard certificate
//! for `*.t.test`) reached with quinn + h3 clients on the UDP port of its HTTPS listener.
//! The cluster-level test with an outside client (aioquic) is `cluster-tests/tests/t74_http3.rs`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;

use super::super::tests::{start, Env, BASE};
use crate::metrics::ReasonLabels;

fn client(env: &Env) -> quinn::Endpoint {
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(env.roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic client");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

async fn connect(
    ep: &quinn::Endpoint,
    env: &Env,
    host: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let connecting = ep.connect(env.https, host).expect("connect");
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("handshake within 10 s")
}

/// One GET on a fresh HTTP/3 session over `conn`: status and body.
async fn get(conn: &quinn::Connection, host: &str, path: &str) -> (u16, String) {
    let (mut driver, mut send) = ::h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .expect("h3 client");
    let drive = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let req = http::Request::get(format!("https://{host}{path}"))
        .body(())
        .expect("request");
    let mut s = send.send_request(req).await.expect("send request");
    s.finish().await.expect("finish");
    let resp = s.recv_response().await.expect("response");
    let mut body = Vec::new();
    while let Some(mut chunk) = s.recv_data().await.expect("body") {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    drive.abort();
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).to_string(),
    )
}

fn rejections(env: &Env, reason: &'static str) -> u64 {
    env.metrics
        .limit_rejections
        .get_or_create(&ReasonLabels { reason })
        .get()
}

#[tokio::test]
async fn get_over_http3_reaches_the_backend_with_forwarded_headers() {
    let env = start(|_| {}).await;
    let ep = client(&env);
    let host = format!("demo.{BASE}");
    let conn = connect(&ep, &env, &host).await.expect("handshake");
    let (status, body) = get(&conn, &host, "/x?y=1").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["path"], "/x?y=1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(v["headers"].get("transfer-encoding").is_none(), "{v}");
}

#[tokio::test]
async fn per_ip_limit_and_stream_cap() {
    let env = start(|c| {
        c.max_connections_per_ip = 2;
        c.http3_max_concurrent_streams = 2;
    })
    .await;
    let ep = client(&env);
    let host = format!("demo.{BASE}");
    let c1 = connect(&ep, &env, &host).await.expect("first connection");
    // The second one finds its address half-full and goes through a Retry first.
    let c2 = connect(&ep, &env, &host).await.expect("second connection");
    let third = connect(&ep, &env, &host).await;
    assert!(third.is_err(), "third connection from one IP: {third:?}");
    assert_eq!(rejections(&env, "connections_per_ip"), 1);

    // Stream credit: two request streams open at once, the third waits for credit.
    let s1 = c1.open_bi().await.expect("stream 1");
    let s2 = c1.open_bi().await.expect("stream 2");
    let s3 = tokio::time::timeout(Duration::from_millis(300), c1.open_bi()).await;
    assert!(s3.is_err(), "a third concurrent stream was allowed");

    drop(c2);
    drop(s1);
    drop(s2);
    drop(c1);
    // Slots come back once the server has seen the connections go.
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(c) = connect(&ep, &env, &host).await {
            ok = get(&c, &host, "/").await.0 == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a new connection is served after the old ones closed");
}

#[tokio::test]
async fn passthrough_and_unknown_names_fail_the_quic_handshake() {
    let env = start(|_| {}).await;
    let ep = client(&env);
    // `demo` declares port 80: `demo-80s` is its TLS passthrough route.
    let refused = connect(&ep, &env, &format!("demo-80s.{BASE}")).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(rejections(&env, "http3_passthrough"), 1);
    let unknown = connect(&ep, &env, "nothing.example").await;
    assert!(unknown.is_err(), "{unknown:?}");
}

#[tokio::test]
async fn shutdown_closes_connections_with_h3_no_error() {
    let env = start(|_| {}).await;
    let ep = client(&env);
    let host = format!("demo.{BASE}");
    let conn = connect(&ep, &env, &host).await.expect("handshake");
    assert_eq!(get(&conn, &host, "/").await.0, 200);
    env.shutdown.cancel();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed within 5 s of shutdown");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0x100), "{c:?}")
        }
        other => panic!("closed with {other:?}"),
    }
}

#[tokio::test]
async fn a_request_past_its_total_time_is_reset() {
    let env = start(|c| c.http3_request_total_timeout_secs = 1).await;
    let ep = client(&env);
    let host = format!("demo.{BASE}");
    let conn = connect(&ep, &env, &host).await.expect("handshake");
    let (mut driver, mut send) = ::h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .expect("h3 client");
    let drive = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    // 20 chunks 200 ms apart: 4 s of body against a 1 s budget.
    let req = http::Request::get(format!("https://{host}/stream?chunks=20&ms=200"))
        .body(())
        .expect("request");
    let mut s = send.send_request(req).await.expect("send request");
    s.finish().await.expect("finish");
    let started = std::time::Instant::now();
    assert_eq!(s.recv_response().await.expect("head").status(), 200);
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.recv_data().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stream ends within 5 s");
    assert!(
        outcome.is_err(),
        "the body was cut by a reset, not completed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(rejections(&env, "http3_request_timeout"), 1);
    drive.abort();
}

#[tokio::test]
async fn request_body_limit_applies_over_http3() {
    let env = start(|c| c.max_request_body_bytes = 1000).await;
    let ep = client(&env);
    let host = format!("demo.{BASE}");
    let conn = connect(&ep, &env, &host).await.expect("handshake");
    let (mut driver, mut send) = ::h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .expect("h3 client");
    let drive = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    // Declared too large: refused before anything reaches the backend.
    let req = http::Request::post(format!("https://{host}/"))
        .header("content-length", "5000")
        .body(())
        .expect("request");
    let mut s = send.send_request(req).await.expect("send request");
    s.send_data(bytes::Bytes::from(vec![b'x'; 5000]))
        .await
        .expect("body");
    s.finish().await.expect("finish");
    assert_eq!(s.recv_response().await.expect("head").status(), 413);
    // No length, and more bytes than allowed: cut while streaming.
    let req = http::Request::post(format!("https://{host}/"))
        .body(())
        .expect("request");
    let mut s = send.send_request(req).await.expect("send request");
    for _ in 0..5 {
        s.send_data(bytes::Bytes::from(vec![b'x'; 1000]))
            .await
            .expect("body");
    }
    s.finish().await.expect("finish");
    assert_eq!(s.recv_response().await.expect("head").status(), 413);
    drive.abort();
}

#[tokio::test]
async fn idle_connection_is_closed() {
    let env = start(|c| c.idle_timeout_ms = 300).await;
    let ep = client(&env);
    let conn = connect(&ep, &env, &format!("demo.{BASE}"))
        .await
        .expect("handshake");
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("an idle connection is closed");
}

#[test]
fn split_cookies_are_joined_for_http1_backends() {
    let mut h = http::HeaderMap::new();
    h.append(http::header::COOKIE, "a=1".parse().expect("v"));
    h.append(http::header::COOKIE, "b=2".parse().expect("v"));
    super::join_cookies(&mut h);
    let all: Vec<_> = h.get_all(http::header::COOKIE).iter().collect();
    assert_eq!(all, vec!["a=1; b=2"]);
}

#[test]
fn alt_svc_port_follows_the_public_port_unless_http3_has_its_own_address() {
    let mut c = crate::config::EdgeConfig::default();
    assert_eq!(super::public_port(&c, 8443), 8443);
    c.https_public_port = Some(443);
    assert_eq!(super::public_port(&c, 8443), 443);
    c.http3_listen = Some("0.0.0.0:9443".parse().expect("addr"));
    assert_eq!(super::public_port(&c, 9443), 9443);
}

#[tokio::test]
async fn a_taken_udp_port_fails_the_bind_with_a_clear_error() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let mut cfg = crate::config::EdgeConfig {
        https_listen: udp.local_addr().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    };
    match super::super::EdgeListeners::bind(&cfg).await {
        Ok(_) => panic!("bind succeeded although udp {} is taken", cfg.https_listen),
        Err(e) if e.to_string().contains("edge.http3") => {
            assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}")
        }
        // Someone else holds the TCP port of that number: nothing to learn from this run.
        Err(_) => return,
    }
    cfg.http3 = false;
    // Without HTTP/3 the same ports bind.
    super::super::EdgeListeners::bind(&cfg)
        .await
        .expect("tcp only");
}

/// A POST declaring `declared` bytes (if any) and sending `body`: the status, or how the
/// stream failed.
async fn post_declared(
    send: &mut ::h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>,
    host: &str,
    declared: Option<&str>,
    body: &[u8],
) -> Result<u16, String> {
    let mut req = http::Request::post(format!("https://{host}/upload"));
    if let Some(d) = declared {
        req = req.header("content-length", d);
    }
    let req = req.body(()).expect("request");
    let mut s = send
        .send_request(req)
        .await
        .map_err(|e| format!("send request: {e}"))?;
    if !body.is_empty() {
        s.send_data(bytes::Bytes::copy_from_slice(body))
            .await
            .map_err(|e| format!("send data: {e}"))?;
    }
    s.finish().await.map_err(|e| format!("finish: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), s.recv_response())
        .await
        .map_err(|_| "no answer in 10 s".to_string())?
        .map_err(|e| format!("response: {e}"))?;
    Ok(resp.status().as_u16())
}

#[tokio::test]
async fn a_body_that_disagrees_with_its_content_length_is_a_stream_error() {
    let env = start(|_| {}).await;
    let ep = client(&env);
    let host = format!("demo.{BASE}");
    let conn = connect(&ep, &env, &host).await.expect("handshake");
    let (mut driver, mut send) = ::h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .expect("h3 client");
    let drive = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    for (declared, body, what) in [
        (Some("10"), &b"short"[..], "short body"),
        (Some("5"), &b"longer than five"[..], "long body"),
        // FIN right after the headers: a body-less request that would go out on the direct
        // backend client with its content-length, and leave that connection waiting for bytes.
        (Some("10"), &b""[..], "no body at all"),
        (Some("0"), &b"x"[..], "a byte after content-length: 0"),
        (Some("+5"), &b"hello"[..], "a signed content-length"),
        (Some("5, 6"), &b"hello"[..], "two different lengths"),
    ] {
        let r = post_declared(&mut send, &host, declared, body).await;
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("0x10e") || e.contains("MESSAGE")),
            "{what}: expected an H3_MESSAGE_ERROR stream error, got {r:?}"
        );
    }
    assert_eq!(rejections(&env, "http3_content_length"), 6);
    // The connection still serves requests whose body matches (or declares nothing).
    for (declared, body) in [
        (Some("5"), &b"hello"[..]),
        (None, b"any length"),
        (Some("5, 5"), b"hello"),
    ] {
        assert_eq!(
            post_declared(&mut send, &host, declared, body).await,
            Ok(200),
            "{declared:?}"
        );
    }
    drive.abort();
}

#[test]
fn content_length_is_digits_only_and_agreeing() {
    let h = |v: &[&'static str]| {
        let mut m = http::HeaderMap::new();
        for x in v {
            m.append(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from_static(x),
            );
        }
        m
    };
    assert_eq!(super::declared_length(&h(&[])), Ok(None));
    assert_eq!(super::declared_length(&h(&["12"])), Ok(Some(12)));
    assert_eq!(super::declared_length(&h(&["7, 7", "7"])), Ok(Some(7)));
    for bad in [
        &["+5"][..],
        &["-5"],
        &["5, 6"],
        &["5", "6"],
        &[""],
        &["0x5"],
        &["5 5"],
    ] {
        assert!(super::declared_length(&h(bad)).is_err(), "{bad:?}");
    }
    assert_eq!(super::length_mismatch(None, 99, true), None);
    assert_eq!(super::length_mismatch(Some(5), 3, false), None);
    assert!(super::length_mismatch(Some(5), 3, true).is_some());
    assert!(super::length_mismatch(Some(5), 6, false).is_some());
    assert_eq!(super::length_mismatch(Some(5), 5, true), None);
}
