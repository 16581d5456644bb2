//! Scratch shared by every layer of a kind instead of owned by each (the convs' group
//! scratch). A network's layers run one after another, so one set serves them all and stays in
//! cache from layer to layer, where owned sets were cold at each layer's first touch: read from
//! memory and written back. Folded resnet at batch 128 ran each block 1.3-1.5x slower in the
//! forward's chain than timed alone: 13 convs' group scratch (8 groups of up to ~0.7 MB) on top
//! of the activations, against the ~32 MB of L3 that runs at full speed on this host. Shared:
//! resnet 24.2-26.2 -> 19.5-20.9 ms, vgg 17.6-18.6 -> 16.9-18.4 (3 alternating rounds).
//! (Sharing the residual blocks' inner outputs too, and writing an eval forward's outputs into
//! two buffers in turn, measured level or slower: growing a buffer back refills it with zeros.)

use std::sync::Mutex;

/// Sets not in use: a layer borrows one for a call and gives it back. While every set is in
/// use (models running at once on several threads) a call starts an empty one; at most
/// `KEPT` sets wait between calls.
pub struct SharedScratch<T> {
    idle: Mutex<Vec<T>>,
}

const KEPT: usize = 4;

/// Layers whose input holds fewer values keep their own scratch, small enough to stay in L2
/// from one call to the next: sharing it made resnet at batch 1 (inputs of 12-50 K values)
/// 3-7% slower, 0.270-0.279 -> 0.289-0.294 ms; at batch 128 (0.8-6.4 M values) sharing is the
/// gain above.
pub const SHARE_FROM_VALUES: usize = 1 << 18;

impl<T: Default> Default for SharedScratch<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Default> SharedScratch<T> {
    pub const fn new() -> Self {
        SharedScratch {
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with a shared set in `slot` in place of the owner's own, which is put back
    /// after. Only for scratch that holds nothing from one call to the next.
    pub fn lend<S, R>(&self, owner: &mut S, slot: fn(&mut S) -> &mut T, f: impl FnOnce(&mut S) -> R) -> R {
        let mut set = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.pop())
            .unwrap_or_default();
        std::mem::swap(slot(owner), &mut set);
        let out = f(owner);
        std::mem::swap(slot(owner), &mut set);
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < KEPT {
                idle.push(set);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set lent and given back is the one the next call gets, with what it holds; the
    /// owner's own set is back in its slot between calls; calls that overlap get sets of
    /// their own.
    fn slot_of(v: &mut Vec<u8>) -> &mut Vec<u8> {
        v
    }

    #[test]
    fn a_set_goes_back_and_overlapping_calls_get_their_own() {
        static SHARED: SharedScratch<Vec<u8>> = SharedScratch::new();
        let mut slot = vec![9];
        SHARED.lend(&mut slot, slot_of, |s| {
            assert!(s.is_empty(), "the owner's set was lent as the shared one");
            s.extend_from_slice(&[1, 2, 3]);
        });
        assert_eq!(slot, [9]);
        let mut other = Vec::new();
        SHARED.lend(&mut slot, slot_of, |s| {
            assert_eq!(s, &[1, 2, 3]);
            SHARED.lend(&mut other, slot_of, |o| {
                assert!(o.is_empty(), "an overlapping call got a set in use")
            });
        });
        SHARED.lend(&mut slot, slot_of, |s| assert_eq!(s, &[1, 2, 3]));
        assert_eq!(slot, [9]);
    }
}
