//! Background care of one pool: keep `min_pool_size` warm, close connections
//! idle past `server_idle_timeout` or older than `server_lifetime`, and drop
//! idle ones that died (e.g. server restart).

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Pool, lock};

const TICK: Duration = Duration::from_secs(1);

/// Runs until the pool is dropped.
pub async fn run(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        prune(&pool);
        warm(&pool).await;
    }
}

fn prune(pool: &Pool) {
    let retirement = pool.retirement();
    if retirement == super::Retirement::Replaced {
        pool.close_idle();
        return;
    }
    let s = pool.settings();
    // A draining pool keeps no minimum: it only serves who is left.
    let min = if retirement == super::Retirement::Draining {
        0
    } else {
        s.min_size as usize
    };
    let in_use = pool.in_use.load(std::sync::atomic::Ordering::Relaxed);
    let mut core = lock(&pool.core);
    let idle = &mut core.idle;
    let mut keep = Vec::with_capacity(idle.len());
    // Oldest-used first so the most recently used stay warm.
    idle.sort_by_key(|i| i.conn.last_used);
    let mut total = idle.len() + in_use;
    let size = s.size as usize;
    for i in idle.drain(..) {
        let dead = !i.conn.looks_alive();
        let old = !s.server_lifetime.is_zero()
            && crate::clock::coarse_since(i.conn.created) >= s.server_lifetime;
        let idle_too_long = !s.server_idle_timeout.is_zero()
            && crate::clock::coarse_since(i.conn.last_used) >= s.server_idle_timeout
            && total > min;
        // After a reload shrank the pool.
        let too_many = total > size;
        if dead || old || idle_too_long || too_many {
            tracing::debug!(pool = %pool.name(), server = i.conn.id, dead, old, idle_too_long, too_many, "closing idle server connection");
            total -= 1;
            tokio::spawn(i.conn.terminate());
        } else {
            keep.push(i);
        }
    }
    *idle = keep;
}

/// Opens connections up to `min_pool_size`, as far as the connection caps
/// (`max_db_connections`, `max_user_connections`) leave room: warming never
/// waits for a cap (a minimum above a cap is met as far as the cap allows).
async fn warm(pool: &Arc<Pool>) {
    while !pool.is_retired()
        && pool.server_count() < pool.settings().min_size as usize
        && pool.can_log_in()
        && pool.caps_have_room()
    {
        let Some(permit) = pool.try_permit() else {
            return;
        };
        let before = pool.server_count();
        match pool.open().await {
            Ok(idle) => {
                permit.give_back(idle);
                if pool.server_count() <= before {
                    // A cap filled meanwhile and `open` lent back one of
                    // the pool's own idle connections: nothing was added,
                    // and asking again would only do the same.
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(pool = %pool.name(), error = %e, "could not open warm server connection");
                return;
            }
        }
    }
}
