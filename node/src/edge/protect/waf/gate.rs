//! The WAF on the request path: a request of a protected app is buffered up to its policy's
//! inspected size, evaluated on the bounded pool within the budget, then refused (403, or 413
//! over the size limit) or forwarded with its body replayed; with response inspection, the
//! backend's response is held up to the engine's limit and evaluated before it is sent.
//!
//! The rule engine's decision is final in block mode; in detect mode every request is
//! forwarded and what matched is logged. Every outcome is counted and, when a rule matched (or
//! with `waf.audit_all`), written to the audit log with the request id the client sees in
//! `x-request-id`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use portcullis_raft::state::{FailMode, WafMode, WafPolicy};

use super::audit::Record;
use super::body::{read_prefix, Replay};
use super::metrics::{OutcomeLabels, RuleLabels, WafAppLabels};
use super::verdict::{self, Matched};
use super::Waf;
use crate::edge::proxy::{BoxError, ProxyBody, ProxyError};
use portcullis_modsec::{Disruption, RuleSet, Tx};

/// The header carrying the request id, to the client and to the backend.
pub const REQUEST_ID: &str = "x-request-id";

/// How much of a response body the engine sees (`SecResponseBodyLimit`).
const RESPONSE_BODY_LIMIT: usize = 512 * 1024;

/// Who sent the request, for the engine and the audit log.
pub struct Origin<'a> {
    pub client: SocketAddr,
    pub app: &'a str,
    pub host: &'a str,
}

/// A request that passed the request phases, on its way to the backend.
pub struct Pending {
    waf: Arc<Waf>,
    policy: WafPolicy,
    pub request_id: String,
    /// The transaction, kept for the response phases.
    tx: Option<Tx>,
    record: Record,
    /// Messages of the request phases, when the transaction already finished.
    logs: Vec<String>,
    eval: Duration,
    /// Set when the budget or the engine failed and the request was forwarded uninspected.
    skipped: Option<&'static str>,
    /// The audit record was written.
    closed: bool,
}

impl Drop for Pending {
    /// A request that ended before its response was inspected (the backend failed, the client
    /// went away) is still recorded with what its request phases found.
    fn drop(&mut self) {
        if !self.closed {
            self.close(None);
        }
    }
}

/// What the request phases produced on the pool.
struct Evaluated {
    disruption: Option<Disruption>,
    /// `None` while the transaction continues into the response phases.
    logs: Option<Vec<String>>,
    tx: Option<Tx>,
    cpu: Duration,
}

/// Header fields as owned bytes, for the evaluation thread.
fn owned_headers(h: &http::HeaderMap, keep: impl Fn(&str) -> bool) -> Vec<(Bytes, Bytes)> {
    h.iter()
        .filter(|(k, _)| keep(k.as_str()))
        .map(|(k, v)| {
            (
                Bytes::copy_from_slice(k.as_str().as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )
        })
        .collect()
}

fn protocol(v: Version) -> (&'static str, &'static str) {
    match v {
        Version::HTTP_3 => ("h3", "3.0"),
        Version::HTTP_2 => ("h2", "2.0"),
        Version::HTTP_10 => ("http/1.0", "1.0"),
        _ => ("http/1.1", "1.1"),
    }
}

/// Now as RFC 3339 UTC with milliseconds.
fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_millis())
}

