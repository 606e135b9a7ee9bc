//! Upgrades: an HTTP/1.1 `Upgrade` (WebSocket or another protocol) is passed to the backend as
//! it is; a WebSocket opened with extended CONNECT (HTTP/2, HTTP/3) becomes the RFC 6455
//! handshake, checked before the client is told the tunnel is open. The tunnel is then relayed
//! byte for byte ([`relay`], which TLS passthrough uses too) until a side closes or it idles.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use portcullis_geo::LoadGuard;

use super::error::{BoxError, ProxyBody, ProxyError};
use super::headers::strip_hop_by_hop;
use crate::edge::limits::{Activity, ActivityClock};
use crate::edge::route::Backend;

/// A WebSocket opened with extended CONNECT (`:protocol websocket`): RFC 8441 over HTTP/2,
/// RFC 9220 over HTTP/3. Backends get the RFC 6455 HTTP/1.1 handshake instead, so an app
/// serves one kind of WebSocket whatever the client speaks.
pub(super) fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut d = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    d.update(key);
    d.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(d.finish())
}

pub(super) fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Turns an extended CONNECT's request into the RFC 6455 handshake (`GET`, `Upgrade:
/// websocket`, a version, a key of ours) and returns the key.
pub(super) fn websocket_handshake(parts: &mut http::request::Parts) -> String {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    parts.method = Method::GET;
    let h = &mut parts.headers;
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.entry(header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_KEY, v);
    }
    key
}

/// What became of the response to an upgrade request.
pub(super) enum Answered {
    /// The response the client gets: the tunnel is open, or the backend refused an extended
    /// CONNECT's handshake with an error of its own, which is passed on.
    Done(Response<ProxyBody>),
    /// No upgrade: relayed as any other response, with the instance's load held until its body
    /// is done.
    Relay(Response<Incoming>, Option<LoadGuard>),
}

/// The backend's response to an upgrade request: on 101 the tunnel between `client_upgrade`
/// (the client's side) and the backend opens, with the instance counted as loaded for as long
/// as it is open (`load_guard`) and closed after `idle` without a byte. `ws_key`: the key of the
/// handshake an extended CONNECT became ([`websocket_handshake`]), which the backend's
/// `Sec-WebSocket-Accept` must match. `backend`: the instance, named in errors.
pub(super) fn answer(
    mut resp: Response<Incoming>,
    client_upgrade: OnUpgrade,
    ws_key: Option<&str>,
    load_guard: Option<LoadGuard>,
    idle: Duration,
    backend: &Option<Arc<Backend>>,
) -> Result<Answered, ProxyError> {
    if let Some(key) = ws_key {
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            if resp.status().is_success() {
                // A 2xx would tell an extended-CONNECT client that the tunnel is open.
                return Err(ProxyError::WebSocketRefused {
                    backend: cand_id(backend),
                    reason: format!("answered {} instead of 101", resp.status()),
                });
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            return Ok(Answered::Done(Response::from_parts(
                parts,
                body.map_err(BoxError::from).boxed(),
            )));
        }
        let want = websocket_accept(key.as_bytes());
        if resp
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .map(|v| v.as_bytes())
            != Some(want.as_bytes())
        {
            return Err(ProxyError::WebSocketRefused {
                backend: cand_id(backend),
                reason: "wrong or missing Sec-WebSocket-Accept".into(),
            });
        }
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        // The instance stays loaded (least-conn) for as long as the tunnel is open.
        let held = load_guard;
        tokio::spawn(async move {
            let _held = held;
            let (c, b) = match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            relay(TokioIo::new(c), TokioIo::new(b), idle).await;
        });
        let (mut parts, _) = resp.into_parts();
        if ws_key.is_some() {
            // Extended CONNECT succeeds with 200 and no handshake headers (RFC 8441 §5).
            strip_hop_by_hop(&mut parts.headers, false);
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
            parts.status = StatusCode::OK;
        } else {
            strip_hop_by_hop(&mut parts.headers, true);
        }
        return Ok(Answered::Done(Response::from_parts(
            parts,
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )));
    }
    Ok(Answered::Relay(resp, load_guard))
}

fn cand_id(b: &Option<Arc<Backend>>) -> String {
    b.as_ref()
        .map_or_else(String::new, |b| b.instance_id.clone())
}

/// Relays an upgraded (WebSocket) or passthrough connection until either side closes or no
/// byte moves for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut clock = ActivityClock::new();
    let mut a = Activity::new(a, clock.clone());
    let mut b = b;
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let tick = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "relay ended");
                }
                return;
            }
            _ = tokio::time::sleep(tick) => {
                if clock.idle_for() >= idle {
                    tracing::debug!(?idle, "relay idle; closing");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn only_websocket_is_an_extended_connect_we_serve() {
        let mut ws = Request::connect("https://a.example/chat")
            .body(())
            .expect("req");
        ws.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(is_websocket_connect(&ws));
        let mut wt = Request::connect("https://a.example/chat")
            .body(())
            .expect("req");
        wt.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("webtransport"));
        assert!(!is_websocket_connect(&wt));
        let plain = Request::connect("a.example:443").body(()).expect("req");
        assert!(!is_websocket_connect(&plain));
        assert_eq!(
            ProxyError::ConnectNotSupported.status(),
            StatusCode::NOT_IMPLEMENTED
        );
    }
}
