//! Weight types, the error type and the `Matrix` view.

use crate::formats::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, QK, QK_K,
};

/// How the elements of a weight matrix are stored (the subset of GGUF/ggml tensor types
/// these kernels understand).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    /// IEEE-754 single precision, 4 bytes per element.
    F32,
    /// IEEE-754 half precision, 2 bytes per element.
    F16,
    /// bfloat16, 2 bytes per element.
    BF16,
    /// ggml Q4_0: blocks of 32 4-bit values with one f16 scale (18 bytes).
    Q4_0,
    /// ggml Q4_1: blocks of 32 4-bit values with an f16 scale and an f16 minimum (20 bytes).
    Q4_1,
    /// ggml Q8_0: blocks of 32 8-bit values with one f16 scale (34 bytes).
    Q8_0,
    /// ggml Q5_0: blocks of 32 5-bit values with one f16 scale (22 bytes).
    Q5_0,
    /// ggml Q5_1: blocks of 32 5-bit values with an f16 scale and minimum (24 bytes).
    Q5_1,
    /// ggml Q2_K: super-blocks of 256 2-bit values, 4-bit sub-block scales and minimums
    /// (84 bytes).
    #[allow(non_camel_case_types)]
    Q2_K,
    /// ggml Q3_K: super-blocks of 256 3-bit values, 6-bit sub-block scales (110 bytes).
    #[allow(non_camel_case_types)]
    Q3_K,
    /// ggml Q4_K: super-blocks of 256 4-bit values, 6-bit sub-block scales and minimums
    /// (144 bytes).
    #[allow(non_camel_case_types)]
    Q4_K,
    /// ggml Q5_K: super-blocks of 256 5-bit values, 6-bit sub-block scales and minimums
    /// (176 bytes).
    #[allow(non_camel_case_types)]
    Q5_K,
    /// ggml Q6_K: super-blocks of 256 6-bit values, 8-bit sub-block scales (210 bytes).
    #[allow(non_camel_case_types)]
    Q6_K,
}

impl WeightType {
    /// Number of elements in one block (1 for the float types).
    pub const fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 | Self::Q5_0 | Self::Q5_1 => QK,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => QK_K,
        }
    }

    /// Number of bytes one block occupies.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => BlockQ4_0::BYTES,
            Self::Q4_1 => BlockQ4_1::BYTES,
            Self::Q8_0 => BlockQ8_0::BYTES,
            Self::Q5_0 => BlockQ5_0::BYTES,
            Self::Q5_1 => BlockQ5_1::BYTES,
            Self::Q2_K => BlockQ2K::BYTES,
            Self::Q3_K => BlockQ3K::BYTES,
            Self::Q4_K => BlockQ4K::BYTES,
            Self::Q5_K => BlockQ5K::BYTES,
            Self::Q6_K => BlockQ6K::BYTES,
        }
    }

    /// Bytes needed for a row of `n` elements; `None` when `n` is not a whole number of
    /// blocks or the size overflows `usize`.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }
}

/// Errors from the kernels: always a caller-side size mismatch, with the sizes involved.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A row length is not a whole number of blocks of the weight type.
    #[error("{ty:?}: {cols} elements per row is not a multiple of the block length {block_len}")]
    NotBlockMultiple {
        /// The weight type.
        ty: WeightType,
        /// The offending row length in elements.
        cols: usize,
        /// The block length of `ty`.
        block_len: usize,
    },
    /// A byte buffer does not have the size its shape implies.
    #[error("{what}: {ty:?} data for {rows}x{cols} needs {expected} bytes, got {actual}")]
    DataSize {
        /// What the buffer is.
        what: &'static str,
        /// The weight type.
        ty: WeightType,
        /// Rows in the shape.
        rows: usize,
        /// Columns in the shape.
        cols: usize,
        /// Bytes the shape implies.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A float slice does not have the length the other arguments imply.
    #[error("{what}: expected {expected} elements, got {actual}")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// Length implied by the other arguments.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// A shape's size does not fit in `usize`.
    #[error("{what}: size of {a} x {b} overflows")]
    Overflow {
        /// What was being sized.
        what: &'static str,
        /// First factor.
        a: usize,
        /// Second factor.
        b: usize,
    },
}

/// A weight matrix stored row-major as GGUF stores it: `rows` rows of `cols` elements each
/// (GGUF dims `[cols, rows]`), every row a whole number of blocks of its type.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    ty: WeightType,
    data: &'a [u8],
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl<'a> Matrix<'a> {
    /// Wraps `data` as a `rows` x `cols` matrix of type `ty`, checking that `cols` is a whole
    /// number of blocks and that `data` holds exactly `rows` rows.
    pub fn new(
        ty: WeightType,
        data: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        let row_bytes = checked_row_bytes(ty, cols)?;
        let expected = rows.checked_mul(row_bytes).ok_or(KernelError::Overflow {
            what: "matrix bytes",
            a: rows,
            b: row_bytes,
        })?;
        if data.len() != expected {
            return Err(KernelError::DataSize {
                what: "matrix",
                ty,
                rows,
                cols,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self {
            ty,
            data,
            rows,
            cols,
            row_bytes,
        })
    }

    /// The element type.
    pub fn ty(&self) -> WeightType {
        self.ty
    }

    /// The raw bytes of the whole matrix.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of elements per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The bytes of row `i`.
    ///
    /// # Panics
    ///
    /// If `i >= self.rows()`; use [`Matrix::get_row`] for a checked lookup.
    pub fn row(&self, i: usize) -> &'a [u8] {
        match self.get_row(i) {
            Some(r) => r,
            None => panic!("row {i} out of range for a matrix of {} rows", self.rows),
        }
    }

    /// The bytes of row `i`, or `None` when out of range.
    pub fn get_row(&self, i: usize) -> Option<&'a [u8]> {
        if i >= self.rows {
            return None;
        }
        let start = i * self.row_bytes;
        self.data.get(start..start + self.row_bytes)
    }
}

/// `ty.row_bytes(cols)` with the failure turned into a typed error.
pub(crate) fn checked_row_bytes(ty: WeightType, cols: usize) -> Result<usize, KernelError> {
    if !cols.is_multiple_of(ty.block_len()) {
        return Err(KernelError::NotBlockMultiple {
            ty,
            cols,
            block_len: ty.block_len(),
        });
    }
    ty.row_bytes(cols).ok_or(KernelError::Overflow {
        what: "row bytes",
        a: cols / ty.block_len(),
        b: ty.block_bytes(),
    })
}

/// Checks that a buffer of `actual` bytes holds exactly one row of `elems` elements of `ty`
/// (`what` names the buffer in the error).
pub(crate) fn check_row_bytes(
    what: &'static str,
    ty: WeightType,
    elems: usize,
    actual: usize,
) -> Result<(), KernelError> {
    let expected = checked_row_bytes(ty, elems)?;
    if actual != expected {
        return Err(KernelError::DataSize {
            what,
            ty,
            rows: 1,
            cols: elems,
            expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(WeightType::Q4_0.block_bytes(), 18);
        assert_eq!(WeightType::Q4_1.block_bytes(), 20);
        assert_eq!(WeightType::Q8_0.block_bytes(), 34);
        assert_eq!(WeightType::F16.row_bytes(3), Some(6));
        assert_eq!(WeightType::Q4_0.row_bytes(64), Some(36));
        assert_eq!(WeightType::Q4_0.row_bytes(40), None);
        assert_eq!(WeightType::F32.row_bytes(usize::MAX), None);
    }
}
