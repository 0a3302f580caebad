//! Runs the real `tidepool` binary as a child process, with its config in a
//! file, for tests of what only a process has: signals (SIGHUP, SIGTERM),
//! the config file reload, its log output and its exit.

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub config_path: PathBuf,
    dir: PathBuf,
    log: Arc<Mutex<Vec<u8>>>,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Daemon {
    /// Starts tidepool with `toml`, in which `{port}` and `{metrics_port}`
    /// are replaced by free ports. Logs are JSON lines, kept in memory.
    pub fn start(toml: &str) -> Daemon {
        // A port found free can be taken by another test before tidepool
        // binds it: then tidepool exits, and it starts again on others.
        let mut attempts = 0;
        loop {
            match Self::try_start(toml, free_port(), &[]) {
                Ok(d) => return d,
                Err(log) if attempts < 3 && log.contains("cannot listen") => attempts += 1,
                Err(log) => panic!("tidepool did not start; log:\n{log}"),
            }
        }
    }

    /// Like [`Daemon::start`], listening on `port` (another tidepool may
    /// already listen there with `so_reuseport`).
    pub fn start_on(toml: &str, port: u16) -> Daemon {
        Self::start_with(toml, port, &[])
    }

    /// Like [`Daemon::start_on`], with more command-line arguments.
    pub fn start_with(toml: &str, port: u16, args: &[&str]) -> Daemon {
        Self::try_start(toml, port, args)
            .unwrap_or_else(|log| panic!("tidepool did not start; log:\n{log}"))
    }

    /// Starts tidepool and waits until it listens: its own log says so (not
    /// merely something accepting on the port) and it still runs. Err: its
    /// log, when it exited or did not listen within 30 s.
    fn try_start(toml: &str, port: u16, args: &[&str]) -> Result<Daemon, String> {
        let metrics_port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tidepool-daemon-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("daemon dir");
        let config_path = dir.join("proxy.toml");
        let toml = toml
            .replace("{port}", &port.to_string())
            .replace("{metrics_port}", &metrics_port.to_string());
        std::fs::write(&config_path, toml).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .arg("--config")
            .arg(&config_path)
            .args(["--log-format", "json", "--threads", "2"])
            .args(args)
            .env("TIDEPOOL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tidepool");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let d = Daemon {
            child,
            port,
            metrics_port,
            config_path,
            dir,
            log,
        };
        let mut d = d;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                // Its last words may still be on their way from the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("(exited: {status})\n{}", d.log()));
            }
            if d.log().contains("\"listening\"")
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                return Err(format!("(not listening after 30 s)\n{}", d.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Log lines parsed as JSON (lines that are not JSON are skipped).
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({sig}) failed");
    }

    /// Replaces the config file (same `{port}` substitution as `start`).
    pub fn write_config(&self, toml: &str) {
        let toml = toml
            .replace("{port}", &self.port.to_string())
            .replace("{metrics_port}", &self.metrics_port.to_string());
        std::fs::write(&self.config_path, toml).expect("write config");
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        super::url(self.port, user, Some(password), db)
    }

    /// Waits for the process to exit; its status, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_with(port, path, "")
}

/// [`http_get`] with more header lines (each ending in `\r\n`).
pub fn http_get_with(port: u16, path: &str, headers: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read http");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
