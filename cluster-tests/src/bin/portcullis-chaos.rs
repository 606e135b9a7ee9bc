//! `portcullis-chaos`: fault-injection runs against a real cluster in network namespaces.
//!
//! ```text
//! sudo target/debug/portcullis-chaos run cluster-tests/scenarios/kill.toml --seed 42
//! sudo target/debug/portcullis-chaos cleanup
//! ```
//! See docs/chaos.md.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis_cluster_tests::chaos::run::{self, RunOptions};
use portcullis_cluster_tests::chaos::scenario::Scenario;
use portcullis_cluster_tests::chaos::topology;

#[derive(Parser)]
#[command(about = "Chaos runs against a real Portcullis cluster in network namespaces")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file.
    Run {
        scenario: PathBuf,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// The portcullis binary under test.
        #[arg(long, default_value = "target/debug/portcullis")]
        portcullis: PathBuf,
        /// Where to write the JSON report (default: chaos-<name>-<seed>.json).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Keep the run directory (node logs) even when the run passes.
        #[arg(long)]
        keep: bool,
    },
    /// Validate scenario files without running anything.
    Check { scenarios: Vec<PathBuf> },
    /// Remove namespaces, links and processes left by an interrupted run.
    Cleanup,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.cmd {
        Cmd::Check { scenarios } => {
            let mut ok = true;
            for p in scenarios {
                match Scenario::load(&p) {
                    Ok(s) => println!(
                        "{}: ok ({}, {} faults)",
                        p.display(),
                        s.name,
                        s.faults.len()
                    ),
                    Err(e) => {
                        eprintln!("error: {e}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Cmd::Cleanup => {
            if !topology::is_root() {
                eprintln!(
                    "error: portcullis-chaos cleanup needs root (namespaces); run it with sudo"
                );
                return ExitCode::from(2);
            }
            let removed = topology::cleanup_all();
            if removed.is_empty() {
                println!("nothing to clean up");
            }
            for r in removed {
                println!("removed {r}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Run {
            scenario,
            seed,
            portcullis,
            report,
            keep,
        } => {
            // Validate before anything starts, so a typo costs nothing.
            let sc = match Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let seed_used = seed.unwrap_or(sc.seed);
            let opts = RunOptions {
                scenario_path: scenario,
                seed,
                bin: portcullis,
                report,
                keep,
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                // Dropping the run future on a signal drops the cluster and topology guards,
                // which kill the nodes and delete the namespaces.
                let mut term = match tokio::signal::unix::signal(
                    tokio::signal::unix::SignalKind::terminate(),
                ) {
                    Ok(s) => s,
                    Err(e) => return Err(anyhow::anyhow!("install SIGTERM handler: {e}")),
                };
                tokio::select! {
                    r = run::run(&opts) => r,
                    _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C); cleaned up")),
                    _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM); cleaned up")),
                }
            });
            // Belt and braces: nothing of ours may outlive the run, even after a panic in a
            // guard or an error half-way through setup.
            if topology::is_root() {
                topology::cleanup_all();
            }
            match result {
                Ok(r) => {
                    print!("{}", run::summary(&r));
                    let path = opts.report.clone().unwrap_or_else(|| {
                        PathBuf::from(format!("chaos-{}-{}.json", r.scenario, r.seed))
                    });
                    match run::write_report(&r, &path) {
                        Ok(()) => println!("report: {}", path.display()),
                        Err(e) => eprintln!("error: {e:#}"),
                    }
                    if r.passed {
                        ExitCode::SUCCESS
                    } else {
                        println!("node logs: {}", r.run_dir);
                        println!("reproduce: {}", run::reproduce_command(&opts, r.seed));
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    if !e.to_string().contains("needs root") {
                        eprintln!("reproduce: {}", run::reproduce_command(&opts, seed_used));
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}
