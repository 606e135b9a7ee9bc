//! `portcullis secrets …`: the cluster data key — generate one, see what is sealed, rewrap.

use anyhow::bail;
use portcullis_proto::admin::Empty;

use super::args::{Global, SecretsCmd};
use super::output::{print_json, rpc};

pub async fn run(g: &Global, cmd: SecretsCmd) -> anyhow::Result<()> {
    if let SecretsCmd::GenKey { out } = &cmd {
        let key = zeroize::Zeroizing::new(crate::secrets::generate_key()?);
        match out {
            Some(path) => {
                if path.exists() {
                    bail!(
                        "{} exists; refusing to overwrite a data key",
                        path.display()
                    );
                }
                crate::pki::write_private(path, format!("{}\n", key.as_str()).as_bytes())?;
                eprintln!("wrote a new data key to {}", path.display());
            }
            None => println!("{}", key.as_str()),
        }
        return Ok(());
    }
    let mut c = g.target().connect().await?;
    match cmd {
        SecretsCmd::GenKey { .. } => {}
        SecretsCmd::Status => {
            let r = rpc(c.key_status(Empty {}).await)?;
            if g.json {
                let keys: Vec<_> = r
                    .keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "kind": k.kind,
                            "name": k.name,
                            "key_encryption": k.key_encryption,
                            "protection": k.protection,
                        })
                    })
                    .collect();
                return print_json(&serde_json::json!({
                    "current_key_id": r.current_key_id,
                    "previous_key_ids": r.previous_key_ids,
                    "keys": keys,
                }));
            }
            println!(
                "current data key {} (previous: {})",
                r.current_key_id,
                if r.previous_key_ids.is_empty() {
                    "none".to_string()
                } else {
                    r.previous_key_ids.join(", ")
                }
            );
            for k in &r.keys {
                println!(
                    "{:<13} {:<40} {:<32} {}",
                    k.kind, k.name, k.key_encryption, k.protection
                );
            }
        }
        SecretsCmd::Rewrap => {
            let r = rpc(c.rewrap_keys(Empty {}).await)?;
            if g.json {
                return print_json(&serde_json::json!({
                    "rewrapped": r.rewrapped,
                    "already_current": r.already_current,
                    "changed_meanwhile": r.changed_meanwhile,
                    "log_index": r.log_index,
                }));
            }
            println!(
                "re-sealed {} key(s); {} already current; {} changed meanwhile (run again to check)",
                r.rewrapped, r.already_current, r.changed_meanwhile
            );
        }
    }
    Ok(())
}
