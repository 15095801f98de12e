//! ggml block layouts of the 5-bit formats and the K-quants, byte for byte as in ggml's
//! `ggml-common.h`, each pinned by a compile-time size check.
//!
//! The structs are plain data (`#[repr(C)]`, every field little-endian on disk); the kernels
//! read blocks from byte slices with `from_bytes`, which takes any alignment.

use half::f16;

use crate::types::QK;

/// Elements per K-quant super-block (ggml `QK_K`).
pub const QK_K: usize = 256;

/// Copies `N` bytes at `at` out of `b` (the callers pass in-range constant offsets of a
/// fixed-size block).
fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

/// ggml `block_q5_0`: value `j` is `(q_j - 16) * d` with the 5-bit `q_j` = low nibble from
/// `qs` (element `k` in the low nibble of byte `k`, element `k + 16` in its high nibble) plus
/// bit `j` of the little-endian `qh` as bit 4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: f16,
    /// Fifth bit of every element, as a little-endian `u32`.
    pub qh: [u8; 4],
    /// Low nibbles.
    pub qs: [u8; QK / 2],
}

/// ggml `block_q5_1`: value `j` is `q_j * d + m`, the 5-bit `q_j` packed as in [`BlockQ5_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset).
    pub m: f16,
    /// Fifth bit of every element, as a little-endian `u32`.
    pub qh: [u8; 4],
    /// Low nibbles.
    pub qs: [u8; QK / 2],
}

/// ggml `block_q2_K`: 16 sub-blocks of 16; sub-block `s` has scale `d * (scales[s] & 15)` and
/// minimum `dmin * (scales[s] >> 4)`; value = `scale * q - min` with a 2-bit `q`.
///
/// Quant layout: element `e = 128n + 32j + l` (n < 2, j < 4, l < 32) is bits `2j..2j+2` of
/// `qs[32n + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ2K {
    /// Per sub-block 4-bit scale (low nibble) and 4-bit minimum (high nibble).
    pub scales: [u8; QK_K / 16],
    /// 2-bit quants.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the minimums.
    pub dmin: f16,
}

/// ggml `block_q3_K`: 16 sub-blocks of 16, value = `d * (sc_s - 32) * (q - 4·[hbit clear])`.
///
/// The 2-bit low part is laid out as in [`BlockQ2K`]; the high bit of element
/// `e = 32g + l` is bit `g` of `hmask[l]`. The 6-bit scales: the low nibble of `sc_s` is the
/// low (s < 8) or high (s ≥ 8) nibble of `scales[s % 8]`, its top two bits are bits
/// `2(s/4)..2(s/4)+2` of `scales[8 + s % 4]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ3K {
    /// High bits of the 3-bit quants.
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits of the quants.
    pub qs: [u8; QK_K / 4],
    /// Sixteen 6-bit scales, packed.
    pub scales: [u8; 12],
    /// Super-block scale.
    pub d: f16,
}

/// ggml `block_q4_K`: 8 sub-blocks of 32, value = `d·sc_s · q - dmin·m_s` with 6-bit
/// `sc_s`, `m_s` (ggml `get_scale_min_k4`) and a 4-bit `q`: element `e = 64n + 32h + l` is
/// the low (h = 0) or high (h = 1) nibble of `qs[32n + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums, packed.
    pub scales: [u8; 12],
    /// 4-bit quants.
    pub qs: [u8; QK_K / 2],
}

/// ggml `block_q5_K`: as [`BlockQ4K`] with a fifth bit: element `e` of sub-block `s = e / 32`
/// has bit `s` of `qh[e % 32]` as bit 4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums, packed.
    pub scales: [u8; 12],
    /// High bits.
    pub qh: [u8; QK_K / 8],
    /// Low nibbles.
    pub qs: [u8; QK_K / 2],
}

