//! Keeping the thread pool's workers awake through a chain of short parallel regions.
//!
//! A forward pass is a chain of parallel regions (one or more per layer) separated by short
//! serial stretches. A rayon worker that finds no work for a few microseconds goes to sleep on
//! a futex, and waking it costs the next region tens of microseconds: on the 2-core host,
//! 8 tasks of 12 µs after 20 µs of serial work took 73 µs instead of 48, and a batch-1 vgg
//! conv ran no faster on 2 threads than on 1. OpenMP (PyTorch) and ONNX Runtime spin their
//! workers between regions for the same reason. `with_workers_awake` does that for the length
//! of one call: every other worker polls for stolen work (rayon's `yield_now`) until the call
//! returns, so each region's tasks start at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set while some call keeps the workers awake: a nested or concurrent call just runs.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Sets a flag when dropped: the end of the call, also when it panics.
struct SetOnDrop<'a>(&'a AtomicBool, bool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Release);
    }
}

/// Runs `f` on a worker of the current pool while the pool's other workers poll for its jobs
/// instead of sleeping (they spin: use it around work made of parallel regions, not around
/// waiting). With one thread, or inside another such call, it just runs `f`.
pub fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() < 2
        || ACTIVE
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return f();
    }
    let _active = SetOnDrop(&ACTIVE, false);
    let done = AtomicBool::new(false);
    let done = &done;
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        s.spawn_broadcast(move |_, ctx| {
            if Some(ctx.index()) == owner {
                return;
            }
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Idle) {
                    std::hint::spin_loop();
                }
            }
        });
        let _done = SetOnDrop(done, true);
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The call returns f's value with the helpers released (the scope ends), from inside and
    /// outside the pool and nested; a panic in f reaches the caller instead of leaving the
    /// helpers spinning (which would hang the scope).
    #[test]
    fn returns_the_value_and_releases_the_workers() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let sum = |n: u64| (0..n).into_par_iter().sum::<u64>();
        assert_eq!(pool.install(|| with_workers_awake(|| sum(1000))), 499_500);
        assert_eq!(
            pool.install(|| with_workers_awake(|| with_workers_awake(|| sum(10)))),
            45
        );
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| with_workers_awake(|| -> u64 { panic!("inside") }))
        }));
        assert!(caught.is_err());
        assert_eq!(pool.install(|| with_workers_awake(|| sum(100))), 4950);
        assert_eq!(with_workers_awake(|| 7), 7);
    }
}
