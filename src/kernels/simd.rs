//! Runtime CPU dispatch and a shared output for disjoint strided writes.

/// Defines `fn NAME(args) -> ret` whose body is compiled three times: with AVX-512, with
/// AVX2+FMA (each taken when the CPU has it, detected at run time) and for the baseline target.
/// The body's loops use explicit lanes, so every version computes the same sums in the same order.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[inline(never)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features avx512() was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                #[inline(never)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features avx2() was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Asks for the cache lines of `v` into L2: a hint, for a kernel that will read `v` after
/// work on other data (no fault, no result, nothing on other targets).
#[inline(always)]
pub(crate) fn prefetch_l2(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in v.chunks(16) {
        // SAFETY: a prefetch reads nothing architecturally; the address is inside `v`.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// An output buffer that parallel tasks write through, each to its own disjoint ranges (the
/// strided runs of one channel). Reads and writes outside a task's own ranges are forbidden.
pub struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks only touch disjoint ranges (see `run`), so sharing the pointer is sound.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

impl SharedOut {
    pub fn new(data: &mut [f32]) -> Self {
        SharedOut {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        }
    }

    /// The range `start..start + len`.
    ///
    /// # Safety
    /// No two live slices returned by this method may overlap, and the buffer passed to `new`
    /// must outlive them and not be used otherwise meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn run(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start + len <= self.len,
            "run {start}+{len} outside buffer of {}",
            self.len
        );
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}