/// ggml `block_q6_K`: 16 sub-blocks of 16, value = `d * scales[s] * (q - 32)` with a 6-bit
/// `q`: element `e = 128n + 32k + l` takes its low nibble from `ql[64n + l + 32(k & 1)]`
/// (low nibble for k < 2, high for k ≥ 2) and its top two bits from bits `2k..2k+2` of
/// `qh[32n + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    /// Low 4 bits.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits.
    pub qh: [u8; QK_K / 4],
    /// Signed 8-bit sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: f16,
}

/// ggml `block_q8_K` (activations only): value `j` is `qs[j] * d`; `bsums[g]` is the sum of
/// `qs[16g .. 16g + 16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    /// Scale (f32, unlike the weight formats).
    pub d: f32,
    /// Signed 8-bit values in -127..=127.
    pub qs: [i8; QK_K],
    /// Sums of groups of 16 quants.
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ2K>() == 84);
const _: () = assert!(size_of::<BlockQ3K>() == 110);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockQ5K>() == 176);
const _: () = assert!(size_of::<BlockQ6K>() == 210);
const _: () = assert!(size_of::<BlockQ8K>() == 292);

impl BlockQ5_0 {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: f16_at(b, 0),
            qh: arr(b, 2),
            qs: arr(b, 6),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..6].copy_from_slice(&self.qh);
        out[6..].copy_from_slice(&self.qs);
        out
    }
}

impl BlockQ5_1 {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qh: arr(b, 4),
            qs: arr(b, 8),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.m.to_le_bytes());
        out[4..8].copy_from_slice(&self.qh);
        out[8..].copy_from_slice(&self.qs);
        out
    }
}

impl BlockQ2K {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            scales: arr(b, 0),
            qs: arr(b, 16),
            d: f16_at(b, 80),
            dmin: f16_at(b, 82),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..16].copy_from_slice(&self.scales);
        out[16..80].copy_from_slice(&self.qs);
        out[80..82].copy_from_slice(&self.d.to_le_bytes());
        out[82..].copy_from_slice(&self.dmin.to_le_bytes());
        out
    }
}

impl BlockQ3K {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            hmask: arr(b, 0),
            qs: arr(b, 32),
            scales: arr(b, 96),
            d: f16_at(b, 108),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..32].copy_from_slice(&self.hmask);
        out[32..96].copy_from_slice(&self.qs);
        out[96..108].copy_from_slice(&self.scales);
        out[108..].copy_from_slice(&self.d.to_le_bytes());
        out
    }

    /// The sixteen signed sub-block scales (`sc_s - 32`, in -32..=31).
    pub fn unpacked_scales(&self) -> [i8; 16] {
        std::array::from_fn(|s| {
            let low = if s < 8 {
                self.scales[s] & 0x0F
            } else {
                self.scales[s - 8] >> 4
            };
            let high = (self.scales[8 + s % 4] >> (2 * (s / 4))) & 3;
            ((low | (high << 4)) as i8) - 32
        })
    }
}

/// ggml `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j < 8` of a Q4_K/Q5_K
/// block. Bytes 0..4 hold scales 0..4 (low 6 bits), bytes 4..8 minimums 0..4; sub-blocks 4..8
/// take their low nibbles from bytes 8..12 and their top two bits from the top bits of bytes
/// 0..8.
pub(crate) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl BlockQ4K {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: arr(b, 4),
            qs: arr(b, 16),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        out[4..16].copy_from_slice(&self.scales);
        out[16..].copy_from_slice(&self.qs);
        out
    }

    /// The eight 6-bit (scale, minimum) pairs.
    pub fn unpacked_scales(&self) -> [(u8, u8); 8] {
        std::array::from_fn(|j| scale_min_k4(j, &self.scales))
    }
}

impl BlockQ5K {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: arr(b, 4),
            qh: arr(b, 16),
            qs: arr(b, 48),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        out[4..16].copy_from_slice(&self.scales);
        out[16..48].copy_from_slice(&self.qh);
        out[48..].copy_from_slice(&self.qs);
        out
    }

    /// The eight 6-bit (scale, minimum) pairs.
    pub fn unpacked_scales(&self) -> [(u8, u8); 8] {
        std::array::from_fn(|j| scale_min_k4(j, &self.scales))
    }
}

