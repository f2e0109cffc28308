//! A table of items with a free list.

/// A table of items with a free list: [`insert`](Slab::insert) reuses the
/// slot most recently freed, and an index stays valid (names the same
/// item) until [`remove`](Slab::remove).
#[derive(Debug)]
pub struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab::new()
    }
}

impl<T> Slab<T> {
    /// An empty slab.
    pub const fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Stores `item`; returns its index.
    pub fn insert(&mut self, item: T) -> u32 {
        if let Some(i) = self.free.pop() {
            self.items[i as usize] = Some(item);
            i
        } else {
            self.items.push(Some(item));
            (self.items.len() - 1) as u32
        }
    }

    /// The item at `i`, if one is stored there.
    pub fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize).and_then(Option::as_ref)
    }

    /// The item at `i`, mutably, if one is stored there.
    pub fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize).and_then(Option::as_mut)
    }

    /// Takes the item at `i` out; its index goes to the free list.
    pub fn remove(&mut self, i: u32) -> Option<T> {
        let item = self.items.get_mut(i as usize)?.take();
        if item.is_some() {
            self.free.push(i);
        }
        item
    }

    /// Items stored.
    pub fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }

    /// Whether no item is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored items with their indices.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> + '_ {
        (self.items.iter().enumerate()).filter_map(|(i, t)| Some((i as u32, t.as_ref()?)))
    }

    /// The stored items with their indices, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut T)> + '_ {
        (self.items.iter_mut().enumerate()).filter_map(|(i, t)| Some((i as u32, t.as_mut()?)))
    }

    /// Takes every item out, in index order, leaving the slab empty.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.items.drain(..).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_stay_valid_and_freed_ones_are_reused() {
        let mut s = Slab::new();
        assert!(s.is_empty());
        let (a, b, c) = (s.insert("a"), s.insert("b"), s.insert("c"));
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(s.remove(b), Some("b"));
        assert_eq!(s.remove(b), None, "removed twice");
        assert_eq!(s.get(b), None);
        assert_eq!((s.get(a), s.get(c)), (Some(&"a"), Some(&"c")));
        assert_eq!(s.len(), 2);
        assert_eq!(s.insert("d"), b, "the freed index is reused");
        *s.get_mut(b).unwrap() = "e";
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [(0, &"a"), (1, &"e"), (2, &"c")]
        );
        for (_, v) in s.iter_mut() {
            *v = "z";
        }
        assert_eq!(s.get(99), None);
        assert_eq!(s.remove(99), None);
        assert_eq!(s.drain().collect::<Vec<_>>(), ["z", "z", "z"]);
        assert!(s.is_empty());
        assert_eq!(s.insert("f"), 0, "drained: indices start again");
    }
}
