//! x86-64 kernels: `avx2` (+FMA, F16C; with `avx2_kquants`, `avx2_tiles` and the packed
//! kernel `avx2_packed`) and `avx512vnni` (built on the AVX2 table), the attention kernels of
//! both in `attn`, sharing the building blocks in `helpers`.
//!
//! Layout of every kernel: a safe wrapper (the table entry) that clamps lengths and calls
//! an `unsafe` `#[target_feature]` function on raw pointers. The wrappers are only reachable
//! through the tables, which each module's `table()` hands out after checking the CPU; that
//! check is what makes the `unsafe` calls in the wrappers sound.
#![allow(unsafe_code)]

mod attn;
pub(crate) mod avx2;
mod avx2_kpacked;
mod avx2_kquants;
mod avx2_packed;
mod avx2_tiles;
mod avx512_kpacked;
pub(crate) mod avx512vnni;
mod helpers;
