//! Load generator for `scripts/bench`: opens many PostgreSQL client connections
//! (through a pooler or directly) and either holds them idle or runs a short
//! query in a loop on each, measuring every query's latency.
//!
//! ```text
//! loadgen idle --port P --clients 10000 [--hold 120] [--no-warm]
//! loadgen run  --port P --clients 10000 --duration 10 [--query "select 1"]
//! common: --host 127.0.0.1 --user bench --dbname bench [--password PW]
//!         --concurrency 100 (connection attempts in flight) --threads N
//!         --watch-pid PID (run: report that process's CPU ticks, utime+stime
//!         of all its threads, and the machine's busy ticks over the timed part)
//! ```
//!
//! Output is one JSON object per line on stdout:
//! - idle: `{"event":"ready",...}` once every connection attempt has finished
//!   (the caller samples memory then), `{"event":"done",...}` when the hold time
//!   is over or on SIGTERM/SIGINT.
//! - run: one `{"event":"result",...}` with connection errors, query errors,
//!   throughput and latency percentiles (microseconds).
//!
//! Connections are opened at most `--concurrency` at a time so that the
//! listener's accept backlog is never flooded. Every load stops by itself.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tokio_postgres::{Client, Config, NoTls};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Idle,
    Run,
}

struct Opts {
    mode: Mode,
    host: String,
    port: u16,
    user: String,
    dbname: String,
    password: Option<String>,
    clients: usize,
    concurrency: usize,
    duration: f64,
    hold: f64,
    query: String,
    warm: bool,
    threads: Option<usize>,
    watch_pid: Option<u32>,
}

const USAGE: &str = "usage: loadgen idle|run --port P [--host H] [--user U] [--dbname D] \
[--password PW] --clients N [--concurrency C] [--duration SECS] [--hold SECS] \
[--query SQL] [--no-warm] [--threads N] [--watch-pid PID]";

fn parse_args() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mode = match args.next().as_deref() {
        Some("idle") => Mode::Idle,
        Some("run") => Mode::Run,
        _ => return Err(USAGE.into()),
    };
    let mut o = Opts {
        mode,
        host: "127.0.0.1".into(),
        port: 0,
        user: "bench".into(),
        dbname: "bench".into(),
        password: None,
        clients: 100,
        concurrency: 100,
        duration: 10.0,
        hold: 120.0,
        query: "select 1".into(),
        warm: true,
        threads: None,
        watch_pid: None,
    };
    while let Some(flag) = args.next() {
        if flag == "--no-warm" {
            o.warm = false;
            continue;
        }
        let val = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--host" => o.host = val,
            "--port" => o.port = num(&val)? as u16,
            "--user" => o.user = val,
            "--dbname" => o.dbname = val,
            "--password" => o.password = Some(val),
            "--clients" => o.clients = num(&val)? as usize,
            "--concurrency" => o.concurrency = (num(&val)? as usize).max(1),
            "--duration" => o.duration = num(&val)?,
            "--hold" => o.hold = num(&val)?,
            "--query" => o.query = val,
            "--threads" => o.threads = Some((num(&val)? as usize).max(1)),
            "--watch-pid" => o.watch_pid = Some(num(&val)? as u32),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if o.port == 0 {
        return Err(format!("--port is required\n{USAGE}"));
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = opts.threads {
        rt.worker_threads(n);
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = Arc::new(opts);
    match opts.mode {
        Mode::Idle => rt.block_on(idle(opts)),
        Mode::Run => rt.block_on(run(opts)),
    }
    // Dropping the runtime would wait for nothing useful; closing 10k sockets
    // is done by the kernel at exit.
    std::process::exit(0);
}

fn config(o: &Opts) -> Config {
    let mut c = Config::new();
    c.host(&o.host)
        .port(o.port)
        .user(&o.user)
        .dbname(&o.dbname)
        .connect_timeout(Duration::from_secs(60));
    if let Some(pw) = &o.password {
        c.password(pw);
    }
    c
}

async fn connect(cfg: &Config) -> Result<Client, String> {
    let (client, conn) = cfg.connect(NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Remembers how many times each distinct error message occurred (a few kinds).
#[derive(Default)]
struct Errors {
    count: u64,
    kinds: Vec<(String, u64)>,
}

impl Errors {
    fn add(&mut self, msg: String) {
        self.count += 1;
        if let Some(k) = self.kinds.iter_mut().find(|(m, _)| *m == msg) {
            k.1 += 1;
        } else if self.kinds.len() < 5 {
            self.kinds.push((msg, 1));
        }
    }
    fn merge(&mut self, other: Errors) {
        self.count += other.count;
        for (m, n) in other.kinds {
            if let Some(k) = self.kinds.iter_mut().find(|(x, _)| *x == m) {
                k.1 += n;
            } else if self.kinds.len() < 5 {
                self.kinds.push((m, n));
            }
        }
    }
    fn json(&self) -> String {
        let mut s = String::from("[");
        for (i, (m, n)) in self.kinds.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{{\"message\":{},\"count\":{n}}}", json_str(m));
        }
        s.push(']');
        s
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Opens `--clients` connections (at most `--concurrency` in flight), runs one
/// query on each unless `--no-warm`, reports, then holds them open.
async fn idle(o: Arc<Opts>) {
    let cfg = Arc::new(config(&o));
    let sem = Arc::new(Semaphore::new(o.concurrency));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        let (cfg, sem, o) = (cfg.clone(), sem.clone(), o.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
            let client = connect(&cfg).await?;
            if o.warm {
                client
                    .simple_query(&o.query)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<Client, String>(client)
        }));
    }
    let mut clients = Vec::with_capacity(o.clients);
    let mut errors = Errors::default();
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => clients.push(c),
            Ok(Err(e)) => errors.add(e),
            Err(e) => errors.add(format!("task: {e}")),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"event\":\"ready\",\"clients\":{},\"connected\":{},\"errors\":{},\"error_kinds\":{},\"connect_secs\":{secs:.3}}}",
        o.clients,
        clients.len(),
        errors.count,
        errors.json()
    );
    let held = Instant::now();
    wait_for_stop(Duration::from_secs_f64(o.hold)).await;
    let closed = clients.iter().filter(|c| c.is_closed()).count();
    println!(
        "{{\"event\":\"done\",\"held_secs\":{:.3},\"closed_while_held\":{closed}}}",
        held.elapsed().as_secs_f64()
    );
}

async fn wait_for_stop(limit: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tokio::time::sleep(limit).await;
        return;
    };
    tokio::select! {
        _ = tokio::time::sleep(limit) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// utime + stime (clock ticks) of a whole process, from /proc/PID/stat.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Busy clock ticks of the whole machine (all CPUs), from /proc/stat.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Some(
        f.iter()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, v)| v)
            .sum(),
    )
}