/// Days since 1970-01-01 to a civil date (proleptic Gregorian; H. Hinnant's algorithm).
fn rfc3339(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Runs the request phases of `req`. `Ok` carries the request to forward (its body replayed)
/// and what the response phases and the audit log need; `Err` is the answer to the client.
pub async fn inspect_request<B>(
    waf: &Arc<Waf>,
    policy: &WafPolicy,
    origin: Origin<'_>,
    req: Request<B>,
    read_timeout: Duration,
) -> Result<(Request<ProxyBody>, Pending), ProxyError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let request_id = waf.request_id();
    let (mut parts, body) = req.into_parts();
    let (proto, version) = protocol(parts.version);
    let uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut record = Record {
        ts: String::new(),
        request_id: request_id.clone(),
        node: waf.node_id(),
        app: origin.app.to_string(),
        host: origin.host.to_string(),
        client_ip: origin.client.ip().to_string(),
        method: parts.method.as_str().to_string(),
        uri: uri.clone(),
        protocol: proto,
        mode: policy.mode.as_str(),
        paranoia: policy.paranoia,
        action: "pass",
        status: None,
        anomaly_score: 0,
        rules: Vec::new(),
        eval_us: 0,
    };
    // The backend sees the gateway's id, never one the client chose.
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        parts.headers.insert(REQUEST_ID, v);
    }

    let limit = usize::try_from(policy.body_limit).unwrap_or(usize::MAX);
    // Pinned: the HTTP/3 body adapter is not `Unpin`.
    let prefix = match tokio::time::timeout(read_timeout, read_prefix(Box::pin(body), limit)).await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(ProxyError::ClientBody(e)),
        Err(_) => {
            return Err(ProxyError::ClientBody(
                format!("request body not received within {read_timeout:?}").into(),
            ))
        }
    };
    if prefix.over && policy.over_limit == portcullis_raft::state::OverLimit::Refuse {
        record.action = "blocked";
        record.status = Some(413);
        finish_record(waf, &mut record, Vec::new(), Duration::ZERO, true);
        return Err(ProxyError::BodyTooLarge(policy.body_limit));
    }
    let inspected = prefix.read.slice(..prefix.read.len().min(limit));

    // Headers as the engine expects them: HTTP/2 and HTTP/3 carry the host in `:authority`.
    let mut headers = owned_headers(&parts.headers, |k| k != REQUEST_ID);
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(a) = parts.uri.authority() {
            headers.push((
                Bytes::from_static(b"host"),
                Bytes::copy_from_slice(a.as_str().as_bytes()),
            ));
        }
    }

    let set = waf.rule_set(policy);
    let evaluated = match set {
        None => Err("unavailable"),
        Some(set) => {
            let job = {
                let method = parts.method.as_str().as_bytes().to_vec();
                let client = origin.client;
                let keep = policy.response_inspection;
                move || {
                    evaluate_request(
                        &set, client, &uri, &method, version, &headers, &inspected, keep,
                    )
                }
            };
            let budget = Duration::from_millis(u64::from(policy.budget_ms));
            // Waiting for a slot is not part of the budget: under load requests queue rather
            // than pass uninspected.
            let slot = waf.slot().await;
            let handle = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                job()
            });
            match tokio::time::timeout(budget, handle).await {
                Ok(Ok(Ok(e))) => Ok(e),
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %e, "WAF transaction failed");
                    Err("unavailable")
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "WAF evaluation panicked");
                    Err("unavailable")
                }
                Err(_) => Err("over_budget"),
            }
        }
    };

    let body = Replay::boxed(prefix);
    match evaluated {
        Err(why) => {
            let closed = policy.on_budget == FailMode::Closed;
            let labels = OutcomeLabels {
                app: origin.app.to_string(),
                outcome: if closed { "closed" } else { "pass" },
            };
            if why == "over_budget" {
                waf.metrics.over_budget.get_or_create(&labels).inc();
            } else {
                waf.metrics.unavailable.get_or_create(&labels).inc();
            }
            record.action = match (why, closed) {
                ("over_budget", true) => "over_budget_blocked",
                ("over_budget", false) => "over_budget_pass",
                (_, true) => "unavailable_blocked",
                (_, false) => "unavailable_pass",
            };
            if closed {
                record.status = Some(503);
            }
            finish_record(waf, &mut record, Vec::new(), started.elapsed(), true);
            if closed {
                return Err(ProxyError::WafUnavailable { request_id });
            }
            let pending = Pending {
                waf: waf.clone(),
                policy: policy.clone(),
                request_id,
                tx: None,
                record,
                logs: Vec::new(),
                eval: Duration::ZERO,
                skipped: Some(why),
                closed: false,
            };
            Ok((Request::from_parts(parts, body), pending))
        }
        Ok(ev) => {
            if let Some(d) = ev.disruption.filter(|_| policy.mode == WafMode::Block) {
                record.action = "blocked";
                record.status = Some(d.status);
                let logs = ev.logs.unwrap_or_default();
                finish_record(waf, &mut record, logs, ev.cpu, true);
                return Err(ProxyError::WafBlocked {
                    request_id,
                    status: StatusCode::from_u16(d.status)
                        .ok()
                        .filter(|s| s.is_client_error())
                        .unwrap_or(StatusCode::FORBIDDEN),
                });
            }
            let pending = Pending {
                waf: waf.clone(),
                policy: policy.clone(),
                request_id,
                tx: ev.tx,
                record,
                logs: ev.logs.unwrap_or_default(),
                eval: ev.cpu,
                skipped: None,
                closed: false,
            };
            Ok((Request::from_parts(parts, body), pending))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn evaluate_request(
    set: &Arc<RuleSet>,
    client: SocketAddr,
    uri: &str,
    method: &[u8],
    version: &str,
    headers: &[(Bytes, Bytes)],
    body: &[u8],
    keep_for_response: bool,
) -> Result<Evaluated, String> {
    let t0 = Instant::now();
    let mut tx = Tx::new(set)?;
    tx.connection(&client.ip().to_string(), client.port(), "0.0.0.0", 443);
    let hs: Vec<(&[u8], &[u8])> = headers.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let mut d = tx.request_head(uri.as_bytes(), method, version, &hs);
    if d.is_none() {
        d = tx.request_body(body);
    }
    let (logs, tx) = if keep_for_response && d.is_none() {
        (None, Some(tx))
    } else {
        (Some(tx.finish()), None)
    };
    Ok(Evaluated {
        disruption: d,
        logs,
        tx,
        cpu: t0.elapsed(),
    })
}

impl Pending {
    /// Runs the response phases when the policy inspects responses, and writes the audit
    /// record. Returns the response to send: the backend's, or the WAF's refusal.
    pub async fn response(
        mut self,
        resp: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut resp = resp;
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        let Some(tx) = self.tx.take() else {
            self.close(None);
            return Ok(resp);
        };
        let (parts, body) = resp.into_parts();
        let prefix = match read_prefix(body, RESPONSE_BODY_LIMIT).await {
            Ok(p) => p,
            Err(e) => {
                // The backend's body failed mid-way; the client gets the same failure.
                self.close(None);
                return Err(ProxyError::Upstream {
                    backend: "-".into(),
                    source: e,
                });
            }
        };
        let inspected = prefix
            .read
            .slice(..prefix.read.len().min(RESPONSE_BODY_LIMIT));
        let status = parts.status.as_u16();
        let headers = owned_headers(&parts.headers, |_| true);
        let budget = Duration::from_millis(u64::from(self.policy.budget_ms));
        let slot = self.waf.slot().await;
        let handle = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let t0 = Instant::now();
            let mut tx = tx;
            let hs: Vec<(&[u8], &[u8])> = headers.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            let mut d = tx.response_head(status, &hs);
            if d.is_none() {
                d = tx.response_body(&inspected);
            }
            (d, tx.finish(), t0.elapsed())
        });
        let outcome = tokio::time::timeout(budget, handle).await;
        let body = Replay::boxed(prefix);
        let resp = Response::from_parts(parts, body);
        match outcome {
            Ok(Ok((d, logs, cpu))) => {
                self.logs.extend(logs);
                self.eval += cpu;
                if let Some(d) = d.filter(|_| self.policy.mode == WafMode::Block) {
                    self.record.action = "blocked";
                    self.record.status = Some(d.status);
                    let request_id = self.request_id.clone();
                    self.close(None);
                    return Err(ProxyError::WafBlocked {
                        request_id,
                        status: StatusCode::FORBIDDEN,
                    });
                }
                self.close(None);
                Ok(resp)
            }
            _ => {
                let closed = self.policy.on_budget == FailMode::Closed;
                let labels = OutcomeLabels {
                    app: self.record.app.clone(),
                    outcome: if closed { "closed" } else { "pass" },
                };
                self.waf.metrics.over_budget.get_or_create(&labels).inc();
                let request_id = self.request_id.clone();
                self.close(Some(if closed {
                    "over_budget_blocked"
                } else {
                    "over_budget_pass"
                }));
                if closed {
                    return Err(ProxyError::WafUnavailable { request_id });
                }
                Ok(resp)
            }
        }
    }

    fn close(&mut self, action: Option<&'static str>) {
        self.closed = true;
        if let Some(a) = action.or(self.skipped.map(|s| match s {
            "over_budget" => "over_budget_pass",
            _ => "unavailable_pass",
        })) {
            self.record.action = a;
        }
        let logs = std::mem::take(&mut self.logs);
        // A transaction that never reached its response phases still runs phase 5.
        let logs = match self.tx.take() {
            Some(tx) => {
                let mut l = logs;
                l.extend(tx.finish());
                l
            }
            None => logs,
        };
        let blocked = self.record.action == "blocked";
        let mut record = std::mem::replace(&mut self.record, empty_record());
        finish_record(&self.waf, &mut record, logs, self.eval, blocked);
    }
}

