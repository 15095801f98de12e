//! ggml tensor element types and their block layouts.

use std::fmt;

numbered_types! {
    /// The element type of a tensor, with ggml's numeric id as discriminant.
    ///
    /// Every layout here (elements per block, bytes per block) was checked against ggml's
    /// `type_traits` table and the block structs of `ggml-common.h`. Ids that ggml has removed
    /// (4, 5, 31-33, 36-38) are not listed and are rejected when read.
    #[allow(non_camel_case_types)]
    pub enum GgmlType {
        /// 32-bit IEEE float.
        F32 = 0 => "f32",
        /// 16-bit IEEE float.
        F16 = 1 => "f16",
        /// 4-bit, blocks of 32 with an f16 scale.
        Q4_0 = 2 => "q4_0",
        /// 4-bit, blocks of 32 with an f16 scale and minimum.
        Q4_1 = 3 => "q4_1",
        /// 5-bit, blocks of 32 with an f16 scale.
        Q5_0 = 6 => "q5_0",
        /// 5-bit, blocks of 32 with an f16 scale and minimum.
        Q5_1 = 7 => "q5_1",
        /// 8-bit, blocks of 32 with an f16 scale.
        Q8_0 = 8 => "q8_0",
        /// 8-bit, blocks of 32 with an f16 scale and sum.
        Q8_1 = 9 => "q8_1",
        /// 2-bit k-quant, super-blocks of 256.
        Q2_K = 10 => "q2_K",
        /// 3-bit k-quant, super-blocks of 256.
        Q3_K = 11 => "q3_K",
        /// 4-bit k-quant, super-blocks of 256.
        Q4_K = 12 => "q4_K",
        /// 5-bit k-quant, super-blocks of 256.
        Q5_K = 13 => "q5_K",
        /// 6-bit k-quant, super-blocks of 256.
        Q6_K = 14 => "q6_K",
        /// 8-bit k-quant (dot-product intermediate), super-blocks of 256.
        Q8_K = 15 => "q8_K",
        /// i-quant, 2.0625 bits per weight.
        IQ2_XXS = 16 => "iq2_xxs",
        /// i-quant, 2.3125 bits per weight.
        IQ2_XS = 17 => "iq2_xs",
        /// i-quant, 3.0625 bits per weight.
        IQ3_XXS = 18 => "iq3_xxs",
        /// i-quant, 1.5625 bits per weight.
        IQ1_S = 19 => "iq1_s",
        /// Non-linear 4-bit, blocks of 32.
        IQ4_NL = 20 => "iq4_nl",
        /// i-quant, 3.4375 bits per weight.
        IQ3_S = 21 => "iq3_s",
        /// i-quant, 2.5625 bits per weight.
        IQ2_S = 22 => "iq2_s",
        /// Non-linear 4-bit, super-blocks of 256.
        IQ4_XS = 23 => "iq4_xs",
        /// 8-bit signed integer.
        I8 = 24 => "i8",
        /// 16-bit signed integer.
        I16 = 25 => "i16",
        /// 32-bit signed integer.
        I32 = 26 => "i32",
        /// 64-bit signed integer.
        I64 = 27 => "i64",
        /// 64-bit IEEE float.
        F64 = 28 => "f64",
        /// i-quant, 1.75 bits per weight.
        IQ1_M = 29 => "iq1_m",
        /// bfloat16.
        BF16 = 30 => "bf16",
        /// Ternary, 1.6875 bits per weight.
        TQ1_0 = 34 => "tq1_0",
        /// Ternary, 2.0625 bits per weight.
        TQ2_0 = 35 => "tq2_0",
        /// Microscaling FP4, blocks of 32 with an E8M0 scale.
        MXFP4 = 39 => "mxfp4",
    }
}

/// Super-block length of the k-quants, i-quants and ternary types.
const QK_K: u64 = 256;

impl GgmlType {
    /// Elements per block (1 for the plain float and integer types).
    pub fn block_len(self) -> u64 {
        match self {
            GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::F64
            | GgmlType::I8
            | GgmlType::I16
            | GgmlType::I32
            | GgmlType::I64 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1
            | GgmlType::IQ4_NL
            | GgmlType::MXFP4 => 32,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K
            | GgmlType::IQ2_XXS
            | GgmlType::IQ2_XS
            | GgmlType::IQ3_XXS
            | GgmlType::IQ1_S
            | GgmlType::IQ3_S
            | GgmlType::IQ2_S
            | GgmlType::IQ4_XS
            | GgmlType::IQ1_M
            | GgmlType::TQ1_0
            | GgmlType::TQ2_0 => QK_K,
        }
    }

