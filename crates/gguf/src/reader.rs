//! Opening, validating and reading a GGUF file.
//!
//! The whole header (metadata and tensor infos) is parsed once, front to back, by a cursor
//! that checks every read against the end of the buffer. Every count read from the file is
//! bounded by the bytes that remain divided by the smallest encoding of one entry before any
//! vector is sized from it, so a hostile header can make the parser do at most work and
//! allocation proportional to the file's length.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::GgufError;
use crate::types::GgmlType;
use crate::value::{Array, Metadata, Value, ValueType};
use crate::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};

/// The most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// The deepest nesting of metadata arrays accepted (an array of arrays is depth 2).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Smallest encoded metadata pair: empty-length key prefix (8), type (4), one-byte value (1).
const MIN_KV_LEN: u64 = 8 + 4 + 1;

/// Smallest encoded tensor info: name length (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 4 + 8;

/// Where a tensor is and what it holds, as described by the file's tensor info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (`"blk.0.attn_q.weight"`).
    pub name: String,
    /// Dimensions in file order, ggml's `ne`: `dims[0]` is the contiguous row length.
    /// At most [`MAX_DIMS`]; empty for a scalar.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the first byte relative to [`GgufFile::data_offset`].
    pub offset: u64,
    /// Number of elements (product of `dims`, 1 for a scalar).
    pub n_elements: u64,
    /// Number of bytes of tensor data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Elements per row: `dims[0]`, or 1 for a scalar.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of the dimensions after the first (1 for a vector or a
    /// scalar, 0 if any dimension is 0).
    pub fn n_rows(&self) -> u64 {
        // Validated at open: the product of all dimensions fits in an i64.
        self.dims.iter().skip(1).product()
    }
}

/// The bytes of an open file: memory-mapped or owned.
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(vec) => vec,
        }
    }
}

/// A validated GGUF file: its metadata, tensor infos and tensor bytes.
///
/// Opening checks the whole header and that every tensor's bytes lie inside the file, so the
/// accessors cannot fail afterwards.
pub struct GgufFile {
    storage: Storage,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Memory-maps and validates the file at `path`.
    ///
    /// The file must not be modified or truncated by another process while the returned value
    /// is alive: the map would change under it.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // Mapping an empty file fails on some platforms; an empty buffer reports truncation.
        let storage = if len == 0 {
            Storage::Owned(Vec::new())
        } else {
            Storage::Mapped(map(&file).map_err(io)?)
        };
        GgufFile::from_storage(storage)
    }

    /// Validates a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<GgufFile, GgufError> {
        let header = parse(storage.bytes())?;
        Ok(GgufFile {
            storage,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
        })
    }

    /// The format version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data: `general.alignment`, or 32 when absent.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The absolute file offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// The metadata key/value pairs.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// Exactly the bytes of tensor `info`, `info.n_bytes` long.
    ///
    /// `info` must come from this file's [`GgufFile::tensors`]; for an info from elsewhere the
    /// result is whatever lies at its range, or empty when that range is outside this file.
    /// The slice is not aligned beyond what the file's layout gives: a memory map starts on a
    /// page, so its tensors are aligned to [`GgufFile::alignment`]; an owned buffer may not be.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let range = self
            .data_offset
            .checked_add(info.offset)
            .and_then(|start| Some((start, start.checked_add(info.n_bytes)?)))
            .and_then(|(start, end)| {
                Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
            });
        range
            .and_then(|r| self.storage.bytes().get(r))
            .unwrap_or(&[])
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("mapped", &matches!(self.storage, Storage::Mapped(_)))
            .field("file_size", &self.file_size())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("metadata_len", &self.metadata.len())
            .field("tensors_len", &self.tensors.len())
            .finish()
    }
}

#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and lives inside `GgufFile` with the bytes it hands out.
    // Mapping is unsound only if the file is changed by someone else while mapped; that is a
    // documented precondition of `GgufFile::open`, as for every memory-mapped model loader.
    unsafe { Mmap::map(file) }
}

/// Everything parsed from the header.
struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        self.bytes.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let truncated = GgufError::Truncated {
            offset: self.offset(),
            needed: n,
            what,
        };
        if n > self.remaining() {
            return Err(truncated);
        }
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n));
        let slice = end.and_then(|end| Some((end, self.bytes.get(self.pos..end)?)));
        let (end, slice) = slice.ok_or(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let at = self.offset();
        self.take(N as u64, what)?
            .try_into()
            .map_err(|_| GgufError::Truncated {
                offset: at,
                needed: N as u64,
                what,
            })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let at = self.offset();
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { offset: at, what }),
        }
    }
}

