//! `portcullis waf …`: per-app WAF policy (`set`, `unset`, `show`), a raw request tested
//! against a node's engine (`test`), and rule reloads (`reload`). docs/waf.md.
//!
//! `set` changes only the flags given: it reads the app's effective policy (its own, else the
//! cluster default, else the built-in one), applies the flags and writes the result as the
//! app's policy.

use std::io::Read;

use anyhow::{bail, Context};
use portcullis_proto::admin::{self as pb, Empty};
use portcullis_raft::state::{FailMode, OverLimit, RuleExclusion, WafMode, WafPolicy};

use super::args::{Global, WafCmd, WafPolicyArgs, WafTarget};
use super::client::{connect_addr, ClusterFile};
use super::output::{print_json, rpc};

/// `ID` or `ID:/path/prefix`.
pub fn parse_exclusion(s: &str) -> Result<RuleExclusion, String> {
    let (id, path) = match s.split_once(':') {
        Some((id, p)) => (id, Some(p.to_string())),
        None => (s, None),
    };
    let id: u32 = id
        .parse()
        .map_err(|_| format!("{s:?}: expected RULE_ID or RULE_ID:/path/prefix"))?;
    Ok(RuleExclusion {
        id,
        path_prefix: path,
    })
}

fn apply(p: &mut WafPolicy, a: &WafPolicyArgs) -> anyhow::Result<()> {
    if let Some(m) = &a.mode {
        p.mode =
            WafMode::parse(m).with_context(|| format!("--mode {m:?}: off, detect or block"))?;
    }
    if let Some(n) = a.paranoia {
        p.paranoia = n;
    }
    if let Some(n) = a.inbound_threshold {
        p.inbound_threshold = n;
    }
    if let Some(n) = a.outbound_threshold {
        p.outbound_threshold = n;
    }
    if a.clear_exclusions {
        p.exclusions.clear();
    }
    for e in &a.exclude {
        let e = parse_exclusion(e).map_err(anyhow::Error::msg)?;
        if !p.exclusions.contains(&e) {
            p.exclusions.push(e);
        }
    }
    if let Some(n) = a.body_limit {
        p.body_limit = n;
    }
    if let Some(o) = &a.over_limit {
        p.over_limit = match o.as_str() {
            "inspect" => OverLimit::InspectPrefix,
            "refuse" => OverLimit::Refuse,
            _ => bail!("--over-limit {o:?}: inspect or refuse"),
        };
    }
    if let Some(r) = a.response_inspection {
        p.response_inspection = r;
    }
    if let Some(n) = a.budget_ms {
        p.budget_ms = n;
    }
    if let Some(o) = &a.on_budget {
        p.on_budget = match o.as_str() {
            "open" => FailMode::Open,
            "closed" => FailMode::Closed,
            _ => bail!("--on-budget {o:?}: open or closed"),
        };
    }
    p.validate().map_err(|e| anyhow::anyhow!("{e}"))
}

fn query(t: &WafTarget) -> anyhow::Result<pb::WafPolicyQuery> {
    match (&t.app, t.default) {
        (Some(app), false) => Ok(pb::WafPolicyQuery {
            app: app.clone(),
            cluster_default: false,
        }),
        (None, true) => Ok(pb::WafPolicyQuery {
            app: String::new(),
            cluster_default: true,
        }),
        _ => bail!("name an APP or pass --default"),
    }
}

