//! Keeping the thread pool's workers awake through a chain of short parallel regions.
//!
//! A forward pass is a chain of parallel regions (one or more per layer) separated by short
//! serial stretches. A rayon worker that finds no work for a few microseconds goes to sleep on
//! a futex, and waking it costs the next region tens of microseconds: on the 2-core host,
//! 8 tasks of 12 µs after 20 µs of serial work took 73 µs instead of 48, and a batch-1 vgg
//! conv ran no faster on 2 threads than on 1. OpenMP (PyTorch) and ONNX Runtime spin their
//! workers between regions for the same reason. `with_workers_awake` does that for the length
//! of one call: every other worker polls for stolen work (rayon's `yield_now`) until the call
//! returns or no work came for IDLE_LIMIT, so each region's tasks start at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A helper that finds no work for this long stops polling. Besides sparing a core through a
/// long serial stretch, this is what keeps the scheme free of deadlock: a worker may steal one
/// of f's jobs before it picks up its polling job, and then run the polling job on top of it
/// (while that stolen job waits in a join); f, waiting for the stolen job, makes no new work,
/// and the helper returns to finish it. Without the limit that state hung for good (seen in a
/// CLI test's training step). The forward's serial stretches between regions are 5-20 µs.
const IDLE_LIMIT: Duration = Duration::from_micros(200);

/// Set while some call keeps the workers awake: a nested or concurrent call just runs.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Sets a flag when dropped: the end of the call, also when it panics.
struct SetOnDrop<'a>(&'a AtomicBool, bool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Release);
    }
}

/// Runs `f` while the other workers of the current pool poll for its jobs instead of sleeping
/// (they spin: use it around work made of parallel regions, not around waiting). Outside a
/// pool, with one thread, or inside another such call, it just runs `f`. The call never waits
/// for its helpers: one that a busy machine schedules late finds the call over and returns
/// (waiting for them, as a scope does, cost each call a scheduler time slice under load: 2,000
/// calls took 8 s against 0.3).
pub fn with_workers_awake<R>(f: impl FnOnce() -> R) -> R {
    let Some(owner) = rayon::current_thread_index() else {
        return f();
    };
    if rayon::current_num_threads() < 2
        || ACTIVE
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return f();
    }
    let _active = SetOnDrop(&ACTIVE, false);
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() != owner {
            poll_until(&flag);
        }
    });
    let _done = SetOnDrop(&done, true);
    f()
}

/// A helper's loop: run whatever work the pool has until `done`, or until none came for
/// IDLE_LIMIT.
fn poll_until(done: &AtomicBool) {
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        if idle_since.get_or_insert_with(Instant::now).elapsed() > IDLE_LIMIT {
            return;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The call returns f's value, from inside and outside the pool and nested; a panic in f
    /// reaches the caller and the next call runs.
    #[test]
    fn returns_the_value_inside_and_outside_the_pool_and_after_a_panic() {
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

    /// A helper with no work and no end signal returns by itself: were it to poll on top of
    /// a job of f's it stole first (f then waiting on that job, making no new work), nothing
    /// else would end it. A CLI test's training step hung so before the limit.
    #[test]
    fn an_idle_helper_returns_without_the_end_signal() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let t = Instant::now();
            pool.install(|| poll_until(&AtomicBool::new(false)));
            tx.send(t.elapsed()).unwrap();
        });
        let took = rx.recv_timeout(Duration::from_secs(10)).expect("the helper returned");
        assert!(took >= IDLE_LIMIT, "returned after {took:?}");
    }

    /// Many short calls of nested joins, with gaps of 0-15 µs between them that catch the
    /// helper in every state (asleep, searching, about to steal): all finish, with the sums
    /// right.
    #[test]
    fn many_short_calls_of_nested_joins_finish() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let mut total = 0u64;
            for i in 0..5_000u64 {
                let t = Instant::now();
                while t.elapsed() < Duration::from_nanos(i * 7919 % 15_000) {}
                total += pool.install(|| {
                    with_workers_awake(|| {
                        (0..4u64)
                            .into_par_iter()
                            .map(|i| {
                                let (a, b) = rayon::join(|| i, || (0..3u64).into_par_iter().sum::<u64>());
                                a + b
                            })
                            .sum::<u64>()
                    })
                });
            }
            tx.send(total).unwrap();
        });
        let total = rx.recv_timeout(Duration::from_secs(60)).expect("the calls finished");
        assert_eq!(total, 5_000 * (6 + 4 * 3));
    }
}
