//! What can go wrong with a proxied request: [`ProxyError`], mapped to a status and a [`Fault`]
//! in one place; and the body every response of the proxy has ([`ProxyBody`]), whose errors are
//! [`BoxError`]s.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::combinators::BoxBody;

use crate::edge::grammar::GrammarError;
use crate::edge::route::RouteError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Who is at fault, for logs and for deciding whether another backend could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no usable host: {0}")]
    BadHost(String),
    #[error("request target {0:?} is not origin-form (`/…`, or `*` for OPTIONS)")]
    BadTarget(String),
    #[error("no route for host {host:?}: {source}")]
    NoRoute { host: String, source: RouteError },
    #[error("malformed host {host:?}: {source}")]
    BadName { host: String, source: GrammarError },
    #[error("host {host:?} does not belong to the route of the TLS server name {sni:?}")]
    Misdirected { host: String, sni: String },
    #[error("{0:?} is only served to trusted networks")]
    Forbidden(String),
    #[error("app {0:?} has no instance to serve it")]
    NoBackend(String),
    #[error("app {0:?} has no healthy instance")]
    NoHealthyBackend(String),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("request body: {0}")]
    ClientBody(BoxError),
    #[error("CONNECT is only served for WebSocket (extended CONNECT, `:protocol websocket`)")]
    ConnectNotSupported,
    #[error("backend {backend} refused the WebSocket handshake: {reason}")]
    WebSocketRefused { backend: String, reason: String },
    #[error("{host:?} is a TLS passthrough route; it cannot be reached over plain HTTP")]
    PassthroughOverHttp { host: String },
    #[error("backend {backend} did not answer within {timeout:?}")]
    Timeout { backend: String, timeout: Duration },
    #[error("cannot connect to backend {backend}: {source}")]
    Connect { backend: String, source: BoxError },
    #[error("backend {backend} failed: {source}")]
    Upstream { backend: String, source: BoxError },
    #[error("internal error: {0}")]
    Internal(String),
    /// The WAF refused the request (`edge/protect/waf`).
    #[error("refused by the web application firewall (request id {request_id})")]
    WafBlocked {
        request_id: String,
        status: StatusCode,
    },
    /// The WAF could not inspect the request (over budget, or no engine) and the app's policy
    /// fails closed.
    #[error("the web application firewall could not inspect this request (request id {request_id}); try again")]
    WafUnavailable { request_id: String },
}

impl ProxyError {
    /// The one place that maps failures to statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadHost(_) | ProxyError::BadTarget(_) | ProxyError::BadName { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::PassthroughOverHttp { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::NoBackend(_) | ProxyError::NoHealthyBackend(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectNotSupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::WebSocketRefused { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::WafBlocked { status, .. } => *status,
            ProxyError::WafUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::BadHost(_)
            | ProxyError::BadTarget(_)
            | ProxyError::NoRoute { .. }
            | ProxyError::BadName { .. }
            | ProxyError::Misdirected { .. }
            | ProxyError::Forbidden(_)
            | ProxyError::PassthroughOverHttp { .. }
            | ProxyError::BodyTooLarge(_)
            | ProxyError::ClientBody(_)
            | ProxyError::ConnectNotSupported
            | ProxyError::WafBlocked { .. } => Fault::Client,
            ProxyError::NoBackend(_)
            | ProxyError::NoHealthyBackend(_)
            | ProxyError::Timeout { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::WebSocketRefused { .. } => Fault::Upstream,
            ProxyError::Internal(_) | ProxyError::WafUnavailable { .. } => Fault::Internal,
        }
    }

    /// Could the same request go to another backend? Only when nothing reached the first one.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect { .. })
    }
}
