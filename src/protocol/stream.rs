//! A client's or a server's connection: a TCP socket, plain or under TLS.
//!
//! Plain sockets keep the one-system-call reads of `protocol::io`. Under
//! TLS the same calls (try_read, poll_read, try_send, send) go through a
//! rustls connection driven without blocking: a read takes one chunk of
//! records from the socket and hands back every byte of plaintext they hold
//! (nothing is left inside rustls for a wait on the socket to miss); a send
//! encrypts what it is given and writes what the socket takes. Records the
//! socket did not take are written before any more plaintext is accepted
//! (the socket's backpressure stays the caller's), and by every read poll
//! (a connection that only waits to read still finishes its writes).
//!
//! Invariant: the rustls state sits behind a mutex that is never held across
//! an await; the forwarding loop reads and writes through one `&Stream`.

use std::io::{self, ErrorKind, Read, Write};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Plaintext accepted per send under TLS (a few records).
const TLS_SEND_CHUNK: usize = 64 * 1024;

pub struct Stream {
    tcp: TcpStream,
    /// Boxed: a plain connection pays 8 bytes, not rustls' kilobyte.
    tls: Option<Box<Mutex<Tls>>>,
}

struct Tls {
    conn: rustls::Connection,
}

/// A TLS session away from its socket (a parked client's).
pub struct TlsSession(Box<Mutex<Tls>>);

/// `io::Read`/`io::Write` over a socket without waiting (`WouldBlock`).
struct Nonblocking<'a>(&'a TcpStream);

impl Read for Nonblocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Nonblocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

