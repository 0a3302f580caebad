//! SHOW MEM: PgBouncer's columns (`name, size, used, free, memtotal`), one
//! row per kind of record tidepool keeps per client, server and pool, plus
//! the bytes buffered for clients and the allocator's totals.
//!
//! `size` is bytes per item, `used` items in use, `free` items allocated
//! but unused, `memtotal` = size × (used + free), as in PgBouncer (whose
//! rows are its slab caches). Counts come from the structures that hold
//! the items.

use super::*;

pub(super) fn mem(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("size", Int8),
        ("used", Int8),
        ("free", Int8),
        ("memtotal", Int8),
    ]);
    let pools = shared.registry.pools();
    let servers: usize = pools.iter().map(|p| p.server_count()).sum();
    // Each listed record lives in an Arc: two reference counts more.
    let arc = 2 * std::mem::size_of::<usize>();
    let mut rows: Vec<(&str, usize, usize, usize)> = vec![
        (
            "client_cache",
            std::mem::size_of::<crate::client::list::ClientInfo>() + arc,
            shared.list.len(),
            0,
        ),
        (
            "parked_client_cache",
            crate::client::park::Lot::item_size(),
            shared.lot.len(),
            0,
        ),
        (
            "server_cache",
            std::mem::size_of::<crate::server::ServerConn>(),
            servers,
            0,
        ),
        (
            "pool_cache",
            std::mem::size_of::<crate::pool::Pool>() + arc,
            pools.len(),
            0,
        ),
        // Whole messages buffered for clients (above 64 KiB each), against
        // max_client_buffer_bytes.
        ("client_buffer_bytes", 1, shared.buffers.used(), 0),
    ];
    if let Some(u) = crate::memory::usage() {
        let (allocated, resident) = (u.allocated as usize, u.resident as usize);
        // Bytes handed out, and pages kept beyond them.
        rows.push((
            "allocator_bytes",
            1,
            allocated,
            resident.saturating_sub(allocated),
        ));
    }
    for (name, size, used, free) in rows {
        rs.push(vec![
            name.into(),
            (size as i64).into(),
            (used as i64).into(),
            (free as i64).into(),
            ((size * (used + free)) as i64).into(),
        ]);
    }
    rs
}
