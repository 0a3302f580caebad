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
    /// Worker threads. Default 0: one per core the process may use (a
    /// multi-threaded runtime sharing one pool). 1: a single event loop,
    /// PgBouncer's model and the least CPU per transaction when the
    /// database, not the pooler, is the bottleneck.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// Take over the listening sockets of the tidepool running on
    /// `upgrade_socket` (an upgrade): it stops accepting and its clients
    /// finish there.
    #[arg(long)]
    takeover: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and exit; with --probe, also check that a
    /// tidepool running with it answers (a container's health check).
    Check {
        /// Connect to the first `listen` address and, when `[metrics]
        /// listen` is set, GET /healthz; exit 1 if either fails.
        #[arg(long)]
        probe: bool,
    },
    /// Print where each statement would be routed (its class under the
    /// config's `[routing]` rules); with --bench, also what classifying it
    /// costs: parsed, from the shared text cache, from a client's memo.
    Classify {
        /// Measure the cost of classification (the defaults: pgbench's
        /// statements and a few typical ones, when no statement is given).
        #[arg(long)]
        bench: bool,
        /// Milliseconds per measured batch (seven batches per figure).
        #[arg(long, default_value_t = 40)]
        batch_ms: u64,
        /// SQL statements.
        statements: Vec<String>,
    },
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

/// `check --probe`: the first listen address accepts a connection and
/// `/healthz` (when the metrics endpoint is on) answers 200, each within
/// two seconds. A wildcard address is probed on loopback.
fn probe_running(config: &tidepool::Config) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
    const WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
    let resolve = |addr: &str| -> Result<SocketAddr, String> {
        let mut a = addr
            .to_socket_addrs()
            .map_err(|e| format!("{addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr}: no address"))?;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        Ok(a)
    };
    let listen = config.tidepool.listen.first().ok_or("no listen address")?;
    let a = resolve(listen)?;
    TcpStream::connect_timeout(&a, WITHIN).map_err(|e| format!("{a}: {e}"))?;
    if let Some(m) = &config.metrics.listen {
        let a = resolve(m)?;
        let mut s = TcpStream::connect_timeout(&a, WITHIN).map_err(|e| format!("{a}: {e}"))?;
        s.set_read_timeout(Some(WITHIN))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("{a}: {e}"))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .map_err(|e| format!("{a}: {e}"))?;
        if !answer.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "{a}/healthz answered {:?}",
                answer.lines().next().unwrap_or("")
            ));
        }
    }
    Ok(())
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
    match cli.command {
        Some(Command::Check { probe }) => {
            for w in tidepool::pool::health_warnings(&config) {
                eprintln!("warning: {w}");
            }
            println!("{}: OK", cli.config.display());
            if probe {
                if let Err(e) = probe_running(&config) {
                    eprintln!("tidepool: probe failed: {e}");
                    return ExitCode::FAILURE;
                }
                println!("tidepool answers");
            }
            return ExitCode::SUCCESS;
        }
        Some(Command::Classify {
            bench,
            batch_ms,
            statements,
        }) => {
            classify_command(&config, bench, batch_ms, statements);
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    init_logging(cli.log_format);
    // One thread: a single-threaded runtime (no work stealing, no waking of
    // idle workers), like PgBouncer's event loop. More: a multi-threaded one;
    // 0 (the default) means one worker per core this process may run on.
    let threads = match cli.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut rt = match threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    rt.enable_all();
    // After clients park, every thread gives its allocator cache back when
    // it next goes idle (see tidepool::memory), and its spare trackers
    // with it.
    rt.on_thread_park(|| tidepool::memory::flush_if_asked(tidepool::client::txn::spare::clear));
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidepool: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The proxy runs as a task, on a worker, not in block_on on this
    // thread: the main thread then never allocates for clients (its
    // allocator cache would not be flushed: it has no park hook).
    let main = async move {
        tracing::info!(threads, "runtime");
        let proxy = match tidepool::Proxy::bind_with(config, Some(cli.config.clone()), cli.takeover)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        // A shutdown ends the process within shutdown_timeout (plus a short
        // grace), whatever a task is doing.
        let limit = proxy.shared().settings().config.tidepool.shutdown_timeout;
        proxy.shared().watchdog.enforce_shutdown(limit);
        tokio::spawn(tidepool::lifecycle::reload_on_sighup(proxy.shared()));
        tokio::spawn(tidepool::lifecycle::pause_on_sigusr(proxy.shared()));
        proxy.run(tidepool::lifecycle::signal(), None).await;
        ExitCode::SUCCESS
    };
    let code = rt.block_on(async move {
        tokio::spawn(main).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the proxy's task failed");
            ExitCode::FAILURE
        })
    });
    // Tasks still running (clients closed at the deadline, blocking work)
    // are dropped, not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}

/// `tidepool classify`: one tab-separated line per statement.
fn classify_command(
    config: &tidepool::Config,
    bench: bool,
    batch_ms: u64,
    statements: Vec<String>,
) {
    use tidepool::router::{classify, measure};
    let rules = classify::Rules::from_config(&config.routing);
    let statements = if statements.is_empty() && bench {
        measure::DEFAULT_STATEMENTS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        statements
    };
    if !bench {
        for sql in &statements {
            // Without a database at hand, the functions a read calls are
            // listed: it stays a read if none of them is VOLATILE.
            let v = classify::classify(sql, &rules);
            if v.calls.is_empty() {
                println!("{:?}\t{sql}", v.class);
            } else {
                println!("{:?} if read-only: {}\t{sql}", v.class, v.calls.join(", "));
            }
        }
        return;
    }
    println!("class\tparsed_ns\ttext_cache_ns\ttemplate_memo_ns\tstatement");
    let batch = std::time::Duration::from_millis(batch_ms.max(1));
    for sql in &statements {
        let c = measure::measure(sql, &rules, batch);
        println!(
            "{:?}\t{:.0}\t{:.0}\t{:.0}\t{}",
            c.class, c.parsed_ns, c.text_cache_ns, c.template_memo_ns, c.statement
        );
    }
}
