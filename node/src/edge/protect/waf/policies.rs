//! The policies the routing snapshot carries: each app's effective WAF policy, looked up per
//! request without touching the replicated state.

use std::collections::HashMap;
use std::sync::Arc;

use portcullis_raft::state::{WafMode, WafPolicy, WafState};

#[derive(Debug, Default, Clone)]
pub struct Policies {
    /// For apps without a policy of their own.
    default: Arc<WafPolicy>,
    apps: HashMap<String, Arc<WafPolicy>>,
    /// Some app's effective mode is not off: requests need a lookup.
    any_on: bool,
}

impl Policies {
    pub fn from_state(s: &WafState) -> Policies {
        let mut p = Policies {
            default: Arc::new(s.default.clone().unwrap_or_default()),
            apps: s
                .apps
                .iter()
                .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
                .collect(),
            any_on: false,
        };
        p.any_on = p.compute_any_on();
        p
    }

    /// These policies with `apps` read again from `s` (the apps a change touched).
    pub fn update<'a>(&self, s: &WafState, apps: impl IntoIterator<Item = &'a String>) -> Policies {
        let mut p = self.clone();
        for app in apps {
            match s.apps.get(app) {
                Some(pol) => p.apps.insert(app.clone(), Arc::new(pol.clone())),
                None => p.apps.remove(app),
            };
        }
        p.any_on = p.compute_any_on();
        p
    }

    fn compute_any_on(&self) -> bool {
        self.default.mode != WafMode::Off || self.apps.values().any(|p| p.mode != WafMode::Off)
    }

    /// The policy of `app`, or `None` when its WAF is off.
    pub fn active(&self, app: &str) -> Option<&Arc<WafPolicy>> {
        if !self.any_on {
            return None;
        }
        let p = self.apps.get(app).unwrap_or(&self.default);
        (p.mode != WafMode::Off).then_some(p)
    }

    /// Every policy in use, for compiling rule sets ahead of requests.
    pub fn in_use(&self) -> impl Iterator<Item = &WafPolicy> {
        std::iter::once(&*self.default).chain(self.apps.values().map(|p| &**p))
    }
}
