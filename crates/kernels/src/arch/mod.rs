//! One module per instruction set, memchr-style: `portable` (the scalar reference of every
//! kernel, always present) and `x86_64` (AVX2, AVX-512 VNNI). Each provides a
//! `crate::table::Kernels` table, chosen among at run time.

pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;
