use proptest::prelude::*;

use super::super::tests::command;
use super::super::{App, ClusterState, Command, Instance, Response};
use super::*;

/// Ids that hit every rule: app names, their port routes (with and without suffix), case
/// twins, prefixed and unprefixed ids.
pub(crate) fn instance_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("web".to_string()),
        Just("web-1".to_string()),
        Just("web-2s".to_string()),
        Just("WEB-x".to_string()),
        Just("web-x".to_string()),
        Just("web-x-1".to_string()),
        Just("api-1".to_string()),
        Just("api".to_string()),
        "(web|api|db)-[a-z0-9]{1,2}",
        "[a-z0-9]{1,3}",
    ]
}

fn state() -> ClusterState {
    let mut s = ClusterState::default();
    for (name, ports) in [("bank", vec![8080, 443]), ("evil", vec![80])] {
        let c = Command::CreateAppV2 {
            name: name.into(),
            ports,
            lb: "round-robin".into(),
        };
        assert!(matches!(s.apply(1, &c), Response::App(_)));
    }
    s
}

fn reg(id: &str, app: &str, key: &str, policy: RegistrationPolicy) -> Command {
    Command::RegisterInstanceV3(Registration {
        instance: Instance {
            instance_id: id.into(),
            app: app.into(),
            region: "us-east".into(),
            wg_public_key: key.into(),
            ..Default::default()
        },
        policy,
    })
}

const TENANT: RegistrationPolicy = RegistrationPolicy {
    require_app_prefix: true,
    allow_rekey: false,
    max_instances_per_app: 3,
};

fn refused(s: &mut ClusterState, cmd: &Command) -> String {
    let before = s.clone();
    let why = match cmd.validate() {
        Err(e) => e.to_string(),
        Ok(()) => match s.apply(7, cmd) {
            Response::Rejected(why) => why,
            other => panic!("{cmd:?} was accepted: {other:?}"),
        },
    };
    assert_eq!(*s, before, "a refused command changed the state");
    why
}

#[test]
fn a_tenant_cannot_take_another_apps_names() {
    let mut s = state();
    for (id, says) in [
        ("bank", "the name of app \"bank\""),
        ("bank-8080", "app \"bank\"'s route to its port 8080"),
        ("bank-x", "must start with its app's name"),
        ("bank-443s", "reserved routing form"),
        ("BANK", "lowercase DNS label"),
        ("evil", "the name of app \"evil\""),
        ("evil-80", "app \"evil\"'s route to its port 80"),
        ("evil-7s", "reserved routing form"),
        ("evilx-1", "must start with its app's name"),
    ] {
        let why = refused(&mut s, &reg(id, "evil", "k1", TENANT));
        assert!(why.contains(says), "{id}: {why}");
    }
    // The operator's path has no prefix rule, but the route clashes hold for it too.
    let op = RegistrationPolicy {
        allow_rekey: true,
        ..Default::default()
    };
    for id in ["bank", "bank-8080", "bank-443s"] {
        refused(&mut s, &reg(id, "evil", "", op));
    }
}

#[test]
fn siblings_keys_case_twins_and_caps() {
    let mut s = state();
    let ok = |s: &mut ClusterState, c: &Command| {
        assert!(
            matches!(s.apply(8, c), Response::InstanceV2(_)),
            "{c:?} refused"
        )
    };
    ok(&mut s, &reg("bank-1", "bank", "kb1", TENANT));
    // Another app's instance, and a sibling with a new key.
    let why = refused(&mut s, &reg("bank-1", "evil", "ke1", TENANT));
    assert!(why.contains("belongs to app \"bank\""), "{why}");
    let why = refused(&mut s, &reg("bank-1", "bank", "kb2", TENANT));
    assert!(why.contains("another WireGuard key"), "{why}");
    // A renewal with the same key is fine, and the operator may re-key.
    ok(&mut s, &reg("bank-1", "bank", "kb1", TENANT));
    let op = RegistrationPolicy {
        allow_rekey: true,
        ..Default::default()
    };
    ok(&mut s, &reg("bank-1", "bank", "kb3", op));
    // `bank-1-8080` would read as bank-1's port route.
    let why = refused(&mut s, &reg("bank-1-8080", "bank", "kb4", TENANT));
    assert!(why.contains("instance \"bank-1\"'s route"), "{why}");
    // A case twin left by an older build.
    s.instances.insert(
        "evil-Twin".into(),
        Instance {
            instance_id: "evil-Twin".into(),
            app: "evil".into(),
            ..Default::default()
        },
    );
    let why = refused(&mut s, &reg("evil-twin", "evil", "ke2", TENANT));
    assert!(why.contains("only by case"), "{why}");
    // The cap counts what the app holds; renewals are never refused by it.
    ok(&mut s, &reg("evil-a", "evil", "ke3", TENANT));
    ok(&mut s, &reg("evil-b", "evil", "ke4", TENANT));
    let why = refused(&mut s, &reg("evil-c", "evil", "ke5", TENANT));
    assert!(
        why.contains("its limit (wg.max_instances_per_app = 3)"),
        "{why}"
    );
    ok(&mut s, &reg("evil-a", "evil", "ke3", TENANT));
}