struct ClientResult {
    connected: bool,
    latencies_us: Vec<u32>,
    done_in_time: u64,
    errors: Errors,
}

/// Connects every client, then starts them together: each runs `--query` in a
/// loop (simple protocol) until the deadline, timing each query.
async fn run(o: Arc<Opts>) {
    let cfg = Arc::new(config(&o));
    let sem = Arc::new(Semaphore::new(o.concurrency));
    let settled = Arc::new(AtomicUsize::new(0));
    let (start_tx, start_rx) = watch::channel::<Option<(Instant, Instant)>>(None);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        let (cfg, sem, o, settled) = (cfg.clone(), sem.clone(), o.clone(), settled.clone());
        let mut start_rx = start_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult {
                connected: false,
                latencies_us: Vec::new(),
                done_in_time: 0,
                errors: Errors::default(),
            };
            let permit = sem.acquire_owned().await;
            let client = connect(&cfg).await;
            drop(permit);
            settled.fetch_add(1, Ordering::SeqCst);
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    r.errors.add(format!("connect: {e}"));
                    return r;
                }
            };
            r.connected = true;
            let Ok(start) = start_rx.wait_for(|s| s.is_some()).await.map(|s| *s) else {
                return r;
            };
            let Some((_, deadline)) = start else { return r };
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.simple_query(&o.query).await {
                    Ok(_) => {
                        let now = Instant::now();
                        r.latencies_us
                            .push(now.duration_since(t).as_micros().min(u32::MAX as u128) as u32);
                        if now <= deadline {
                            r.done_in_time += 1;
                        }
                    }
                    Err(e) => {
                        r.errors.add(format!("query: {e}"));
                        if client.is_closed() {
                            break;
                        }
                    }
                }
            }
            r
        }));
    }
    while settled.load(Ordering::SeqCst) < o.clients {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let cpu0 = o.watch_pid.and_then(proc_cpu_ticks);
    let busy0 = machine_busy_ticks();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.duration);
    let _ = start_tx.send(Some((start, deadline)));
    tokio::time::sleep_until(deadline.into()).await;
    let cpu1 = o.watch_pid.and_then(proc_cpu_ticks);
    let busy1 = machine_busy_ticks();
    let ticks = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => (b - a).to_string(),
        _ => "null".to_string(),
    };
    let (watch_ticks, busy_ticks) = (ticks(cpu0, cpu1), ticks(busy0, busy1));

    let mut lat: Vec<u32> = Vec::new();
    let mut per_client: Vec<u64> = Vec::with_capacity(o.clients);
    let mut errors = Errors::default();
    let (mut connected, mut in_time) = (0usize, 0u64);
    for t in tasks {
        match t.await {
            Ok(r) => {
                if r.connected {
                    connected += 1;
                    per_client.push(r.done_in_time);
                }
                in_time += r.done_in_time;
                lat.extend_from_slice(&r.latencies_us);
                errors.merge(r.errors);
            }
            Err(e) => errors.add(format!("task: {e}")),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    per_client.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[i.clamp(1, lat.len()) - 1]
    };
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64
    };
    let pc = |q: f64| {
        per_client
            .get(((per_client.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"event\":\"result\",\"clients\":{},\"connected\":{connected},\"connect_secs\":{connect_secs:.3},\
\"duration_secs\":{:.3},\"wall_secs\":{wall:.3},\"queries\":{},\"queries_in_time\":{in_time},\"qps\":{:.1},\
\"errors\":{},\"error_kinds\":{},\"lat_mean_us\":{mean:.1},\"lat_p50_us\":{},\"lat_p90_us\":{},\"lat_p99_us\":{},\
\"lat_p999_us\":{},\"lat_max_us\":{},\"per_client_min\":{},\"per_client_median\":{},\"per_client_max\":{},\
\"watch_cpu_ticks\":{watch_ticks},\"machine_busy_ticks\":{busy_ticks}}}",
        o.clients,
        o.duration,
        lat.len(),
        in_time as f64 / o.duration,
        errors.count,
        errors.json(),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        lat.last().copied().unwrap_or(0),
        pc(0.0),
        pc(0.5),
        pc(1.0),
    );
}