impl BlockQ6K {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            ql: arr(b, 0),
            qh: arr(b, 128),
            scales: arr::<16>(b, 192).map(|v| v as i8),
            d: f16_at(b, 208),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..128].copy_from_slice(&self.ql);
        out[128..192].copy_from_slice(&self.qh);
        out[192..208].copy_from_slice(&self.scales.map(|v| v as u8));
        out[208..].copy_from_slice(&self.d.to_le_bytes());
        out
    }
}

impl BlockQ8K {
    /// Size in bytes.
    pub const BYTES: usize = size_of::<Self>();

    /// Parses a block from its little-endian byte form (any alignment).
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        Self {
            d: f32::from_le_bytes(arr(b, 0)),
            qs: arr::<QK_K>(b, 4).map(|v| v as i8),
            bsums: std::array::from_fn(|g| i16::from_le_bytes(arr(b, 4 + QK_K + 2 * g))),
        }
    }

    /// Writes the block in its byte form.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..4].copy_from_slice(&self.d.to_le_bytes());
        out[4..4 + QK_K].copy_from_slice(&self.qs.map(|v| v as u8));
        for (g, s) in self.bsums.iter().enumerate() {
            let at = 4 + QK_K + 2 * g;
            out[at..at + 2].copy_from_slice(&s.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_through_bytes() {
        let b: [u8; BlockQ6K::BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        assert_eq!(BlockQ6K::from_bytes(&b).to_bytes(), b);
        let b: [u8; BlockQ3K::BYTES] = std::array::from_fn(|i| (i * 5 + 1) as u8);
        assert_eq!(BlockQ3K::from_bytes(&b).to_bytes(), b);
        let b: [u8; BlockQ5K::BYTES] = std::array::from_fn(|i| (i * 11) as u8);
        assert_eq!(BlockQ5K::from_bytes(&b).to_bytes(), b);
        let b: [u8; BlockQ8K::BYTES] = std::array::from_fn(|i| (i * 13) as u8);
        assert_eq!(BlockQ8K::from_bytes(&b).to_bytes(), b);
        let b: [u8; BlockQ5_1::BYTES] = std::array::from_fn(|i| (i * 3) as u8);
        assert_eq!(BlockQ5_1::from_bytes(&b).to_bytes(), b);
        // Field offsets: Q2_K keeps its f16 scales at the end.
        let q = BlockQ2K::from_bytes(&std::array::from_fn(|i| i as u8));
        assert_eq!(q.d.to_bits(), u16::from_le_bytes([80, 81]));
        assert_eq!(q.dmin.to_bits(), u16::from_le_bytes([82, 83]));
    }

    #[test]
    fn k4_scales_unpack_as_ggml_packs_them() {
        // Pack scales (10+j, j<8) and mins (40+j) the way quantize_row_q4_K_ref does.
        let (ls, lm): ([u8; 8], [u8; 8]) = (
            std::array::from_fn(|j| 10 + j as u8 * 7),
            std::array::from_fn(|j| 40 + j as u8),
        );
        let mut q = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                q[j] = ls[j];
                q[j + 4] = lm[j];
            } else {
                q[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
                q[j - 4] |= (ls[j] >> 4) << 6;
                q[j] |= (lm[j] >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (ls[j], lm[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q3_k_scales_unpack_as_ggml_packs_them() {
        let want: [i8; 16] = std::array::from_fn(|j| j as i8 * 4 - 32);
        let mut b = BlockQ3K {
            hmask: [0; 32],
            qs: [0; 64],
            scales: [0; 12],
            d: f16::ONE,
        };
        for (j, &w) in want.iter().enumerate() {
            let l = (w + 32) as u8;
            if j < 8 {
                b.scales[j] = l & 0xF;
            } else {
                b.scales[j - 8] |= (l & 0xF) << 4;
            }
            b.scales[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
        }
        assert_eq!(b.unpacked_scales(), want);
    }
}
