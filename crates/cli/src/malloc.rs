//! The C allocator's settings for an inference process (glibc on Linux only).
//!
//! glibc gives freed memory back to the system as soon as the top of a heap holds more than
//! its trim threshold (128 KiB until it adapts), and serves blocks above its mmap threshold
//! with fresh mappings. An engine step allocates and frees the same buffers every few
//! milliseconds (attention scratch on each pool thread, logits rows, batch activations), so
//! with the defaults the same pages went back and were faulted in again on every step:
//! about 45,000 page faults a second serving 64 streams of SmolLM2 on two cores, each a
//! kernel entry and a zeroed page. Here freed memory stays in the process for the next step
//! (as llama.cpp keeps its compute buffers); what a process holds is bounded by its peak.

/// Keeps freed memory for reuse: trimming only above 1 GiB free at a heap's top, and fresh
/// mappings only for blocks of 32 MiB and more (glibc's largest dynamic threshold). Call
/// once, first thing in `main`, before other threads start.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn keep_freed_memory() {
    const TRIM: libc::c_int = 1 << 30;
    const MMAP: libc::c_int = 32 << 20;
    // SAFETY: `mallopt` only sets allocator parameters; it is called before any other
    // thread exists. A refused value (0 returned) leaves glibc's default, which is
    // correct, only slower.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP);
    }
}

/// Other allocators keep their own policy.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn keep_freed_memory() {}
