//! `portcullis waf test`: one raw HTTP/1.1 request through this node's engine under an app's
//! policy, answered with what matched and what the policy would do. Admin only; nothing is
//! forwarded and nothing is logged to the audit log.

use std::sync::Arc;

use portcullis_modsec::Tx;
use portcullis_raft::state::{WafMode, WafPolicy};
use serde::Serialize;

use super::verdict::{self, Matched};
use super::Waf;

/// Largest request accepted for a test.
pub const MAX_TEST_REQUEST: usize = 1024 * 1024;

#[derive(Debug, Serialize)]
pub struct ProbeResult {
    pub mode: &'static str,
    pub paranoia: u8,
    /// The status a block-mode policy answers with, if the request would be refused.
    pub block_status: Option<u16>,
    /// What this app's policy does with it: `forward`, `log` (detect) or `block`.
    pub action: &'static str,
    pub anomaly_score: u32,
    pub rules: Vec<Matched>,
    pub engine: String,
}

/// A request split into the parts the engine takes.
struct RawRequest {
    method: String,
    uri: String,
    version: &'static str,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

fn parse(raw: &[u8]) -> Result<RawRequest, String> {
    if raw.len() > MAX_TEST_REQUEST {
        return Err(format!("request larger than {MAX_TEST_REQUEST} bytes"));
    }
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err("incomplete request head (end it with an empty line)".into())
        }
        Err(e) => return Err(format!("malformed request: {e}")),
    };
    let version = match req.version {
        Some(0) => "1.0",
        _ => "1.1",
    };
    Ok(RawRequest {
        method: req.method.unwrap_or("GET").to_string(),
        uri: req.path.unwrap_or("/").to_string(),
        version,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
            .collect(),
        body: raw[head..].to_vec(),
    })
}

impl Waf {
    /// Evaluates `raw` under `policy` (compiling its rule set if no app uses it yet). Blocking.
    pub fn probe(&self, policy: &WafPolicy, raw: &[u8]) -> Result<ProbeResult, String> {
        if let Some(why) = self.unavailable() {
            return Err(format!("no WAF engine on this node: {why}"));
        }
        let req = parse(raw)?;
        // Evaluated as block mode so the result says whether the request would be refused;
        // `action` then applies the app's real mode.
        let as_block = WafPolicy {
            mode: WafMode::Block,
            ..policy.clone()
        };
        let set = match self.rule_set(&as_block) {
            Some(s) => s,
            None => Arc::new(self.compile_now(&as_block)?),
        };
        let mut tx = Tx::new(&set)?;
        tx.connection("127.0.0.1", 40000, "0.0.0.0", 443);
        let hs: Vec<(&[u8], &[u8])> = req.headers.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let limit = usize::try_from(policy.body_limit).unwrap_or(usize::MAX);
        let mut d = tx.request_head(req.uri.as_bytes(), req.method.as_bytes(), req.version, &hs);
        if d.is_none() {
            d = tx.request_body(&req.body[..req.body.len().min(limit)]);
        }
        let logs = tx.finish();
        let prefixes = self.rule_prefixes();
        let rules: Vec<Matched> = logs
            .iter()
            .filter_map(|l| verdict::parse_line(l, &prefixes))
            .collect();
        let block_status = d.map(|d| d.status);
        let action = match (policy.mode, block_status.is_some(), rules.is_empty()) {
            (WafMode::Block, true, _) => "block",
            (WafMode::Off, _, _) => "forward",
            (_, _, false) => "log",
            _ => "forward",
        };
        Ok(ProbeResult {
            mode: policy.mode.as_str(),
            paranoia: policy.paranoia,
            block_status,
            action,
            anomaly_score: verdict::anomaly_score(&rules),
            rules,
            engine: self.engine_version(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn raw_requests_split_into_head_and_body() {
        let r =
            super::parse(b"POST /login?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nq=1")
                .expect("parsed");
        assert_eq!(
            (r.method.as_str(), r.uri.as_str(), r.version),
            ("POST", "/login?x=1", "1.1")
        );
        assert_eq!(r.headers.len(), 2);
        assert_eq!(r.body, b"q=1");
        assert!(super::parse(b"GET / HTTP/1.1\r\nHost: a\r\n").is_err());
        assert!(super::parse(b"\x00\x01 nonsense\r\n\r\n").is_err());
    }
}
