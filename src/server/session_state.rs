//! What session state a server connection holds that ties it to one client
//! (held cursors, temporary relations, session advisory locks, channels
//! listened to), read from the server itself at a transaction boundary, so
//! that a pin ends when its state does, whatever statement ended it.
//!
//! Invariant: asked only while the server is idle (outside a transaction),
//! where every advisory lock held is a session lock and every cursor left
//! is a held one.

use crate::client::pins;

/// Counts of each kind of session state, in one row (schema-qualified, so
/// a client's objects named like the catalog's cannot answer for them).
pub const QUERY: &str = "select \
     (select pg_catalog.count(*) from pg_catalog.pg_cursors where is_holdable), \
     (select pg_catalog.count(*) from pg_catalog.pg_class \
       where relnamespace operator(pg_catalog.=) pg_catalog.pg_my_temp_schema()), \
     (select pg_catalog.count(*) from pg_catalog.pg_locks \
       where locktype operator(pg_catalog.=) 'advisory' \
       and pid operator(pg_catalog.=) pg_catalog.pg_backend_pid()), \
     (select pg_catalog.count(*) from pg_catalog.pg_listening_channels())";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionState {
    pub held_cursors: u64,
    pub temp_relations: u64,
    pub advisory_locks: u64,
    pub channels: u64,
}

impl SessionState {
    /// From the row of [`QUERY`]; None when it is not that row.
    pub fn from_row(row: &[String]) -> Option<Self> {
        let n = |i: usize| row.get(i)?.parse::<u64>().ok();
        Some(Self {
            held_cursors: n(0)?,
            temp_relations: n(1)?,
            advisory_locks: n(2)?,
            channels: n(3)?,
        })
    }

    /// Why the client must keep this server (the first kind of state left,
    /// in the order above), or None: the server can be shared again.
    pub fn reason(&self) -> Option<&'static str> {
        [
            (self.held_cursors, pins::HOLD_CURSOR),
            (self.temp_relations, pins::TEMP_TABLE),
            (self.advisory_locks, pins::ADVISORY_LOCK),
            (self.channels, pins::LISTEN),
        ]
        .into_iter()
        .find(|(n, _)| *n > 0)
        .map(|(_, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_state_left_is_the_reason() {
        let row = |v: [&str; 4]| v.map(str::to_owned).to_vec();
        let none = SessionState::from_row(&row(["0", "0", "0", "0"])).unwrap();
        assert_eq!(none.reason(), None);
        let temp = SessionState::from_row(&row(["0", "2", "1", "0"])).unwrap();
        assert_eq!(temp.reason(), Some(pins::TEMP_TABLE));
        let listen = SessionState::from_row(&row(["0", "0", "0", "3"])).unwrap();
        assert_eq!(listen.reason(), Some(pins::LISTEN));
        assert_eq!(SessionState::from_row(&row(["0", "x", "0", "0"])), None);
        assert_eq!(SessionState::from_row(&["1".to_owned()]), None);
    }
}
