//! ggml's block formats, byte for byte as in ggml's `ggml-common.h`: every `#[repr(C)]`
//! block struct, each pinned by compile-time size checks, and the iterators the portable
//! kernels walk rows of blocks with.
//!
//! The structs are plain data, every field little-endian on disk. Kernels read blocks from
//! byte slices with `from_bytes`, which takes any alignment (a GGUF tensor's rows start at
//! any byte), so a block is never borrowed in place.

use half::f16;

/// Elements per quantisation block in every 32-element ggml format (Q4_0 … Q8_1).
pub const QK: usize = 32;

/// Elements per K-quant super-block (ggml `QK_K`).
pub const QK_K: usize = 256;

/// A field of a block as stored: little-endian, any alignment.
trait LeField: Sized {
    /// Reads the field from the start of `b`.
    fn read(b: &[u8]) -> Self;
    /// Writes the field to the start of `out`.
    fn write(&self, out: &mut [u8]);
}

impl LeField for f16 {
    fn read(b: &[u8]) -> Self {
        f16::from_le_bytes([b[0], b[1]])
    }
    fn write(&self, out: &mut [u8]) {
        out[..2].copy_from_slice(&self.to_le_bytes());
    }
}

impl LeField for f32 {
    fn read(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_le_bytes());
    }
}

impl<const N: usize> LeField for [u8; N] {
    fn read(b: &[u8]) -> Self {
        let mut out = [0u8; N];
        out.copy_from_slice(&b[..N]);
        out
    }
    fn write(&self, out: &mut [u8]) {
        out[..N].copy_from_slice(self);
    }
}

impl<const N: usize> LeField for [i8; N] {
    fn read(b: &[u8]) -> Self {
        std::array::from_fn(|j| b[j] as i8)
    }
    fn write(&self, out: &mut [u8]) {
        for (o, &q) in out[..N].iter_mut().zip(self) {
            *o = q as u8;
        }
    }
}

impl<const N: usize> LeField for [i16; N] {
    fn read(b: &[u8]) -> Self {
        std::array::from_fn(|j| i16::from_le_bytes([b[2 * j], b[2 * j + 1]]))
    }
    fn write(&self, out: &mut [u8]) {
        for (o, s) in out[..2 * N].chunks_exact_mut(2).zip(self) {
            o.copy_from_slice(&s.to_le_bytes());
        }
    }
}

/// Defines each block struct with its byte size: `#[repr(C)]`, a compile-time check that
/// the fields fill exactly that many bytes with no padding (so the fields' order is the
/// byte layout), `BYTES`, and `from_bytes`/`to_bytes` that read and write the fields in
/// order.
macro_rules! block_formats {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident ($bytes:literal) {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    )*) => {$(
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty ),*
        }

        const _: () = assert!(size_of::<$name>() == $bytes);
        const _: () = assert!(0 $( + size_of::<$ty>() )* == $bytes);

        impl $name {
            /// Size in bytes.
            pub const BYTES: usize = size_of::<Self>();

            /// The block of all-zero bytes (every scale and quant 0).
            #[allow(dead_code)] // not every format is built from zero
            pub(crate) fn zeroed() -> Self {
                Self::from_bytes(&[0; Self::BYTES])
            }

            /// Parses a block from its little-endian byte form (any alignment).
            pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
                let mut at = 0;
                $(
                    let $field = <$ty as LeField>::read(&b[at..]);
                    at += size_of::<$ty>();
                )*
                debug_assert_eq!(at, Self::BYTES);
                Self { $($field),* }
            }

            /// Writes the block in its byte form.
            pub fn to_bytes(&self) -> [u8; Self::BYTES] {
                let mut out = [0u8; Self::BYTES];
                let mut at = 0;
                $(
                    self.$field.write(&mut out[at..]);
                    at += size_of::<$ty>();
                )*
                debug_assert_eq!(at, Self::BYTES);
                out
            }
        }
    )*};
}

