//! PAUSE, RESUME, KILL and RELOAD, as PgBouncer documents them: PAUSE waits
//! for running transactions to finish, then closes the database's server
//! connections and holds new transactions until RESUME; KILL drops the
//! database's clients and servers at once and leaves it paused.

use std::sync::Arc;

use bytes::BytesMut;

use super::AdminError;
use super::output::command_complete;
use crate::client::Shared;
use crate::client::list::Eviction;

/// The databases a command applies to: the one named (which must exist), or all.
fn targets(shared: &Shared, db: Option<&str>) -> Result<Vec<String>, AdminError> {
    let settings = shared.settings();
    match db {
        Some(d) if settings.config.databases.contains_key(d) => Ok(vec![d.to_owned()]),
        Some(d) if crate::client::startup::ADMIN_DATABASES.contains(&d) => Err(AdminError::State(
            format!("the admin database {d} cannot be paused, resumed or killed"),
        )),
        Some(d) => Err(AdminError::NoDatabase(d.to_owned())),
        None => Ok(crate::lifecycle::pause_targets(shared, None)),
    }
}

pub async fn pause(
    shared: &Arc<Shared>,
    db: Option<&str>,
    out: &mut BytesMut,
) -> Result<(), AdminError> {
    let dbs = targets(shared, db)?;
    if dbs.iter().all(|d| shared.registry.control(d).is_paused()) {
        return Err(AdminError::State(match db {
            Some(d) => format!("database {d} is already paused"),
            None => "already paused".into(),
        }));
    }
    crate::lifecycle::pause(shared, db)
        .await
        .map_err(|e| AdminError::State(format!("PAUSE canceled: {e}")))?;
    command_complete(out, "PAUSE");
    Ok(())
}

pub fn resume(shared: &Shared, db: Option<&str>, out: &mut BytesMut) -> Result<(), AdminError> {
    targets(shared, db)?;
    if crate::lifecycle::resume(shared, db).is_empty() {
        return Err(AdminError::State(match db {
            Some(d) => format!("database {d} is not paused"),
            None => "pooler is not paused".into(),
        }));
    }
    command_complete(out, "RESUME");
    Ok(())
}

pub fn kill(shared: &Shared, db: Option<&str>, out: &mut BytesMut) -> Result<(), AdminError> {
    targets(shared, db)?;
    let dbs = crate::lifecycle::hold(shared, db);
    let mut killed = 0;
    for c in shared.list.all() {
        if dbs.iter().any(|d| **d == *c.database()) {
            c.evict(Eviction::Killed);
            killed += 1;
        }
    }
    shared.lot.wake_evicted();
    crate::lifecycle::close_idle_of(shared, &dbs);
    tracing::warn!(databases = ?dbs, clients = killed, "KILL: clients and server connections dropped; paused until RESUME");
    command_complete(out, "KILL");
    Ok(())
}

pub fn reload(shared: &Shared, out: &mut BytesMut) -> Result<(), AdminError> {
    let kept = crate::lifecycle::reload(shared).map_err(|e| AdminError::Reload(e.to_string()))?;
    for setting in kept {
        crate::protocol::write::notice_response(
            out,
            "01000",
            &format!("{setting} changes only on restart; the running value stays in force"),
        );
    }
    command_complete(out, "RELOAD");
    Ok(())
}
