#![no_main]
//! A CVM's registration message (protobuf, from a tenant's CVM) and the checks the registry
//! makes before proposing it: the WireGuard key parses, the `Instance` is built, and
//! `Command::RegisterInstanceV3` validates. What passes is applied to a state that already
//! holds another tenant's app and instance: it must not panic, must refuse without changing
//! anything, and an accepted registration must stay inside its own app's names, hold a key no
//! other instance holds, and renew to the same tunnel address.
use libfuzzer_sys::fuzz_target;
use portcullis_proto::cluster::RegisterCvmRequest;
use portcullis_raft::state::{Instance, Registration, RegistrationPolicy};
use portcullis_raft::{ClusterState, Command, Response};
use portcullis_wg::PublicKey;
use prost::Message;

const TENANT_POLICY: RegistrationPolicy = RegistrationPolicy {
    require_app_prefix: true,
    allow_rekey: false,
    max_instances_per_app: 4,
};

fn state_bytes(s: &ClusterState) -> Vec<u8> {
    bincode::serialize(s).expect("state encodes")
}

/// Another tenant: app `web` with instance `web-1`.
fn neighbour() -> (ClusterState, String) {
    let mut s = ClusterState::default();
    let app = Command::CreateAppV2 {
        name: "web".into(),
        ports: vec![443],
        lb: "round-robin".into(),
    };
    assert!(matches!(s.apply(1, &app), Response::App(_)));
    let key = PublicKey::from_bytes([7; 32]).to_base64();
    let reg = Command::RegisterInstanceV3(Registration {
        instance: Instance {
            instance_id: "web-1".into(),
            app: "web".into(),
            region: "eu".into(),
            wg_public_key: key.clone(),
            registered_at: 1,
            ..Default::default()
        },
        policy: TENANT_POLICY,
    });
    assert!(matches!(s.apply(2, &reg), Response::InstanceV2(_)));
    (s, key)
}

fuzz_target!(|data: &[u8]| {
    let Ok(r) = RegisterCvmRequest::decode(data) else {
        return;
    };
    // As `cvm_registry::Registry::register` does, after the credential check (which names
    // `r.app`).
    let Ok(key) = r.wg_public_key.parse::<PublicKey>() else {
        return;
    };
    let canonical = key.to_base64();
    assert_eq!(canonical.parse::<PublicKey>().ok(), Some(key));
    let inst = Instance {
        instance_id: r.instance_id.clone(),
        app: r.app.clone(),
        region: r.region.clone(),
        wg_public_key: canonical.clone(),
        tunnel_ip: None,
        backend_addr: None,
        registered_at: 100,
    };
    let cmd = Command::RegisterInstanceV3(Registration {
        instance: inst.clone(),
        policy: TENANT_POLICY,
    });
    let valid = cmd.validate().is_ok();
    if valid {
        // The stricter shape accepts nothing the older one refused.
        assert!(Command::RegisterInstanceV2(inst.clone()).validate().is_ok());
    }

    let (mut state, taken_key) = neighbour();
    let _ = state.apply(
        3,
        &Command::CreateAppV2 {
            name: r.app.clone(),
            ports: vec![443, 8080],
            lb: "round-robin".into(),
        },
    );
    let before = state_bytes(&state);
    match state.apply(4, &cmd) {
        Response::InstanceV2(got) => {
            assert!(valid);
            assert_eq!(
                (&got.instance_id, &got.app, &got.wg_public_key),
                (&r.instance_id, &r.app, &canonical)
            );
            assert!(r.instance_id.starts_with(&format!("{}-", r.app)));
            if got.instance_id == "web-1" {
                // Only the neighbour itself renews its instance, with its key.
                assert_eq!((r.app.as_str(), &canonical), ("web", &taken_key));
            } else {
                assert_ne!(canonical, taken_key, "the neighbour's key");
            }
            assert!(got.tunnel_ip.is_some());
            assert_eq!(state.instances.get(&got.instance_id), Some(&got));
            let holders = state
                .instances
                .values()
                .filter(|i| i.wg_public_key == canonical)
                .count();
            assert_eq!(holders, 1, "keys are unique");
            // The agent renews every 30 s: same id, same key, same address.
            let renewed = Command::RegisterInstanceV3(Registration {
                instance: Instance {
                    registered_at: 130,
                    ..inst
                },
                policy: TENANT_POLICY,
            });
            match state.apply(5, &renewed) {
                Response::InstanceV2(again) => assert_eq!(again.tunnel_ip, got.tunnel_ip),
                other => panic!("renewal refused: {other:?}"),
            }
        }
        Response::Rejected(_) => {
            assert_eq!(
                state_bytes(&state),
                before,
                "a refused registration changes nothing"
            )
        }
        other => panic!("unexpected answer {other:?}"),
    }
});
