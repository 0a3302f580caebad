//! A network namespace joined to this one by a veth pair, with TCP relays
//! on both sides, so that a connection to a local server can be routed
//! across the pair and the pair cut: the kernel then drops what crosses it
//! (no data, no reset: a network partition as both ends see it) until it is
//! healed. Needs root and `ip` (iproute2); `Netns::new` says why not when
//! the machine cannot make one.
//!
//! Path of a connection to `Link::port` on `Link::addr` (the namespace's
//! address): this namespace → veth → relay inside the namespace → veth →
//! relay on this side (on the host's veth address) → 127.0.0.1:target.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;

pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A fresh namespace and veth pair, or why this machine cannot make one.
    pub fn new() -> Result<Netns, String> {
        let pid = std::process::id();
        let name = format!("tp{pid}");
        let third = (pid % 250) as u8;
        let n = Netns {
            host_if: format!("{name}h"),
            ns_if: format!("{name}n"),
            host_addr: Ipv4Addr::new(10, 253, third, 1),
            ns_addr: Ipv4Addr::new(10, 253, third, 2),
            name,
        };
        ip(&["netns", "add", &n.name])?;
        // From here on, Drop removes what was made.
        let host_cidr = format!("{}/30", n.host_addr);
        let ns_cidr = format!("{}/30", n.ns_addr);
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if,
        ])?;
        ip(&["link", "set", &n.ns_if, "netns", &n.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &n.host_if])?;
        ip(&["link", "set", &n.host_if, "up"])?;
        ip(&["-n", &n.name, "addr", "add", &ns_cidr, "dev", &n.ns_if])?;
        ip(&["-n", &n.name, "link", "set", &n.ns_if, "up"])?;
        ip(&["-n", &n.name, "link", "set", "lo", "up"])?;
        Ok(n)
    }

    /// Cuts the link: the namespace's end goes down, and what the host
    /// sends across is dropped.
    pub fn cut(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]).expect("cut the link");
    }

    /// Heals the link.
    pub fn heal(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"]).expect("heal the link");
    }

    /// Runs `f` on a thread that has entered the namespace (sockets made
    /// there belong to it, whatever thread uses them later).
    fn inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on this (new, short-lived) thread with a valid
            // namespace descriptor; only this thread changes namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
    }

    /// Relays across the link to 127.0.0.1:`target`: returns the
    /// namespace-side address to connect to.
    pub async fn link_to(&self, target: u16) -> SocketAddr {
        use tokio::net::{TcpListener, TcpStream};
        // This side: the host's veth address → the target.
        let host = TcpListener::bind((self.host_addr, 0))
            .await
            .expect("host relay");
        let host_port = host.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut a, _)) = host.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut b) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
        });
        // Inside: the namespace's address → across the veth to this side.
        let ns_addr = self.ns_addr;
        let inner = self
            .inside(move || std::net::TcpListener::bind((ns_addr, 0)))
            .expect("relay inside the namespace");
        inner.set_nonblocking(true).unwrap();
        let at = inner.local_addr().unwrap();
        let inner = TcpListener::from_std(inner).unwrap();
        let name = self.name.clone();
        let host_addr = self.host_addr;
        tokio::spawn(async move {
            while let Ok((mut a, _)) = inner.accept().await {
                let path = format!("/run/netns/{name}");
                tokio::spawn(async move {
                    // The outgoing leg is made inside the namespace too.
                    let made = tokio::task::spawn_blocking(move || {
                        std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
                            let ns = std::fs::File::open(&path)?;
                            // SAFETY: as in `inside`.
                            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            std::net::TcpStream::connect((host_addr, host_port))
                        })
                        .join()
                    })
                    .await;
                    let Ok(Ok(Ok(b))) = made else { return };
                    let _ = b.set_nonblocking(true);
                    let Ok(mut b) = TcpStream::from_std(b) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                });
            }
        });
        at
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
