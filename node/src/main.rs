//! `portcullis`: parse the command line, run the command, map failures to exit codes.

use clap::Parser;
use portcullis_node::cli::launcher;
use portcullis_node::cli::{self, Cli, Cmd};
use portcullis_node::config::NodeConfig;
use portcullis_node::{server, EXIT_CONFIG};
use tokio_util::sync::CancellationToken;

// glibc's allocator showed up at ~12 % of the proxy's samples (docs/benchmarks.md); mimalloc's
// thread-local free lists suit the many small, short-lived allocations of request handling.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs go through a background writer thread: a per-request access line must never block a
/// runtime worker on a slow or full stderr pipe. Under overload lines are dropped (and counted
/// by tracing-appender) rather than stalling requests. Keep the guard alive until exit so
/// buffered lines are flushed.
fn init_tracing() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn")
    });
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    // Colours only on a terminal: logs in files and journald stay plain text (through the
    // non-blocking writer the subscriber cannot tell by itself).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer)
        .init();
    guard
}

#[tokio::main]
async fn main() {
    let log_guard = init_tracing();
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // process::exit skips destructors: flush the log writer first.
    drop(log_guard);
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Cmd::CheckConfig { file } => match NodeConfig::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(0)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(EXIT_CONFIG)
            }
        },
        Cmd::Node { config } => {
            let cfg = match NodeConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(EXIT_CONFIG);
                }
            };
            let listeners = server::Listeners::bind(&cfg).await?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            server::run(cfg, listeners, shutdown).await?;
            Ok(0)
        }
        Cmd::Up(args) => launcher::up(args).await.map(|_| 0),
        Cmd::Down { state_dir } => launcher::down(&state_dir).await.map(|_| 0),
        Cmd::Cluster(c) => cli::cluster::run(&cli.global, c).await.map(|_| 0),
        Cmd::App(c) => cli::app::run(&cli.global, c).await.map(|_| 0),
        Cmd::Cert(c) => cli::cert::run(&cli.global, c).await.map(|_| 0),
        Cmd::Domain(c) => cli::domain::run(&cli.global, c).await.map(|_| 0),
        Cmd::Secrets(c) => cli::secrets::run(&cli.global, c).await.map(|_| 0),
        Cmd::Cvm(c) => cli::cvm::run(&cli.global, c).await.map(|_| 0),
        Cmd::Waf(c) => cli::waf::run(&cli.global, c).await.map(|_| 0),
        Cmd::DemoApp(args) => portcullis_node::cli::demo::run(args).await.map(|_| 0),
        Cmd::CvmAgent(args) => {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            portcullis_node::tunnel::agent::run(args, shutdown)
                .await
                .map(|_| 0)
        }
    }
}

/// SIGTERM drains under the grace period; SIGINT (or a second signal) exits at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("sigterm: draining");
                shutdown.cancel();
            }
            _ = int.recv() => {
                tracing::info!("sigint: exiting");
                std::process::exit(130);
            }
        }
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        std::process::exit(130);
    });
}
