//! Resources kept until the library lets go of them.

/// Resources kept until the library lets go of them: memory a cancelled
/// operation may still touch, a handle whose close has not finished. Each
/// is [`bury`](Graveyard::bury)-ed and released (dropped) only when
/// [`reap`](Graveyard::reap)'s check says the library is done with it, or
/// when the caller [`release_all`](Graveyard::release_all)s them once
/// nothing can touch them any more.
#[derive(Debug)]
pub struct Graveyard<T> {
    kept: Vec<T>,
}

impl<T> Default for Graveyard<T> {
    fn default() -> Self {
        Graveyard::new()
    }
}

impl<T> Graveyard<T> {
    /// An empty graveyard.
    pub const fn new() -> Self {
        Graveyard { kept: Vec::new() }
    }

    /// Keeps `item` until it is reaped or released.
    pub fn bury(&mut self, item: T) {
        self.kept.push(item);
    }

    /// Releases (drops) every item for which `done` returns true; returns
    /// how many went.
    pub fn reap(&mut self, mut done: impl FnMut(&mut T) -> bool) -> usize {
        let before = self.kept.len();
        self.kept.retain_mut(|t| !done(t));
        before - self.kept.len()
    }

    /// Releases (drops) every item: the library lets go of all of them.
    pub fn release_all(&mut self) {
        self.kept.clear();
    }

    /// Takes every item out, for the caller to release in its own way
    /// (or to leave to the process with [`std::mem::forget`]).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.kept.drain(..)
    }

    /// The items kept.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.kept.iter()
    }

    /// The items kept, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.kept.iter_mut()
    }

    /// Items kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records its drop.
    struct Handle<'l>(u32, &'l RefCell<Vec<u32>>);

    impl Drop for Handle<'_> {
        fn drop(&mut self) {
            self.1.borrow_mut().push(self.0);
        }
    }

    #[test]
    fn items_go_only_when_the_library_lets_go() {
        let dropped = RefCell::new(Vec::new());
        let mut g = Graveyard::new();
        for i in 0..4 {
            g.bury(Handle(i, &dropped));
        }
        assert_eq!(g.len(), 4);
        assert_eq!(g.reap(|h| h.0 % 2 == 1), 2);
        assert_eq!(*dropped.borrow(), [1, 3]);
        assert_eq!(g.reap(|_| false), 0);
        assert_eq!(g.iter().map(|h| h.0).collect::<Vec<_>>(), [0, 2]);
        let taken: Vec<_> = g.drain().collect();
        assert!(g.is_empty());
        assert_eq!(*dropped.borrow(), [1, 3], "drained, not dropped");
        drop(taken);
        g.bury(Handle(9, &dropped));
        g.release_all();
        assert_eq!(*dropped.borrow(), [1, 3, 0, 2, 9]);
        assert!(g.is_empty());
    }
}
