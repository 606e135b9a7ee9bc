//! What is read before TLS on the HTTPS port: a PROXY protocol header from a trusted sender,
//! then the ClientHello, under a size cap (the caller applies the deadline).

use std::io;
use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::clienthello::{parse_client_hello, ClientHello, HelloError};
use super::limits;
use super::proxy_protocol::{parse_proxy_header, ProxyError as PpError};

/// Why a connection ended before its ClientHello was read.
#[derive(Debug, thiserror::Error)]
pub(super) enum PreambleError {
    #[error("connection closed before a complete client hello")]
    Eof,
    #[error("client hello larger than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Hello(HelloError),
    #[error(transparent)]
    Proxy(PpError),
    #[error(transparent)]
    Limit(limits::LimitError),
    #[error("read: {0}")]
    Io(#[from] io::Error),
}

impl PreambleError {
    pub(super) fn reason(&self) -> &'static str {
        match self {
            PreambleError::Eof => "eof_before_hello",
            PreambleError::TooLarge(_) => "client_hello_too_large",
            PreambleError::Hello(HelloError::NotHandshake(_)) => "not_tls",
            PreambleError::Hello(_) => "malformed_client_hello",
            PreambleError::Proxy(_) => "proxy_protocol",
            PreambleError::Limit(e) => e.reason(),
            PreambleError::Io(_) => "io",
        }
    }
}

/// What was read before TLS: the real client, the ClientHello, and every byte after any PROXY
/// header (to be replayed into rustls or relayed to a passthrough backend).
pub(super) struct Preamble {
    pub(super) client: SocketAddr,
    pub(super) hello: ClientHello,
    pub(super) buf: BytesMut,
}

/// Reads any PROXY header and the ClientHello. From a trusted PROXY sender (`proxy_allowed`),
/// `client_known` is called with the real client as soon as the header (or its absence) says
/// who that is, before any of the ClientHello is waited for: an `Err` (the per-IP limit) ends
/// the connection there.
pub(super) async fn read_preamble<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    proxy_allowed: bool,
    cap: usize,
    mut client_known: impl FnMut(SocketAddr) -> Result<(), limits::LimitError>,
) -> Result<Preamble, PreambleError> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut client = peer;
    // Only trusted peers may send a PROXY header; from them it is optional (a TLS record can
    // never start with either signature, so the two cannot be confused).
    let mut proxy_pending = proxy_allowed;
    loop {
        if proxy_pending {
            match parse_proxy_header(&buf) {
                Ok(h) => {
                    client = h.source.unwrap_or(peer);
                    buf.advance(h.consumed);
                    proxy_pending = false;
                    client_known(client).map_err(PreambleError::Limit)?;
                }
                Err(PpError::NotProxy) => {
                    proxy_pending = false;
                    client_known(client).map_err(PreambleError::Limit)?;
                }
                Err(PpError::Incomplete) => {}
                Err(e) => return Err(PreambleError::Proxy(e)),
            }
        }
        if !proxy_pending {
            match parse_client_hello(&buf) {
                Ok(hello) => return Ok(Preamble { client, hello, buf }),
                Err(HelloError::Incomplete) => {}
                Err(e) => return Err(PreambleError::Hello(e)),
            }
        }
        if buf.len() >= cap {
            return Err(PreambleError::TooLarge(cap));
        }
        let room = cap - buf.len();
        buf.reserve(room.min(16 * 1024));
        let n = (&mut *stream).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(PreambleError::Eof);
        }
    }
}