    /// Bytes per block. The comments give the block's fields, in bytes, in file order.
    pub fn block_bytes(self) -> u64 {
        match self {
            GgmlType::I8 => 1,
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => 2,
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F64 | GgmlType::I64 => 8,
            // d(2) qs(16)
            GgmlType::Q4_0 => 18,
            // d(2) m(2) qs(16)
            GgmlType::Q4_1 => 20,
            // d(2) qh(4) qs(16)
            GgmlType::Q5_0 => 22,
            // d(2) m(2) qh(4) qs(16)
            GgmlType::Q5_1 => 24,
            // d(2) qs(32)
            GgmlType::Q8_0 => 34,
            // d(2) s(2) qs(32)
            GgmlType::Q8_1 => 36,
            // scales(16) qs(64) d(2) dmin(2)
            GgmlType::Q2_K => 84,
            // hmask(32) qs(64) scales(12) d(2)
            GgmlType::Q3_K => 110,
            // d(2) dmin(2) scales(12) qs(128)
            GgmlType::Q4_K => 144,
            // d(2) dmin(2) scales(12) qh(32) qs(128)
            GgmlType::Q5_K => 176,
            // ql(128) qh(64) scales(16) d(2)
            GgmlType::Q6_K => 210,
            // d(f32, 4) qs(256) bsums(16 x i16 = 32)
            GgmlType::Q8_K => 292,
            // d(2) qs(32 x u16 = 64)
            GgmlType::IQ2_XXS => 66,
            // d(2) qs(64) scales(8)
            GgmlType::IQ2_XS => 74,
            // d(2) qs(96)
            GgmlType::IQ3_XXS => 98,
            // d(2) qs(32) qh(8 x u16 = 16)
            GgmlType::IQ1_S => 50,
            // d(2) qs(16)
            GgmlType::IQ4_NL => 18,
            // d(2) qs(64) qh(8) signs(32) scales(4)
            GgmlType::IQ3_S => 110,
            // d(2) qs(64) qh(8) scales(8)
            GgmlType::IQ2_S => 82,
            // d(2) scales_h(2) scales_l(4) qs(128)
            GgmlType::IQ4_XS => 136,
            // qs(32) qh(16) scales(8)
            GgmlType::IQ1_M => 56,
            // qs(48) qh(4) d(2)
            GgmlType::TQ1_0 => 54,
            // qs(64) d(2)
            GgmlType::TQ2_0 => 66,
            // e(1) qs(16)
            GgmlType::MXFP4 => 17,
        }
    }

    /// Whether the type stores blocks of more than one element.
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes taken by `n_elements` elements of this type, or `None` when `n_elements` is not a
    /// multiple of [`GgmlType::block_len`] or the size overflows `u64`.
    pub fn row_bytes(self, n_elements: u64) -> Option<u64> {
        let block_len = self.block_len();
        if !n_elements.is_multiple_of(block_len) {
            return None;
        }
        (n_elements / block_len).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        for (i, t) in GgmlType::ALL.iter().enumerate() {
            assert_eq!(GgmlType::from_u32(t.id()), Some(*t));
            for other in &GgmlType::ALL[i + 1..] {
                assert_ne!(t.id(), other.id());
                assert_ne!(t.name(), other.name());
            }
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 40, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_u32(removed), None, "id {removed}");
        }
    }

    #[test]
    fn bits_per_weight_match_ggml_documentation() {
        // Bits per weight as ggml's comments state them, times 10_000 to stay in integers.
        let expected = [
            (GgmlType::Q2_K, 26_250),
            (GgmlType::Q3_K, 34_375),
            (GgmlType::Q4_K, 45_000),
            (GgmlType::Q5_K, 55_000),
            (GgmlType::Q6_K, 65_625),
            (GgmlType::IQ2_XXS, 20_625),
            (GgmlType::IQ2_XS, 23_125),
            (GgmlType::IQ2_S, 25_625),
            (GgmlType::IQ3_XXS, 30_625),
            (GgmlType::IQ3_S, 34_375),
            (GgmlType::IQ1_S, 15_625),
            (GgmlType::IQ1_M, 17_500),
            (GgmlType::TQ1_0, 16_875),
            (GgmlType::TQ2_0, 20_625),
        ];
        for (t, bpw) in expected {
            assert_eq!(t.block_bytes() * 8 * 10_000 / t.block_len(), bpw, "{t}");
        }
    }

    #[test]
    fn row_bytes_checks_blocks_and_overflow() {
        assert_eq!(GgmlType::Q4_0.row_bytes(64), Some(36));
        assert_eq!(GgmlType::Q4_0.row_bytes(33), None);
        assert_eq!(GgmlType::Q6_K.row_bytes(512), Some(420));
        assert_eq!(GgmlType::F32.row_bytes(0), Some(0));
        assert_eq!(GgmlType::F32.row_bytes(u64::MAX / 2), None);
        assert_eq!(GgmlType::F16.row_bytes(u64::MAX / 2), Some(u64::MAX - 1));
        assert!(GgmlType::Q8_0.is_quantized());
        assert!(!GgmlType::BF16.is_quantized());
        assert_eq!(GgmlType::Q4_K.to_string(), "q4_K");
    }
}
