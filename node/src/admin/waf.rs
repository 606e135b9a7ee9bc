//! The WAF's admin calls: policies (replicated writes and linearizable reads), a raw request
//! tested against this node's engine, and a rule reload on this node.

use portcullis_proto::admin::{self as pb, WriteReply};
use portcullis_raft::state::WafPolicy;
use portcullis_raft::Command;
use tonic::Status;

use super::grpc::AdminService;
use crate::edge::protect::waf::probe::MAX_TEST_REQUEST;

fn parse_policy(json: &str) -> Result<WafPolicy, Status> {
    let p: WafPolicy = serde_json::from_str(json)
        .map_err(|e| Status::invalid_argument(format!("WAF policy: {e}")))?;
    p.validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(p)
}

fn to_json(p: &WafPolicy) -> String {
    serde_json::to_string(p).unwrap_or_default()
}

impl AdminService {
    /// This node's WAF engine (every node that runs a data plane has one).
    fn waf_engine(&self) -> Result<std::sync::Arc<crate::edge::protect::waf::Waf>, Status> {
        self.state
            .edge
            .get()
            .and_then(|e| e.waf().cloned())
            .ok_or_else(|| Status::unavailable("this node runs no data plane"))
    }

    pub(super) async fn waf_set(&self, r: pb::WafPolicyRequest) -> Result<WriteReply, Status> {
        let app = match (r.cluster_default, r.app.is_empty()) {
            (true, true) => None,
            (false, false) => Some(r.app),
            _ => {
                return Err(Status::invalid_argument(
                    "name an app or the cluster default, not both",
                ))
            }
        };
        let policy = if r.policy_json.is_empty() {
            None
        } else {
            Some(parse_policy(&r.policy_json)?)
        };
        let (log_index, _) = self.commit(Command::SetWafPolicy { app, policy }).await?;
        Ok(WriteReply { log_index })
    }

    pub(super) async fn waf_get(
        &self,
        r: pb::WafPolicyQuery,
    ) -> Result<pb::WafPolicyReply, Status> {
        self.barrier().await?;
        let applied = self.state.cluster.shared.read();
        let waf = &applied.state.waf;
        let (policy, source) = if r.cluster_default {
            match &waf.default {
                Some(p) => (p.clone(), "cluster-default"),
                None => (WafPolicy::default(), "built-in"),
            }
        } else {
            if !applied.state.apps.contains_key(&r.app) {
                return Err(Status::not_found(format!("app {:?} not found", r.app)));
            }
            match (waf.apps.get(&r.app), &waf.default) {
                (Some(p), _) => (p.clone(), "app"),
                (None, Some(p)) => (p.clone(), "cluster-default"),
                (None, None) => (WafPolicy::default(), "built-in"),
            }
        };
        Ok(pb::WafPolicyReply {
            policy_json: to_json(&policy),
            source: source.into(),
        })
    }

    pub(super) async fn waf_test(&self, r: pb::WafTestRequest) -> Result<pb::WafTestReply, Status> {
        if r.request.len() > MAX_TEST_REQUEST {
            return Err(Status::invalid_argument(format!(
                "request larger than {MAX_TEST_REQUEST} bytes"
            )));
        }
        let policy = self
            .waf_get(pb::WafPolicyQuery {
                app: r.app,
                cluster_default: false,
            })
            .await?;
        let policy = parse_policy(&policy.policy_json)?;
        let waf = self.waf_engine()?;
        let out = tokio::task::spawn_blocking(move || waf.probe(&policy, &r.request))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::failed_precondition)?;
        Ok(pb::WafTestReply {
            result_json: serde_json::to_string(&out).unwrap_or_default(),
        })
    }

    pub(super) async fn waf_reload(&self) -> Result<pb::WafReloadReply, Status> {
        let waf = self.waf_engine()?;
        let w = waf.clone();
        let n = tokio::task::spawn_blocking(move || w.reload())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "rules not reloaded (the previous rules keep serving): {e}"
                ))
            })?;
        Ok(pb::WafReloadReply {
            rule_sets: u32::try_from(n).unwrap_or(u32::MAX),
            engine: waf.engine_version(),
        })
    }
}
