//! What a run measures: the targets (a [`Kind`] of server at an address, with the process whose
//! CPU time is the target's), the [`Mode`]s of load, the dev PKI every target serves, and the
//! constants every part shares (the host name, the backend's body, the deadlines).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

/// The backend's answer to every request. Fixed, so every target moves the same bytes.
pub const BODY: &[u8] = &[b'x'; 128];
/// TCP connect, client side.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS, QUIC and HTTP handshakes, both sides.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Send → full response. Generous: a 2-core machine under load can stall for a while, and a
/// stall should show up in p99.9, not as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Child processes (nginx, HAProxy, the backend, `portcullis up`) get this long to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The host every request names; the dev wildcard certificate covers it.
pub const APP: &str = "benchapp";

/// How a target is loaded.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, ValueEnum)]
pub enum Mode {
    H1,
    H2,
    Newconn,
    /// HTTP/3 over QUIC, Portcullis only: Debian's nginx 1.22 has no `http_v3_module` and its
    /// HAProxy 2.6 is built without QUIC, so there is no same-run peer to compare against.
    H3,
    /// `h1` driven by wrk (C, OpenSSL) instead of this binary's client.
    Wrk,
    /// `h2` driven by h2load (nghttp2's, C, OpenSSL) instead of this binary's client.
    H2load,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::H1 => "h1 keep-alive",
            Mode::H2 => "h2",
            Mode::Newconn => "new TLS conn",
            Mode::H3 => "h3",
            Mode::Wrk => "h1 keep-alive (wrk)",
            Mode::H2load => "h2 (h2load)",
        }
    }

    /// Driven by an outside program rather than this binary's client.
    pub fn tool(self) -> Option<&'static str> {
        match self {
            Mode::Wrk => Some("wrk"),
            Mode::H2load => Some("h2load"),
            _ => None,
        }
    }
}

/// Which server a target is.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, ValueEnum)]
pub enum Kind {
    Direct,
    Portcullis,
    Nginx,
    Haproxy,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "backend direct (ceiling)",
            Kind::Portcullis => "portcullis",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }
}

/// One server under load.
#[derive(Clone)]
pub struct Target {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// The process whose CPU time, with its descendants' (nginx's workers), is the target's.
    pub pid: u32,
}

/// The dev PKI of the local cluster (`portcullis up`): every target serves its wildcard
/// certificate, and the client trusts its CA.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}
