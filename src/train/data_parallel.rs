//! Data-parallel training's pieces: each process's share of a global batch, the gradient
//! all-reduction, and the start state broadcast from rank 0.

use std::time::{Duration, Instant};

use super::Communicator;
use crate::error::{Error, Result};
use crate::nn::{BufferMut, Sequential};
use crate::optim::{Optimizer, OptimizerKind};

/// Process `rank`'s part of a global batch: contiguous, the parts' sizes differing by at most
/// one (all equal when the process count divides the batch).
pub fn shard<T>(batch: &[T], rank: usize, size: usize) -> &[T] {
    let n = batch.len();
    &batch[rank * n / size..(rank + 1) * n / size]
}

/// Checks that every batch of an epoch of `samples` in global batches of `batch` splits over
/// `size` processes: the process count divides the batch, and the last batch holds at least one
/// sample per process. Returns the smallest part any process gets.
pub fn check_split(batch: usize, samples: usize, size: usize) -> Result<usize> {
    if size == 1 {
        return Ok(batch.min(samples));
    }
    if !batch.is_multiple_of(size) {
        return Err(Error::invalid(format!(
            "--batch-size {batch} is the global batch, split over {size} processes: it must be a multiple of {size}"
        )));
    }
    let last = samples % batch;
    if last > 0 && last < size {
        return Err(Error::invalid(format!(
            "the last batch of each epoch ({samples} images in batches of {batch}) holds {last}, fewer than the {size} \
             processes; choose a --train-limit or --batch-size that leaves at least {size}"
        )));
    }
    let smallest_last = if last > 0 { last / size } else { batch };
    Ok((batch / size).min(smallest_last).min(samples))
}

/// Sums every parameter's gradient over the processes, in buckets of at most `BUCKET` values,
/// after backward. (Overlapping the buckets with backward measured no gain on the machines this
/// was built on: see ARCHITECTURE.md.)
#[derive(Default)]
pub struct GradientSync {
    flat: Vec<f32>,
    /// Time spent in the all-reductions since the last `take_time`.
    time: Duration,
    /// Bytes all-reduced per step.
    pub bytes: usize,
}

impl GradientSync {
    /// 4 MB of f32 per all-reduction.
    pub const BUCKET: usize = 1 << 20;

    pub fn all_reduce(&mut self, comm: &dyn Communicator, net: &mut Sequential) {
        if comm.size() == 1 {
            return;
        }
        let flat = &mut self.flat;
        flat.clear();
        net.visit_params(&mut |p| flat.extend_from_slice(&p.grad.data));
        let t0 = Instant::now();
        for bucket in flat.chunks_mut(Self::BUCKET) {
            comm.all_reduce_sum_f32(bucket);
        }
        self.time += t0.elapsed();
        self.bytes = flat.len() * 4;
        let mut at = 0;
        net.visit_params(&mut |p| {
            let n = p.grad.data.len();
            p.grad.data.copy_from_slice(&flat[at..at + n]);
            at += n;
        });
    }

    /// The all-reduction time since the last call.
    pub fn take_time(&mut self) -> Duration {
        std::mem::take(&mut self.time)
    }
}

/// Gives every process rank 0's parameters, buffers (running statistics) and optimizer state,
/// so all start from one state whatever each built or read.
pub fn broadcast_state(comm: &dyn Communicator, net: &mut Sequential, opt: &mut Optimizer) {
    if comm.size() == 1 {
        return;
    }
    net.visit_params(&mut |p| comm.broadcast_f32(&mut p.value.data, 0));
    broadcast_buffers(comm, net);
    let mut step = opt.step.to_le_bytes();
    comm.broadcast_bytes(&mut step, 0);
    opt.step = u64::from_le_bytes(step);
    if opt.step > 0 && opt.first.is_empty() {
        let adam = opt.config.kind != OptimizerKind::Sgd;
        let (first, second) = (&mut opt.first, &mut opt.second);
        net.visit_params(&mut |p| {
            first.push(vec![0.0; p.value.len()]);
            if adam {
                second.push(vec![0.0; p.value.len()]);
            }
        });
    }
    for v in opt.first.iter_mut().chain(opt.second.iter_mut()) {
        comm.broadcast_f32(v, 0);
    }
}

/// Gives every process rank 0's buffers: with per-process BN statistics (plain `bn`), the
/// running statistics of rank 0 are the model's, as with PyTorch DDP's `broadcast_buffers`.
pub fn broadcast_buffers(comm: &dyn Communicator, net: &mut Sequential) {
    if comm.size() == 1 {
        return;
    }
    for (_, b) in net.named_buffers() {
        match b {
            BufferMut::F32(t) => comm.broadcast_f32(&mut t.data, 0),
            BufferMut::I64(v) => {
                let mut bytes = v.to_le_bytes();
                comm.broadcast_bytes(&mut bytes, 0);
                *v = i64::from_le_bytes(bytes);
            }
        }
    }
}

/// Seconds per all-reduction of `n` f32 values (the median of `reps`, after one warm-up), for
/// each n in `sizes`: the communication cost of a step against its size.
pub fn all_reduce_timings(comm: &dyn Communicator, sizes: &[usize], reps: usize) -> Vec<(usize, f64)> {
    let mut out = Vec::new();
    for &n in sizes {
        let mut buf = vec![1.0f32; n];
        comm.all_reduce_sum_f32(&mut buf);
        let mut times: Vec<f64> = (0..reps.max(1))
            .map(|_| {
                let t0 = Instant::now();
                comm.all_reduce_sum_f32(&mut buf);
                t0.elapsed().as_secs_f64()
            })
            .collect();
        // Every process reports rank 0's clock: the slowest of a collective decides it anyway.
        times.sort_by(f64::total_cmp);
        let mut median = times[times.len() / 2].to_le_bytes();
        comm.broadcast_bytes(&mut median, 0);
        out.push((n, f64::from_le_bytes(median)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order_and_differ_by_at_most_one() {
        let batch: Vec<usize> = (0..10).collect();
        let parts: Vec<&[usize]> = (0..4).map(|r| shard(&batch, r, 4)).collect();
        assert_eq!(parts.concat(), batch);
        let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [2, 3, 2, 3]);
        assert_eq!(shard(&batch, 0, 1), &batch[..]);
    }

    #[test]
    fn split_checks_name_the_batch_and_the_last_batch() {
        assert_eq!(check_split(8, 100, 1).unwrap(), 8);
        assert_eq!(check_split(8, 100, 4).unwrap(), 1);
        assert_eq!(check_split(8, 96, 4).unwrap(), 2);
        let e = check_split(6, 100, 4).unwrap_err().to_string();
        assert!(e.contains("multiple of 4"), "{e}");
        let e = check_split(8, 98, 4).unwrap_err().to_string();
        assert!(e.contains("holds 2, fewer than the 4"), "{e}");
    }
}