impl Tls {
    /// Writes the records rustls holds; `Ok(true)` when none is left.
    fn flush(&mut self, tcp: &TcpStream) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Nonblocking(tcp)) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Moves every byte of plaintext rustls holds into `buf`; `Ok(None)`
    /// when the peer closed the TLS session.
    fn drain(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let mut chunk = [0u8; 8192];
        let mut got = 0;
        loop {
            match self.conn.reader().read(&mut chunk) {
                Ok(0) => return Ok(if got == 0 { None } else { Some(got) }),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    got += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Some(got)),
                // The peer closed the socket without close_notify.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    return Ok(if got == 0 { None } else { Some(got) });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One read without waiting: plaintext already held, else one chunk of
    /// records from the socket. `Ok(0)` at the end of the stream.
    fn try_read(&mut self, tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.drain(buf)? {
                None => return Ok(0),
                Some(n) if n > 0 => return Ok(n),
                Some(_) => {}
            }
            let n = match self.conn.read_tls(&mut Nonblocking(tcp)) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Records queued by the last read (an alert, a key
                    // update) go out while the caller waits.
                    self.flush(tcp)?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let state = self.conn.process_new_packets();
            // An alert rustls wants to send about a bad record goes first.
            let _ = self.flush(tcp);
            let state = state.map_err(tls_error)?;
            if n == 0 {
                // End of the socket: what plaintext is left, then the end.
                let left = self.drain(buf)?.unwrap_or(0);
                return Ok(left);
            }
            if state.peer_has_closed() && state.plaintext_bytes_to_read() == 0 {
                return Ok(0);
            }
        }
    }

    /// Encrypts up to a chunk of `buf` once earlier records are written.
    fn try_send(&mut self, tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
        if !self.flush(tcp)? {
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = self
            .conn
            .writer()
            .write(&buf[..buf.len().min(TLS_SEND_CHUNK)])?;
        buf.advance(n);
        self.flush(tcp)?;
        Ok(n)
    }
}

impl Stream {
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream { tcp, tls: None }
    }

    /// A socket whose TLS handshake is done; plaintext the handshake read
    /// beyond itself is still in `conn` (the first read returns it).
    pub fn tls(tcp: TcpStream, conn: rustls::Connection) -> Stream {
        Stream {
            tcp,
            tls: Some(Box::new(Mutex::new(Tls { conn }))),
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, Tls>> {
        self.tls
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The socket and the TLS session apart (parking: the socket waits in
    /// the lot, the session with it); [`Stream::from_parts`] joins them.
    pub fn into_parts(self) -> (TcpStream, Option<TlsSession>) {
        (self.tcp, self.tls.map(TlsSession))
    }

    pub fn from_parts(tcp: TcpStream, tls: Option<TlsSession>) -> Stream {
        Stream {
            tcp,
            tls: tls.map(|t| t.0),
        }
    }

    /// Whether the TLS session holds nothing (no plaintext to hand out, no
    /// records to write): the socket alone then says when there is more.
    pub fn is_quiet(&self) -> bool {
        self.lock()
            .is_none_or(|t| !t.conn.wants_write() && t.conn.wants_read())
    }

    /// The socket, for a plain stream (parking, handshakes).
    pub fn into_tcp(self) -> Result<TcpStream, Box<Stream>> {
        match self.tls {
            None => Ok(self.tcp),
            Some(_) => Err(Box::new(self)),
        }
    }

    /// Cheap liveness check of an idle connection: a closed socket or
    /// unsolicited data (a FATAL at server shutdown) mean it is unusable.
    /// Under TLS, records that carry no data (a session ticket, a key
    /// update) are taken in and do not count.
    pub fn looks_alive(&self) -> bool {
        let Some(mut t) = self.lock() else {
            let mut probe = [0u8; 1];
            return matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock);
        };
        loop {
            match t.conn.read_tls(&mut Nonblocking(&self.tcp)) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Ok(0) | Err(_) => return false,
                Ok(_) => match t.conn.process_new_packets() {
                    Ok(state) if state.peer_has_closed() || state.plaintext_bytes_to_read() > 0 => {
                        return false;
                    }
                    Ok(_) => {}
                    Err(_) => return false,
                },
            }
        }
    }

    /// The peer's certificate (DER), when it showed one.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let t = self.lock()?;
        Some(t.conn.peer_certificates()?.first()?.to_vec())
    }

    /// What was negotiated, in two bytes: the cipher suite's code (which
    /// implies the protocol version; 0: plain). See [`tls_text`].
    pub fn tls_code(&self) -> u16 {
        let Some(t) = self.lock() else {
            return 0;
        };
        t.conn
            .negotiated_cipher_suite()
            .map_or(0, |s| u16::from(s.suite()))
    }

    /// What was negotiated (`TLSv1.3/TLS13_AES_256_GCM_SHA384`), or empty.
    pub fn tls_summary(&self) -> String {
        tls_text(self.tls_code())
    }

    /// Reads what is available into `buf` without waiting (see
    /// `protocol::io::try_read`).
    #[inline]
    pub fn try_read(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match &self.tls {
            None => super::io::try_read(&self.tcp, buf),
            Some(_) => self.try_read_tls(buf),
        }
    }

    #[inline(never)]
    fn try_read_tls(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self.lock() {
            Some(mut t) => t.try_read(&self.tcp, buf),
            None => super::io::try_read(&self.tcp, buf),
        }
    }

    /// Reads what is available once the socket is readable (see
    /// `protocol::io::poll_read`); under TLS, also writes records left over.
    #[inline]
    pub fn poll_read(&self, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match &self.tls {
            None => super::io::poll_read(&self.tcp, buf, cx),
            Some(_) => self.poll_read_tls(buf, cx),
        }
    }

    #[inline(never)]
    fn poll_read_tls(&self, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if let Some(mut t) = self.lock()
            && t.conn.wants_write()
        {
            match t.flush(&self.tcp) {
                Ok(true) => {}
                Ok(false) => {
                    // Woken when the socket takes more.
                    let _ = self.tcp.poll_write_ready(cx);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        loop {
            // Plaintext rustls holds comes first, whatever the socket says.
            match self.try_read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => return Poll::Ready(other),
            }
            // The socket said WouldBlock (its readiness is cleared): wait.
            std::task::ready!(self.tcp.poll_read_ready(cx))?;
        }
    }

    /// Waits until a read may find something: the socket is readable, or
    /// (under TLS, where rustls may hold plaintext) at once.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tls.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    /// Sends what the socket takes now (see `protocol::io::try_send`).
    #[inline]
    pub fn try_send(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match &self.tls {
            None => super::io::try_send(&self.tcp, buf),
            Some(_) => self.try_send_tls(buf),
        }
    }

    #[inline(never)]
    fn try_send_tls(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self.lock() {
            Some(mut t) => t.try_send(&self.tcp, buf),
            None => super::io::try_send(&self.tcp, buf),
        }
    }

    /// Sends once the socket is writable (see `protocol::io::send`). A plain
    /// socket's future is `io::send`'s own.
    #[inline]
    pub fn send<'a>(
        &'a self,
        buf: &'a mut BytesMut,
    ) -> impl std::future::Future<Output = io::Result<usize>> + 'a {
        use futures_util::future::Either;
        match &self.tls {
            None => Either::Left(super::io::send(&self.tcp, buf)),
            Some(_) => Either::Right(self.send_tls(buf)),
        }
    }

    async fn send_tls(&self, buf: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            loop {
                match self.try_send(buf) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    other => return Poll::Ready(other),
                }
                std::task::ready!(self.tcp.poll_write_ready(cx))?;
            }
        })
        .await
    }

    /// Sends all of `buf`, and under TLS every record, then returns.
    pub async fn send_all(&self, buf: &mut BytesMut) -> io::Result<()> {
        while !buf.is_empty() {
            if self.send(buf).await? == 0 {
                return Err(ErrorKind::WriteZero.into());
            }
        }
        self.flush_tls().await
    }

    /// Writes the records rustls still holds.
    pub async fn flush_tls(&self) -> io::Result<()> {
        loop {
            let done = match self.lock() {
                None => true,
                Some(mut t) => t.flush(&self.tcp)?,
            };
            if done {
                return Ok(());
            }
            std::future::poll_fn(|cx| self.tcp.poll_write_ready(cx)).await?;
        }
    }

    /// Sends close_notify (under TLS) and shuts the socket down.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        if let Some(mut t) = self.lock() {
            t.conn.send_close_notify();
        }
        self.flush_tls().await?;
        tokio::io::AsyncWriteExt::shutdown(&mut self.tcp).await
    }

    /// Writes all of `data` (login and error paths).
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut buf = BytesMut::from(data);
        self.send_all(&mut buf).await
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.peer_addr()
    }

    /// Whether the socket is a Unix-domain one (a client of
    /// `unix_socket_dir`; see [`unix_as_tcp`]).
    pub fn is_unix(&self) -> bool {
        is_unix_socket(&self.tcp)
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }
}

