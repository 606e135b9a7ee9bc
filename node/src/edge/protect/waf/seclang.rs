//! The SecLang text one policy compiles from: engine settings, the CRS setup, the policy's
//! settings, the operator's extra files, the CRS rules, and the policy's exclusions.
//!
//! Pure: paths and policy in, text out. Policies are validated before they enter the log
//! (`WafPolicy::validate`), which keeps path prefixes to plain path characters, so nothing in a
//! policy can add a directive here.

use std::path::{Path, PathBuf};

use portcullis_raft::state::{OverLimit, WafMode, WafPolicy};

/// Where the rules come from on this node (`[waf]` in the node's config).
#[derive(Debug, Clone)]
pub struct RuleFiles {
    /// `crs-setup.conf`, or the CRS release's `crs-setup.conf.example`.
    pub setup: PathBuf,
    /// The CRS `rules/` directory (`*.conf`, in name order, as CRS's docs include them).
    pub rules: PathBuf,
    /// Operator files included after the policy's settings and before the rules.
    pub extra: Vec<PathBuf>,
    /// Scratch space for multipart uploads (`SecTmpDir`, `SecDataDir`).
    pub tmp: PathBuf,
}

impl RuleFiles {
    /// Finds the setup file and rules under a CRS release directory.
    pub fn from_crs_dir(
        crs: &Path,
        extra: Vec<PathBuf>,
        tmp: PathBuf,
    ) -> Result<RuleFiles, String> {
        let setup = ["crs-setup.conf", "crs-setup.conf.example"]
            .iter()
            .map(|n| crs.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "{}: no crs-setup.conf or crs-setup.conf.example (waf.crs_dir must be a CRS release directory)",
                    crs.display()
                )
            })?;
        let rules = crs.join("rules");
        if !rules.is_dir() {
            return Err(format!("{}: not a directory", rules.display()));
        }
        Ok(RuleFiles {
            setup,
            rules,
            extra,
            tmp,
        })
    }

    /// The rule files in load order; read anew on every load, so a reload sees added files.
    pub fn rule_paths(&self) -> Result<Vec<PathBuf>, String> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.rules)
            .map_err(|e| format!("{}: {e}", self.rules.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(format!("{}: no *.conf rule files", self.rules.display()));
        }
        Ok(v)
    }
}

/// First id of the rules a policy's path exclusions become (the local range, 1–99,999).
pub const EXCLUSION_ID_BASE: u32 = 99_000;

/// The SecLang of `policy` over `files` (with `rules` from [`RuleFiles::rule_paths`]).
pub fn render(policy: &WafPolicy, files: &RuleFiles, rules: &[PathBuf]) -> String {
    let mut s = String::with_capacity(4096);
    let line = |s: &mut String, l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    // Detect mode runs the same rules without disruptive actions; the gateway never asks the
    // engine for a 403 it would not send.
    line(
        &mut s,
        match policy.mode {
            WafMode::Block => "SecRuleEngine On",
            WafMode::Detect | WafMode::Off => "SecRuleEngine DetectionOnly",
        },
    );
    // ModSecurity's recommended base configuration (modsecurity.conf-recommended): body
    // processors by content type, strict body parsing, PCRE limits.
    for l in BASE {
        line(&mut s, l);
    }
    // The gateway hands the engine at most `body_limit` bytes and enforces `over_limit` itself
    // (413 or the prefix), so the engine processes what it gets.
    let limit = policy.body_limit.max(1);
    line(&mut s, &format!("SecRequestBodyLimit {limit}"));
    line(&mut s, &format!("SecRequestBodyNoFilesLimit {limit}"));
    line(&mut s, "SecRequestBodyLimitAction ProcessPartial");
    line(
        &mut s,
        if policy.response_inspection {
            "SecResponseBodyAccess On"
        } else {
            "SecResponseBodyAccess Off"
        },
    );
    line(&mut s, &format!("SecTmpDir {}", quoted_path(&files.tmp)));
    line(&mut s, &format!("SecDataDir {}", quoted_path(&files.tmp)));
    line(&mut s, &format!("Include {}", quoted_path(&files.setup)));
    line(
        &mut s,
        &format!(
            "SecAction \"id:900000,phase:1,pass,t:none,nolog,setvar:tx.blocking_paranoia_level={}\"",
            policy.paranoia
        ),
    );
    line(
        &mut s,
        &format!(
            "SecAction \"id:900110,phase:1,pass,t:none,nolog,setvar:tx.inbound_anomaly_score_threshold={},setvar:tx.outbound_anomaly_score_threshold={}\"",
            policy.inbound_threshold, policy.outbound_threshold
        ),
    );
    for f in &files.extra {
        line(&mut s, &format!("Include {}", quoted_path(f)));
    }
    // Path-scoped exclusions run before the rules they switch off (as CRS's REQUEST-900 file
    // does); whole-rule exclusions remove the rule once it is defined.
    let mut next_id = EXCLUSION_ID_BASE;
    for e in &policy.exclusions {
        if let Some(prefix) = &e.path_prefix {
            line(
                &mut s,
                &format!(
                    "SecRule REQUEST_FILENAME \"@beginsWith {prefix}\" \"id:{next_id},phase:1,pass,t:none,nolog,ctl:ruleRemoveById={}\"",
                    e.id
                ),
            );
            next_id += 1;
        }
    }
    for r in rules {
        line(&mut s, &format!("Include {}", quoted_path(r)));
    }
    for e in policy.exclusions.iter().filter(|e| e.path_prefix.is_none()) {
        line(&mut s, &format!("SecRuleRemoveById {}", e.id));
    }
    s
}

