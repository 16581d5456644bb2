//! Communication between the processes of a data-parallel job: one small interface
//! (`Communicator`), a single-process implementation, and (feature `mpi`) the MPI one. Nothing
//! else in the engine knows about MPI: the training loop and SyncBN talk to a `Communicator`.

#[cfg(feature = "mpi")]
pub mod mpi;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// The collective operations data-parallel training needs. Every process of the job must make
/// the same calls in the same order (as in MPI); sums are the same on every process.
pub trait Communicator: Send + Sync {
    /// This process's index, 0..size.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Every process's `buf` becomes the elementwise sum over all processes.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]);
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Every process's `buf` becomes `root`'s (all hold the same length).
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize);
    fn broadcast_f32(&self, buf: &mut [f32], root: usize);
    /// Ends every process of the job with `code` (MPI_Abort): for an error on one process that
    /// the others cannot learn of, which would otherwise wait for it forever.
    fn abort(&self, code: i32) -> !;
}

/// The communicator of a job of one process: every collective is the identity.
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
    fn broadcast_bytes(&self, _buf: &mut [u8], _root: usize) {}
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A one-process communicator.
pub fn single_process() -> Arc<dyn Communicator> {
    Arc::new(SingleProcess)
}

/// Makes a check that any process may fail collective: when some process's `result` is an
/// error, the lowest such rank returns its own error (the one line the job prints) and every
/// other rank returns `Error::OtherRank`, so all of them stop together instead of some waiting
/// in the next collective for a process that left.
pub fn agree<T>(comm: &dyn Communicator, result: Result<T>) -> Result<T> {
    if comm.size() == 1 {
        return result;
    }
    let mut failed = vec![0.0f64; comm.size()];
    failed[comm.rank()] = f64::from(u8::from(result.is_err()));
    comm.all_reduce_sum_f64(&mut failed);
    match failed.iter().position(|&f| f > 0.0) {
        None => result,
        Some(r) if r == comm.rank() => result.map_err(stop_together),
        Some(r) => Err(stop_together(Error::OtherRank(r))),
    }
}

/// Set once every process of the job knows it is stopping (an agreed failure, or a failure all
/// of them saw, such as a diverged loss): the processes may then end normally. Any other error
/// on one process must end the job with `Communicator::abort`, or the others would wait for it.
static STOPPING_TOGETHER: AtomicBool = AtomicBool::new(false);

/// Marks `e` as an error every process of the job stops with (see `stopping_together`).
pub fn stop_together(e: Error) -> Error {
    STOPPING_TOGETHER.store(true, Ordering::SeqCst);
    e
}

/// Whether every process of the job is stopping together, so none needs to be aborted.
pub fn stopping_together() -> bool {
    STOPPING_TOGETHER.load(Ordering::SeqCst)
}

/// Rank `root`'s bytes on every process (lengths may differ before the call).
pub fn broadcast_vec(comm: &dyn Communicator, bytes: &mut Vec<u8>, root: usize) {
    if comm.size() == 1 {
        return;
    }
    let mut len = (bytes.len() as u64).to_le_bytes();
    comm.broadcast_bytes(&mut len, root);
    bytes.resize(u64::from_le_bytes(len) as usize, 0);
    comm.broadcast_bytes(bytes, root);
}

/// Whether this process was started by an MPI launcher (mpirun, srun), from the variables the
/// launcher sets; the number of processes it started, if so.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// A communicator that counts the time spent in its collectives (waiting for the slowest
/// process included): the communication share of a step.
pub struct TimedComm {
    inner: Arc<dyn Communicator>,
    nanos: std::sync::atomic::AtomicU64,
}

impl TimedComm {
    pub fn new(inner: Arc<dyn Communicator>) -> Self {
        TimedComm {
            inner,
            nanos: Default::default(),
        }
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = f();
        self.nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// The time counted since the last call.
    pub fn take(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.nanos.swap(0, std::sync::atomic::Ordering::Relaxed))
    }
}

impl Communicator for TimedComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
        self.timed(|| self.inner.all_reduce_sum_f32(buf))
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.timed(|| self.inner.all_reduce_sum_f64(buf))
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) {
        self.timed(|| self.inner.broadcast_bytes(buf, root))
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        self.timed(|| self.inner.broadcast_f32(buf, root))
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_agrees_with_itself_and_keeps_its_error() {
        let c = SingleProcess;
        assert_eq!(agree(&c, Ok(3)).unwrap(), 3);
        let e = agree::<()>(&c, Err(Error::invalid("bad"))).unwrap_err();
        assert_eq!(e.to_string(), "bad");
        let mut v = vec![1u8, 2];
        broadcast_vec(&c, &mut v, 0);
        assert_eq!(v, [1, 2]);
    }
}
