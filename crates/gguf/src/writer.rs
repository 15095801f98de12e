//! Writing GGUF files: a builder for valid files and raw primitives for hostile ones.

use std::path::Path;

use crate::error::GgufError;
use crate::reader::MAX_DIMS;
use crate::types::GgmlType;
use crate::value::Value;
use crate::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT};

/// Builds a GGUF file in memory: metadata pairs and tensors, in the order added.
///
/// Tensor data is laid out in order, each tensor starting at a multiple of the alignment and
/// padded with zeros to the next one. The writer checks each tensor's data length against its
/// shape and type, but not names: repeating a key or tensor name writes a file the reader
/// rejects, which is what tests of the reader need. For anything more hostile, assemble the
/// bytes with [`raw`].
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    alignment: Option<u64>,
    kvs: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

impl GgufWriter {
    /// An empty file of format `version` (the reader accepts 2 and 3; any value is written).
    pub fn new(version: u32) -> GgufWriter {
        GgufWriter {
            version,
            alignment: None,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Adds a metadata pair after those already added.
    pub fn add_kv(&mut self, key: impl Into<String>, value: Value) -> &mut GgufWriter {
        self.kvs.push((key.into(), value));
        self
    }

    /// Sets the alignment of tensor data and writes it as a `general.alignment` `u32` pair,
    /// before all other pairs. Fails with [`GgufError::BadAlignment`] unless `alignment` is a
    /// non-zero power of two that fits in a `u32`.
    pub fn set_alignment(&mut self, alignment: u64) -> Result<&mut GgufWriter, GgufError> {
        if !alignment.is_power_of_two() || u32::try_from(alignment).is_err() {
            return Err(GgufError::BadAlignment { value: alignment });
        }
        self.alignment = Some(alignment);
        Ok(self)
    }

    /// Adds a tensor of shape `dims` (row length first) whose bytes are `data`.
    ///
    /// Fails with [`GgufError::InvalidTensorShape`] if the shape has more than four dimensions,
    /// too many elements, or rows that are not whole blocks of `ggml_type`, and with
    /// [`GgufError::TensorDataSize`] if `data` is not exactly the size the shape needs.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut GgufWriter, GgufError> {
        let name = name.into();
        let invalid = |reason| GgufError::InvalidTensorShape {
            name: name.clone(),
            dims: dims.to_vec(),
            ggml_type,
            reason,
        };
        if dims.len() > MAX_DIMS {
            return Err(invalid("more than four dimensions"));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(|| invalid("element count overflows i64"))?;
        let row_len = dims.first().copied().unwrap_or(1);
        if !row_len.is_multiple_of(ggml_type.block_len()) {
            return Err(invalid("row length is not a multiple of the block length"));
        }
        let expected = ggml_type
            .row_bytes(n_elements)
            .ok_or_else(|| invalid("size in bytes overflows"))?;
        let actual = data.len() as u64;
        if actual != expected {
            return Err(GgufError::TensorDataSize {
                name,
                expected,
                actual,
            });
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        Ok(self)
    }

    /// The complete file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.alignment.unwrap_or(DEFAULT_ALIGNMENT);
        let mut buf = Vec::new();
        let alignment_kv = self.alignment.map(|a| {
            let a = u32::try_from(a).unwrap_or(u32::MAX); // checked by `set_alignment`
            (ALIGNMENT_KEY, Value::U32(a))
        });
        let kv_count = self.kvs.len() + usize::from(alignment_kv.is_some());
        raw::put_header(
            &mut buf,
            self.version,
            self.tensors.len() as u64,
            kv_count as u64,
        );
        if let Some((key, value)) = &alignment_kv {
            raw::put_kv(&mut buf, key, value);
        }
        for (key, value) in &self.kvs {
            raw::put_kv(&mut buf, key, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            raw::put_tensor_info(&mut buf, &t.name, &t.dims, t.ggml_type.id(), offset);
            offset = align_up(offset + t.data.len() as u64, alignment);
        }
        if !self.tensors.is_empty() {
            raw::pad_to(&mut buf, alignment);
        }
        let data_start = buf.len();
        for t in &self.tensors {
            buf.extend_from_slice(&t.data);
            let written = (buf.len() - data_start) as u64;
            buf.resize(data_start + align_up(written, alignment) as usize, 0);
        }
        buf
    }

    /// Writes the complete file to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

/// Primitives that write GGUF fields into a buffer, for hand-assembling files (hostile ones
/// included: nothing here checks anything).
///
/// ```
/// use souverain_gguf::{GgufError, GgufFile, raw};
///
/// let mut buf = Vec::new();
/// raw::put_header(&mut buf, 3, 0, 1_000_000_000); // claims far more pairs than follow
/// let err = GgufFile::from_bytes(buf).unwrap_err();
/// assert!(matches!(err, GgufError::CountExceedsFile { offset: 16, .. }));
/// ```
pub mod raw {
    use crate::value::Value;

    /// Appends one byte.
    pub fn put_u8(buf: &mut Vec<u8>, v: u8) {
        buf.push(v);
    }

    /// Appends a little-endian `u32`.
    pub fn put_u32(buf: &mut Vec<u8>, v: u32) {
        buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a little-endian `u64`.
    pub fn put_u64(buf: &mut Vec<u8>, v: u64) {
        buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a string: `u64` length, then the bytes (which need not be UTF-8).
    pub fn put_string(buf: &mut Vec<u8>, s: impl AsRef<[u8]>) {
        let s = s.as_ref();
        put_u64(buf, s.len() as u64);
        buf.extend_from_slice(s);
    }

    /// Appends the header: magic, version, tensor count, metadata pair count.
    pub fn put_header(buf: &mut Vec<u8>, version: u32, tensor_count: u64, kv_count: u64) {
        buf.extend_from_slice(&crate::MAGIC);
        put_u32(buf, version);
        put_u64(buf, tensor_count);
        put_u64(buf, kv_count);
    }

    /// Appends a value's encoding without its type id (an array writes its element type,
    /// length and elements).
    pub fn put_value(buf: &mut Vec<u8>, value: &Value) {
        match value {
            Value::U8(v) => put_u8(buf, *v),
            Value::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => put_u32(buf, *v),
            Value::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::U64(v) => put_u64(buf, *v),
            Value::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => put_u8(buf, u8::from(*v)),
            Value::String(s) => put_string(buf, s),
            Value::Array(array) => {
                put_u32(buf, array.elem_type().id());
                put_u64(buf, array.len() as u64);
                for v in array.values() {
                    put_value(buf, v);
                }
            }
        }
    }

    /// Appends a metadata pair: key, value type id, value.
    pub fn put_kv(buf: &mut Vec<u8>, key: &str, value: &Value) {
        put_string(buf, key);
        put_u32(buf, value.value_type().id());
        put_value(buf, value);
    }

    /// Appends a tensor info: name, dimension count, dimensions, type id, data offset.
    pub fn put_tensor_info(buf: &mut Vec<u8>, name: &str, dims: &[u64], type_id: u32, offset: u64) {
        put_string(buf, name);
        put_u32(buf, dims.len() as u32);
        for &d in dims {
            put_u64(buf, d);
        }
        put_u32(buf, type_id);
        put_u64(buf, offset);
    }

    /// Appends zero bytes until the length is a multiple of `alignment` (nothing if it is 0).
    pub fn pad_to(buf: &mut Vec<u8>, alignment: u64) {
        if alignment == 0 {
            return;
        }
        while !(buf.len() as u64).is_multiple_of(alignment) {
            buf.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_padded() {
        let mut w = GgufWriter::new(3);
        w.set_alignment(64).unwrap();
        w.add_tensor("a", &[3], GgmlType::F32, vec![1; 12]).unwrap();
        w.add_tensor("b", &[32], GgmlType::Q8_0, vec![2; 34])
            .unwrap();
        let bytes = w.to_bytes();
        assert_eq!(bytes.len() % 64, 0);
        // Header, one alignment pair, then the first tensor info's name.
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 1);
        assert_eq!(bytes[bytes.len() - 128..bytes.len() - 116], [1; 12]);
        assert_eq!(bytes[bytes.len() - 64..bytes.len() - 30], [2; 34]);
    }

    #[test]
    fn tensors_are_checked() {
        let mut w = GgufWriter::new(3);
        assert!(matches!(
            w.add_tensor("x", &[31], GgmlType::Q4_0, vec![0; 18]),
            Err(GgufError::InvalidTensorShape { .. })
        ));
        assert!(matches!(
            w.add_tensor("x", &[32], GgmlType::Q4_0, vec![0; 17]),
            Err(GgufError::TensorDataSize {
                expected: 18,
                actual: 17,
                ..
            })
        ));
        assert!(matches!(
            w.add_tensor("x", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]),
            Err(GgufError::InvalidTensorShape { .. })
        ));
        assert!(matches!(
            w.add_tensor("x", &[1 << 32, 1 << 32], GgmlType::I8, vec![]),
            Err(GgufError::InvalidTensorShape { .. })
        ));
        assert!(matches!(
            w.set_alignment(48),
            Err(GgufError::BadAlignment { value: 48 })
        ));
        assert!(matches!(
            w.set_alignment(1 << 32),
            Err(GgufError::BadAlignment { .. })
        ));
        assert!(w.set_alignment(0).is_err());
    }
}
