//! The error type of the crate.

use std::path::PathBuf;

use crate::types::GgmlType;

/// Everything that can go wrong while opening, validating, querying or writing a GGUF file.
///
/// Byte offsets (`offset`) are absolute positions in the file where the faulty field starts.
/// A tensor's own `tensor_offset` is relative to the start of the data section, as in the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened, sized, memory-mapped or written.
    #[error("cannot access GGUF file {}: {source}", path.display())]
    Io {
        /// The path that was being accessed.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error(
        "not a GGUF file: magic at offset 0 is {found:02x?}, expected \"GGUF\" [47, 47, 55, 46]"
    )]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },

    /// The version is not 2 or 3.
    #[error("unsupported GGUF version {version} at offset 4 (only versions 2 and 3 are read)")]
    UnsupportedVersion {
        /// The version in the header.
        version: u32,
    },

    /// A field runs past the end of the file.
    #[error(
        "file truncated: {what} needs {needed} bytes at offset {offset}, past the end of the file"
    )]
    Truncated {
        /// Where the field starts.
        offset: u64,
        /// How many bytes the field needs from `offset`.
        needed: u64,
        /// Which field was being read.
        what: &'static str,
    },

    /// A count in the file is larger than the remaining bytes could possibly hold.
    #[error(
        "{what} count {count} at offset {offset} cannot fit in the rest of the file (at most {max})"
    )]
    CountExceedsFile {
        /// What is being counted: tensors, metadata pairs or array elements.
        what: &'static str,
        /// The count in the file.
        count: u64,
        /// Where the count is stored.
        offset: u64,
        /// The largest count the remaining bytes could hold.
        max: u64,
    },

    /// A string is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Where the string (its length prefix) starts.
        offset: u64,
        /// Which string: metadata key, string value or tensor name.
        what: &'static str,
    },

    /// A metadata value type id is not one GGUF defines.
    #[error("unknown metadata value type {type_id} at offset {offset}")]
    UnknownValueType {
        /// The type id found.
        type_id: u32,
        /// Where the type id is stored.
        offset: u64,
    },

    /// A boolean value is neither 0 nor 1.
    #[error("invalid boolean byte {value} at offset {offset} (must be 0 or 1)")]
    InvalidBool {
        /// The byte found.
        value: u8,
        /// Where the byte is stored.
        offset: u64,
    },

    /// Arrays are nested more deeply than [`crate::MAX_ARRAY_DEPTH`].
    #[error("array at offset {offset} is nested more than {max} levels deep")]
    NestingTooDeep {
        /// Where the too-deep array's element type is stored.
        offset: u64,
        /// The deepest nesting accepted.
        max: usize,
    },

    /// A metadata key is empty.
    #[error("empty metadata key at offset {offset}")]
    EmptyKey {
        /// Where the key starts.
        offset: u64,
    },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key '{key}' at offset {offset}")]
    DuplicateKey {
        /// The repeated key.
        key: String,
        /// Where the second occurrence starts.
        offset: u64,
    },

    /// The same tensor name appears twice.
    #[error("duplicate tensor name '{name}' at offset {offset}")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
        /// Where the second tensor info starts.
        offset: u64,
    },

    /// A tensor's number of dimensions is larger than [`crate::MAX_DIMS`].
    #[error("tensor '{name}' has {n_dims} dimensions (at most {max}) at offset {offset}")]
    TooManyDims {
        /// The tensor.
        name: String,
        /// The number of dimensions in the file.
        n_dims: u32,
        /// The largest number accepted.
        max: usize,
        /// Where the dimension count is stored.
        offset: u64,
    },

    /// A tensor dimension does not fit in an `i64`, as ggml requires.
    #[error(
        "tensor '{name}' dimension {index} is {value} at offset {offset}, larger than i64::MAX"
    )]
    DimTooLarge {
        /// The tensor.
        name: String,
        /// Which dimension (0 is the contiguous row length).
        index: usize,
        /// The value in the file.
        value: u64,
        /// Where the dimension is stored.
        offset: u64,
    },

    /// The product of a tensor's dimensions does not fit in an `i64`.
    #[error(
        "tensor '{name}' at offset {offset} has shape {dims:?} whose element count overflows i64"
    )]
    ElementCountOverflow {
        /// The tensor.
        name: String,
        /// Its dimensions.
        dims: Vec<u64>,
        /// Where the tensor info starts.
        offset: u64,
    },

    /// A tensor type id is not one this crate knows the layout of.
    #[error("tensor '{name}' has unknown ggml type {type_id} at offset {offset}")]
    UnknownTensorType {
        /// The tensor.
        name: String,
        /// The type id found.
        type_id: u32,
        /// Where the type id is stored.
        offset: u64,
    },

    /// A tensor's row length is not a whole number of blocks of its type.
    #[error(
        "tensor '{name}' of type {ggml_type} has rows of {row_len} elements, \
         not a multiple of the block length {block_len}"
    )]
    RowNotBlockMultiple {
        /// The tensor.
        name: String,
        /// Its type.
        ggml_type: GgmlType,
        /// Its first dimension.
        row_len: u64,
        /// Elements per block of its type.
        block_len: u64,
    },

    /// A tensor's size in bytes overflows `u64`.
    #[error(
        "tensor '{name}' with shape {dims:?} and type {ggml_type} has a size in bytes that overflows"
    )]
    TensorSizeOverflow {
        /// The tensor.
        name: String,
        /// Its dimensions.
        dims: Vec<u64>,
        /// Its type.
        ggml_type: GgmlType,
    },

    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error(
        "tensor '{name}' data offset {tensor_offset} (stored at offset {offset}) \
         is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        tensor_offset: u64,
        /// The alignment required.
        alignment: u64,
        /// Where the tensor offset is stored.
        offset: u64,
    },

    /// A tensor's bytes do not lie inside the file.
    #[error(
        "tensor '{name}' data ({n_bytes} bytes at data offset {tensor_offset}, absolute {start}) \
         runs past the end of the file ({file_size} bytes)"
    )]
    TensorOutOfBounds {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        tensor_offset: u64,
        /// Its absolute start (saturated at `u64::MAX` if it overflows).
        start: u64,
        /// Its size in bytes.
        n_bytes: u64,
        /// The size of the file.
        file_size: u64,
    },

    /// `general.alignment` is zero, not a power of two, or does not fit in a `u32`.
    #[error("alignment {value} is not a non-zero power of two that fits in a u32")]
    BadAlignment {
        /// The alignment found or requested.
        value: u64,
    },

    /// A metadata key that was asked for is absent.
    #[error("metadata key '{key}' is missing")]
    MissingKey {
        /// The key.
        key: String,
    },

    /// A metadata value has a different type than the one asked for.
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The type found.
        found: &'static str,
    },

    /// A metadata integer does not fit in the type asked for.
    #[error("metadata key '{key}' holds {value}, which does not fit in {expected}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The value found.
        value: i128,
    },

    /// A writer was given a tensor whose shape it cannot encode.
    #[error(
        "cannot write tensor '{name}': shape {dims:?} is invalid for type {ggml_type}: {reason}"
    )]
    InvalidTensorShape {
        /// The tensor.
        name: String,
        /// The shape given.
        dims: Vec<u64>,
        /// The type given.
        ggml_type: GgmlType,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A writer was given tensor data of the wrong length.
    #[error(
        "cannot write tensor '{name}': data is {actual} bytes, its shape and type need {expected}"
    )]
    TensorDataSize {
        /// The tensor.
        name: String,
        /// The bytes the shape and type need.
        expected: u64,
        /// The bytes given.
        actual: u64,
    },

    /// An array was built from values that are not all of its element type.
    #[error("array of {expected} cannot hold a {found} at index {index}")]
    MixedArray {
        /// The element type of the array.
        expected: &'static str,
        /// The type of the offending value.
        found: &'static str,
        /// Its position in the array.
        index: usize,
    },
}
