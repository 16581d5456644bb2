//! The MPI communicator (feature `mpi`): MPI_COMM_WORLD through rsmpi.

use std::sync::{Arc, Mutex};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use mpi::Threading;

use super::Communicator;
use crate::error::{Error, Result};

/// MPI_COMM_WORLD. Collectives run on the training thread (a worker of the thread pool), one
/// at a time: MPI is initialized with MPI_THREAD_SERIALIZED.
pub struct MpiWorld {
    world: SimpleCommunicator,
    /// The send side of the all-reductions (MPI's collectives take distinct buffers), kept so a
    /// step allocates nothing.
    send_f32: Mutex<Vec<f32>>,
    send_f64: Mutex<Vec<f64>>,
}

// SAFETY: the world communicator is a process-wide handle; MPI_THREAD_SERIALIZED lets any thread
// call MPI as long as calls do not overlap, which the training loop's single thread guarantees
// (the send buffers' locks also serialize the all-reductions).
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// Initializes MPI: the universe (finalizes MPI when dropped: keep it alive until the end of
/// main) and the world communicator.
pub fn init() -> Result<(Universe, Arc<dyn Communicator>)> {
    let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
        .ok_or_else(|| Error::invalid("MPI could not be initialized (it already was)"))?;
    if provided < Threading::Serialized {
        return Err(Error::invalid(format!(
            "this MPI library offers thread level {provided:?}; normlab needs Serialized (OpenMPI has it)"
        )));
    }
    let world = universe.world();
    let comm = MpiWorld {
        world,
        send_f32: Mutex::new(Vec::new()),
        send_f64: Mutex::new(Vec::new()),
    };
    Ok((universe, Arc::new(comm)))
}

impl Communicator for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
        let mut send = self.send_f32.lock().unwrap_or_else(|e| e.into_inner());
        send.clear();
        send.extend_from_slice(buf);
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        let mut send = self.send_f64.lock().unwrap_or_else(|e| e.into_inner());
        send.clear();
        send.extend_from_slice(buf);
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
