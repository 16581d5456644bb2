//! How this process was started: alone, or as one process of an MPI job (mpirun). MPI starts
//! only when a launcher's variables say so (or NORMLAB_MPI=1), so a plain `normlab` is
//! unchanged; under MPI an error on one process ends the whole job instead of leaving the
//! others waiting.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use normlab::dist::{self, Communicator};
use normlab::{Error, Result};

static WORLD: OnceLock<Arc<dyn Communicator>> = OnceLock::new();

/// The processes of this job (one, unless started by mpirun).
pub fn world() -> Arc<dyn Communicator> {
    WORLD.get().cloned().unwrap_or_else(dist::single_process)
}

/// Held by main for the life of the process: finalizes MPI when dropped.
pub struct Launch {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

impl Launch {
    /// Finalizes MPI if it was started; call before main returns.
    pub fn end(self) {}
}

fn asked_for_mpi() -> bool {
    std::env::var("NORMLAB_MPI").is_ok_and(|v| v == "1")
}

/// Starts MPI when launched by mpirun (or asked with NORMLAB_MPI=1).
pub fn start() -> Result<Launch> {
    let launched = dist::launched_size();
    if launched.is_none() && !asked_for_mpi() {
        return Ok(Launch {
            #[cfg(feature = "mpi")]
            _universe: None,
        });
    }
    #[cfg(feature = "mpi")]
    {
        let (universe, comm) = dist::mpi::init()?;
        let _ = WORLD.set(comm.clone());
        if comm.size() > 1 {
            abort_job_on_panic(comm);
        }
        Ok(Launch {
            _universe: Some(universe),
        })
    }
    #[cfg(not(feature = "mpi"))]
    match launched {
        Some(n) if n > 1 => Err(Error::invalid(format!(
            "started as one of {n} MPI processes, but this normlab was built without MPI, so each would \
             train alone; build it with: cargo build --release --features mpi"
        ))),
        _ if asked_for_mpi() => Err(Error::invalid(
            "NORMLAB_MPI=1, but this normlab was built without MPI; build it with: cargo build --release --features mpi",
        )),
        _ => Ok(Launch {}),
    }
}

/// A panic on one process ends the job (MPI_Abort) after its message, instead of a hang.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn abort_job_on_panic(comm: Arc<dyn Communicator>) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        comm.abort(101);
    }));
}

/// The process's exit: the error's one line (from the process it happened on; the others of an
/// MPI job stop silently), and an MPI_Abort of the job when the other processes do not know.
pub fn finish(result: Result<()>) -> ExitCode {
    let comm = world();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::OtherRank(_)) => ExitCode::FAILURE,
        // A closed pipe (`normlab ... | head -1`): quietly, with the status of a process that
        // SIGPIPE ended, as Unix tools do.
        Err(e) if e.is_broken_pipe() => ExitCode::from(141),
        Err(e) => {
            if comm.size() > 1 {
                eprintln!("error (process {} of {}): {e}", comm.rank(), comm.size());
                if !dist::stopping_together() {
                    comm.abort(1);
                }
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Threads per process when --threads is not given: the cores shared among this machine's
/// processes of the job.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
        .filter(|&n| n > 0 && WORLD.get().is_some());
    (cores / local.unwrap_or(1)).max(1)
}
