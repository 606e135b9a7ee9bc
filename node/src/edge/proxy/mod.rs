//! HTTP proxying: one request from a client (HTTP/1.1, HTTP/2 or HTTP/3, over TLS or on the
//! plain port for `.internal`) to a backend over pooled HTTP/1.1 or h2c connections.
//!
//! Per request: Host → route (must be the SNI's route on TLS connections, else 421) → backend
//! (the app's balancing policy, healthy instances first) → forwarded headers → the backend's
//! response streamed back with HSTS. Every failure is a [`ProxyError`], mapped to a status in
//! one place.
//!
//! Layout, by job:
//! - `forward.rs`: [`Proxy`] — the route check, backend choice and the attempts, the response
//!   back, request metrics and the access log; [`ConnCtx`], what a connection knows about
//!   itself.
//! - `headers.rs`: hop-by-hop fields, the forwarded headers, `Set-Cookie` domains.
//! - `upgrade.rs`: HTTP/1.1 upgrades and WebSocket over extended CONNECT; [`relay`], the byte
//!   relay of tunnels and of TLS passthrough.
//! - `error.rs`: [`ProxyError`] and its status and fault; the body and error types.
//!
//! The coming protections (WAF, rate limits: `edge/protect/`) run in `forward.rs`, in
//! `Proxy::forward` once the request's route is known and before a backend is chosen.

mod error;
mod forward;
mod headers;
mod upgrade;

pub use error::{BoxError, Fault, ProxyBody, ProxyError};
pub use forward::{request_host, ConnCtx, LastRoute, Pooling, Proxy, ProxySettings};
pub use headers::ForwardedFor;
pub use upgrade::relay;
