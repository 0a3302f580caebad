//! TCP keepalive and user timeout on a socket (`[tidepool] tcp_keepalive`,
//! `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt`, `tcp_user_timeout`),
//! applied to client and server connections alike. A zero setting leaves
//! the operating system's default.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// The settings, as the config gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    pub enabled: bool,
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    pub user_timeout: Duration,
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive {
            enabled: true,
            idle: Duration::ZERO,
            interval: Duration::ZERO,
            count: 0,
            user_timeout: Duration::ZERO,
        }
    }
}

fn set(fd: i32, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: passes a pointer to an i32 and its size, as setsockopt wants.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Applies `k` to `socket`.
pub fn apply(socket: &impl AsRawFd, k: &KeepAlive) -> std::io::Result<()> {
    let fd = socket.as_raw_fd();
    set(
        fd,
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        i32::from(k.enabled),
    )?;
    if k.enabled {
        if !k.idle.is_zero() {
            set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(k.idle))?;
        }
        if !k.interval.is_zero() {
            set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(k.interval))?;
        }
        if k.count > 0 {
            set(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPCNT,
                i32::try_from(k.count).unwrap_or(i32::MAX),
            )?;
        }
    }
    if !k.user_timeout.is_zero() {
        let ms = i32::try_from(k.user_timeout.as_millis()).unwrap_or(i32::MAX);
        set(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(fd: i32, level: i32, name: i32) -> i32 {
        let mut v: i32 = 0;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: reads an i32 option into `v`.
        let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
        assert_eq!(r, 0);
        v
    }

    #[test]
    fn every_setting_reaches_the_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let k = KeepAlive {
            enabled: true,
            idle: Duration::from_secs(17),
            interval: Duration::from_secs(5),
            count: 4,
            user_timeout: Duration::from_millis(12_345),
        };
        apply(&s, &k).unwrap();
        let fd = s.as_raw_fd();
        assert_eq!(get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 17);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 5);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 4);
        assert_eq!(get(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 12_345);
        apply(
            &s,
            &KeepAlive {
                enabled: false,
                ..k
            },
        )
        .unwrap();
        assert_eq!(get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
    }
}
