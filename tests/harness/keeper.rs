//! Spawns long-lived server processes from one dedicated thread that never
//! exits, with `PR_SET_PDEATHSIG = SIGQUIT`.
//!
//! Linux delivers the parent-death signal when the *thread* that forked the
//! child exits, not when the process does. Test threads come and go, so the
//! fork has to happen on a thread that lives as long as the process; then the
//! signal fires exactly when the test process dies (normally or killed).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

type Request = (Command, mpsc::Sender<io::Result<Child>>);

static KEEPER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

fn keeper() -> &'static mpsc::Sender<Request> {
    KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("tidepool-pg-keeper".into())
            .spawn(move || {
                // The sender lives in a static, so this loop never ends.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                loop {
                    std::thread::park();
                }
            })
            .expect("harness: could not start the process keeper thread");
        tx
    })
}

/// Spawns `cmd` from the keeper thread; the child gets SIGQUIT when the test
/// process dies. The returned `Child` can be waited on / killed from any thread.
pub fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // Runs after setuid/setgid (which would clear the setting).
            let rc = libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGQUIT as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            );
            if rc == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper()
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("harness keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("harness keeper thread did not answer"))?
}