/// A path as a SecLang operand. Paths come from the node's own config, not from tenants; quotes
/// keep spaces working.
fn quoted_path(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// Whether a body over the inspected size is refused.
pub fn refuses_over_limit(p: &WafPolicy) -> bool {
    p.over_limit == OverLimit::Refuse
}

const BASE: &[&str] = &[
    "SecRequestBodyAccess On",
    r#"SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\+|/)|text/)xml" "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML""#,
    r#"SecRule REQUEST_HEADERS:Content-Type "^application/json" "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON""#,
    "SecRequestBodyJsonDepthLimit 512",
    "SecArgumentsLimit 1000",
    r#"SecRule &ARGS "@ge 1000" "id:200007,phase:2,t:none,log,deny,status:400,msg:'Failed to fully parse request body due to large argument count',severity:2""#,
    r#"SecRule REQBODY_ERROR "!@eq 0" "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.',logdata:'%{reqbody_error_msg}',severity:2""#,
    r#"SecRule MULTIPART_STRICT_ERROR "!@eq 0" "id:200003,phase:2,t:none,log,deny,status:400,msg:'Multipart request body failed strict validation'""#,
    r#"SecRule MULTIPART_UNMATCHED_BOUNDARY "@eq 1" "id:200004,phase:2,t:none,log,deny,msg:'Multipart parser detected a possible unmatched boundary.'""#,
    "SecPcreMatchLimit 100000",
    "SecPcreMatchLimitRecursion 100000",
    r#"SecRule TX:/^MSC_/ "!@streq 0" "id:200005,phase:2,t:none,deny,msg:'ModSecurity internal error flagged: %{MATCHED_VAR_NAME}'""#,
    "SecResponseBodyMimeType text/plain text/html text/xml",
    "SecResponseBodyLimit 524288",
    "SecResponseBodyLimitAction ProcessPartial",
    "SecAuditEngine Off",
    "SecArgumentSeparator &",
    "SecCookieFormat 0",
    "SecStatusEngine Off",
];

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_raft::state::RuleExclusion;

    #[test]
    fn a_policy_becomes_settings_rules_and_exclusions_in_order() {
        let files = RuleFiles {
            setup: "/crs/crs-setup.conf.example".into(),
            rules: "/crs/rules".into(),
            extra: vec!["/etc/waf/local.conf".into()],
            tmp: "/var/tmp/waf".into(),
        };
        let p = WafPolicy {
            mode: WafMode::Block,
            paranoia: 2,
            inbound_threshold: 7,
            exclusions: vec![
                RuleExclusion {
                    id: 942100,
                    path_prefix: None,
                },
                RuleExclusion {
                    id: 941100,
                    path_prefix: Some("/api".into()),
                },
            ],
            ..WafPolicy::default()
        };
        let rules = vec![PathBuf::from("/crs/rules/REQUEST-901-INITIALIZATION.conf")];
        let s = render(&p, &files, &rules);
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in\n{s}"));
        assert!(s.starts_with("SecRuleEngine On\n"));
        assert!(
            at("setvar:tx.blocking_paranoia_level=2")
                > at("Include \"/crs/crs-setup.conf.example\"")
        );
        assert!(at("tx.inbound_anomaly_score_threshold=7") < at("Include \"/etc/waf/local.conf\""));
        let path_rule = at("@beginsWith /api\" \"id:99000,");
        assert!(path_rule < at("REQUEST-901"));
        assert!(at("SecRuleRemoveById 942100") > at("REQUEST-901"));
        let detect = render(
            &WafPolicy {
                mode: WafMode::Detect,
                ..WafPolicy::default()
            },
            &files,
            &rules,
        );
        assert!(detect.starts_with("SecRuleEngine DetectionOnly\n"));
        assert!(!detect.contains("SecRuleRemoveById"));
    }
}