block_formats! {
    /// ggml `block_q4_0`: value `j` is `(nibble_j - 8) * d`; byte `k` of `qs` holds element
    /// `k` in its low nibble and element `k + 16` in its high nibble.
    pub struct BlockQ4_0 (18) {
        /// Scale.
        pub d: f16,
        /// Packed 4-bit values.
        pub qs: [u8; QK / 2],
    }

    /// ggml `block_q4_1`: value `j` is `nibble_j * d + m`, nibbles packed as in
    /// [`BlockQ4_0`].
    pub struct BlockQ4_1 (20) {
        /// Scale.
        pub d: f16,
        /// Minimum (offset).
        pub m: f16,
        /// Packed 4-bit values.
        pub qs: [u8; QK / 2],
    }

    /// ggml `block_q8_0`: value `j` is `qs[j] * d`.
    pub struct BlockQ8_0 (34) {
        /// Scale.
        pub d: f16,
        /// Signed 8-bit values.
        pub qs: [i8; QK],
    }

    /// ggml `block_q8_1` (activations only): value `j` is `qs[j] * d`; `s` is `d * sum(qs)`.
    pub struct BlockQ8_1 (36) {
        /// Scale.
        pub d: f16,
        /// `d * sum(qs)`, computed in f32 from the unrounded `d`, then stored as f16.
        pub s: f16,
        /// Signed 8-bit values.
        pub qs: [i8; QK],
    }

    /// ggml `block_q5_0`: value `j` is `(q_j - 16) * d` with the 5-bit `q_j` = low nibble
    /// from `qs` (element `k` in the low nibble of byte `k`, element `k + 16` in its high
    /// nibble) plus bit `j` of the little-endian `qh` as bit 4.
    pub struct BlockQ5_0 (22) {
        /// Scale.
        pub d: f16,
        /// Fifth bit of every element, as a little-endian `u32`.
        pub qh: [u8; 4],
        /// Low nibbles.
        pub qs: [u8; QK / 2],
    }

    /// ggml `block_q5_1`: value `j` is `q_j * d + m`, the 5-bit `q_j` packed as in
    /// [`BlockQ5_0`].
    pub struct BlockQ5_1 (24) {
        /// Scale.
        pub d: f16,
        /// Minimum (offset).
        pub m: f16,
        /// Fifth bit of every element, as a little-endian `u32`.
        pub qh: [u8; 4],
        /// Low nibbles.
        pub qs: [u8; QK / 2],
    }

    /// ggml `block_q2_K`: 16 sub-blocks of 16; sub-block `s` has scale
    /// `d * (scales[s] & 15)` and minimum `dmin * (scales[s] >> 4)`; value =
    /// `scale * q - min` with a 2-bit `q`.
    ///
    /// Quant layout: element `e = 128n + 32j + l` (n < 2, j < 4, l < 32) is bits `2j..2j+2`
    /// of `qs[32n + l]`.
    pub struct BlockQ2K (84) {
        /// Per sub-block 4-bit scale (low nibble) and 4-bit minimum (high nibble).
        pub scales: [u8; QK_K / 16],
        /// 2-bit quants.
        pub qs: [u8; QK_K / 4],
        /// Super-block scale of the scales.
        pub d: f16,
        /// Super-block scale of the minimums.
        pub dmin: f16,
    }

    /// ggml `block_q3_K`: 16 sub-blocks of 16, value = `d * (sc_s - 32) * (q - 4·[hbit
    /// clear])`.
    ///
    /// The 2-bit low part is laid out as in [`BlockQ2K`]; the high bit of element
    /// `e = 32g + l` is bit `g` of `hmask[l]`. The 6-bit scales: the low nibble of `sc_s` is
    /// the low (s < 8) or high (s ≥ 8) nibble of `scales[s % 8]`, its top two bits are bits
    /// `2(s/4)..2(s/4)+2` of `scales[8 + s % 4]`.
    pub struct BlockQ3K (110) {
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
    /// `sc_s`, `m_s` (ggml `get_scale_min_k4`) and a 4-bit `q`: element `e = 64n + 32h + l`
    /// is the low (h = 0) or high (h = 1) nibble of `qs[32n + l]`.
    pub struct BlockQ4K (144) {
        /// Super-block scale of the scales.
        pub d: f16,
        /// Super-block scale of the minimums.
        pub dmin: f16,
        /// Eight 6-bit scales and eight 6-bit minimums, packed.
        pub scales: [u8; 12],
        /// 4-bit quants.
        pub qs: [u8; QK_K / 2],
    }

    /// ggml `block_q5_K`: as [`BlockQ4K`] with a fifth bit: element `e` of sub-block
    /// `s = e / 32` has bit `s` of `qh[e % 32]` as bit 4.
    pub struct BlockQ5K (176) {
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

    /// ggml `block_q6_K`: 16 sub-blocks of 16, value = `d * scales[s] * (q - 32)` with a
    /// 6-bit `q`: element `e = 128n + 32k + l` takes its low nibble from
    /// `ql[64n + l + 32(k & 1)]` (low nibble for k < 2, high for k ≥ 2) and its top two bits
    /// from bits `2k..2k+2` of `qh[32n + l]`.
    pub struct BlockQ6K (210) {
        /// Low 4 bits.
        pub ql: [u8; QK_K / 2],
        /// High 2 bits.
        pub qh: [u8; QK_K / 4],
        /// Signed 8-bit sub-block scales.
        pub scales: [i8; QK_K / 16],
        /// Super-block scale.
        pub d: f16,
    }

    /// ggml `block_q8_K` (activations only): value `j` is `qs[j] * d`; `bsums[g]` is the sum
    /// of `qs[16g .. 16g + 16]`.
    pub struct BlockQ8K (292) {
        /// Scale (f32, unlike the weight formats).
        pub d: f32,
        /// Signed 8-bit values in -127..=127.
        pub qs: [i8; QK_K],
        /// Sums of groups of 16 quants.
        pub bsums: [i16; QK_K / 16],
    }
}

impl BlockQ3K {
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
    /// The eight 6-bit (scale, minimum) pairs.
    pub fn unpacked_scales(&self) -> [(u8, u8); 8] {
        std::array::from_fn(|j| scale_min_k4(j, &self.scales))
    }
}

impl BlockQ5K {
    /// The eight 6-bit (scale, minimum) pairs.
    pub fn unpacked_scales(&self) -> [(u8, u8); 8] {
        std::array::from_fn(|j| scale_min_k4(j, &self.scales))
    }
}

/// Iterates the parsed block pairs of a weight row and an activation row (as many whole
/// blocks as both hold).
pub(crate) fn blocks<'a, W: 'a, X: 'a, const WB: usize, const XB: usize>(
    w: &'a [u8],
    x: &'a [u8],
    pw: fn(&[u8; WB]) -> W,
    px: fn(&[u8; XB]) -> X,
) -> impl Iterator<Item = (W, X)> + 'a {
    w.as_chunks::<WB>()
        .0
        .iter()
        .zip(x.as_chunks::<XB>().0)
        .map(move |(a, b)| (pw(a), px(b)))
}

