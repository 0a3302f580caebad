//! Pins that end: at a transaction boundary after a statement that may
//! have ended the session state a client was pinned for, the server says
//! what it still holds, and the client goes back to sharing servers once
//! nothing is left.
//!
//! Invariant: asked only with the server idle and quiet (nothing owed,
//! nothing half sent), so the question is a transaction of its own.

use super::*;

impl Session {
    /// Whether the pin ended: true (the pin is released) when the server
    /// holds no session state for the client any more; false when some
    /// remains (the reason shown follows what remains) or the server could
    /// not tell (the pin stays: erring towards keeping the state).
    pub(super) async fn pin_ended(&mut self, server: &mut PooledConn) -> bool {
        if self.pinned.is_none() {
            return true;
        }
        let answer = server.conn().session_state().await;
        let id = self.listed.info.id;
        match answer {
            Ok((state, notifications)) => {
                // Notifications of a listening (pinned) client are its own.
                self.out.extend_from_slice(&notifications);
                match (state.map(|s| s.reason()), self.pinned.take()) {
                    (Some(None), Some(pin)) => {
                        tracing::info!(
                            client = id,
                            reason = pin.reason(),
                            "client unpinned: its session state is gone"
                        );
                        pin.release();
                        true
                    }
                    (Some(Some(reason)), Some(mut pin)) => {
                        pin.now_for(reason);
                        self.pinned = Some(pin);
                        false
                    }
                    (None, pin) => {
                        self.pinned = pin;
                        false
                    }
                    (_, None) => true,
                }
            }
            Err(e) => {
                tracing::debug!(client = id, error = %e, "session state check failed; the client stays pinned");
                false
            }
        }
    }
}
