//! The `tidepool` binary: CLI, config loading, logging, runtime. Nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tidepool",
    version,
    about = "PostgreSQL proxy and transaction-mode connection pooler"
)]
struct Cli {
    /// Path to proxy.toml.
    #[arg(long, short, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, global = true, default_value = "human")]
    log_format: LogFormat,
    /// Worker threads. Default 1: one event loop, PgBouncer's model and the
    /// least CPU per transaction. More (e.g. the number of cores) gives a
    /// multi-threaded runtime, for when one core is not enough.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and exit.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match tidepool::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tidepool: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("{}: OK", cli.config.display());
        return ExitCode::SUCCESS;
    }
    init_logging(cli.log_format);
    // One thread: a single-threaded runtime (no work stealing, no waking of
    // idle workers), like PgBouncer's event loop. More: a multi-threaded one.
    let mut rt = match cli.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    rt.enable_all();
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidepool: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let proxy = match tidepool::Proxy::bind_with_path(config, Some(cli.config.clone())).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(tidepool::lifecycle::reload_on_sighup(proxy.shared()));
        proxy.run(tidepool::lifecycle::signal(), None).await;
        ExitCode::SUCCESS
    })
}
