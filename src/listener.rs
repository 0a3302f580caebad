//! Accept loop: one task per client. Client limits and SSL/GSSENC answers
//! happen in the client's own startup phase, so a slow client never slows
//! the accept loop.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::client::{self, Shared};

/// Accepts until `shutdown` resolves.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(crate::watchdog::Watched::new(
                        0,
                        client::serve(stream, shared.clone()),
                    ));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}
