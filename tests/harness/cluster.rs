//! A throw-away PostgreSQL cluster: one primary and optional streaming replicas.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::os::{self, Res, TempRoot};
use super::process::{self, run_ok};
use super::{
    APP_PASSWORD, APP_USER, DEFAULT_DEADLINE, HOST, MD5_PASSWORD, MD5_USER, SUPERUSER,
    SUPERUSER_PASSWORD, TRUST_USER,
};

/// Deadline for initdb / pg_basebackup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a fast shutdown may take before the server is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
/// Attempts at finding a free port for a new server.
const PORT_ATTEMPTS: usize = 8;

/// A PostgreSQL primary plus `n` streaming replicas in a private temp dir.
///
/// Dropping it stops all servers (replicas first) and deletes the temp dir.
/// The shared clusters returned by `harness::cluster()` live in statics and are
/// never dropped: their servers die with the test process (PDEATHSIG) and
/// their directories are removed by a later harness run.
pub struct Cluster {
    // Field order is drop order: replicas, then primary, then the directory.
    replicas: Vec<Server>,
    primary: Server,
    root: TempRoot,
}

impl Cluster {
    /// Starts a private cluster with `replicas` streaming replicas.
    /// Panics with a descriptive message if that fails.
    pub fn start_new(replicas: usize) -> Cluster {
        Cluster::try_start_new(replicas).unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"))
    }

    /// Like [`Cluster::start_new`] but returns the error.
    pub fn try_start_new(replicas: usize) -> Result<Cluster, String> {
        os::require_server_binaries()?;
        os::server_user()?;
        let root = TempRoot::new()?;

        let pwfile = root.path().join("pwfile");
        fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n"))
            .map_err(|e| format!("writing {}: {e}", pwfile.display()))?;
        os::chown_to_server_user(&pwfile)?;

        let data = root.path().join("primary");
        let mut initdb = Command::new(os::pg_bin("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .current_dir(root.path());
        server_env(&mut initdb)?;
        run_ok(initdb, None, SETUP_TIMEOUT, "initdb")?;
        let _ = fs::remove_file(&pwfile);

        write_file(&data.join("pg_hba.conf"), PG_HBA)?;
        let primary = Server::start_on_free_port("primary".into(), data, root.path())?;

        // From here on, dropping `cluster` cleans everything up on error.
        let mut cluster = Cluster {
            replicas: Vec::new(),
            primary,
            root,
        };
        cluster.create_roles()?;
        for _ in 0..replicas {
            cluster.add_replica()?;
        }
        Ok(cluster)
    }

    /// Always `"127.0.0.1"`.
    pub fn host(&self) -> &'static str {
        HOST
    }

    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    pub fn replica_ports(&self) -> Vec<u16> {
        self.replicas.iter().map(|r| r.port).collect()
    }

    /// Path of a PostgreSQL program (see `harness::pg_bin`).
    pub fn bin(&self, name: &str) -> PathBuf {
        os::pg_bin(name)
    }

    /// The cluster's temp dir (data dirs, unix sockets).
    pub fn root_dir(&self) -> &Path {
        self.root.path()
    }

    pub fn primary_data_dir(&self) -> &Path {
        &self.primary.data_dir
    }

    /// Directory holding the servers' unix sockets (`unix_socket_directories`).
    pub fn socket_dir(&self) -> &Path {
        self.root.path()
    }

    /// `postgresql://postgres:postgres@127.0.0.1:<primary>/<db>`
    pub fn superuser_url(&self, db: &str) -> String {
        super::url(self.primary.port, SUPERUSER, Some(SUPERUSER_PASSWORD), db)
    }

    /// URL for `user` on the primary.
    pub fn url(&self, user: &str, password: Option<&str>, db: &str) -> String {
        super::url(self.primary.port, user, password, db)
    }

    /// `app`/`secret` on the primary.
    pub fn app_url(&self, db: &str) -> String {
        super::url(self.primary.port, APP_USER, Some(APP_PASSWORD), db)
    }

    /// Creates a fresh, uniquely named database owned by `app` and returns its
    /// name (`<prefix>_<n>`, prefix lowercased and reduced to `[a-z0-9_]`).
    pub fn create_database(&self, prefix: &str) -> String {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let mut clean: String = prefix
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        if clean.is_empty() || clean.starts_with(|c: char| c.is_ascii_digit()) {
            clean.insert_str(0, "db_");
        }
        let name = format!("{clean}_{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        self.superuser_sql(
            self.primary.port,
            "postgres",
            &format!("CREATE DATABASE \"{name}\" OWNER \"{APP_USER}\""),
        )
        .unwrap_or_else(|e| panic!("create_database({prefix}): {e}"));
        name
    }

    /// tokio-postgres client connected directly to the primary as `postgres`.
    pub async fn admin_client(&self, db: &str) -> tokio_postgres::Client {
        self.admin_client_on(self.primary.port, db).await
    }

    /// tokio-postgres superuser client for the server on `port` (primary or
    /// replica of this cluster).
    pub async fn admin_client_on(&self, port: u16, db: &str) -> tokio_postgres::Client {
        let config = format!(
            "host={HOST} port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} \
             dbname={db} connect_timeout=10"
        );
        super::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("admin connection to {HOST}:{port}/{db} failed: {e}"))
    }

