//! One namespace for routable names.
//!
//! Under a base domain the first label of a host is looked up among app names, instance ids,
//! and the reserved forms `<name>-<port>[s|g]`. If two of those could spell the same label, the
//! lookup order would decide who serves it, and a tenant that registers an instance id equal to
//! another app's name (or to one of its port routes) would take over that app's hostname. So
//! the state refuses, at `apply`:
//!
//! - an instance id that is an app's name, is one of an app's `<app>-<port>[s|g]` routes, is
//!   `<instance>-<port>` of an existing instance, carries the `s`/`g` suffix of a reserved
//!   form, or differs from an existing id only by case;
//! - an app whose name is an instance id, whose `<name>-<port>` routes are instance ids, or
//!   inside whose name space (`<name>-…`) another app's instances already live;
//! - for registrations made with a CVM credential (tenant-chosen ids), an id that is not
//!   prefixed with its own app's name and a `-` (`<app>-<anything>`), or whose longest app
//!   prefix is another app (`web-admin-1` of app `web` while app `web-admin` exists).
//!
//! The prefix rule is what makes instance ids unable to look like another tenant's app: a
//! tenant holding a credential for `evil` can only ever name `evil-…`. dstack's
//! `<instance-id>.<base>` keeps working; the instance id is simply `<app>-<id>`.
//!
//! These rules are new with [`super::Command::RegisterInstanceV3`] and
//! [`super::Command::CreateAppV2`]. The older variants keep their old meaning when replayed,
//! because `apply` must give every node the same state from the same log. Whatever collisions
//! older states already hold are listed by [`ClusterState::name_collisions`].
//!
//! Proposers: the admin API sends `CreateAppV2` and operator `RegisterInstanceV3`s
//! (`allow_rekey`, no prefix rule, no cap); the CVM registry sends tenant `RegisterInstanceV3`s
//! (prefix rule, no re-key, `wg.max_instances_per_app`). Both check against their applied state
//! first ([`ClusterState::check_registration`], [`ClusterState::check_new_app_name`]) so a refusal
//! names the clash before anything is written. The data plane looks app routes up before
//! instance ids (`node/src/edge/route.rs`), and `node/src/collisions.rs` reports what
//! [`ClusterState::name_collisions`] finds (log, metric, `cluster status`). Cluster tests:
//! t86 (a tenant's attempts), t87 (pinned ports).

use serde::{Deserialize, Serialize};

use super::model::{ClusterState, Instance};

/// How a registration is held to the namespace, chosen by the proposer and carried in the
/// entry so that every node applies the same rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegistrationPolicy {
    /// The id must be `<app>-<something>` (registrations with a CVM credential).
    pub require_app_prefix: bool,
    /// An existing instance may be re-registered with a different WireGuard key (operators
    /// only: a tenant re-registering a sibling id with a new key would take it over).
    pub allow_rekey: bool,
    /// Most instances the app may hold; 0 is no limit. A renewal is never refused by it.
    pub max_instances_per_app: u32,
}

/// A registration as proposed by this build: the instance and the rules it is held to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Registration {
    pub instance: Instance,
    pub policy: RegistrationPolicy,
}

/// Splits a label of the reserved form `<name>-<digits>[s|g|sg|gs]` into name, port digits as a
/// number (not range-checked) and whether a suffix is present. Mirrors
/// `node/src/edge/grammar.rs` `parse_label`, which must stay pure `std` for its fuzz crate and
/// so cannot call this; a property test in `node/src/edge/route.rs` holds the two in step.
pub fn port_form(label: &str) -> Option<(&str, u32, bool)> {
    let (name, tail) = label.rsplit_once('-')?;
    let digits_end = tail.bytes().take_while(u8::is_ascii_digit).count();
    let (digits, suffix) = tail.split_at(digits_end);
    if name.is_empty() || digits.is_empty() || !matches!(suffix, "" | "s" | "g" | "sg" | "gs") {
        return None;
    }
    // Longer than any port: still reserved (the grammar answers "invalid port"), never a name.
    let port = digits.parse::<u32>().unwrap_or(u32::MAX);
    Some((name, port, !suffix.is_empty()))
}

/// A name clash found in an existing state (written before these rules, or by an older
/// build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    pub instance_id: String,
    pub app: String,
    pub why: String,
}

impl ClusterState {
    /// Why instance id `id` may not be registered for `app` under `policy`, if it may not.
    /// Only for ids not yet registered: renewals keep the id they hold.
    pub fn check_new_instance_id(
        &self,
        id: &str,
        app: &str,
        policy: &RegistrationPolicy,
    ) -> Result<(), String> {
        if let Some(twin) = self
            .instances
            .keys()
            .find(|k| k.eq_ignore_ascii_case(id) && k.as_str() != id)
        {
            return Err(format!(
                "instance id {id:?} differs only by case from existing instance {twin:?}; host names are case-insensitive"
            ));
        }
        self.check_id_against_routes(id)?;
        if policy.require_app_prefix {
            self.check_app_prefix(id, app)?;
        }
        Ok(())
    }

