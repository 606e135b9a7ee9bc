//! The WAF's metrics (`portcullis_waf_*`). Labels are bounded: apps come from the replicated
//! state and families from a fixed list (`verdict::family`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub app: String,
    pub family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WafAppLabels {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub app: String,
    /// `pass` (forwarded uninspected) or `closed` (refused).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct WafMetrics {
    /// Matched rules, by app and rule family (every mode).
    pub detections: Family<RuleLabels, Counter>,
    /// Requests refused by the WAF, by app and the family of the rules that matched.
    pub blocks: Family<RuleLabels, Counter>,
    /// Requests inspected, by app.
    pub inspected: Family<WafAppLabels, Counter>,
    /// CPU-bound evaluation time per phase group (request, response).
    pub eval_seconds: Histogram,
    /// Evaluations that outran the budget, by app and what the policy did.
    pub over_budget: Family<OutcomeLabels, Counter>,
    /// Requests of apps with the WAF on while no engine could run (library or rules missing).
    pub unavailable: Family<OutcomeLabels, Counter>,
    /// Rule set (re)loads by result (`ok`, `error`).
    pub reloads: Family<ResultLabels, Counter>,
    /// Audit records dropped because the writer fell behind.
    pub audit_dropped: Counter,
}

impl WafMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = WafMetrics {
            detections: Family::default(),
            blocks: Family::default(),
            inspected: Family::default(),
            // 20 µs .. ~0.65 s.
            eval_seconds: Histogram::new(exponential_buckets(0.00002, 2.0, 16)),
            over_budget: Family::default(),
            unavailable: Family::default(),
            reloads: Family::default(),
            audit_dropped: Counter::default(),
        };
        let w = r.sub_registry_with_prefix("portcullis_waf");
        w.register(
            "detections",
            "Matched WAF rules by app and rule family",
            m.detections.clone(),
        );
        w.register(
            "blocks",
            "Requests the WAF refused, by app and matched rule family",
            m.blocks.clone(),
        );
        w.register(
            "inspected",
            "Requests inspected by app",
            m.inspected.clone(),
        );
        w.register(
            "eval_seconds",
            "Rule evaluation time per request (request phases; response phases separately)",
            m.eval_seconds.clone(),
        );
        w.register(
            "over_budget",
            "Evaluations past the app's budget, by what the policy did (pass or closed)",
            m.over_budget.clone(),
        );
        w.register(
            "unavailable",
            "Requests of WAF-protected apps while no rule engine was loaded, by what the policy did",
            m.unavailable.clone(),
        );
        w.register(
            "rule_reloads",
            "Rule set loads by result",
            m.reloads.clone(),
        );
        w.register(
            "audit_dropped",
            "Audit records dropped because the writer fell behind",
            m.audit_dropped.clone(),
        );
        m
    }
}

impl Default for WafMetrics {
    fn default() -> Self {
        Self::register(&mut Registry::default())
    }
}