    /// Fast shutdown of the primary (SIGINT to the postmaster), waiting until
    /// it has exited. No-op if it is not running.
    pub fn stop_primary(&self) {
        self.primary
            .stop()
            .unwrap_or_else(|e| panic!("stop_primary: {e}"));
    }

    /// Starts the primary again on the same port and data dir and waits until
    /// it accepts connections. No-op if it is running.
    pub fn start_primary(&self) {
        self.primary
            .start()
            .unwrap_or_else(|e| panic!("start_primary: {e}"));
    }

    /// [`Cluster::stop_primary`] + [`Cluster::start_primary`].
    pub fn restart_primary(&self) {
        self.stop_primary();
        self.start_primary();
    }

    /// Fast shutdown of replica `i`, waiting until it has exited.
    pub fn stop_replica(&self, i: usize) {
        self.replicas[i]
            .stop()
            .unwrap_or_else(|e| panic!("stop_replica: {e}"));
    }

    /// Starts replica `i` again on the same port and waits until it accepts
    /// connections.
    pub fn start_replica(&self, i: usize) {
        self.replicas[i]
            .start()
            .unwrap_or_else(|e| panic!("start_replica: {e}"));
    }

    /// `kill -9` of the primary's postmaster (no shutdown: its backends
    /// die with it and unflushed work is lost, as in a crash); waits until
    /// it has exited. `start_primary` runs crash recovery.
    pub fn kill_primary(&self) {
        self.primary.signal_postmaster(libc::SIGKILL);
        let mut guard = self.primary.lock();
        if let Some(mut child) = guard.take() {
            let _ = child.wait();
        }
        drop(guard);
        // Orphaned backends notice the postmaster is gone and exit; the
        // next start waits for the port and shared memory to be free.
    }

    /// Sends `sig` to replica `i`'s postmaster (SIGSTOP: it stops
    /// answering without closing connections; SIGCONT resumes it).
    pub fn signal_replica(&self, i: usize, sig: i32) {
        self.replicas[i].signal_postmaster(sig);
    }

