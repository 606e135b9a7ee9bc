//! Instance health on this node: local soft state, never written through Raft. Every node
//! probes every instance itself ([`probe_loop`]: TCP connect or HTTP GET, rise/fall
//! thresholds), and the proxy ejects an instance after `passive_fall` consecutive connect
//! failures seen by real requests ([`InstanceHealth::record_connect_failure`]).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::edge::upstream::{connect_with_timeout, Target, Upstream};
use crate::edge::Snapshot;

/// `[health]`: node-wide active and passive health checking of instances.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Probe every instance this often, milliseconds. Default 2000.
    pub interval_ms: u64,
    /// A probe that takes longer fails, milliseconds. Default 1000.
    pub timeout_ms: u64,
    /// Consecutive successful probes that bring an unhealthy instance back. Default 2.
    pub rise: u32,
    /// Consecutive failed probes that take an instance out of rotation. Default 3.
    pub fall: u32,
    /// `GET` this path (2xx/3xx is healthy) instead of only connecting. Default: TCP connect.
    pub http_path: Option<String>,
    /// Consecutive connect failures of proxied requests that eject an instance until probes
    /// bring it back. Default 3; 0 disables passive ejection.
    pub passive_fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            http_path: None,
            passive_fall: 3,
        }
    }
}

impl HealthConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 || self.timeout_ms == 0 {
            return Err("health.interval_ms and health.timeout_ms must be > 0".into());
        }
        if self.rise == 0 || self.fall == 0 {
            return Err("health.rise and health.fall must be > 0".into());
        }
        if let Some(p) = &self.http_path {
            if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(format!(
                    "health.http_path {p:?} must be an absolute URL path"
                ));
            }
        }
        Ok(())
    }
}

/// One instance's health on this node. New instances start healthy so a fresh registration
/// serves at once; probes and passive failures take it out.
#[derive(Debug)]
pub struct InstanceHealth {
    healthy: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    passive_fails: AtomicU32,
}

impl Default for InstanceHealth {
    fn default() -> Self {
        InstanceHealth {
            healthy: AtomicBool::new(true),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            passive_fails: AtomicU32::new(0),
        }
    }
}

impl InstanceHealth {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records one probe; returns the new state when it changed. Only the prober calls this
    /// (one task), so the read-modify-write sequences do not race with each other.
    pub fn record_probe(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.fail_streak.store(0, Ordering::Relaxed);
            let n = self
                .ok_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if !self.is_healthy() && n >= rise {
                self.passive_fails.store(0, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let n = self
                .fail_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if self.is_healthy() && n >= fall {
                self.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// A proxied request could not connect. Returns true when this ejected the instance.
    pub fn record_connect_failure(&self, passive_fall: u32) -> bool {
        if passive_fall == 0 {
            return false;
        }
        let n = self
            .passive_fails
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= passive_fall && self.healthy.swap(false, Ordering::Relaxed) {
            // Probes must now see `rise` successes in a row before it comes back.
            self.ok_streak.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// A proxied request connected.
    pub fn record_connect_success(&self) {
        if self.passive_fails.load(Ordering::Relaxed) != 0 {
            self.passive_fails.store(0, Ordering::Relaxed);
        }
    }
}

/// One probe: connect through the upstream (the same path requests take), and with
/// `http_path` send a GET and require a 2xx/3xx status line. Everything under `timeout`.
pub async fn probe(
    upstream: &dyn Upstream,
    target: &Target,
    http_path: Option<&str>,
    timeout: Duration,
) -> bool {
    let run = async {
        let mut io = connect_with_timeout(upstream, target, timeout).await.ok()?;
        let Some(path) = http_path else {
            return Some(true);
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: portcullis-health\r\nConnection: close\r\n\r\n"
        );
        io.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let r = io.read(&mut buf[n..]).await.ok()?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code: u16 = line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, run).await, Ok(Some(true)))
}

/// Probes every instance from this node, forever: one round per `interval_ms`, all probes of
/// a round concurrently, each under `timeout_ms`. Reads the current snapshot each round, so
/// instances added or removed are picked up without a restart.
pub async fn probe_loop(
    snapshot: Arc<arc_swap::ArcSwap<Snapshot>>,
    upstream: Arc<dyn Upstream>,
    cfg: HealthConfig,
    metrics: Arc<crate::metrics::EdgeMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: std::collections::HashSet<String> = Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = snapshot.load_full();
        // Removed instances stop being reported instead of showing their last state forever.
        reported.retain(|id| {
            let keep = snap.balance.health(id).is_some();
            if !keep {
                let labels = crate::metrics::InstanceLabels {
                    instance: id.clone(),
                };
                metrics.backend_healthy.remove(&labels);
                metrics.health_probe_failures.remove(&labels);
            }
            keep
        });
        let mut round = tokio::task::JoinSet::new();
        for (id, addr) in snap.routes.probe_targets() {
            let (Some(health), Some(target)) =
                (snap.balance.health(&id).cloned(), Target::parse(&addr))
            else {
                continue;
            };
            let upstream = upstream.clone();
            let path = cfg.http_path.clone();
            round.spawn(async move {
                let ok = probe(upstream.as_ref(), &target, path.as_deref(), timeout).await;
                (id, health, target, ok)
            });
        }
        drop(snap);
        while let Some(r) = round.join_next().await {
            let Ok((id, health, target, ok)) = r else {
                continue;
            };
            let labels = crate::metrics::InstanceLabels {
                instance: id.clone(),
            };
            if !ok {
                metrics.health_probe_failures.get_or_create(&labels).inc();
            }
            match health.record_probe(ok, cfg.rise, cfg.fall) {
                Some(true) => {
                    tracing::info!(instance = %id, backend = %target, "instance healthy again")
                }
                Some(false) => {
                    tracing::warn!(instance = %id, backend = %target, fall = cfg.fall, "instance out of rotation: probes failing")
                }
                None => {}
            }
            metrics
                .backend_healthy
                .get_or_create(&labels)
                .set(i64::from(health.is_healthy()));
            reported.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_thresholds() {
        let h = InstanceHealth::default();
        assert!(h.is_healthy());
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), Some(false));
        assert!(!h.is_healthy());
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), Some(true));
        assert!(h.is_healthy());
    }

    #[test]
    fn passive_ejection() {
        let h = InstanceHealth::default();
        assert!(!h.record_connect_failure(2));
        h.record_connect_success();
        assert!(!h.record_connect_failure(2));
        assert!(h.record_connect_failure(2));
        assert!(!h.is_healthy());
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), Some(true));
        assert!(!InstanceHealth::default().record_connect_failure(0));
    }

    #[tokio::test]
    async fn http_probe_checks_status() {
        use tokio::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let up = crate::edge::upstream::TcpUpstream;
        let t = Target::parse(&addr.to_string()).expect("target");
        let d = Duration::from_secs(2);
        assert!(probe(&up, &t, Some("/healthz"), d).await);
        assert!(!probe(&up, &t, Some("/healthz"), d).await);
        // Nothing listens any more once the task is done; a plain connect probe fails.
        let closed = Target::parse("127.0.0.1:1").expect("target");
        assert!(!probe(&up, &closed, None, d).await);
    }

    #[test]
    fn health_config_validation() {
        assert!(HealthConfig::default().validate().is_ok());
        let bad = HealthConfig {
            fall: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = HealthConfig {
            http_path: Some("healthz".into()),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