fn print_policy(g: &Global, who: &str, p: &WafPolicy, source: &str) -> anyhow::Result<()> {
    if g.json {
        return print_json(&serde_json::json!({ "target": who, "source": source, "policy": p }));
    }
    let excl: Vec<String> = p
        .exclusions
        .iter()
        .map(|e| match &e.path_prefix {
            Some(pp) => format!("{}:{pp}", e.id),
            None => e.id.to_string(),
        })
        .collect();
    println!("{who} ({source})");
    println!("  mode                 {}", p.mode.as_str());
    println!("  paranoia             {}", p.paranoia);
    println!(
        "  anomaly thresholds   inbound {}, outbound {}",
        p.inbound_threshold, p.outbound_threshold
    );
    println!(
        "  exclusions           {}",
        if excl.is_empty() {
            "-".into()
        } else {
            excl.join(", ")
        }
    );
    println!(
        "  body inspected       {} bytes, above: {}",
        p.body_limit,
        match p.over_limit {
            OverLimit::InspectPrefix => "inspect the first part",
            OverLimit::Refuse => "refuse (413)",
        }
    );
    println!("  response inspection  {}", p.response_inspection);
    println!(
        "  budget               {} ms, then fail {}",
        p.budget_ms,
        match p.on_budget {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    );
    Ok(())
}

pub async fn run(g: &Global, cmd: WafCmd) -> anyhow::Result<()> {
    if let WafCmd::Reload = cmd {
        return reload(g).await;
    }
    let mut c = g.target().connect().await?;
    match cmd {
        WafCmd::Reload => {}
        WafCmd::Set { target, policy } => {
            let q = query(&target)?;
            let cur = rpc(c.get_waf_policy(q.clone()).await)?;
            let mut p: WafPolicy =
                serde_json::from_str(&cur.policy_json).context("policy from the cluster")?;
            apply(&mut p, &policy)?;
            let r = rpc(c
                .set_waf_policy(pb::WafPolicyRequest {
                    app: q.app.clone(),
                    cluster_default: q.cluster_default,
                    policy_json: serde_json::to_string(&p)?,
                })
                .await)?;
            let who = target.app.as_deref().unwrap_or("cluster default");
            if g.json {
                return print_json(
                    &serde_json::json!({ "target": who, "policy": p, "log_index": r.log_index }),
                );
            }
            print_policy(g, who, &p, "set")?;
        }
        WafCmd::Unset { target } => {
            let q = query(&target)?;
            let r = rpc(c
                .set_waf_policy(pb::WafPolicyRequest {
                    app: q.app,
                    cluster_default: q.cluster_default,
                    policy_json: String::new(),
                })
                .await)?;
            let who = target.app.as_deref().unwrap_or("cluster default");
            if g.json {
                return print_json(
                    &serde_json::json!({ "target": who, "removed": true, "log_index": r.log_index }),
                );
            }
            println!("{who}: policy removed");
        }
        WafCmd::Show { target } => {
            let q = query(&target)?;
            let r = rpc(c.get_waf_policy(q).await)?;
            let p: WafPolicy = serde_json::from_str(&r.policy_json)?;
            print_policy(
                g,
                target.app.as_deref().unwrap_or("cluster default"),
                &p,
                &r.source,
            )?;
        }
        WafCmd::Test { app, request } => {
            let raw = if request.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::stdin().read_to_end(&mut v)?;
                v
            } else {
                std::fs::read(&request).with_context(|| format!("read {}", request.display()))?
            };
            // Files written by hand end lines with LF; HTTP wants CRLF in the head.
            let raw = crlf_head(&raw);
            let r = rpc(c.test_waf(pb::WafTestRequest { app, request: raw }).await)?;
            let v: serde_json::Value = serde_json::from_str(&r.result_json)?;
            if g.json {
                return print_json(&v);
            }
            println!(
                "action {} (mode {}, paranoia {}), anomaly score {}",
                v["action"].as_str().unwrap_or("?"),
                v["mode"].as_str().unwrap_or("?"),
                v["paranoia"],
                v["anomaly_score"]
            );
            for r in v["rules"].as_array().into_iter().flatten() {
                println!(
                    "  {}  {:<9} {}",
                    r["id"],
                    r["severity"].as_str().unwrap_or(""),
                    r["msg"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

/// The head of `raw` with bare LF line ends turned into CRLF; the body is left as it is.
pub fn crlf_head(raw: &[u8]) -> Vec<u8> {
    let (head, body) = match find(raw, b"\r\n\r\n").map(|i| i + 4) {
        Some(i) => (&raw[..i], &raw[i..]),
        None => match find(raw, b"\n\n").map(|i| i + 2) {
            Some(i) => (&raw[..i], &raw[i..]),
            None => (raw, &raw[raw.len()..]),
        },
    };
    let mut out = Vec::with_capacity(raw.len() + 64);
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out.extend_from_slice(body);
    out
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Reloads the rules on every node of `--cluster`, or on the one `--admin` node.
async fn reload(g: &Global) -> anyhow::Result<()> {
    let t = g.target();
    let nodes: Vec<(String, String)> = match (&t.admin, &t.cluster) {
        (None, Some(dir)) => {
            let cf = ClusterFile::load(dir)?;
            let token = std::fs::read_to_string(&cf.token_file)
                .with_context(|| format!("read {}", cf.token_file.display()))?
                .trim()
                .to_string();
            cf.nodes
                .iter()
                .map(|n| (n.admin_addr.clone(), token.clone()))
                .collect()
        }
        _ => Vec::new(),
    };
    let mut results = Vec::new();
    let mut failed = false;
    if nodes.is_empty() {
        let mut c = t.connect().await?;
        let r = rpc(c.reload_waf(Empty {}).await)?;
        results.push(
            serde_json::json!({ "node": t.admin, "rule_sets": r.rule_sets, "engine": r.engine }),
        );
    } else {
        for (addr, token) in nodes {
            let out = match connect_addr(&addr, &token).await {
                Ok(mut c) => match c.reload_waf(Empty {}).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        serde_json::json!({ "node": addr, "rule_sets": r.rule_sets, "engine": r.engine })
                    }
                    Err(e) => {
                        failed = true;
                        serde_json::json!({ "node": addr, "error": e.message() })
                    }
                },
                Err(e) => {
                    failed = true;
                    serde_json::json!({ "node": addr, "error": format!("{e:#}") })
                }
            };
            results.push(out);
        }
    }
    if g.json {
        print_json(&serde_json::Value::Array(results))?;
    } else {
        for r in &results {
            match r.get("error") {
                Some(e) => println!("{}: NOT reloaded: {}", r["node"], e.as_str().unwrap_or("")),
                None => println!(
                    "{}: reloaded {} rule set(s) ({})",
                    r["node"],
                    r["rule_sets"],
                    r["engine"].as_str().unwrap_or("")
                ),
            }
        }
    }
    if failed {
        bail!(
            "the rules were not reloaded everywhere; nodes that failed keep their previous rules"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_parse_with_and_without_a_path() {
        assert_eq!(
            parse_exclusion("942100").expect("id"),
            RuleExclusion {
                id: 942100,
                path_prefix: None
            }
        );
        assert_eq!(
            parse_exclusion("942100:/api/search").expect("id:path"),
            RuleExclusion {
                id: 942100,
                path_prefix: Some("/api/search".into())
            }
        );
        assert!(parse_exclusion("sqli").is_err());
    }

    #[test]
    fn only_the_head_gets_crlf() {
        assert_eq!(
            crlf_head(b"POST / HTTP/1.1\nHost: a\n\nx\ny"),
            b"POST / HTTP/1.1\r\nHost: a\r\n\r\nx\ny".to_vec()
        );
        let already = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        assert_eq!(crlf_head(&already), already);
    }
}
