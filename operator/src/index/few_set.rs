//! A set that usually holds one or two items: the pods at an address, the services with
//! an endpoint there, the pods of one label value. The index keeps one per address and
//! per label value, tens of thousands of them, and a `BTreeSet` of one item allocates a
//! whole node (eleven slots: about 550 bytes for a key of two strings). A sorted vector
//! holds few items at the size of the items; past [`MAX_FEW`] the set becomes a
//! `BTreeSet`, so a label on twenty thousand pods still inserts in log time.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// Items kept in a sorted vector before the set becomes a B-tree.
const MAX_FEW: usize = 16;

/// A sorted set, compact while small.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum FewSet<T> {
    /// Up to [`MAX_FEW`] items, sorted, no duplicates.
    Few(Vec<T>),
    /// More.
    Many(BTreeSet<T>),
}

impl<T> Default for FewSet<T> {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl<T: Ord> FewSet<T> {
    /// Adds `item`; false when it was there already.
    pub fn insert(&mut self, item: T) -> bool {
        match self {
            Self::Few(items) => match items.binary_search(&item) {
                Ok(_) => false,
                Err(at) if items.len() < MAX_FEW => {
                    // Room for exactly the items: most sets stay at one or two.
                    items.reserve_exact(1);
                    items.insert(at, item);
                    true
                }
                Err(_) => {
                    let mut many: BTreeSet<T> = std::mem::take(items).into_iter().collect();
                    many.insert(item);
                    *self = Self::Many(many);
                    true
                }
            },
            Self::Many(items) => items.insert(item),
        }
    }

    /// Removes `item`; false when it was not there. A large set stays a B-tree until it
    /// is empty, so a set hovering at the limit does not flip back and forth.
    pub fn remove(&mut self, item: &T) -> bool {
        match self {
            Self::Few(items) => match items.binary_search(item) {
                Ok(at) => {
                    items.remove(at);
                    true
                }
                Err(_) => false,
            },
            Self::Many(items) => items.remove(item),
        }
    }
}

impl<T> FewSet<T> {
    /// How many items it holds.
    pub fn len(&self) -> usize {
        match self {
            Self::Few(items) => items.len(),
            Self::Many(items) => items.len(),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items in order.
    pub fn iter(&self) -> Iter<'_, T> {
        match self {
            Self::Few(items) => Iter::Few(items.iter()),
            Self::Many(items) => Iter::Many(items.iter()),
        }
    }
}

/// The items of a [`FewSet`] in order.
pub(super) enum Iter<'a, T> {
    Few(std::slice::Iter<'a, T>),
    Many(std::collections::btree_set::Iter<'a, T>),
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        match self {
            Self::Few(items) => items.next(),
            Self::Many(items) => items.next(),
        }
    }
}

impl<'a, T> IntoIterator for &'a FewSet<T> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Adds `v` to the set of `k` in a lookup map, making the set when it is the first.
pub(super) fn add<K: Hash + Eq, V: Ord>(map: &mut HashMap<K, FewSet<V>>, k: K, v: V) {
    map.entry(k).or_default().insert(v);
}

/// Removes `v` from the set of `k`, and the set once it is empty.
pub(super) fn remove<K: Hash + Eq, V: Ord>(map: &mut HashMap<K, FewSet<V>>, k: K, v: &V) {
    if let Some(set) = map.get_mut(&k) {
        set.remove(v);
        if set.is_empty() {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set against a `BTreeSet` through inserts and removes that cross the limit
    /// both ways.
    #[test]
    fn behaves_as_a_sorted_set_across_the_limit() {
        let mut few = FewSet::default();
        let mut model = BTreeSet::new();
        // A fixed pseudo-random walk over 0..40, inserting twice as often as removing.
        let mut x: u64 = 7;
        for step in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let item = (x >> 33) % 40;
            if step % 3 == 2 {
                assert_eq!(few.remove(&item), model.remove(&item), "remove {item}");
            } else {
                assert_eq!(few.insert(item), model.insert(item), "insert {item}");
            }
            assert_eq!(few.len(), model.len());
            assert!(few.iter().eq(model.iter()), "step {step}");
        }
        assert!(
            matches!(few, FewSet::Many(_)),
            "the walk never grew past the limit"
        );
    }

    #[test]
    fn small_sets_stay_vectors_of_their_size() {
        let mut set = FewSet::default();
        assert!(set.insert("b") && set.insert("a") && !set.insert("a"));
        let FewSet::Few(items) = &set else {
            panic!("two items became a B-tree");
        };
        assert_eq!((items.as_slice(), items.capacity()), (&["a", "b"][..], 2));
        assert!(set.remove(&"a") && !set.remove(&"a") && set.len() == 1);
    }
}
