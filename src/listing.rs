//! A process-wide list of live things (clients, server connections) that
//! the console and metrics enumerate. Each entry is added once and removed
//! when its [`Entry`] guard drops; the hot path never touches the list, only
//! the entry's own atomics.
//!
//! Invariant: an item is listed exactly while its guard lives. The list is
//! sharded by id so logins and logouts on different cores rarely contend.
//! An entry is the item's pointer alone (8 bytes): the id is read from the
//! item, not kept beside it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hashbrown::HashTable;

const SHARDS: usize = 16;

/// The hash of an id (ids are mostly consecutive: spread them over the
/// table's buckets and its control bytes' bits).
pub fn id_hash(id: u64) -> u64 {
    id.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26)
}

/// What can be listed: it knows its id.
pub trait Listable: Send + Sync {
    fn id(&self) -> u64;
}

pub struct Listing<T> {
    shards: [Mutex<HashTable<Arc<T>>>; SHARDS],
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashTable::new())),
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
        let id = self.info.id();
        if let Ok(e) = self
            .list
            .shard(id)
            .find_entry(id_hash(id), |i| Arc::ptr_eq(i, &self.info))
        {
            e.remove();
        }
    }
}

impl<T: Listable> Listing<T> {
    fn shard(&self, id: u64) -> MutexGuard<'_, HashTable<Arc<T>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(self: &Arc<Self>, info: T) -> Entry<T> {
        let info = Arc::new(info);
        let id = info.id();
        let mut shard = self.shard(id);
        // An id is listed once (a second item with it replaces the first,
        // whose guard then removes nothing).
        match shard.entry(id_hash(id), |i| i.id() == id, |i| id_hash(i.id())) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = info.clone(),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(info.clone());
            }
        }
        drop(shard);
        Entry {
            list: self.clone(),
            info,
        }
    }

    /// The item listed under `id`, if any.
    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.shard(id).find(id_hash(id), |i| i.id() == id).cloned()
    }

    /// Every listed item, by id.
    pub fn all(&self) -> Vec<Arc<T>> {
        let mut v: Vec<Arc<T>> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
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
            for item in s.lock().unwrap_or_else(PoisonError::into_inner).iter() {
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

    #[test]
    fn a_guard_removes_its_own_item_only() {
        let l: Arc<Listing<Item>> = Arc::default();
        let items: Vec<_> = (0..1000).map(|i| l.add(Item(i * 7))).collect();
        assert_eq!(l.len(), 1000);
        assert!(l.get(7 * 999).is_some() && l.get(5).is_none());
        // A second item under a listed id replaces the first; the first's
        // guard then leaves the second listed.
        let again = l.add(Item(14));
        drop(items);
        assert_eq!(l.len(), 1);
        assert!(Arc::ptr_eq(&l.get(14).unwrap(), &again.info));
        drop(again);
        assert!(l.is_empty());
    }
}
