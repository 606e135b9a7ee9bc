//! `portcullis cvm …`: credentials, instances, weights and the tunnel address pool.

use std::path::Path;

use anyhow::Context;
use portcullis_proto::admin::{
    self as pb, Empty, InstanceId, ListInstancesRequest, RegisterInstanceRequest,
};

use super::args::{CvmCmd, Global, PoolCmd};
use super::output::{instance_out, print_json, print_list, rpc, InstanceOut};

pub async fn run(g: &Global, cmd: CvmCmd) -> anyhow::Result<()> {
    if let CvmCmd::Credential { pki, app, out } = &cmd {
        issue_credential(pki, app, out)?;
        println!(
            "issued a CVM credential for app {app} in {} (cert.pem, key.pem, ca.pem)",
            out.display()
        );
        return Ok(());
    }
    let mut c = g.target().connect().await?;
    match cmd {
        // Handled above, before connecting: it needs no cluster.
        CvmCmd::Credential { .. } => {}
        CvmCmd::Register {
            instance_id,
            app,
            region,
            backend,
            wg_public_key,
        } => {
            let req = RegisterInstanceRequest {
                instance_id,
                app,
                region,
                wg_public_key,
                backend_addr: backend.unwrap_or_default(),
            };
            let i = instance_out(rpc(c.register_instance(req).await)?);
            if g.json {
                return print_json(&i);
            }
            println!(
                "registered {} (app {}, region {}, tunnel ip {})",
                i.instance_id, i.app, i.region, i.tunnel_ip
            );
        }
        CvmCmd::List { app } => {
            let r = rpc(c
                .list_instances(ListInstancesRequest {
                    app: app.unwrap_or_default(),
                })
                .await)?;
            let list: Vec<InstanceOut> = r.instances.into_iter().map(instance_out).collect();
            // IPv6 tunnel addresses are up to 39 characters; IPv4 lists keep their width.
            let ip_width = list.iter().map(|i| i.tunnel_ip.len()).fold(15, usize::max);
            print_list(g, &list, |i| {
                println!(
                    "{:<24} {:<16} {:<10} {:<ip_width$} {}",
                    i.instance_id, i.app, i.region, i.tunnel_ip, i.backend_addr
                )
            })?;
        }
        CvmCmd::Show { instance_id } => {
            let i = instance_out(rpc(c.get_instance(InstanceId { instance_id }).await)?);
            if g.json {
                return print_json(&i);
            }
            println!(
                "{}: app {}, region {}, tunnel ip {}, backend {}",
                i.instance_id, i.app, i.region, i.tunnel_ip, i.backend_addr
            );
        }
        CvmCmd::Remove { instance_id } => {
            let r = rpc(c
                .remove_instance(InstanceId {
                    instance_id: instance_id.clone(),
                })
                .await)?;
            if g.json {
                return print_json(
                    &serde_json::json!({ "removed": instance_id, "log_index": r.log_index }),
                );
            }
            println!("removed {instance_id}");
        }
        CvmCmd::Weight {
            instance_id,
            weight,
        } => {
            let r = rpc(c
                .set_instance_weight(pb::InstanceWeightRequest {
                    instance_id: instance_id.clone(),
                    weight,
                })
                .await)?;
            if g.json {
                return print_json(&serde_json::json!({
                    "instance_id": instance_id, "weight": weight, "log_index": r.log_index
                }));
            }
            println!("{instance_id}: weight {weight}");
        }
        CvmCmd::Pool { action } => {
            let r = match action {
                None => rpc(c.get_tunnel_pool(Empty {}).await)?,
                Some(PoolCmd::Set { cidr }) => {
                    rpc(c.set_tunnel_pool(pb::SetTunnelPoolRequest { cidr }).await)?
                }
            };
            if g.json {
                return print_json(&serde_json::json!({
                    "cidr": r.cidr, "allocated": r.allocated, "capacity": r.capacity,
                    "log_index": r.log_index
                }));
            }
            println!(
                "tunnel pool {}: {} allocated, capacity {}",
                r.cidr, r.allocated, r.capacity
            );
        }
    }
    Ok(())
}

/// `portcullis cvm credential`: issues a CVM credential for `app` from the CA in `pki` and
/// writes `ca.pem`, `cert.pem` and `key.pem` (0600) to `out`: everything a CVM needs besides
/// its agent configuration.
pub fn issue_credential(pki: &Path, app: &str, out: &Path) -> anyhow::Result<()> {
    portcullis_raft::state::validate_app_name(app).context("--app")?;
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem"))
        .with_context(|| format!("read {}/ca.pem", pki.display()))?;
    let ca_key = std::fs::read_to_string(pki.join("ca.key"))
        .with_context(|| format!("read {}/ca.key", pki.display()))?;
    let issued = portcullis_raft::tls::issue_cvm_cert(&ca_pem, &ca_key, app)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    std::fs::write(out.join("ca.pem"), &ca_pem).context("write ca.pem")?;
    std::fs::write(out.join("cert.pem"), &issued.cert_pem).context("write cert.pem")?;
    crate::pki::write_private(&out.join("key.pem"), issued.key_pem.as_bytes())?;
    Ok(())
}
