//! The Terraform modules (issue 2), applied for real with the `terraform` binary: the
//! local-cluster module starts a 3-node cluster on apply and stops it on destroy; the cluster
//! module renders every node's configuration (accepted by `portcullis check-config`) and
//! cloud-init user data that carries the node's credentials but never the CA key. Every module,
//! including the cloud example that cannot be applied here, must pass `terraform fmt -check`.
//!
//! Terraform is not packaged in Debian; without it the test says so and passes vacuously.

use std::path::{Path, PathBuf};
use std::process::Command;

use portcullis_cluster_tests::harness::{
    alive, phase, portcullis_bin, read_cluster_json, run, show, DownOnDrop, Status,
};

fn terraform_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../terraform")
}

/// `terraform <args>` in `dir`, non-interactive, with no user CLI configuration.
fn terraform(dir: &Path, args: &[&str]) -> std::process::Output {
    let start = std::time::Instant::now();
    let out = run(Command::new("terraform")
        .current_dir(dir)
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_INPUT", "0")
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .env("CHECKPOINT_DISABLE", "1")
        .args(args));
    eprintln!("terraform {}: {:?}", args.join(" "), start.elapsed());
    out
}

fn ok(out: std::process::Output, what: &str) -> std::process::Output {
    assert!(out.status.success(), "{what}: {}", show(&out));
    out
}

/// A working directory two levels below the repository (in `target/`), so modules are local
/// paths (`../../terraform/...`): Terraform copies an absolute-path source like a download,
/// and the modules' own relative references would then break.
fn work_dir() -> tempfile::TempDir {
    let parent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&parent).expect("target dir");
    tempfile::Builder::new()
        .prefix("tf-work-")
        .tempdir_in(parent)
        .expect("tempdir")
}

/// A root configuration in `work` calling `module` with `body` as its arguments.
fn root_config(work: &Path, module: &str, body: &str, outputs: &[&str]) {
    let mut text =
        format!("module \"m\" {{\n  source = \"../../terraform/modules/{module}\"\n{body}\n}}\n");
    for o in outputs {
        text.push_str(&format!(
            "output \"{o}\" {{\n  value     = module.m.{o}\n  sensitive = true\n}}\n"
        ));
    }
    std::fs::write(work.join("main.tf"), text).expect("write main.tf");
}

fn output_json(work: &Path) -> serde_json::Value {
    let out = ok(terraform(work, &["output", "-json", "-no-color"]), "output");
    serde_json::from_slice(&out.stdout).expect("terraform output -json")
}