#[test]
fn the_longest_app_prefix_owns_a_name() {
    let mut s = state();
    let c = Command::CreateAppV2 {
        name: "bank-admin".into(),
        ports: vec![9000],
        lb: "round-robin".into(),
    };
    assert!(matches!(s.apply(2, &c), Response::App(_)));
    let why = refused(&mut s, &reg("bank-admin-1", "bank", "k", TENANT));
    assert!(why.contains("inside app \"bank-admin\"'s names"), "{why}");
    assert!(matches!(
        s.apply(3, &reg("bank-admin-1", "bank-admin", "k", TENANT)),
        Response::InstanceV2(_)
    ));
}

#[test]
fn an_app_cannot_be_created_over_instances() {
    let mut s = state();
    let op = RegistrationPolicy::default();
    assert!(matches!(
        s.apply(2, &reg("shop", "bank", "", op)),
        Response::InstanceV2(_)
    ));
    assert!(matches!(
        s.apply(3, &reg("bank-z", "bank", "", op)),
        Response::InstanceV2(_)
    ));
    let create = |name: &str| Command::CreateAppV2 {
        name: name.into(),
        ports: vec![8080],
        lb: "round-robin".into(),
    };
    let why = refused(&mut s, &create("shop"));
    assert!(
        why.contains("taken by instance \"shop\" of app \"bank\""),
        "{why}"
    );
    // An id named inside the new app's space (`bank-z-…` would read as app bank-z's).
    assert!(matches!(
        s.apply(4, &reg("shop2-q", "bank", "", op)),
        Response::InstanceV2(_)
    ));
    let why = refused(&mut s, &create("shop2"));
    assert!(why.contains("already named inside shop2-"), "{why}");
    let why = refused(&mut s, &create("bank-z"));
    assert!(why.contains("taken by instance \"bank-z\""), "{why}");
}

#[test]
fn old_shapes_keep_their_old_meaning_and_collisions_are_listed() {
    // A log written by an older build: the instance `bank` came first, then app `bank`.
    let mut s = ClusterState::default();
    let old_app = |name: &str| Command::CreateApp {
        name: name.into(),
        ports: vec![8080],
        lb: "round-robin".into(),
    };
    assert!(matches!(s.apply(1, &old_app("evil")), Response::App(_)));
    let old_reg = |id: &str| {
        Command::RegisterInstanceV2(Instance {
            instance_id: id.into(),
            app: "evil".into(),
            region: "us-east".into(),
            ..Default::default()
        })
    };
    for id in ["bank", "bank-8080", "Evil-x", "evil-x"] {
        assert!(matches!(s.apply(2, &old_reg(id)), Response::InstanceV2(_)));
    }
    assert!(matches!(s.apply(3, &old_app("bank")), Response::App(_)));
    let found: Vec<(String, String)> = s
        .name_collisions()
        .into_iter()
        .map(|c| (c.instance_id, c.why))
        .collect();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].0 == "bank" && found[0].1.contains("equals app"));
    assert!(found[1].0 == "bank-8080" && found[1].1.contains("port 8080"));
    assert!(found[2].1.contains("only by case"), "{found:?}");
    assert_eq!(
        ClusterState {
            apps: [("a".to_string(), App::default())].into(),
            ..Default::default()
        }
        .name_collisions(),
        vec![]
    );
}

#[test]
fn port_form_reads_the_reserved_shapes() {
    assert_eq!(port_form("web-8080"), Some(("web", 8080, false)));
    assert_eq!(port_form("web-8080s"), Some(("web", 8080, true)));
    assert_eq!(port_form("a-b-1g"), Some(("a-b", 1, true)));
    assert_eq!(port_form("web-99999999999"), Some(("web", u32::MAX, false)));
    assert_eq!(port_form("web"), None);
    assert_eq!(port_form("web-x1"), None);
    assert_eq!(port_form("-1"), None);
}

fn has_old_shape(c: &Command) -> bool {
    match c {
        Command::CreateApp { .. }
        | Command::RegisterInstance(_)
        | Command::RegisterInstanceV2(_) => true,
        Command::Batch(v) => v.iter().any(has_old_shape),
        _ => false,
    }
}

proptest! {
    /// Whatever this build's commands do, in any order, no instance id ever clashes with an
    /// app route or another id: the state never needs the "app wins" rule.
    #[test]
    fn new_shapes_never_collide(cmds in proptest::collection::vec(command(), 0..80)) {
        let mut s = ClusterState::default();
        for (i, c) in cmds.iter().enumerate() {
            if !has_old_shape(c) {
                s.apply(i as u64 + 1, c);
            }
        }
        prop_assert_eq!(s.name_collisions(), vec![]);
    }
}
