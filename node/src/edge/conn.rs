//! One connection on the HTTPS port, after accept: the preamble (`preamble.rs`), then by its
//! SNI either a TLS-ALPN-01 answer (through the ACME hook), a passthrough relay
//! (`passthrough.rs`), or TLS termination and HTTP (`serve.rs`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::acme_hook;
use super::grammar::Mode;
use super::limits::{ConnPermit, Rewind};
use super::preamble::{read_preamble, PreambleError};
use super::proxy::ConnCtx;
use super::Edge;

impl Edge {
    pub(super) async fn serve_tls(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        mut permit: ConnPermit,
        shutdown: CancellationToken,
    ) {
        let hello_timeout = Duration::from_millis(self.cfg.client_hello_timeout_ms);
        // Untrusted peers were charged at accept; a trusted PROXY sender's connection is
        // charged to the client it names, once its header is read (`accept_loop`).
        let proxy_allowed = self.proxy_from.contains(peer.ip());
        let pre = match tokio::time::timeout(
            hello_timeout,
            read_preamble(
                &mut stream,
                peer,
                proxy_allowed,
                self.cfg.max_client_hello_bytes,
                |client| permit.charge(client.ip().to_canonical()),
            ),
        )
        .await
        {
            Err(_) => {
                self.metrics.limit("client_hello_timeout");
                return;
            }
            Ok(Err(e)) => {
                match e {
                    PreambleError::TooLarge(_) | PreambleError::Limit(_) => {
                        self.metrics.limit(e.reason())
                    }
                    _ => self.metrics.handshake_failure(e.reason()),
                }
                tracing::debug!(error = %e, "no client hello");
                return;
            }
            Ok(Ok(p)) => p,
        };
        let trusted = self.trusted.contains(pre.client.ip());
        let snap = self.snapshot.load_full();
        let sni = pre.hello.server_name.clone();
        // RFC 8737: a CA validating TLS-ALPN-01 offers only `acme-tls/1`. A name with a pending
        // answer gets the challenge certificate (through the ACME hook, `acme_hook.rs`); any
        // other is refused below, except passthrough names, whose backends may run their own
        // ACME clients.
        let acme_tls = acme_hook::is_acme_tls(&pre.hello.alpn);
        if let Some((name, cfg)) = sni
            .as_deref()
            .filter(|_| acme_tls)
            .and_then(|n| Some((n, self.acme.tls_alpn01(n)?)))
        {
            let limit = Duration::from_millis(self.cfg.tls_handshake_timeout_ms);
            let io = Rewind::new(pre.buf.freeze(), stream);
            let answer = self.acme.answer_tls_alpn01(cfg, Box::new(io), name, limit);
            if let Err(e) = answer.await {
                tracing::debug!(error = %e, "acme-tls/1 answer failed");
            }
            return;
        }
        let route = match sni.as_deref() {
            Some(n) => self.proxy.resolve_host(&snap.routes, n).await.ok(),
            None => None,
        };
        if let Some(r) = &route {
            if r.internal && !trusted {
                self.metrics.limit("internal_untrusted");
                return;
            }
            if r.mode == Mode::Passthrough {
                let r = r.clone();
                return self.passthrough(stream, pre, r, snap).await;
            }
        }
        if acme_tls {
            self.metrics.handshake_failure("acme_tls_no_challenge");
            tracing::debug!(sni = ?sni, "acme-tls/1 without a pending challenge refused");
            return;
        }
        drop(snap);

        let io = Rewind::new(pre.buf.freeze(), stream);
        let handshake = Duration::from_millis(self.cfg.tls_handshake_timeout_ms);
        let tls = match tokio::time::timeout(handshake, self.acceptor.accept(io)).await {
            Err(_) => {
                self.metrics.handshake_failure("timeout");
                return;
            }
            Ok(Err(e)) => {
                self.metrics.handshake_failure(classify_tls_error(&e));
                tracing::debug!(error = %e, sni = ?sni, "tls handshake failed");
                return;
            }
            Ok(Ok(s)) => s,
        };
        let ctx = Arc::new(ConnCtx::new(pre.client, "https", sni, route, trusted));
        self.serve_http(tls, ctx, shutdown).await;
    }
}

fn classify_tls_error(e: &io::Error) -> &'static str {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    match inner {
        rustls::Error::PeerIncompatible(_) => "peer_incompatible",
        rustls::Error::General(_) => "no_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "other",
    }
}