#[test]
fn terraform_modules_apply_for_real() {
    if run(Command::new("sh").args(["-c", "command -v terraform"]))
        .status
        .code()
        != Some(0)
    {
        eprintln!(
            "SKIPPED terraform_modules_apply_for_real: no `terraform` binary on PATH \
             (not packaged in Debian; install Terraform >= 1.5 or OpenTofu as `terraform`)"
        );
        return;
    }

    phase("terraform fmt -check over every module and example");
    ok(
        terraform(
            &terraform_dir(),
            &["fmt", "-check", "-recursive", "-no-color"],
        ),
        "terraform fmt -check",
    );

    phase("local-cluster: apply starts a 3-node cluster");
    let work = work_dir();
    let state = tempfile::Builder::new()
        .prefix("portcullis-tf-")
        .tempdir()
        .expect("tempdir");
    let state_dir = state.path().join("cluster");
    // If an assertion fails before `destroy`, the nodes must not outlive the test.
    let _down = DownOnDrop(state_dir.clone());
    root_config(
        work.path(),
        "local-cluster",
        &format!(
            "  portcullis_bin = \"{}\"\n  state_dir      = \"{}\"\n  nodes          = 3",
            portcullis_bin().display(),
            state_dir.display()
        ),
        &["cluster_dir"],
    );
    ok(terraform(work.path(), &["init", "-no-color"]), "init");
    ok(
        terraform(work.path(), &["apply", "-auto-approve", "-no-color"]),
        "apply",
    );
    let outputs = output_json(work.path());
    assert_eq!(
        outputs["cluster_dir"]["value"].as_str(),
        Some(state_dir.to_str().expect("utf8")),
        "{outputs}"
    );
    let info = read_cluster_json(&state_dir);
    assert_eq!(info.nodes.len(), 3);
    let status = run(Command::new(portcullis_bin())
        .arg("--cluster")
        .arg(&state_dir)
        .args(["cluster", "status", "--json"]));
    assert!(status.status.success(), "{}", show(&status));
    let status: Status = serde_json::from_slice(&status.stdout).expect("status json");
    assert!(status.leader_id.is_some(), "{status:?}");
    assert_eq!(
        status.members.iter().filter(|m| m.voter).count(),
        3,
        "{status:?}"
    );

    phase("local-cluster: destroy stops every process");
    ok(
        terraform(work.path(), &["destroy", "-auto-approve", "-no-color"]),
        "destroy",
    );
    for n in &info.nodes {
        assert!(!alive(n.pid), "node {} (pid {}) still runs", n.id, n.pid);
    }

    phase("cluster: configs pass check-config; user data carries credentials, never the CA key");
    let pki = state.path().join("pki");
    let out = run(Command::new(portcullis_bin())
        .args(["cluster", "init", "--pki"])
        .arg(&pki)
        .args(["--node-id", "1,2,3"]));
    assert!(out.status.success(), "{}", show(&out));
    let work = work_dir();
    root_config(
        work.path(),
        "cluster",
        &format!(
            "  pki_dir      = \"{}\"\n  base_domains = [\"gw.example.com\"]\n  nodes = [\n    \
             {{ id = 1, region = \"eu-west\", advertise_ip = \"10.0.1.10\" }},\n    \
             {{ id = 2, region = \"us-east\", advertise_ip = \"10.0.2.10\" }},\n    \
             {{ id = 3, region = \"ap-south\", advertise_ip = \"10.0.3.10\" }},\n  ]\n  \
             acme = {{ contact = [\"mailto:ops@example.com\"] }}",
            pki.display()
        ),
        &["config_toml", "user_data", "members"],
    );
    ok(terraform(work.path(), &["init", "-no-color"]), "init");
    ok(
        terraform(work.path(), &["apply", "-auto-approve", "-no-color"]),
        "apply",
    );
    let outputs = output_json(work.path());
    assert_eq!(
        outputs["members"]["value"].as_str(),
        Some(
            "--member 1=10.0.1.10:8000@eu-west --member 2=10.0.2.10:8000@us-east \
             --member 3=10.0.3.10:8000@ap-south"
        ),
        "{outputs}"
    );
    let ca_key = std::fs::read_to_string(pki.join("ca.key")).expect("ca.key");
    let ca_key_body = ca_key.lines().nth(1).expect("a key line");
    for id in ["1", "2", "3"] {
        let config = outputs["config_toml"]["value"][id]
            .as_str()
            .expect("config_toml");
        let file = work.path().join(format!("node-{id}.toml"));
        std::fs::write(&file, config).expect("write config");
        let check = run(Command::new(portcullis_bin())
            .arg("check-config")
            .arg(&file));
        assert!(
            check.status.success(),
            "node {id} config rejected:\n{config}\n{}",
            show(&check)
        );
        assert!(config.contains(&format!("node_id = {id}\n")), "{config}");
        assert!(config.contains("advertise = \"10.0."), "{config}");

        let user_data = outputs["user_data"]["value"][id]
            .as_str()
            .expect("user_data");
        assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
        let key = std::fs::read_to_string(pki.join(format!("node-{id}/key.pem"))).expect("key");
        let key_line = key.lines().nth(1).expect("a key line");
        assert!(user_data.contains(key_line), "node {id} key missing");
        let data_key = std::fs::read_to_string(pki.join("data.key")).expect("data.key");
        assert!(
            user_data.contains(data_key.trim()) && config.contains("data_key_file = "),
            "node {id} lacks the cluster data key"
        );
        assert!(
            !user_data.contains(ca_key_body),
            "node {id} user data ships the CA key"
        );
        assert_eq!(
            user_data.contains("portcullis-bootstrap.service"),
            id == "1",
            "exactly the lowest id bootstraps"
        );
    }
}
