//! OS-level helpers: PostgreSQL binaries, the unprivileged server user,
//! temporary directories and free ports.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

pub type Res<T> = Result<T, String>;

const TMP_PREFIX: &str = "tidepool-test-";

/// The server bindir: `$TIDEPOOL_PG_BINDIR`, `pg_config --bindir`, or the
/// highest `/usr/lib/postgresql/<version>/bin`. `None` if nothing has a
/// `postgres` binary (then bare names are used and resolved via `PATH`).
fn server_bindir() -> Option<&'static Path> {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            let has_server = |dir: &Path| dir.join("postgres").is_file();
            if let Some(dir) = std::env::var_os("TIDEPOOL_PG_BINDIR").map(PathBuf::from)
                && has_server(&dir)
            {
                return Some(dir);
            }
            if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
                && out.status.success()
            {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_server(&dir) {
                    return Some(dir);
                }
            }
            let mut best: Option<(Vec<u32>, PathBuf)> = None;
            for entry in fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
            {
                let version: Option<Vec<u32>> = entry
                    .file_name()
                    .to_str()
                    .and_then(|v| v.split('.').map(|p| p.parse().ok()).collect());
                let dir = entry.path().join("bin");
                if let Some(version) = version
                    && has_server(&dir)
                    && best.as_ref().is_none_or(|(b, _)| version > *b)
                {
                    best = Some((version, dir));
                }
            }
            best.map(|(_, dir)| dir)
        })
        .as_deref()
}

pub fn pg_bin(name: &str) -> PathBuf {
    if let Some(dir) = server_bindir() {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    let p = Path::new("/usr/bin").join(name);
    if p.is_file() {
        return p;
    }
    PathBuf::from(name)
}

/// Checks that the server binaries exist, with an actionable message.
pub fn require_server_binaries() -> Res<()> {
    for name in ["initdb", "postgres", "pg_basebackup"] {
        if !pg_bin(name).is_file() {
            return Err(format!(
                "PostgreSQL server binary `{name}` not found (looked at `pg_config --bindir`, \
                 /usr/lib/postgresql/*/bin, /usr/bin); install the `postgresql` package \
                 (scripts/test does) or set TIDEPOOL_PG_BINDIR"
            ));
        }
    }
    Ok(())
}

/// OS user the servers run as when we are root.
#[derive(Debug, Clone)]
pub struct ServerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn passwd_lookup(name: &str) -> Option<ServerUser> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some(ServerUser {
                name: name.to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        } else {
            None
        }
    })
}

/// `None` when not root (servers run as ourselves); otherwise the `postgres`
/// user, or `tidepool-pg` (created with useradd if missing).
pub fn server_user() -> Res<Option<&'static ServerUser>> {
    static USER: OnceLock<Res<Option<ServerUser>>> = OnceLock::new();
    USER.get_or_init(|| {
        if !is_root() {
            return Ok(None);
        }
        if let Some(u) = passwd_lookup("postgres") {
            return Ok(Some(u));
        }
        const FALLBACK: &str = "tidepool-pg";
        if let Some(u) = passwd_lookup(FALLBACK) {
            return Ok(Some(u));
        }
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                FALLBACK,
            ])
            .output()
            .map_err(|e| format!("running useradd {FALLBACK}: {e}"))?;
        // A concurrently running test binary may have created it meanwhile.
        passwd_lookup(FALLBACK).map(Some).ok_or_else(|| {
            format!(
                "running as root, no `postgres` user and `useradd {FALLBACK}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    })
    .as_ref()
    .map(Option::as_ref)
    .map_err(Clone::clone)
}

/// Makes `cmd` run as the server user (no-op when not root).
pub fn as_server_user(cmd: &mut Command) -> Res<()> {
    if let Some(u) = server_user()? {
        cmd.uid(u.uid).gid(u.gid);
        // Keep HOME from pointing to root's home for the server processes.
        cmd.env("HOME", "/tmp")
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    Ok(())
}

/// Gives `path` to the server user (no-op when not root).
pub fn chown_to_server_user(path: &Path) -> Res<()> {
    if let Some(u) = server_user()? {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(|e| format!("chown {} to {}: {e}", path.display(), u.name))?;
    }
    Ok(())
}

/// Removes `$TMPDIR/tidepool-test-<pid>-*` directories of dead processes
/// (once per test process).
fn remove_stale_dirs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let me = std::process::id();
        let tmp = std::env::temp_dir();
        for entry in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// A fresh `$TMPDIR/tidepool-test-<pid>-<n>` (mode 0700, owned by the server
/// user), removed again on drop.
#[derive(Debug)]
pub struct TempRoot {
    path: PathBuf,
}

impl TempRoot {
    pub fn new() -> Res<TempRoot> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        remove_stale_dirs();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{TMP_PREFIX}{}-{n}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
        }
        fs::create_dir(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let root = TempRoot { path };
        fs::set_permissions(&root.path, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", root.path.display()))?;
        chown_to_server_user(&root.path)?;
        Ok(root)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A loopback port that was free a moment ago (bind :0, read, release).
/// Callers must cope with losing a race for it.
pub fn free_port() -> Res<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("binding 127.0.0.1:0: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr of 127.0.0.1:0 listener: {e}"))
}