/// Iterates (parsed block, its `elems` outputs) for dequantisation, as many as both hold.
pub(crate) fn dequant_blocks<'a, B: 'a, const N: usize>(
    src: &'a [u8],
    dst: &'a mut [f32],
    elems: usize,
    parse: fn(&[u8; N]) -> B,
) -> impl Iterator<Item = (B, &'a mut [f32])> + 'a {
    src.as_chunks::<N>()
        .0
        .iter()
        .zip(dst.chunks_exact_mut(elems))
        .map(move |(b, out)| (parse(b), out))
}

// ---- The packed layout (packed matrices, read by the packed kernels) -----------------------

/// Rows per group of a packed matrix.
pub(crate) const GROUP: usize = 16;
/// Bytes of one (group, block) cell of packed Q4_0/Q4_1: scales, offsets, four nibble
/// vectors.
pub(crate) const CELL: usize = 64 + 4 * 64;
/// Bytes of one (group, block) cell of packed Q8_0: scales and eight byte vectors. Its
/// offsets are always `Q8_M·d` (exact), so the kernels compute them instead of reading them.
pub(crate) const CELL8: usize = 32 + 8 * 64;
/// Q8_0's offset per unit of scale: its bytes are stored as `q + 128`.
pub(crate) const Q8_M: f32 = -128.0;

/// Where the vectors of a packed cell start: after the scales and (Q4_0, Q4_1) the offsets.
pub(crate) const fn vecs_at(bytes: bool) -> usize {
    if bytes { 32 } else { 64 }
}
/// Activation bytes per block the packed kernels read: 32 quants.
pub(crate) const XQ: usize = QK;

// ---- The K layouts (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K repacked; see the packing module) -------

/// How a super-block's offset term is formed (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offset {
    /// `Σ_s mn_s·x_s` with the minimums stored per row and sub-block (Q4_K, Q5_K).
    Mins,
    /// `k·Σ_s sc_s·x_s` (Q6_K: `k = −32`).
    Scales(i32),
    /// `k·Σ x` over the super-block (Q5_0: `−16`; Q5_1: `1`).
    Sum(i32),
}

