//! `portcullis app …`: create, list, show and delete apps.

use portcullis_proto::admin::{self as pb, AppName, CreateAppRequest, Empty};
use serde::Serialize;

use super::args::{AppCmd, Global};
use super::output::{instance_out, print_json, print_list, rpc, InstanceOut};

#[derive(Serialize)]
pub(super) struct AppOut {
    name: String,
    ports: Vec<u32>,
    lb: String,
    revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    instances: Option<Vec<InstanceOut>>,
}

pub(super) fn app_out(a: pb::App, with_instances: bool) -> AppOut {
    AppOut {
        name: a.name,
        ports: a.ports,
        lb: a.lb,
        revision: a.revision,
        instances: with_instances.then(|| a.instances.into_iter().map(instance_out).collect()),
    }
}

pub async fn run(g: &Global, cmd: AppCmd) -> anyhow::Result<()> {
    let mut c = g.target().connect().await?;
    match cmd {
        AppCmd::Create { name, ports, lb } => {
            let a = rpc(c.create_app(CreateAppRequest { name, ports, lb }).await)?;
            if g.json {
                return print_json(&app_out(a, false));
            }
            println!(
                "created app {} (ports {:?}, lb {}, revision {})",
                a.name, a.ports, a.lb, a.revision
            );
        }
        AppCmd::List => {
            let r = rpc(c.list_apps(Empty {}).await)?;
            let apps: Vec<AppOut> = r.apps.into_iter().map(|a| app_out(a, false)).collect();
            print_list(g, &apps, |a| {
                println!("{:<24} ports {:?}  lb {}", a.name, a.ports, a.lb)
            })?;
        }
        AppCmd::Show { name } => {
            let a = app_out(rpc(c.get_app(AppName { name }).await)?, true);
            if g.json {
                return print_json(&a);
            }
            println!(
                "{}: ports {:?}, lb {}, revision {}",
                a.name, a.ports, a.lb, a.revision
            );
            let instances = a.instances.unwrap_or_default();
            let ip_width = instances
                .iter()
                .map(|i| i.tunnel_ip.len())
                .fold(15, usize::max);
            for i in instances {
                println!(
                    "  {:<20} {:<10} {:<ip_width$} {}",
                    i.instance_id, i.region, i.tunnel_ip, i.backend_addr
                );
            }
        }
        AppCmd::Delete { name } => {
            let r = rpc(c.delete_app(AppName { name: name.clone() }).await)?;
            if g.json {
                return print_json(
                    &serde_json::json!({ "deleted": name, "log_index": r.log_index }),
                );
            }
            println!("deleted app {name}");
        }
    }
    Ok(())
}