    /// `pg_ctl promote` of replica `i`: it leaves recovery and takes
    /// writes; waits until it has.
    pub fn promote_replica(&self, i: usize) {
        let mut cmd = Command::new(os::pg_bin("pg_ctl"));
        cmd.args(["promote", "-w", "-t", "60", "-D"])
            .arg(&self.replicas[i].data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        server_env(&mut cmd).unwrap_or_else(|e| panic!("promote_replica: {e}"));
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("promote_replica: pg_ctl: {e}"));
        assert!(
            out.status.success(),
            "pg_ctl promote failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether the primary's postmaster process is alive.
    pub fn primary_is_running(&self) -> bool {
        self.primary.is_running()
    }

    /// The primary's server log (`<data dir>/postgres.log`).
    pub fn primary_log(&self) -> String {
        fs::read_to_string(self.primary.log_path()).unwrap_or_default()
    }

    /// Data directory of replica `i` (0-based).
    pub fn replica_data_dir(&self, i: usize) -> &Path {
        &self.replicas[i].data_dir
    }

    /// Server log of replica `i` (0-based).
    pub fn replica_log(&self, i: usize) -> String {
        fs::read_to_string(self.replicas[i].log_path()).unwrap_or_default()
    }

    /// Waits until every replica has replayed the primary's current WAL
    /// position (i.e. everything committed so far is visible there).
    pub fn wait_for_replicas(&self) {
        self.try_wait_for_replicas()
            .unwrap_or_else(|e| panic!("wait_for_replicas: {e}"));
    }

    fn try_wait_for_replicas(&self) -> Res<()> {
        // With synchronous_commit = off, recent commits may not be flushed
        // (and so not sent) yet. Commit one WAL-writing transaction
        // synchronously, which flushes all WAL inserted before it, then read
        // the flush position. (txid_current() alone writes no WAL and would
        // commit asynchronously.)
        let out = self.superuser_sql(
            self.primary.port,
            "postgres",
            "SET synchronous_commit = on;\n\
             SELECT pg_logical_emit_message(true, 'tidepool-harness', 'sync');\n\
             SELECT pg_current_wal_flush_lsn();",
        )?;
        let lsn = out
            .lines()
            .last()
            .ok_or_else(|| format!("no WAL position from the primary: {out:?}"))?
            .trim()
            .to_owned();
        for r in &self.replicas {
            let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
            self.poll_sql_true(r.port, &sql, &format!("{} to replay up to {lsn}", r.name))?;
        }
        Ok(())
    }

    /// Runs `sql` as superuser with psql on the primary, in `db`; returns
    /// trimmed `-At` output.
    pub fn primary_sql(&self, db: &str, sql: &str) -> String {
        self.superuser_sql(self.primary.port, db, sql)
            .unwrap_or_else(|e| panic!("primary_sql: {e}"))
    }

    /// Reloads the primary's configuration (pg_hba.conf, ssl, ALTER SYSTEM)
    /// and returns once the postmaster has taken it: a new connection
    /// reports a later load time (a fixed pause raced a busy machine).
    pub fn reload_primary(&self) {
        let port = self.primary.port;
        let sql = |q: &str| {
            self.superuser_sql(port, "postgres", q)
                .unwrap_or_else(|e| panic!("reload_primary: {e}"))
        };
        let before = sql("select pg_conf_load_time()");
        sql("select pg_reload_conf()");
        self.poll_sql_true(
            port,
            &format!("select pg_conf_load_time() > '{before}'::timestamptz"),
            "the primary to reload its configuration",
        )
        .unwrap_or_else(|e| panic!("reload_primary: {e}"));
    }

    /// Runs `sql` as superuser with psql on `port`; returns trimmed `-At` output.
    fn superuser_sql(&self, port: u16, db: &str, sql: &str) -> Res<String> {
        let url = super::url(port, SUPERUSER, Some(SUPERUSER_PASSWORD), db);
        let mut cmd = Command::new(os::pg_bin("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &url]);
        process::client_env(&mut cmd, &url);
        let out = run_ok(
            cmd,
            Some(sql.as_bytes().to_vec()),
            super::PSQL_TIMEOUT,
            &format!("psql on port {port}: {sql}"),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Polls `sql` (a boolean query) on `port` until it returns true.
    fn poll_sql_true(&self, port: u16, sql: &str, what: &str) -> Res<()> {
        let deadline = Instant::now() + DEFAULT_DEADLINE;
        loop {
            let last = match self.superuser_sql(port, "postgres", sql) {
                Ok(v) if v == "t" => return Ok(()),
                Ok(v) => format!("query returned {v:?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {DEFAULT_DEADLINE:?} waiting for {what}; last: {last}"
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_roles(&self) -> Res<()> {
        let sql = format!(
            "CREATE ROLE \"{APP_USER}\" LOGIN CREATEDB PASSWORD '{APP_PASSWORD}';\n\
             SET password_encryption = 'md5';\n\
             CREATE ROLE \"{MD5_USER}\" LOGIN PASSWORD '{MD5_PASSWORD}';\n\
             RESET password_encryption;\n\
             CREATE ROLE \"{TRUST_USER}\" LOGIN;\n"
        );
        self.superuser_sql(self.primary.port, "postgres", &sql)
            .map(drop)
            .map_err(|e| format!("creating roles: {e}"))
    }

    fn add_replica(&mut self) -> Res<()> {
        let name = format!("replica{}", self.replicas.len() + 1);
        let data = self.root.path().join(&name);
        let mut cmd = Command::new(os::pg_bin("pg_basebackup"));
        cmd.args([
            "-h",
            HOST,
            "-p",
            &self.primary.port.to_string(),
            "-U",
            SUPERUSER,
        ])
        .arg("-D")
        .arg(&data)
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
        .current_dir(self.root.path());
        process::client_env(&mut cmd, "");
        cmd.env("PGPASSWORD", SUPERUSER_PASSWORD);
        server_env(&mut cmd)?;
        run_ok(
            cmd,
            None,
            SETUP_TIMEOUT,
            &format!("pg_basebackup for {name}"),
        )?;
        // The copy carries the primary's log; start the replica's afresh.
        let log = data.join(LOG_FILE);
        if log.exists() {
            write_file(&log, "")?;
        }

        let server = Server::start_on_free_port(name.clone(), data, self.root.path())?;
        let port = server.port;
        self.replicas.push(server);
        self.poll_sql_true(
            port,
            "SELECT pg_is_in_recovery() AND EXISTS \
             (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            &format!("{name} to be in recovery and streaming"),
        )
    }
}

const LOG_FILE: &str = "postgres.log";
const CONF_FILE: &str = "tidepool.conf";

const PG_HBA: &str = "\
# Written by the tidepool test harness.
# TYPE  DATABASE     USER        ADDRESS        METHOD
local   all          all                        trust
local   replication  all                        trust
host    all          trustuser   127.0.0.1/32   trust
host    all          md5user     127.0.0.1/32   md5
host    replication  all         127.0.0.1/32   scram-sha-256
host    all          all         127.0.0.1/32   scram-sha-256
host    all          all         ::1/128        scram-sha-256
";

fn write_file(path: &Path, contents: &str) -> Res<()> {
    fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()))?;
    os::chown_to_server_user(path)
}

/// Environment for server-side programs (initdb, postgres, pg_basebackup):
/// run as the server user, without PG* variables that would change defaults.
fn server_env(cmd: &mut Command) -> Res<()> {
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C");
    os::as_server_user(cmd)
}

/// Writes `<data>/tidepool.conf` and makes sure postgresql.conf includes it
/// (last, so it wins).
fn write_server_conf(data: &Path, port: u16, socket_dir: &Path) -> Res<()> {
    let conf = format!(
        "# Written by the tidepool test harness.
listen_addresses = '{HOST}'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 300
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 5
max_replication_slots = 5
wal_keep_size = 512MB
hot_standby = on
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
",
        socket_dir = socket_dir.display()
    );
    write_file(&data.join(CONF_FILE), &conf)?;

    let main_conf = data.join("postgresql.conf");
    let include = format!("include '{CONF_FILE}'");
    let current = fs::read_to_string(&main_conf)
        .map_err(|e| format!("reading {}: {e}", main_conf.display()))?;
    if !current.lines().any(|l| l.trim() == include) {
        write_file(&main_conf, &format!("{current}\n{include}\n"))?;
    }
    Ok(())
}

enum LaunchError {
    /// Could not bind the port: try again (another port, or later).
    PortClash(String),
    Failed(String),
}

impl From<String> for LaunchError {
    fn from(e: String) -> Self {
        LaunchError::Failed(e)
    }
}

/// One postmaster (primary or replica).
struct Server {
    name: String,
    data_dir: PathBuf,
    port: u16,
    postmaster: Mutex<Option<Child>>,
}

impl Server {
    /// Configures `data_dir` for a free port and starts it, retrying with a
    /// new port if another process grabbed the chosen one.
    fn start_on_free_port(name: String, data_dir: PathBuf, socket_dir: &Path) -> Res<Server> {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = os::free_port()?;
            write_server_conf(&data_dir, port, socket_dir)?;
            let server = Server {
                name: name.clone(),
                data_dir: data_dir.clone(),
                port,
                postmaster: Mutex::new(None),
            };
            match server.launch() {
                Ok(child) => {
                    *server.lock() = Some(child);
                    return Ok(server);
                }
                Err(LaunchError::PortClash(msg)) => last = msg,
                Err(LaunchError::Failed(msg)) => return Err(msg),
            }
        }
        Err(format!(
            "{name}: no usable port after {PORT_ATTEMPTS} attempts; last error: {last}"
        ))
    }

    fn signal_postmaster(&self, sig: i32) {
        if let Some(child) = self.lock().as_ref() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.postmaster
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    fn is_running(&self) -> bool {
        matches!(self.lock().as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Spawns the postmaster (tied to this process) and waits until
    /// postmaster.pid says it accepts connections.
    fn launch(&self) -> Result<Child, LaunchError> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        os::chown_to_server_user(&log_path)?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(|e| format!("duplicating log handle: {e}"))?;

        let mut cmd = Command::new(os::pg_bin("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        server_env(&mut cmd)?;
        let mut child = super::keeper::spawn_tied_to_process(cmd)
            .map_err(|e| format!("spawning postgres for {}: {e}", self.name))?;

        let deadline = Instant::now() + DEFAULT_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let log = read_from(&log_path, log_offset);
                    let msg = format!(
                        "{} postmaster (port {}) exited during startup with {status}; log:\n{log}",
                        self.name, self.port
                    );
                    return Err(if is_port_clash(&log) {
                        LaunchError::PortClash(msg)
                    } else {
                        LaunchError::Failed(msg)
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(format!("waiting for {} postmaster: {e}", self.name).into()),
            }
            if self.pid_file_ready(child.id()) {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                shut_down(&mut child, &self.name);
                return Err(LaunchError::Failed(format!(
                    "{} postmaster (port {}) not ready after {DEFAULT_DEADLINE:?}; log:\n{}",
                    self.name,
                    self.port,
                    read_from(&log_path, log_offset)
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// postmaster.pid line 1 is the pid, line 8 the status; pg_ctl waits for
    /// "ready" (primary) or "standby" (hot standby accepting connections).
    fn pid_file_ready(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        lines.first() == Some(&pid.to_string().as_str())
            && matches!(lines.get(7), Some(&"ready") | Some(&"standby"))
    }

    /// Starts the postmaster again on the same port; a port clash is retried
    /// until the deadline (the old socket may linger briefly).
    fn start(&self) -> Res<()> {
        let mut guard = self.lock();
        if let Some(child) = guard.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            return Ok(());
        }
        *guard = None;
        let deadline = Instant::now() + DEFAULT_DEADLINE;
        loop {
            match self.launch() {
                Ok(child) => {
                    *guard = Some(child);
                    return Ok(());
                }
                Err(LaunchError::PortClash(_)) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(LaunchError::PortClash(msg)) | Err(LaunchError::Failed(msg)) => {
                    return Err(msg);
                }
            }
        }
    }

    /// Fast shutdown; waits for the postmaster to exit.
    fn stop(&self) -> Res<()> {
        let mut guard = self.lock();
        if let Some(mut child) = guard.take() {
            if shut_down(&mut child, &self.name) {
                return Ok(());
            }
            return Err(format!(
                "{} did not finish a fast shutdown within {STOP_DEADLINE:?} and was killed",
                self.name
            ));
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// SIGINT (fast shutdown) and wait; escalates to SIGQUIT / SIGKILL after the
/// deadline. Returns whether the fast shutdown worked in time.
fn shut_down(child: &mut Child, name: &str) -> bool {
    if !matches!(child.try_wait(), Ok(None)) {
        return true;
    }
    signal(child, libc::SIGINT);
    if wait_exit(child, STOP_DEADLINE) {
        return true;
    }
    eprintln!("harness: {name} ignored fast shutdown for {STOP_DEADLINE:?}; sending SIGQUIT");
    signal(child, libc::SIGQUIT);
    if !wait_exit(child, Duration::from_secs(10)) {
        let _ = child.kill();
        let _ = child.wait();
    }
    false
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => thread::sleep(POLL),
        }
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn is_port_clash(log: &str) -> bool {
    log.contains("could not bind")
        || log.contains("Address already in use")
        || log.contains("could not create any TCP/IP sockets")
}