fn empty_record() -> Record {
    Record {
        ts: String::new(),
        request_id: String::new(),
        node: 0,
        app: String::new(),
        host: String::new(),
        client_ip: String::new(),
        method: String::new(),
        uri: String::new(),
        protocol: "",
        mode: "",
        paranoia: 0,
        action: "",
        status: None,
        anomaly_score: 0,
        rules: Vec::new(),
        eval_us: 0,
    }
}

/// Parses what matched, counts it, and writes the audit record when something matched, the
/// request was refused, or the node logs everything.
fn finish_record(waf: &Waf, record: &mut Record, logs: Vec<String>, eval: Duration, blocked: bool) {
    let prefixes = waf.rule_prefixes();
    let rules: Vec<Matched> = logs
        .iter()
        .filter_map(|l| verdict::parse_line(l, &prefixes))
        .collect();
    let app = record.app.clone();
    waf.metrics
        .inspected
        .get_or_create(&WafAppLabels { app: app.clone() })
        .inc();
    if !eval.is_zero() {
        waf.metrics.eval_seconds.observe(eval.as_secs_f64());
    }
    let mut families: Vec<&'static str> = rules.iter().map(|r| verdict::family(r.id)).collect();
    families.sort_unstable();
    families.dedup();
    for f in &families {
        waf.metrics
            .detections
            .get_or_create(&RuleLabels {
                app: app.clone(),
                family: f,
            })
            .inc();
        if blocked {
            waf.metrics
                .blocks
                .get_or_create(&RuleLabels {
                    app: app.clone(),
                    family: f,
                })
                .inc();
        }
    }
    if record.action == "pass" && !rules.is_empty() {
        record.action = "detected";
    }
    record.anomaly_score = verdict::anomaly_score(&rules);
    record.rules = rules;
    record.eval_us = u64::try_from(eval.as_micros()).unwrap_or(u64::MAX);
    if record.action != "pass" || waf.audit_all() {
        record.ts = now_rfc3339();
        if record.action == "blocked" {
            tracing::info!(
                target: "portcullis::waf",
                request_id = %record.request_id,
                app = %record.app,
                client = %record.client_ip,
                score = record.anomaly_score,
                "request blocked"
            );
        }
        if let Some(a) = &waf.audit {
            a.log(record.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        // 2026-12-08T01:02:03Z
        assert_eq!(
            super::rfc3339(1_796_691_723, 45),
            "2026-12-08T01:02:03.045Z"
        );
        assert_eq!(super::rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000Z");
    }
}
