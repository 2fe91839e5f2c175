//! A fixed-size ring: the newest `cap` items, oldest first. Memory stays bounded however long the
//! process runs.

use std::collections::VecDeque;

pub struct Ring<T> {
    items: VecDeque<T>,
    cap: usize,
}

impl<T: Clone> Ring<T> {
    pub fn new(cap: usize) -> Ring<T> {
        Ring {
            items: VecDeque::with_capacity(cap),
            cap,
        }
    }

    /// Keep `item`, dropping the oldest when full.
    pub fn push(&mut self, item: T) {
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    /// Oldest first.
    pub fn to_vec(&self) -> Vec<T> {
        self.items.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_items_in_order() {
        let mut ring = Ring::new(3);
        assert!(ring.to_vec().is_empty());
        for i in 1..=5 {
            ring.push(i);
        }
        assert_eq!(ring.to_vec(), [3, 4, 5]);
    }
}
