//! Socket reads that cost one system call per burst of data.
//!
//! tokio keeps a socket marked readable after a read until a read fails
//! with `WouldBlock`, so reading everything that arrived usually costs a
//! second, failing `recv`. A read that returns less than the space offered
//! has drained the socket: these helpers then clear the readiness at once
//! (through `try_io`, which does not clear it if a new readiness event came
//! in meanwhile), so the next read waits for the reactor instead of asking
//! the kernel. This also makes the idle-server liveness probe free.

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Reads what is available into `buf`'s spare capacity without waiting.
/// `Err(WouldBlock)` when nothing is; `Ok(0)` at end of stream.
pub fn try_read(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(64);
    }
    let offered = buf.capacity() - buf.len();
    let fd = stream.as_raw_fd();
    let mut got = 0;
    let r = stream.try_io(Interest::READABLE, || {
        let n = recv_into(fd, buf)?;
        got = n;
        if n > 0 && n < offered {
            // Drained: clear the readiness now rather than by a failing recv.
            Err(ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match r {
        Err(e) if e.kind() == ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// Reads what is available once `stream` is readable; otherwise registers
/// for readability through the socket's single reader slot (see
/// [`poll_when_ready`]). For hand-written polls that wait on several sockets.
pub fn poll_read(
    stream: &TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    poll_when_ready(
        cx,
        |cx| stream.poll_read_ready(cx),
        || try_read(stream, buf),
    )
}

/// Runs `attempt` once the socket is ready, until it does not say
/// `WouldBlock`, waiting in between through `ready`: the socket's single
/// reader or writer slot (`poll_read_ready`/`poll_write_ready`), not a waiter
/// queued under the socket's lock (`readable()`) and unlinked again when the
/// future is dropped, which `select!` does every time round. So only one
/// task may wait on a given socket this way at a time, as here: a socket
/// belongs to one client task while it is in use. Asking for readiness first
/// makes the common case of a socket with nothing new (each `select!` turn
/// polls every open branch) cost one flag check, with no attempt and no
/// error value.
fn poll_when_ready<T>(
    cx: &mut Context<'_>,
    ready: impl Fn(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut attempt: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        match ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        match attempt() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// Sends as much of `buf` as the socket takes now (one `send`, not a
/// vectored `writev` through the VFS layer) and drops what was sent.
/// `Err(WouldBlock)` when the socket is full.
pub fn try_send(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let n = stream.try_io(Interest::WRITABLE, || send_from(fd, buf))?;
    bytes::Buf::advance(buf, n);
    Ok(n)
}

/// `recv(2)` into `buf`'s spare capacity, as one plain system call: glibc's
/// `recv` wrapper, being a cancellation point, adds bookkeeping around it
/// that costs about as much as the rest of a read's user-space work.
fn recv_into(fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let n = retrying(|| {
        // SAFETY: the kernel writes at most `spare.len()` bytes at
        // `spare`, memory `buf` owns and does not read before `set_len`.
        unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                spare.as_mut_ptr(),
                spare.len(),
                0,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        }
    })?;
    // SAFETY: the kernel initialized the first `n` spare bytes.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `send(2)` of `buf` (no SIGPIPE), as one plain system call (see
/// [`recv_into`]).
fn send_from(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    retrying(|| {
        // SAFETY: the kernel reads at most `buf.len()` bytes at `buf`.
        unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                buf.as_ptr(),
                buf.len(),
                libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::socklen_t,
            )
        }
    })
}

/// A system call's result as a byte count, made again when a signal
/// interrupted it.
fn retrying(mut call: impl FnMut() -> libc::c_long) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until `stream` is writable and sends part of `buf` (see
/// [`try_send`]); the wait uses the socket's writer slot (see
/// [`poll_when_ready`]).
pub async fn send(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        poll_when_ready(
            cx,
            |cx| stream.poll_write_ready(cx),
            || try_send(stream, buf),
        )
    })
    .await
}

/// Sends all of `buf`.
pub async fn send_all(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<()> {
    while !buf.is_empty() {
        if send(stream, buf).await? == 0 {
            return Err(ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}