/// The packed layout of one of these types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KLayout {
    /// Columns per super-block (one `a`, `b` and activation scale each): 256 or 32.
    pub(crate) sb: usize,
    /// Columns per sub-block with its own integer scale: 32 or 16 (`sb` when unscaled).
    pub(crate) sub: usize,
    /// Bits per level: 4, 5 or 6.
    pub(crate) bits: u32,
    /// Whether sub-block scales are stored (else every `sc_s` is 1).
    pub(crate) scaled: bool,
    /// Whether `b` is stored (else `b = a`).
    pub(crate) b_stored: bool,
    /// The offset term.
    pub(crate) offset: Offset,
}

impl KLayout {
    /// Sub-blocks per super-block.
    pub(crate) fn n_sub(&self) -> usize {
        self.sb / self.sub
    }

    /// Offset of the `b` values in a cell.
    pub(crate) fn b_at(&self) -> usize {
        2 * GROUP
    }

    /// Offset of the sub-block scales.
    pub(crate) fn sc_at(&self) -> usize {
        self.b_at() + if self.b_stored { 2 * GROUP } else { 0 }
    }

    /// Offset of the minimums.
    pub(crate) fn mn_at(&self) -> usize {
        self.sc_at() + if self.scaled { GROUP * self.n_sub() } else { 0 }
    }

    /// Offset of the first 32-element run's nibble vectors.
    pub(crate) fn runs_at(&self) -> usize {
        self.mn_at()
            + if self.offset == Offset::Mins {
                GROUP * self.n_sub()
            } else {
                0
            }
    }

    /// Bytes per 32-element run: four nibble vectors and the high bits' planes (one per
    /// bit above four).
    pub(crate) fn run_bytes(&self) -> usize {
        64 * self.bits as usize
    }

    /// Bytes per cell (16 rows × one super-block).
    pub(crate) fn cell_bytes(&self) -> usize {
        self.runs_at() + self.sb / QK * self.run_bytes()
    }

    /// The level of element `e` of row `lane` in `cell` (the scalar twin reads it so).
    pub(crate) fn level(&self, cell: &[u8], lane: usize, e: usize) -> i32 {
        let (run, i) = (e / QK, e % QK);
        let high = i >= 16;
        let (j, k) = ((i % 16) / 4, i % 4);
        let at = self.runs_at() + run * self.run_bytes();
        let byte = cell[at + 64 * j + 4 * lane + k];
        let mut q = i32::from(if high { byte >> 4 } else { byte & 0x0F });
        let plane = at + 256 + 4 * lane + k;
        match self.bits {
            5 => q |= i32::from((cell[plane] >> (2 * j + usize::from(high))) & 1) << 4,
            6 => q |= i32::from((cell[plane + 64 * usize::from(high)] >> (2 * j)) & 3) << 4,
            _ => {}
        }
        q
    }

    /// `(a, b)` of row `lane` in `cell`.
    pub(crate) fn ab(&self, cell: &[u8], lane: usize) -> (f32, f32) {
        let f = |at: usize| f16::from_le_bytes([cell[at + 2 * lane], cell[at + 2 * lane + 1]]);
        let a = f(0).to_f32();
        (
            a,
            if self.b_stored {
                f(self.b_at()).to_f32()
            } else {
                a
            },
        )
    }

    /// The scale of sub-block `s` of row `lane` (1 when unscaled).
    pub(crate) fn scale(&self, cell: &[u8], lane: usize, s: usize) -> i32 {
        if self.scaled {
            i32::from(cell[self.sc_at() + GROUP * s + lane] as i8)
        } else {
            1
        }
    }

    /// The stored minimum of sub-block `s` of row `lane` ([`Offset::Mins`] only).
    pub(crate) fn min(&self, cell: &[u8], lane: usize, s: usize) -> i32 {
        i32::from(cell[self.mn_at() + GROUP * s + lane] as i8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_through_bytes() {
        let b = BlockQ4_1 {
            d: f16::from_f32(0.5),
            m: f16::from_f32(-2.0),
            qs: std::array::from_fn(|i| i as u8 * 17),
        };
        assert_eq!(BlockQ4_1::from_bytes(&b.to_bytes()), b);
        let b = BlockQ8_1 {
            d: f16::from_f32(0.25),
            s: f16::from_f32(3.0),
            qs: std::array::from_fn(|i| i as i8 - 16),
        };
        assert_eq!(BlockQ8_1::from_bytes(&b.to_bytes()), b);
        let bytes = b.to_bytes();
        assert_eq!(&bytes[..2], &[0x00, 0x34]); // 0.25 in f16 is 0x3400, little-endian
    }

    #[test]
    fn wide_blocks_round_trip_through_bytes() {
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
        let q = crate::reference::pack_k4_scales(&ls, &lm);
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
