//! A process-wide list of live things (clients, server connections) that
//! the console and metrics enumerate. Each entry is added once and removed
//! when its [`Entry`] guard drops; the hot path never touches the list, only
//! the entry's own atomics.
//!
//! Invariant: an item is listed exactly while its guard lives. The list is
//! sharded by id so logins and logouts on different cores rarely contend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const SHARDS: usize = 16;

/// What can be listed: it knows its id.
pub trait Listable: Send + Sync {
    fn id(&self) -> u64;
}

pub struct Listing<T> {
    shards: [Mutex<HashMap<u64, Arc<T>>>; SHARDS],
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

/// Keeps its item listed while it lives.
pub struct Entry<T: Listable> {
    list: Arc<Listing<T>>,
    pub info: Arc<T>,
}

impl<T: Listable> Drop for Entry<T> {
    fn drop(&mut self) {
        self.list.shard(self.info.id()).remove(&self.info.id());
    }
}

impl<T: Listable> Listing<T> {
    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Arc<T>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(self: &Arc<Self>, info: T) -> Entry<T> {
        let info = Arc::new(info);
        self.shard(info.id()).insert(info.id(), info.clone());
        Entry {
            list: self.clone(),
            info,
        }
    }

    /// The item listed under `id`, if any.
    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.shard(id).get(&id).cloned()
    }

    /// Every listed item, by id.
    pub fn all(&self) -> Vec<Arc<T>> {
        let mut v: Vec<Arc<T>> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort_by_key(|i| i.id());
        v
    }

    /// Calls `f` on every listed item, one shard locked at a time, in no
    /// particular order (no copy of the list is made).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<T>)) {
        for s in &self.shards {
            for item in s.lock().unwrap_or_else(PoisonError::into_inner).values() {
                f(item);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item(u64);
    impl Listable for Item {
        fn id(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn listed_while_the_guard_lives() {
        let l: Arc<Listing<Item>> = Arc::default();
        let a = l.add(Item(3));
        let b = l.add(Item(1));
        assert_eq!(l.all().iter().map(|i| i.0).collect::<Vec<_>>(), [1, 3]);
        drop(a);
        assert_eq!(l.len(), 1);
        drop(b);
        assert!(l.is_empty());
    }
}
