//! Upgrades without refusing a client: a new tidepool started with
//! `--takeover` asks the running one, over the Unix socket `upgrade_socket`,
//! for its listening sockets. The old process sends them (SCM_RIGHTS) and,
//! once the new one has them, stops accepting and lets its clients finish:
//! they stay until they leave, for up to `shutdown_timeout`, and are then
//! closed at their next transaction boundary as in a shutdown. Both
//! processes accept from the same sockets in between, so no connection
//! attempt is refused or lost.
//!
//! The exchange: the new process writes `TAKEOVER 1\n`; the old answers
//! one message carrying the descriptors and the text `LISTENERS n METRICS
//! m\n` (n client listeners in config order, then m = 0 or 1 metrics
//! listener); the new process writes `OK\n` once it holds them. Invariant:
//! the old process stops accepting only after that `OK`, so an aborted
//! takeover leaves it serving as before.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::client::Shared;

const HELLO: &str = "TAKEOVER 1\n";
/// Most descriptors one takeover carries (listen addresses + metrics).
const MAX_FDS: usize = 32;

/// The listening sockets received from the old process.
pub struct Inherited {
    pub listeners: Vec<std::net::TcpListener>,
    pub metrics: Option<std::net::TcpListener>,
}

/// Asks the tidepool listening on `path` for its listening sockets, makes
/// this process ready with them (`setup`), and only then tells the old one
/// to stop accepting: a setup that fails leaves the old process serving.
pub fn take_over<T>(
    path: &Path,
    setup: impl FnOnce(Inherited) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("no tidepool to take over at {}: {e}", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(HELLO.as_bytes())?;
    let (text, fds) = recv_fds(&s)?;
    let mut words = text.split_whitespace();
    let (Some("LISTENERS"), Some(n), Some("METRICS"), Some(m)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(invalid(&format!("unexpected answer {text:?}")));
    };
    let (n, m): (usize, usize) = (
        n.parse().map_err(|_| invalid("bad count"))?,
        m.parse().map_err(|_| invalid("bad count"))?,
    );
    if fds.len() != n + m || m > 1 {
        return Err(invalid(&format!(
            "{} descriptors for {n} listeners and {m} metrics",
            fds.len()
        )));
    }
    let mut all: Vec<std::net::TcpListener> = fds
        .into_iter()
        .map(|fd| {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true).map(|()| l)
        })
        .collect::<Result<_, _>>()?;
    let metrics = if m == 1 { all.pop() } else { None };
    let ready = setup(Inherited {
        listeners: all,
        metrics,
    })?;
    s.write_all(b"OK\n")?;
    Ok(ready)
}

/// The takeover thread's copies of the listening sockets. [`Handoff::close`]
/// drops them when the listeners close (a shutdown), so that nothing keeps
/// the sockets open and nothing hands over a closed one.
pub struct Handoff(Arc<Mutex<Option<Vec<OwnedFd>>>>);

impl Handoff {
    pub fn close(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// Serves takeover requests on `path` until one succeeds: then the running
/// proxy stops accepting and drains (see the module doc). `fds` are the
/// client listeners in config order, then the metrics listener if any.
/// `replacing`: this process just took over from the one that listened on
/// `path`, whose socket file it replaces.
pub fn serve(
    path: &Path,
    fds: Vec<OwnedFd>,
    metrics: bool,
    shared: Arc<Shared>,
    replacing: bool,
) -> std::io::Result<Handoff> {
    // A socket file left by a process that is gone is replaced; one that
    // answers belongs to a running tidepool.
    if !replacing && UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another tidepool answers on {} (start this one with --takeover to replace it)",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let path = path.to_owned();
    let held = Arc::new(Mutex::new(Some(fds)));
    let handoff = Handoff(held.clone());
    std::thread::Builder::new()
        .name("tidepool-upgrade".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                // Held while handing over: the listeners cannot close
                // meanwhile (`Handoff::close` waits).
                let mut guard = held.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(fds) = guard.as_ref() else {
                    // Closed: a shutdown is under way, nothing to hand over.
                    return;
                };
                let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                match hand_over(&conn, &raw, metrics) {
                    Ok(()) => {
                        guard.take();
                        drop(guard);
                        tracing::info!(socket = %path.display(), "a new tidepool took over the listening sockets: no longer accepting; clients finish here");
                        shared.request_shutdown_after_takeover();
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "takeover request failed; still serving"),
                }
            }
        })?;
    Ok(handoff)
}

fn hand_over(conn: &UnixStream, fds: &[RawFd], metrics: bool) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    // A line of at most a few bytes: a peer that never ends it cannot
    // make this grow.
    let mut reader = BufReader::new(conn.take(64));
    let mut hello = String::new();
    reader.read_line(&mut hello)?;
    if hello != HELLO {
        return Err(invalid(&format!("unexpected request {hello:?}")));
    }
    let m = usize::from(metrics);
    let text = format!("LISTENERS {} METRICS {m}\n", fds.len() - m);
    send_fds(conn, text.as_bytes(), fds)?;
    let mut ok = [0u8; 3];
    reader.read_exact(&mut ok)?;
    if &ok != b"OK\n" {
        return Err(invalid("the new process did not confirm"));
    }
    Ok(())
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("takeover: {what}"))
}

/// Control-message buffer for up to [`MAX_FDS`] descriptors, aligned for
/// `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 256]);

fn send_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(invalid("too many descriptors"));
    }
    let mut cbuf = CmsgBuf([0; 256]);
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the
    // sendmsg call, and the control buffer is large and aligned enough for
    // one cmsghdr with `fds.len()` descriptors (checked above).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(invalid("no room for the descriptors"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload);
        if libc::sendmsg(s.as_raw_fd(), &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv_fds(s: &UnixStream) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut data = [0u8; 256];
    let mut cbuf = CmsgBuf([0; 256]);
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut fds = Vec::new();
    // SAFETY: as in `send_fds`; the kernel writes at most `msg_controllen`
    // bytes of control data and `iov_len` bytes of data, and each received
    // descriptor is owned by this process from here on (wrapped at once).
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / std::mem::size_of::<RawFd>();
                let first = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(first.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(invalid("descriptors truncated"));
        }
        n as usize
    };
    Ok((String::from_utf8_lossy(&data[..n]).into_owned(), fds))
}
