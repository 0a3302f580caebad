//! The listener connection of one hub: connects to the primary with the
//! pool's settings, listens on the channels its clients want (and stops on
//! those nobody wants), queues each notification for the channel's clients,
//! and re-connects after a loss, telling every client that notifications
//! may have been missed.
//!
//! Invariant: `confirmed` changes only after the server answered the
//! LISTEN or UNLISTEN, and is emptied whenever the connection is gone.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::{Hub, ListenError, lock, quote_ident, split_messages};
use crate::protocol::BackendTag;
use crate::protocol::frame::read_frame;
use crate::server::ServerConn;

type Ack = oneshot::Sender<Result<(), ListenError>>;

/// Largest message read from the listener connection (a notification's
/// payload is at most 8,000 bytes).
const LIMIT: usize = 1 << 20;

/// Wait before connecting again after a failure or a loss.
const RETRY: Duration = Duration::from_secs(1);

pub(super) async fn run(hub: Arc<Hub>, mut rx: mpsc::UnboundedReceiver<Option<Ack>>) {
    let mut acks: Vec<Ack> = Vec::new();
    let mut ever_connected = false;
    loop {
        if hub.state().channels.is_empty() {
            answer(&mut acks, Ok(()));
            match rx.recv().await {
                None => return,
                Some(a) => {
                    acks.extend(a);
                    continue;
                }
            }
        }
        let spec = lock(&hub.pool).connect_spec();
        let mut conn = match crate::server::connect(&spec).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(database = %hub.database, error = %e, "cannot open the LISTEN connection to the primary; retrying");
                answer(&mut acks, Err(ListenError(e.to_string())));
                if !pause(&mut rx, &mut acks).await {
                    return;
                }
                continue;
            }
        };
        if ever_connected {
            if let Some(l) = hub.listeners.upgrade() {
                l.reconnects.fetch_add(1, Relaxed);
            }
            // What was sent while no connection listened is lost.
            hub.lost_some();
        }
        // Named in pg_stat_activity for the DBA.
        if let Err(e) = conn
            .run_collecting("SET application_name = 'tidepool listener'")
            .await
        {
            tracing::warn!(database = %hub.database, error = %e, "LISTEN connection failed at once; retrying");
            if !pause(&mut rx, &mut acks).await {
                return;
            }
            continue;
        }
        ever_connected = true;
        hub.state().connected = true;
        tracing::info!(database = %hub.database, pid = conn.cancel_key.pid, "LISTEN connection to the primary open");
        let why = serve(&hub, &mut conn, &mut rx, &mut acks).await;
        {
            let mut s = hub.state();
            s.connected = false;
            s.confirmed.clear();
        }
        match why {
            None => return,
            Some(e) => {
                tracing::warn!(database = %hub.database, error = %e, "LISTEN connection to the primary lost; re-connecting");
                answer(&mut acks, Err(ListenError(e)));
                if !pause(&mut rx, &mut acks).await {
                    return;
                }
            }
        }
    }
}

/// Waits [`RETRY`], failing the LISTENs that come meanwhile (a client
/// should not wait on a primary that is down). False: the hub is gone.
async fn pause(rx: &mut mpsc::UnboundedReceiver<Option<Ack>>, acks: &mut Vec<Ack>) -> bool {
    let until = tokio::time::Instant::now() + RETRY;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            a = rx.recv() => match a {
                None => return false,
                Some(a) => {
                    acks.extend(a);
                    answer(acks, Err(ListenError("re-connecting to the primary".into())));
                }
            },
        }
    }
}

fn answer(acks: &mut Vec<Ack>, r: Result<(), ListenError>) {
    for a in acks.drain(..) {
        let _ = a.send(r.clone());
    }
}

