//! The HTTP endpoint for operators: `/metrics` (OpenMetrics text, encoded
//! by `prometheus-client` from live state at each scrape, or Prometheus's
//! text 0.0.4 when the client does not ask for OpenMetrics),
//! `/healthz` (the process is alive) and `/readyz` (every database's primary
//! accepts connections).
//!
//! Deliberately small: HTTP/1.x `GET`/`HEAD`, one request per connection,
//! bounded request size and time. Nothing here touches the data path.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::Shared;

pub mod metrics;

/// The media type of OpenMetrics, in a request's Accept header.
const OPENMETRICS: &str = "application/openmetrics-text";
/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/readyz` waits for a primary to accept a connection.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// A request head: method, path, and the Authorization and Accept headers.
struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    accept: Option<String>,
}

/// Reads a request head: the method and path of its first line, and the
/// Authorization header.
async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = std::str::from_utf8(&buf).ok()?;
    let mut lines = head.lines();
    let mut parts = lines.next()?.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?;
    let path = target.split('?').next().unwrap_or(target).to_owned();
    let headers: Vec<(&str, &str)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    Some(Request {
        method,
        path,
        authorization: header("authorization"),
        accept: header("accept"),
    })
}

/// Whether `authorization` satisfies `[metrics]`'s auth settings (true when
/// none is set). Compared in constant time.
fn authorized(m: &crate::config::schema::Metrics, authorization: Option<&str>) -> bool {
    use base64::Engine;
    if !m.requires_auth() {
        return true;
    }
    let Some(given) = authorization else {
        return false;
    };
    let eq = crate::auth::constant_time_eq;
    let (scheme, value) = given.split_once(' ').unwrap_or((given, ""));
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return m
            .auth_token
            .as_deref()
            .is_some_and(|t| eq(t.as_bytes(), value.as_bytes()));
    }
    if scheme.eq_ignore_ascii_case("basic")
        && let (Some(u), Some(p)) = (&m.auth_user, &m.auth_password)
        && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value)
    {
        return eq(format!("{u}:{p}").as_bytes(), &decoded);
    }
    false
}

async fn handle(mut stream: TcpStream, shared: Arc<Shared>) {
    let Ok(Some(request)) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await
    else {
        let _ = respond(&mut stream, 400, "text/plain", "bad request\n", false).await;
        return;
    };
    let Request {
        method,
        path,
        authorization,
        accept,
    } = request;
    let head = method == "HEAD";
    // /healthz says only that the process answers: probes need no secret.
    if path != "/healthz"
        && !authorized(&shared.settings().config.metrics, authorization.as_deref())
    {
        let _ = respond(
            &mut stream,
            401,
            "text/plain",
            "authentication required\n",
            head,
        )
        .await;
        return;
    }
    if method != "GET" && !head {
        let _ = respond(&mut stream, 405, "text/plain", "only GET and HEAD\n", head).await;
        return;
    }
    let _ = match path.as_str() {
        "/metrics" => match metrics::render(&shared) {
            // OpenMetrics to those who ask for it (Prometheus does), the
            // classic text to everyone else (promtool, curl), as the
            // official client libraries negotiate.
            Ok(body) if accept.as_deref().is_some_and(|a| a.contains(OPENMETRICS)) => {
                respond(
                    &mut stream,
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    &body,
                    head,
                )
                .await
            }
            Ok(body) => {
                respond(
                    &mut stream,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &metrics::classic::from_openmetrics(&body),
                    head,
                )
                .await
            }
            Err(e) => {
                tracing::error!(error = %e, "encoding metrics failed");
                respond(&mut stream, 500, "text/plain", "encoding failed\n", head).await
            }
        },
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n", head).await,
        "/readyz" => {
            let (ok, body) = ready(&shared).await;
            respond(
                &mut stream,
                if ok { 200 } else { 503 },
                "text/plain",
                &body,
                head,
            )
            .await
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n", head).await,
    };
}

/// Whether every configured database's primary accepts a TCP connection.
pub async fn ready(shared: &Shared) -> (bool, String) {
    let settings = shared.settings();
    // The backend that takes writes: the primary, or the replica that
    // replaced it after a failover.
    let targets: Vec<(String, String)> = settings
        .config
        .databases
        .iter()
        .map(|(name, db)| {
            let addr = match shared.registry.health(name) {
                Some(h) if h.writer() > 0 => {
                    let w = h.writer_backend();
                    format!("{}:{}", w.host, w.port)
                }
                _ => format!("{}:{}", db.host, db.port),
            };
            (name.clone(), addr)
        })
        .collect();
    let checks = targets.into_iter().map(|(name, addr)| async move {
        let r = tokio::time::timeout(READY_TIMEOUT, TcpStream::connect(&addr)).await;
        let ok = matches!(r, Ok(Ok(_)));
        (name, addr, ok)
    });
    let results = futures_join(checks).await;
    let mut body = String::new();
    let mut all = true;
    for (name, addr, ok) in results {
        all &= ok;
        body.push_str(&format!(
            "{name}: primary {addr} {}\n",
            if ok { "reachable" } else { "unreachable" }
        ));
    }
    // Replicas do not decide readiness (reads fall back to the primary),
    // but a backend whose checks fail says why.
    for name in settings.config.databases.keys() {
        let Some(h) = shared.registry.health(name) else {
            continue;
        };
        let all = std::iter::once(("primary", &h.primary))
            .chain(h.replicas.iter().map(|r| ("replica", r)));
        for (role, b) in all {
            if let Some(p) = b.problem() {
                body.push_str(&format!("{name}: {role} {}:{} down: {p}\n", b.host, b.port));
            }
        }
    }
    // A shared rate-limit backend that is down does not make tidepool
    // unready (limits go on locally), but says so.
    if let Some(b) = shared.rate_limits.backend() {
        body.push_str(&format!(
            "rate_limit_backend: redis {} {}\n",
            b.target,
            if b.is_up() {
                "reachable (limits shared)".to_owned()
            } else {
                format!("unreachable (local limits, share 1/{})", b.instances)
            }
        ));
    }
    if shared
        .lifecycle
        .shutting_down
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        all = false;
        body.push_str("shutting down\n");
    }
    (all, body)
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        401 => "Unauthorized",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n{}\r\n",
        body.len(),
        if status == 401 {
            "www-authenticate: Bearer, Basic realm=\"tidepool\"\r\n"
        } else {
            ""
        }
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}
