//! Passing file descriptors between processes over a Unix stream socket
//! (SCM_RIGHTS): the listening sockets and, client by client, the
//! connections a takeover moves (`upgrade`, `client::migrate`).
//!
//! Invariants: every descriptor received is owned at once (closed if
//! dropped); a control message cut short by the kernel (MSG_CTRUNC) is an
//! error, never a silent loss.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 32;

/// Control-message buffer for up to [`MAX_FDS`] descriptors, aligned for
/// `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 256]);

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// One `sendmsg` of `data` carrying `fds`; returns how many bytes of `data`
/// went (the descriptors go with the first byte). Non-blocking sockets give
/// `WouldBlock` as usual.
pub fn send(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
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
        if !fds.is_empty() {
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(invalid("no room for the descriptors"));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
        let n = libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// One `recvmsg` into `data`; the descriptors that came with it are pushed
/// to `fds`. Returns the bytes read (0: the peer closed).
pub fn recv(socket: RawFd, data: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cbuf = CmsgBuf([0; 256]);
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: as in `send`; the kernel writes at most `msg_controllen`
    // bytes of control data and `iov_len` bytes of data, and each received
    // descriptor is owned by this process from here on (wrapped at once).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        let n = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
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
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_crosses_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        assert_eq!(send(a.as_raw_fd(), b"hello", &[y.as_raw_fd()]).unwrap(), 5);
        drop(y);
        let mut data = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv(b.as_raw_fd(), &mut data, &mut fds).unwrap();
        assert_eq!(&data[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the other end of `x`.
        let mut y2 = UnixStream::from(fds.pop().unwrap());
        x.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        y2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // No descriptors: plain bytes.
        assert_eq!(send(a.as_raw_fd(), b"x", &[]).unwrap(), 1);
        let n = recv(b.as_raw_fd(), &mut data, &mut fds).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        assert!(send(a.as_raw_fd(), b"x", &[0; MAX_FDS + 1]).is_err());
    }
}
