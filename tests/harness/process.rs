//! Running short-lived external programs with a deadline.

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::os::Res;

/// Environment for libpq client programs: drop PG* variables that could
/// redirect the connection, take the password from the URL, bound connect time.
pub fn client_env(cmd: &mut Command, url: &str) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGTARGETSESSIONATTRS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(pw) = password_from_url(url) {
        cmd.env("PGPASSWORD", pw);
    }
    cmd.env("PGCONNECT_TIMEOUT", "10");
}

/// `postgresql://user:PASSWORD@host...` -> `PASSWORD` (not percent-decoded).
fn password_from_url(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))?;
    let userinfo = &rest[..rest.find('@')?];
    userinfo.split_once(':').map(|(_, pw)| pw)
}

fn describe(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to completion, feeding `stdin`, capturing stdout/stderr.
/// Kills it and returns an error (with whatever it printed) after `timeout`.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    what: &str,
) -> Res<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not run {what} ({:?}): {e}", cmd.get_program()))?;

    let writer = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(data)) => Some(thread::spawn(move || {
            // The program may exit without reading everything; ignore EPIPE.
            let _ = pipe.write_all(&data);
        })),
        _ => None,
    };
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_reader = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_reader = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child
                    .wait()
                    .map_err(|e| format!("waiting for killed {what}: {e}"))?;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let output = Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
    if timed_out {
        return Err(format!(
            "{what} timed out after {timeout:?}; {}",
            describe(&output)
        ));
    }
    Ok(output)
}

/// Like [`run_with_timeout`] but a non-zero exit is an error too.
pub fn run_ok(cmd: Command, stdin: Option<Vec<u8>>, timeout: Duration, what: &str) -> Res<Output> {
    let out = run_with_timeout(cmd, stdin, timeout, what)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("{what} failed; {}", describe(&out)))
    }
}
