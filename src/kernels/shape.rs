//! The (N, C, S) view every norm kernel works on: NCHW data with S = H·W (S = 1 for
//! BatchNorm1d; an elementwise LayerNorm is (N, C·H·W, 1)). Channel `ch` of sample `i` is the
//! contiguous run `x[(i·C + ch)·S ..][..S]`.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ncs {
    /// Samples.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Values per channel of one sample (H·W).
    pub s: usize,
}

impl Ncs {
    pub fn new(n: usize, c: usize, s: usize) -> Ncs {
        Ncs { n, c, s }
    }

    /// Values in the tensor.
    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values of one sample (C·S).
    pub fn sample_len(&self) -> usize {
        self.c * self.s
    }

    /// Values one channel's statistics run over (N·S).
    pub fn per_channel(&self) -> usize {
        self.n * self.s
    }

    /// The run of channel `ch` in sample `i`.
    #[inline(always)]
    pub fn run(&self, i: usize, ch: usize) -> Range<usize> {
        let off = (i * self.c + ch) * self.s;
        off..off + self.s
    }

    /// The same channels and maps over `n` samples (one ghost batch, one process's share).
    pub fn with_batch(&self, n: usize) -> Ncs {
        Ncs { n, ..*self }
    }
}

/// How a per-row backward over `n` rows (`values` values in all) splits into tasks, each a run
/// of whole rows with its own column accumulators: one task on the calling thread under 2^15
/// values (waking a worker costs more than such work), else two per thread. Returns (rows per
/// task, tasks).
pub fn row_tasks(n: usize, values: usize) -> (usize, usize) {
    let tasks = if values < 1 << 15 {
        1
    } else {
        (2 * rayon::current_num_threads()).clamp(1, n.max(1))
    };
    let rows = n.div_ceil(tasks).max(1);
    (rows, n.div_ceil(rows).max(1))
}