/// Fails unless `count` entries of at least `min_len` bytes each fit in `remaining` bytes.
fn check_count(
    what: &'static str,
    count: u64,
    offset: u64,
    remaining: u64,
    min_len: u64,
) -> Result<usize, GgufError> {
    let max = remaining / min_len.max(1);
    match usize::try_from(count) {
        Ok(n) if count <= max => Ok(n),
        _ => Err(GgufError::CountExceedsFile {
            what,
            count,
            offset,
            max,
        }),
    }
}

fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };

    let magic: [u8; 4] = c.array("magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let tensor_count_at = c.offset();
    let tensor_count = c.u64("tensor count")?;
    let kv_count_at = c.offset();
    let kv_count = c.u64("metadata pair count")?;
    check_count(
        "tensor",
        tensor_count,
        tensor_count_at,
        c.remaining(),
        MIN_TENSOR_INFO_LEN,
    )?;
    let kv_count = check_count(
        "metadata pair",
        kv_count,
        kv_count_at,
        c.remaining(),
        MIN_KV_LEN,
    )?;

    let mut metadata = Metadata::with_capacity(kv_count);
    for _ in 0..kv_count {
        let key_at = c.offset();
        let key = c.string("metadata key")?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { offset: key_at });
        }
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey {
                key,
                offset: key_at,
            });
        }
        let type_at = c.offset();
        let type_id = c.u32("metadata value type")?;
        let value_type = ValueType::from_u32(type_id).ok_or(GgufError::UnknownValueType {
            type_id,
            offset: type_at,
        })?;
        let value = read_value(&mut c, value_type, 0)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(Value::U32(a)) => {
            return Err(GgufError::BadAlignment {
                value: u64::from(*a),
            });
        }
        Some(other) => {
            return Err(GgufError::WrongType {
                key: ALIGNMENT_KEY.to_owned(),
                expected: "u32",
                found: other.type_name(),
            });
        }
    };

    // The metadata has used some of the bytes the header check counted on: check again.
    let tensor_count = check_count(
        "tensor",
        tensor_count,
        tensor_count_at,
        c.remaining(),
        MIN_TENSOR_INFO_LEN,
    )?;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut tensor_index = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let info = read_tensor_info(&mut c, alignment, &tensor_index)?;
        tensor_index.insert(info.name.clone(), i);
        tensors.push(info);
    }

    let file_size = bytes.len() as u64;
    let infos_end = c.offset();
    // As llama.cpp does, the data section is padded to the alignment only if it has tensors.
    let data_offset = if tensors.is_empty() {
        infos_end
    } else {
        let aligned = infos_end.div_ceil(alignment).checked_mul(alignment);
        match aligned {
            Some(aligned) if aligned <= file_size => aligned,
            _ => {
                return Err(GgufError::Truncated {
                    offset: infos_end,
                    needed: aligned.map_or(u64::MAX, |a| a - infos_end),
                    what: "padding before tensor data",
                });
            }
        }
    };

    for info in &tensors {
        let start = data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        if end.is_none_or(|end| end > file_size) {
            return Err(GgufError::TensorOutOfBounds {
                name: info.name.clone(),
                tensor_offset: info.offset,
                start: start.unwrap_or(u64::MAX),
                n_bytes: info.n_bytes,
                file_size,
            });
        }
    }

    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
        tensor_index,
    })
}

/// Reads one value of type `ty`; `depth` is how many arrays enclose it.
fn read_value(c: &mut Cursor<'_>, ty: ValueType, depth: usize) -> Result<Value, GgufError> {
    Ok(match ty {
        ValueType::U8 => Value::U8(c.u8("u8 value")?),
        ValueType::I8 => Value::I8(i8::from_le_bytes(c.array("i8 value")?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array("u16 value")?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array("i16 value")?)),
        ValueType::U32 => Value::U32(c.u32("u32 value")?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array("i32 value")?)),
        ValueType::U64 => Value::U64(c.u64("u64 value")?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array("i64 value")?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array("f32 value")?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array("f64 value")?)),
        ValueType::Bool => {
            let at = c.offset();
            match c.u8("bool value")? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                value => return Err(GgufError::InvalidBool { value, offset: at }),
            }
        }
        ValueType::String => Value::String(c.string("string value")?),
        ValueType::Array => Value::Array(read_array(c, depth + 1)?),
    })
}

