//! TLS passthrough: the ClientHello and every byte after it relayed to a backend that
//! terminates TLS itself; the gateway never sees the plaintext.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::preamble::Preamble;
use super::route::Route;
use super::upstream::{connect_with_timeout, Target};
use super::{balance, proxy, Edge, Snapshot};
use crate::metrics::AppLabels;

impl Edge {
    pub(super) async fn passthrough(
        &self,
        stream: TcpStream,
        pre: Preamble,
        route: Route,
        snap: Arc<Snapshot>,
    ) {
        self.metrics
            .passthrough_connections
            .get_or_create(&AppLabels {
                app: route.app.to_string(),
            })
            .inc();
        let candidates =
            balance::candidates(&snap, &self.balancer, &route, pre.client.ip(), None, 3);
        drop(snap);
        let candidates = match candidates {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(app = %route.app, reason = ?e, "passthrough: no backend");
                return;
            }
        };
        let timeout = Duration::from_millis(self.cfg.backend_connect_timeout_ms);
        // Nothing has been sent yet, so a connect failure can always move on to the next
        // choice: the buffered ClientHello is replayed to whichever backend answers.
        let mut connected = None;
        for cand in candidates {
            let Some(target) = cand
                .backend
                .address(route.port, route.default_port)
                .and_then(|a| Target::parse(&a))
            else {
                continue;
            };
            match connect_with_timeout(self.upstream.as_ref(), &target, timeout).await {
                Ok(u) => {
                    if let Some(h) = &cand.health {
                        h.record_connect_success();
                    }
                    let guard = cand.load.as_ref().map(|l| l.acquire());
                    connected = Some((u, target, guard));
                    break;
                }
                Err(e) => {
                    if let Some(h) = &cand.health {
                        h.record_connect_failure(self.balancer.health.passive_fall);
                    }
                    tracing::warn!(error = %e, backend = %target, app = %route.app, "passthrough connect failed");
                }
            }
        }
        let Some((mut up, target, _load)) = connected else {
            return;
        };
        if let Err(e) = up.write_all(&pre.buf).await {
            tracing::debug!(error = %e, backend = %target, "passthrough write failed");
            return;
        }
        tracing::debug!(backend = %target, app = %route.app, client = %pre.client, "passthrough");
        proxy::relay(stream, up, Duration::from_millis(self.cfg.idle_timeout_ms)).await;
    }
}
