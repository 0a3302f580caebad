//! Ends that are not a clean release: a vanished client's server cleaned
//! up (or closed), a lost server, and a read a replica refused (run again on
//! the primary).

use super::*;
use crate::client::txn::Verdict;

impl Session {
    /// A read the replica refused: as a write (`statement_at_fault`), its
    /// statement goes to the primary from now on (logged once, literals
    /// masked); either way the client's bytes are put back to run there now.
    pub(super) fn misrouted(&mut self, replay: BytesMut, statement_at_fault: bool) {
        let opaque = self.param_facts().opaque_literals;
        if statement_at_fault
            && let (Some(h), Some(sql)) = (
                &self.health,
                first_statement(&replay, self.limit, &self.statements),
            )
        {
            let fingerprint = crate::stats::fingerprint::hash_and_template(sql).0;
            if h.remember_misrouted(fingerprint) {
                let shape = crate::client::txn::shape_in(&self.shared.stats.shapes, sql, opaque);
                tracing::warn!(
                    database = %self.database,
                    statement = %shape.text,
                    "a replica refused a read as a write (25006): run again on the primary, and sent there from now on (a function that writes? list it in write_functions)"
                );
            }
        }
        let mut buf = BytesMut::with_capacity(replay.len() + self.buf.len());
        buf.extend_from_slice(&replay);
        buf.extend_from_slice(&self.buf);
        self.buf = buf;
    }

    /// The client left (or must be closed) while holding `server`: make the
    /// server clean for the next client, or close it.
    pub(super) async fn clean_up(
        &mut self,
        mut server: PooledConn,
        t: &Tracker,
        mid_message: bool,
    ) {
        watchdog::phase(Phase::CleanUp);
        let conn = server.conn();
        if self.pinned.is_some() {
            // Its session state (listeners, locks, temp tables) dies with it.
            return server.release(Release::Close);
        }
        let verdict = t.verdict(mid_message || !conn.buf.is_empty());
        if verdict == Verdict::Close {
            // A query or COPY is still running: stop it, then drop the connection.
            let key = conn.cancel_key.clone();
            if t.expect.ready_owed() > 0 {
                let _ = send_cancel(key).await;
            }
            server.release(Release::Close);
            return;
        }
        let pool_settings = self.pool.settings();
        let reset = if pool_settings.mode == PoolMode::Session {
            Some(pool_settings.server_reset_query.clone()).filter(|q| !q.is_empty())
        } else {
            None
        };
        let sql = match (verdict, reset) {
            (Verdict::Reuse, None) => return server.release(Release::Reuse),
            (Verdict::Reuse, Some(reset)) => reset,
            (_, Some(reset)) => format!("ROLLBACK; {reset}"),
            (_, None) => "ROLLBACK".to_owned(),
        };
        let ok = matches!(
            tokio::time::timeout(CLEANUP_TIMEOUT, conn.run_internal(&sql)).await,
            Ok(Ok(_))
        ) && conn.tx == TxStatus::Idle;
        tracing::debug!(server = conn.id, ok, "cleaned up after departed client");
        server.release(if ok { Release::Reuse } else { Release::Close });
    }

    /// Tells the client its server died: every owed ReadyForQuery gets an
    /// error first; an unsynced batch is skipped until its Sync; a client idle
    /// in the transaction gets the error on its next request.
    pub(super) fn server_lost(&mut self, t: &Tracker, reason: String) {
        let err = || ClientError::ServerLost(reason.clone());
        for _ in 0..t.expect.ready_owed() {
            err().write_to(&mut self.out);
            write::ready_for_query(&mut self.out, TxStatus::Idle);
        }
        if t.batch != crate::client::txn::Batch::Synced {
            err().write_to(&mut self.out);
            self.skip_until_sync = true;
        } else if t.expect.ready_owed() == 0 && t.status != TxStatus::Idle {
            self.owe_error = Some(err());
        }
    }
}
