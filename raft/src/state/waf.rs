//! Web application firewall policy: what the cluster agrees on about inspecting each app's
//! traffic (mode, paranoia level, anomaly thresholds, rule exclusions, body limits, the
//! evaluation budget). The rules themselves are files on each node; only the policy is
//! replicated, so a change serves on every node as soon as the entry applies, like a route.
//!
//! Pure types and field checks: it imports `validate.rs` only. `model.rs` holds a [`WafState`]
//! in `ClusterState`; `command.rs` and `apply.rs` change it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::validate::{field, ValidationError};

/// What the gateway does with an app's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WafMode {
    /// Not inspected.
    #[default]
    Off,
    /// Inspected and logged, always forwarded.
    Detect,
    /// Inspected; a request over the anomaly threshold gets 403 and never reaches the backend.
    Block,
}

impl WafMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WafMode::Off => "off",
            WafMode::Detect => "detect",
            WafMode::Block => "block",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(WafMode::Off),
            "detect" => Some(WafMode::Detect),
            "block" => Some(WafMode::Block),
            _ => None,
        }
    }
}

/// A request body larger than the inspected size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverLimit {
    /// Inspect the first `body_limit` bytes, forward the whole body.
    #[default]
    InspectPrefix,
    /// Refuse with 413.
    Refuse,
}

/// A request whose evaluation outruns the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// Forward it uninspected (counted).
    #[default]
    Open,
    /// Refuse it with 503 (counted).
    Closed,
}

/// One rule switched off for an app: everywhere, or under a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleExclusion {
    pub id: u32,
    /// Only requests whose path starts with this (`/…`).
    pub path_prefix: Option<String>,
}

/// An app's policy (or the cluster default).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WafPolicy {
    pub mode: WafMode,
    /// CRS blocking paranoia level, 1–4.
    pub paranoia: u8,
    /// CRS inbound anomaly score threshold (5 = one critical match).
    pub inbound_threshold: u32,
    /// CRS outbound anomaly score threshold (response rules).
    pub outbound_threshold: u32,
    pub exclusions: Vec<RuleExclusion>,
    /// Request body bytes inspected.
    pub body_limit: u64,
    pub over_limit: OverLimit,
    /// Inspect responses too (CRS 95x rules); the response body is held back until inspected.
    pub response_inspection: bool,
    /// CPU budget of one request's evaluation, in milliseconds.
    pub budget_ms: u32,
    pub on_budget: FailMode,
}

impl Default for WafPolicy {
    /// What an app gets with no policy and no cluster default: off, with CRS's own defaults
    /// ready for `--mode block`.
    fn default() -> Self {
        WafPolicy {
            mode: WafMode::Off,
            paranoia: 1,
            inbound_threshold: 5,
            outbound_threshold: 4,
            exclusions: Vec::new(),
            body_limit: 128 * 1024,
            over_limit: OverLimit::InspectPrefix,
            response_inspection: false,
            budget_ms: 50,
            on_budget: FailMode::Open,
        }
    }
}

/// Largest inspected request body: bodies are held in memory while they are inspected.
pub const MAX_WAF_BODY_LIMIT: u64 = 16 * 1024 * 1024;
/// Most exclusions per policy; each becomes a rule in the app's compiled rule set.
pub const MAX_WAF_EXCLUSIONS: usize = 256;
/// Longest evaluation budget.
pub const MAX_WAF_BUDGET_MS: u32 = 10_000;
const MAX_PATH_PREFIX: usize = 256;

