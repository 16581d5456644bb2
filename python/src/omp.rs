//! PyTorch's OpenMP threads, put to sleep while a normlab kernel runs.
//!
//! After each parallel op, PyTorch's OpenMP worker threads (libgomp) spin-wait for the next
//! one, for up to a few milliseconds, on the very cores normlab's rayon pool then needs:
//! measured here, a LayerNorm backward of [128, 32, 28, 28] took 2.7 ms after a plain
//! kernel call and 5.0 ms (median) right after one parallel torch op. So each kernel call runs
//! inside an OpenMP parallel region of PyTorch's own team: its master (the calling thread)
//! runs the kernel on normlab's pool while the other members, instead of spinning, sleep on a
//! condition variable until it is done. Where no OpenMP runtime is loaded (or it lacks the
//! GOMP entry points), the kernel simply runs.

use std::ffi::{c_int, c_uint, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, OnceLock};

type Body = unsafe extern "C" fn(*mut c_void);
type ParallelFn = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
type ThreadNumFn = unsafe extern "C" fn() -> c_int;

struct Omp {
    parallel: ParallelFn,
    thread_num: ThreadNumFn,
}

/// The runtime, once found; searched on the first kernel call and again by `search` (which
/// `normlab.torch` calls once torch, and with it the runtime, is loaded).
static OMP: OnceLock<Omp> = OnceLock::new();
static SEARCHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Looks for the loaded OpenMP runtime unless it was found already; whether it is there.
pub fn search() -> bool {
    SEARCHED.store(true, std::sync::atomic::Ordering::Relaxed);
    if OMP.get().is_none() {
        if let Some(found) = find() {
            let _ = OMP.set(found);
        }
    }
    OMP.get().is_some()
}

/// Runs `f` with the process's OpenMP team (if any) asleep rather than spinning.
pub fn quiet<R: Send, F: FnOnce() -> R + Send>(f: F) -> R {
    if !SEARCHED.load(std::sync::atomic::Ordering::Relaxed) {
        search();
    }
    let Some(omp) = OMP.get() else {
        return f();
    };
    let shared = Shared {
        work: Mutex::new(Some(f)),
        result: Mutex::new(None),
        done: Mutex::new(false),
        wake: Condvar::new(),
        thread_num: omp.thread_num,
    };
    let data = &shared as *const Shared<F, R> as *mut c_void;
    // SAFETY: GOMP_parallel calls `body` on every member of the team with `data`, and returns
    // only after all of them have returned (the region's closing barrier), so `shared`
    // outlives every use; `body` never unwinds.
    unsafe { (omp.parallel)(body::<F, R>, data, 0, 0) };
    let outcome = shared.result.into_inner().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Some(Ok(r)) => r,
        Some(Err(panic)) => resume_unwind(panic),
        // The master did not run (an OpenMP runtime that breaks the GOMP contract): run here.
        None => shared
            .work
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .map(|f| f())
            .expect("the kernel ran or is still here"),
    }
}

type Outcome<R> = std::thread::Result<R>;

struct Shared<F, R> {
    work: Mutex<Option<F>>,
    result: Mutex<Option<Outcome<R>>>,
    done: Mutex<bool>,
    wake: Condvar,
    thread_num: ThreadNumFn,
}

/// Each member of the team: the master runs the kernel, the others sleep until it is done.
unsafe extern "C" fn body<F: FnOnce() -> R, R>(data: *mut c_void) {
    // SAFETY: `data` is the `Shared` that `quiet` keeps alive for the whole region.
    let s = unsafe { &*(data as *const Shared<F, R>) };
    // SAFETY: omp_get_thread_num takes nothing and is callable in a region.
    if unsafe { (s.thread_num)() } == 0 {
        let work = s.work.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = work {
            let r = catch_unwind(AssertUnwindSafe(f));
            *s.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        }
        *s.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        s.wake.notify_all();
    } else {
        let mut done = s.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = s.wake.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The loaded OpenMP runtime's GOMP_parallel and omp_get_thread_num (libgomp, which PyTorch's
/// Linux wheels bundle, or LLVM/Intel's libomp/libiomp5, which export the same entry points).
#[cfg(target_os = "linux")]
fn find() -> Option<Omp> {
    use std::ffi::{CStr, CString};
    unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        // SAFETY: dl_iterate_phdr hands a valid info; data is the Vec below.
        let (info, found) = unsafe { (&*info, &mut *(data as *mut Vec<CString>)) };
        if !info.dlpi_name.is_null() {
            // SAFETY: dlpi_name is a NUL-terminated path.
            let name = unsafe { CStr::from_ptr(info.dlpi_name) };
            let file = name.to_string_lossy();
            let base = file.rsplit('/').next().unwrap_or("");
            if ["libgomp", "libiomp5", "libomp"].iter().any(|p| base.starts_with(p)) {
                found.push(name.to_owned());
            }
        }
        0
    }
    let mut found: Vec<CString> = Vec::new();
    // SAFETY: the callback only reads what it is handed and pushes to `found`.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut found as *mut Vec<CString> as *mut c_void) };
    found.iter().find_map(|path| {
        // SAFETY: RTLD_NOLOAD only returns a handle to an already-loaded object (its
        // reference count is raised, keeping it loaded for the process's life, as wanted).
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            return None;
        }
        // SAFETY: the names are NUL-terminated; the symbols have these C signatures.
        let (p, t) = unsafe {
            (
                libc::dlsym(handle, c"GOMP_parallel".as_ptr()),
                libc::dlsym(handle, c"omp_get_thread_num".as_ptr()),
            )
        };
        (!p.is_null() && !t.is_null()).then(|| Omp {
            // SAFETY: GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads,
            // unsigned flags) and int omp_get_thread_num(void).
            parallel: unsafe { std::mem::transmute::<*mut c_void, ParallelFn>(p) },
            thread_num: unsafe { std::mem::transmute::<*mut c_void, ThreadNumFn>(t) },
        })
    })
}

#[cfg(not(target_os = "linux"))]
fn find() -> Option<Omp> {
    None
}
