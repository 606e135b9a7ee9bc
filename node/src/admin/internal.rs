//! `<cvm-id>.internal` on the admin port: an operator's request relayed to one instance.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::auth::token_matches;
use super::EdgeSlot;

/// Largest request body relayed to a `.internal` name through the admin port: operators'
/// debugging requests, buffered whole.
const MAX_INTERNAL_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub(super) struct InternalRoute {
    pub(super) edge: EdgeSlot,
    pub(super) token: Arc<String>,
}

/// `<cvm-id>.internal` on the admin port (ARCHITECTURE.md §1): an operator with the admin token
/// reaches one instance directly, e.g. `curl -H 'Host: web-1.internal' -H 'Authorization:
/// Bearer …' http://127.0.0.1:9080/`. Every other request goes on to the admin routes.
pub(super) async fn internal_names(
    State(s): State<InternalRoute>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        // HTTP/2 carries the name in :authority instead.
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(|h| {
            crate::edge::route::split_host_port(h)
                .0
                .trim_end_matches('.')
                .to_ascii_lowercase()
        });
    if !host.is_some_and(|h| h.ends_with(".internal")) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !token_matches(presented, &s.token) {
        return (
            StatusCode::UNAUTHORIZED,
            "`.internal` names on the admin port need the admin bearer token\n",
        )
            .into_response();
    }
    let Some(edge) = s.edge.get().cloned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the data plane does not run on this node\n",
        )
            .into_response();
    };
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let (mut parts, body) = req.into_parts();
    // The admin token is for this node, never for the CVM behind it.
    parts.headers.remove(axum::http::header::AUTHORIZATION);
    let body = match axum::body::to_bytes(body, MAX_INTERNAL_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body over 1 MiB (or unreadable)\n",
            )
                .into_response()
        }
    };
    let req = axum::http::Request::from_parts(parts, http_body_util::Full::new(body));
    edge.serve_internal(client, req)
        .await
        .map(axum::body::Body::new)
}