/// A Unix-domain stream socket in a `TcpStream`: every operation tidepool
/// uses on a client socket (reads, writes, readiness, peek, shutdown) is the
/// same system call on either family, so the data path serves both with
/// one type. Only the addresses differ: `peer_addr` fails on it, which
/// callers treat as "no IP address" (see [`Stream::is_unix`]).
pub fn unix_as_tcp(s: tokio::net::UnixStream) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = s.into_std()?.into_raw_fd();
    // SAFETY: `fd` is an open stream socket this process owns (just taken
    // out of the UnixStream, which no longer closes it); the TcpStream owns
    // it from here on.
    let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

/// Whether `s` is a Unix-domain socket (see [`unix_as_tcp`]).
pub fn is_unix_socket(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: getsockname on an open socket into a zeroed sockaddr_storage
    // of the size passed.
    unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        libc::getsockname(s.as_raw_fd(), (&raw mut addr).cast(), &mut len) == 0
            && i32::from(addr.ss_family) == libc::AF_UNIX
    }
}

/// The text of a [`Stream::tls_code`] (empty for 0).
pub fn tls_text(code: u16) -> String {
    if code == 0 {
        return String::new();
    }
    // TLS 1.3's suites are 0x13xx; every other suite rustls has is 1.2's.
    let version = if code >> 8 == 0x13 {
        "TLSv1.3"
    } else {
        "TLSv1.2"
    };
    let suite = rustls::CipherSuite::from(code);
    format!("{version}/{}", suite.as_str().unwrap_or("unknown"))
}

/// Async reads for the login phase and the console (frame reads).
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tls.is_none() {
            return Pin::new(&mut this.tcp).poll_read(cx, out);
        }
        // Plaintext beyond `out`'s room stays in rustls: take only what fits.
        loop {
            {
                let Some(mut t) = this.lock() else {
                    return Poll::Ready(Ok(()));
                };
                let mut room = vec![0u8; out.remaining()];
                match t.conn.reader().read(&mut room) {
                    Ok(n) => {
                        out.put_slice(&room[..n]);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
                match t.conn.read_tls(&mut Nonblocking(&this.tcp)) {
                    Ok(0) => return Poll::Ready(Ok(())),
                    Ok(_) => {
                        let state = t.conn.process_new_packets();
                        let _ = t.flush(&this.tcp);
                        if let Err(e) = state {
                            return Poll::Ready(Err(tls_error(e)));
                        }
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            // The socket said WouldBlock (its readiness is cleared): wait.
            std::task::ready!(this.tcp.poll_read_ready(cx))?;
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tls.is_none() {
            return Pin::new(&mut this.tcp).poll_write(cx, data);
        }
        loop {
            let mut buf = BytesMut::from(data);
            match this.try_send(&mut buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::task::ready!(this.tcp.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let done = match this.lock() {
                None => true,
                Some(mut t) => t.flush(&this.tcp)?,
            };
            if done {
                return Poll::Ready(Ok(()));
            }
            std::task::ready!(this.tcp.poll_write_ready(cx))?;
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(mut t) = this.lock() {
            t.conn.send_close_notify();
        }
        std::task::ready!(Pin::new(&mut *this).poll_flush(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
