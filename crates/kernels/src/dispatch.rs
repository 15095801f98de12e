//! The one-time choice among the kernel tables (`crate::table`).
//!
//! Each instruction set provides one flat `&'static Kernels` (`crate::arch`). The SIMD tables
//! are only reachable through constructors that check the CPU first (memchr's pattern), so
//! holding a table is proof that its instructions are available. The choice is made once per
//! process and cached in a `OnceLock`; a call costs one atomic load.

use std::sync::OnceLock;

use crate::table::Kernels;

static ACTIVE: OnceLock<&'static Kernels> = OnceLock::new();

/// The best implementation this CPU supports, detected on first use.
pub(crate) fn active() -> &'static Kernels {
    ACTIVE.get_or_init(|| available().pop().unwrap_or(&crate::arch::portable::SCALAR))
}

/// Names the best level a run may use (`scalar`, `avx2`, `avx512vnni`): benchmarks and
/// tests of a slower path on a faster CPU. Unset, or a name not listed, means no limit.
const LIMIT_VAR: &str = "SOUVERAIN_SIMD";

/// Whether the `SOUVERAIN_SIMD` limit lets a table be used.
fn allowed(name: &str) -> bool {
    match std::env::var(LIMIT_VAR).as_deref() {
        Ok("scalar") => name == "scalar",
        Ok("avx2") => name != "avx512vnni",
        _ => true,
    }
}

/// Every implementation this CPU can run (within the `SOUVERAIN_SIMD` limit), scalar
/// first and best last (tests compare them all).
pub(crate) fn available() -> Vec<&'static Kernels> {
    let mut all = vec![&crate::arch::portable::SCALAR];
    // Worst to best; later work (NEON) adds its constructors here.
    #[cfg(target_arch = "x86_64")]
    all.extend(crate::arch::x86_64::avx2::table());
    #[cfg(target_arch = "x86_64")]
    all.extend(crate::arch::x86_64::avx512vnni::table());
    all.retain(|k| allowed(k.name));
    all
}
