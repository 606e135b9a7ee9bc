//! Protections that run on each request once its route is known and before a backend is
//! chosen (`edge/proxy/forward.rs`): they see the app and the effective client, and refuse
//! through `ProxyError`.
//!
//! - [`waf`]: the web application firewall (OWASP CRS on libmodsecurity), per-app policy from
//!   the replicated state.
//!
//! Rate limits will join here. Connection-level limits stay in `edge/limits.rs`.
//!
//! What it may import: the edge's proxy types (`ProxyError`, `ProxyBody`), `portcullis_raft`'s
//! policy types, and the node's leaves (`metrics` registers what is declared here). The proxy
//! calls in; nothing here calls the proxy.

pub mod waf;