/// Reads an array header and its elements; `depth` counts this array (1 for a top-level one).
fn read_array(c: &mut Cursor<'_>, depth: usize) -> Result<Array, GgufError> {
    let elem_at = c.offset();
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep {
            offset: elem_at,
            max: MAX_ARRAY_DEPTH,
        });
    }
    let type_id = c.u32("array element type")?;
    let elem_type = ValueType::from_u32(type_id).ok_or(GgufError::UnknownValueType {
        type_id,
        offset: elem_at,
    })?;
    let count_at = c.offset();
    let count = c.u64("array length")?;
    let count = check_count(
        "array element",
        count,
        count_at,
        c.remaining(),
        elem_type.min_encoded_len(),
    )?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        values.push(read_value(c, elem_type, depth)?);
    }
    Ok(Array::from_checked(elem_type, values))
}

fn read_tensor_info(
    c: &mut Cursor<'_>,
    alignment: u64,
    seen: &HashMap<String, usize>,
) -> Result<TensorInfo, GgufError> {
    let info_at = c.offset();
    let name = c.string("tensor name")?;
    if seen.contains_key(&name) {
        return Err(GgufError::DuplicateTensor {
            name,
            offset: info_at,
        });
    }

    let n_dims_at = c.offset();
    let n_dims = c.u32("tensor dimension count")?;
    let n_dims_usize = usize::try_from(n_dims).unwrap_or(usize::MAX);
    if n_dims_usize > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            name,
            n_dims,
            max: MAX_DIMS,
            offset: n_dims_at,
        });
    }
    let mut dims = Vec::with_capacity(n_dims_usize);
    for index in 0..n_dims_usize {
        let dim_at = c.offset();
        let value = c.u64("tensor dimension")?;
        if i64::try_from(value).is_err() {
            return Err(GgufError::DimTooLarge {
                name,
                index,
                value,
                offset: dim_at,
            });
        }
        dims.push(value);
    }
    let Some(n_elements) = element_count(&dims) else {
        return Err(GgufError::ElementCountOverflow {
            name,
            dims,
            offset: info_at,
        });
    };

    let type_at = c.offset();
    let type_id = c.u32("tensor type")?;
    let Some(ggml_type) = GgmlType::from_u32(type_id) else {
        return Err(GgufError::UnknownTensorType {
            name,
            type_id,
            offset: type_at,
        });
    };
    let row_len = dims.first().copied().unwrap_or(1);
    let block_len = ggml_type.block_len();
    if !row_len.is_multiple_of(block_len) {
        return Err(GgufError::RowNotBlockMultiple {
            name,
            ggml_type,
            row_len,
            block_len,
        });
    }
    let Some(n_bytes) = ggml_type.row_bytes(n_elements) else {
        return Err(GgufError::TensorSizeOverflow {
            name,
            dims,
            ggml_type,
        });
    };

    let offset_at = c.offset();
    let offset = c.u64("tensor data offset")?;
    if !offset.is_multiple_of(alignment) {
        return Err(GgufError::MisalignedTensor {
            name,
            tensor_offset: offset,
            alignment,
            offset: offset_at,
        });
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        n_elements,
        n_bytes,
    })
}

/// The product of `dims` if it fits in an `i64` (ggml counts elements in `int64_t`); a shape
/// with a zero dimension has zero elements whatever the others are, as in ggml.
fn element_count(dims: &[u64]) -> Option<u64> {
    if dims.contains(&0) {
        return Some(0);
    }
    let product = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    i64::try_from(product).is_ok().then_some(product)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_reports_truncation_where_it_happens() {
        let bytes = [1u8, 0, 0, 0, 9];
        let mut c = Cursor {
            bytes: &bytes,
            pos: 0,
        };
        assert_eq!(c.u32("x").unwrap(), 1);
        let err = c.u32("y").unwrap_err();
        assert!(matches!(
            err,
            GgufError::Truncated {
                offset: 4,
                needed: 4,
                what: "y"
            }
        ));
        assert_eq!(c.u8("z").unwrap(), 9);
        assert_eq!(c.remaining(), 0);
        assert!(c.take(u64::MAX, "huge").is_err());
    }

    #[test]
    fn count_is_bounded_by_remaining_bytes() {
        assert_eq!(check_count("x", 10, 0, 130, 13).unwrap(), 10);
        assert!(matches!(
            check_count("x", 11, 8, 130, 13),
            Err(GgufError::CountExceedsFile {
                count: 11,
                offset: 8,
                max: 10,
                ..
            })
        ));
        assert_eq!(check_count("x", 5, 0, 5, 0).unwrap(), 5);
    }

    #[test]
    fn element_count_follows_ggml() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[3, 4]), Some(12));
        assert_eq!(element_count(&[1 << 40, 1 << 40, 0]), Some(0));
        assert_eq!(element_count(&[1 << 32, 1 << 31]), None);
        assert_eq!(element_count(&[1 << 31, 1 << 31]), Some(1 << 62));
    }

    #[test]
    fn gguf_file_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<GgufFile>();
    }
}
