//! Everything normlab puts on disk, and every untrusted file it reads, goes through here:
//! - `atomic`: the one write mechanism (temporary file, fsync, rename, fsync of the folder);
//!   it writes through to device nodes and FIFOs and never replaces a link or a folder;
//! - `guard`: which outputs a command may write (never an input; an existing file or another
//!   run's folder only with `--force`), checked before any work starts;
//! - `lock`: one writer per run folder (an advisory lock with the holder's pid);
//! - `read`: bounded reads of files whose sizes are not yet trusted;
//! - `fault`: the crash-injection hook the tests use to kill the process at every write,
//!   fsync and rename.

pub mod atomic;
mod fault;
pub mod guard;
pub mod lock;
pub mod read;

pub use atomic::write_atomic;
pub use guard::{resolve, OutputGuard};
pub use lock::RunLock;
pub use read::read_limited;