impl WafPolicy {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=4).contains(&self.paranoia) {
            return Err(field(
                "paranoia level",
                self.paranoia.to_string(),
                "must be 1-4",
            ));
        }
        if self.inbound_threshold == 0 || self.inbound_threshold > 10_000 {
            return Err(field(
                "inbound anomaly threshold",
                self.inbound_threshold.to_string(),
                "must be 1-10000",
            ));
        }
        if self.outbound_threshold == 0 || self.outbound_threshold > 10_000 {
            return Err(field(
                "outbound anomaly threshold",
                self.outbound_threshold.to_string(),
                "must be 1-10000",
            ));
        }
        if self.body_limit > MAX_WAF_BODY_LIMIT {
            return Err(field(
                "inspected body size",
                self.body_limit.to_string(),
                "must be at most 16 MiB",
            ));
        }
        if self.budget_ms == 0 || self.budget_ms > MAX_WAF_BUDGET_MS {
            return Err(field(
                "evaluation budget (ms)",
                self.budget_ms.to_string(),
                "must be 1-10000",
            ));
        }
        if self.exclusions.len() > MAX_WAF_EXCLUSIONS {
            return Err(field(
                "rule exclusions",
                self.exclusions.len().to_string(),
                "at most 256",
            ));
        }
        for e in &self.exclusions {
            // CRS and ModSecurity ids are 1..9,999,999 in practice; 0 is not a rule.
            if e.id == 0 || e.id > 99_999_999 {
                return Err(field(
                    "excluded rule id",
                    e.id.to_string(),
                    "must be 1-99999999",
                ));
            }
            if let Some(p) = &e.path_prefix {
                validate_path_prefix(p)?;
            }
        }
        Ok(())
    }
}

/// Path prefixes become part of a SecLang rule on every node: only plain path characters, so
/// no policy can inject rule syntax.
fn validate_path_prefix(p: &str) -> Result<(), ValidationError> {
    let ok = p.starts_with('/')
        && p.len() <= MAX_PATH_PREFIX
        && p.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~' | b'%')
        });
    if ok {
        Ok(())
    } else {
        Err(field(
            "exclusion path prefix",
            p,
            "must start with '/' and hold only letters, digits and / - _ . ~ % (at most 256)",
        ))
    }
}

/// The replicated WAF policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WafState {
    /// Applies to apps without a policy of their own; `None` means [`WafPolicy::default`].
    pub default: Option<WafPolicy>,
    pub apps: BTreeMap<String, WafPolicy>,
}

impl WafState {
    /// The policy that applies to `app`.
    pub fn effective(&self, app: &str) -> WafPolicy {
        self.apps
            .get(app)
            .or(self.default.as_ref())
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_outside_bounds_are_refused() {
        assert!(WafPolicy::default().validate().is_ok());
        let with = |f: &dyn Fn(&mut WafPolicy)| {
            let mut p = WafPolicy::default();
            f(&mut p);
            p.validate()
        };
        assert!(with(&|p| p.paranoia = 0).is_err());
        assert!(with(&|p| p.paranoia = 5).is_err());
        assert!(with(&|p| p.paranoia = 4).is_ok());
        assert!(with(&|p| p.inbound_threshold = 0).is_err());
        assert!(with(&|p| p.body_limit = MAX_WAF_BODY_LIMIT + 1).is_err());
        assert!(with(&|p| p.budget_ms = 0).is_err());
        let excl = |prefix: &str| {
            with(&|p| {
                p.exclusions = vec![RuleExclusion {
                    id: 942100,
                    path_prefix: Some(prefix.to_string()),
                }]
            })
        };
        assert!(excl("/api/v1").is_ok());
        // Anything that could close the quoted SecLang operand, or start a new directive.
        for bad in [
            "api",
            "/a\"b",
            "/a b",
            "/a\nSecRuleEngine Off",
            "/a,b",
            "/a'b",
            "/a\\",
        ] {
            assert!(excl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_app_without_a_policy_gets_the_default() {
        let mut s = WafState::default();
        assert_eq!(s.effective("web").mode, WafMode::Off);
        s.default = Some(WafPolicy {
            mode: WafMode::Detect,
            ..WafPolicy::default()
        });
        assert_eq!(s.effective("web").mode, WafMode::Detect);
        s.apps.insert(
            "web".into(),
            WafPolicy {
                mode: WafMode::Block,
                ..WafPolicy::default()
            },
        );
        assert_eq!(s.effective("web").mode, WafMode::Block);
        assert_eq!(s.effective("other").mode, WafMode::Detect);
    }
}