    /// The route clashes of `id` on its own (no case twins, no prefix rule).
    fn check_id_against_routes(&self, id: &str) -> Result<(), String> {
        if self.apps.contains_key(id) {
            return Err(format!(
                "instance id {id:?} is the name of app {id:?}: it would take over https://{id}.<base>/"
            ));
        }
        if let Some((name, port, suffix)) = port_form(id) {
            if suffix {
                return Err(format!(
                    "instance id {id:?} ends in '-<port>s' or '-<port>g', a reserved routing form"
                ));
            }
            if let Some(a) = self.apps.get(name) {
                if u16::try_from(port).is_ok_and(|p| a.ports.contains(&p)) {
                    return Err(format!(
                        "instance id {id:?} is app {name:?}'s route to its port {port}"
                    ));
                }
            }
            if self.instances.contains_key(name) {
                return Err(format!(
                    "instance id {id:?} is instance {name:?}'s route to port {port}"
                ));
            }
        }
        // `<id>-<port>` of this id must not already be another instance's whole id.
        if let Some(other) = self
            .instances_named_under(id)
            .find(|o| port_form(o).is_some_and(|(name, _, _)| name == id))
        {
            return Err(format!(
                "instance id {id:?} would make instance {other:?} read as its port route"
            ));
        }
        Ok(())
    }

    fn check_app_prefix(&self, id: &str, app: &str) -> Result<(), String> {
        let rest = id
            .strip_prefix(app)
            .and_then(|r| r.strip_prefix('-'))
            .unwrap_or_default();
        if rest.is_empty() {
            return Err(format!(
                "instance id {id:?} must start with its app's name: {app}-<id> (ids chosen with a CVM credential are prefixed so they cannot name another app)"
            ));
        }
        // The longest app prefix owns the name: `web-admin-1` belongs to app `web-admin`.
        for (i, _) in rest.match_indices('-') {
            let longer = &id[..app.len() + 1 + i];
            if self.apps.contains_key(longer) {
                return Err(format!(
                    "instance id {id:?} is inside app {longer:?}'s names ({longer}-…), not {app:?}'s"
                ));
            }
        }
        Ok(())
    }

    /// Why an app named `name` with `ports` may not be created over the instances already
    /// registered, if it may not.
    pub fn check_new_app_name(&self, name: &str, ports: &[u16]) -> Result<(), String> {
        if let Some(i) = self
            .instances
            .values()
            .find(|i| i.instance_id.eq_ignore_ascii_case(name))
        {
            return Err(format!(
                "app name {name:?} is taken by instance {:?} of app {:?}; remove it first (portcullis cvm remove {})",
                i.instance_id, i.app, i.instance_id
            ));
        }
        for id in self.instances_named_under(name) {
            let Some(i) = self.instances.get(id) else {
                continue;
            };
            let route = port_form(id).filter(|(n, _, _)| *n == name);
            let takes_route =
                route.is_some_and(|(_, p, _)| u16::try_from(p).is_ok_and(|p| ports.contains(&p)));
            if takes_route || i.app != name {
                return Err(format!(
                    "instance {id:?} of app {:?} is already named inside {name}-…; remove it first (portcullis cvm remove {id})",
                    i.app
                ));
            }
        }
        Ok(())
    }

    /// Instance ids that start with `<prefix>-`, in order (a range over the sorted map).
    fn instances_named_under<'a>(&'a self, prefix: &str) -> impl Iterator<Item = &'a str> + 'a {
        let start = format!("{prefix}-");
        self.instances
            .range(start.clone()..)
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(&start))
    }

    /// Every clash the current state holds between instance ids and app routes, in id order.
    pub fn name_collisions(&self) -> Vec<Collision> {
        let mut out = Vec::new();
        for i in self.instances.values() {
            let id = i.instance_id.as_str();
            let lower = id.to_ascii_lowercase();
            let clash = |why: String| Collision {
                instance_id: id.to_string(),
                app: i.app.clone(),
                why,
            };
            if self.apps.contains_key(&lower) {
                out.push(clash(format!("equals app {lower:?}; the app is served")));
            } else if let Some((name, port, _)) = port_form(&lower) {
                let declared = self
                    .apps
                    .get(name)
                    .is_some_and(|a| u16::try_from(port).is_ok_and(|p| a.ports.contains(&p)));
                if declared {
                    out.push(clash(format!(
                        "is app {name:?}'s route to port {port}; the app is served"
                    )));
                }
            }
        }
        let mut seen: std::collections::BTreeMap<String, &str> = Default::default();
        for (id, i) in &self.instances {
            if let Some(first) = seen.insert(id.to_ascii_lowercase(), id) {
                out.push(Collision {
                    instance_id: id.clone(),
                    app: i.app.clone(),
                    why: format!("differs only by case from instance {first:?}"),
                });
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests;