/// Listens and delivers until the connection fails (Some(reason)) or the
/// hub is gone (None).
async fn serve(
    hub: &Arc<Hub>,
    conn: &mut ServerConn,
    rx: &mut mpsc::UnboundedReceiver<Option<Ack>>,
    acks: &mut Vec<Ack>,
) -> Option<String> {
    loop {
        // Subscriptions made before this round trip start get what the
        // connection reads after it.
        let joining = hub.inactive();
        if let Err(e) = sync(hub, conn, !joining.is_empty() || !acks.is_empty()).await {
            return Some(e);
        }
        hub.activate(&joining);
        answer(acks, Ok(()));
        tokio::select! {
            a = rx.recv() => match a {
                None => return None,
                Some(a) => {
                    acks.extend(a);
                    while let Ok(a) = rx.try_recv() {
                        acks.extend(a);
                    }
                }
            },
            frame = read_frame(&mut conn.stream, &mut conn.buf, LIMIT) => match frame {
                Err(e) => return Some(crate::server::ServerError::from(e).to_string()),
                Ok(f) => match BackendTag::from_byte(f.tag) {
                    BackendTag::NotificationResponse => {
                        let mut whole = BytesMut::with_capacity(f.body.len() + 5);
                        crate::protocol::write::message(&mut whole, f.tag, |b| {
                            b.extend_from_slice(&f.body)
                        });
                        deliver(hub, whole.freeze());
                    }
                    BackendTag::ErrorResponse => {
                        let why = crate::protocol::messages::error_fields(&f.body)
                            .map(|e| format!("{} ({})", e.message, e.code))
                            .unwrap_or_else(|e| e.to_string());
                        return Some(why);
                    }
                    // ParameterStatus, NoticeResponse: nothing to do.
                    _ => {}
                },
            },
        }
    }
}

/// Makes the connection listen on exactly the channels wanted now; with
/// `barrier`, also makes at least one round trip (an empty query when
/// there is nothing to change), so that every notification sent before it
/// began has been read (and delivered to the subscribers active then).
async fn sync(hub: &Hub, conn: &mut ServerConn, mut barrier: bool) -> Result<(), String> {
    loop {
        let (add, remove) = {
            let s = hub.state();
            let add: Vec<Arc<str>> = s
                .channels
                .keys()
                .filter(|c| !s.confirmed.contains(*c))
                .cloned()
                .collect();
            let remove: Vec<Arc<str>> = s
                .confirmed
                .iter()
                .filter(|c| !s.channels.contains_key(*c))
                .cloned()
                .collect();
            (add, remove)
        };
        if add.is_empty() && remove.is_empty() {
            if barrier {
                for m in split_messages(conn.run_collecting("").await.map_err(|e| e.to_string())?) {
                    deliver(hub, m);
                }
            }
            return Ok(());
        }
        barrier = false;
        for (ch, listen) in add
            .iter()
            .map(|c| (c, true))
            .chain(remove.iter().map(|c| (c, false)))
        {
            let verb = if listen { "LISTEN" } else { "UNLISTEN" };
            let notes = conn
                .run_collecting(&format!("{verb} {}", quote_ident(ch)))
                .await
                .map_err(|e| e.to_string())?;
            for m in split_messages(notes) {
                deliver(hub, m);
            }
            let mut s = hub.state();
            if listen {
                s.confirmed.insert(ch.clone());
            } else {
                s.confirmed.remove(ch);
            }
        }
    }
}

/// Queues a whole NotificationResponse for its channel's clients.
fn deliver(hub: &Hub, message: Bytes) {
    let Some(channel) = channel_of(&message) else {
        return;
    };
    let limit = hub.queue_limit.load(Relaxed);
    hub.deliver(&channel, message, limit);
}

/// The channel named by a whole NotificationResponse.
fn channel_of(message: &[u8]) -> Option<String> {
    let body = message.get(5..)?;
    let mut b = crate::protocol::messages::Body::new(body, "NotificationResponse");
    b.i32().ok()?;
    b.cstr().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(pid: i32, channel: &str, payload: &str) -> Bytes {
        let mut b = BytesMut::new();
        crate::protocol::write::message(&mut b, b'A', |b| {
            b.extend_from_slice(&pid.to_be_bytes());
            b.extend_from_slice(channel.as_bytes());
            b.extend_from_slice(&[0]);
            b.extend_from_slice(payload.as_bytes());
            b.extend_from_slice(&[0]);
        });
        b.freeze()
    }

    #[test]
    fn messages_are_split_whole_and_named_by_channel() {
        let (a, b) = (notification(7, "jobs", "1"), notification(8, "Other", ""));
        let mut all = BytesMut::new();
        all.extend_from_slice(&a);
        all.extend_from_slice(&b);
        all.extend_from_slice(&a[..3]);
        let parts = split_messages(all);
        assert_eq!(parts, vec![a.clone(), b.clone()]);
        assert_eq!(channel_of(&a).as_deref(), Some("jobs"));
        assert_eq!(channel_of(&b).as_deref(), Some("Other"));
        assert_eq!(channel_of(&a[..7]), None);
    }
}
