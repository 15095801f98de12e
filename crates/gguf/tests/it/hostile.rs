//! Hostile and corrupt files, each rejected with the specific error and byte offset.

use crate::common;

use common::{sample_bytes, sample_writer};
use souverain_gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value, ValueType, raw};

fn parse(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(file) => panic!("hostile file accepted: {file:?}"),
        Err(err) => {
            // Every error renders a message without panicking.
            assert!(!err.to_string().is_empty());
            err
        }
    }
}

/// A file holding one tensor info `t` and `data_len` zero bytes of data after the padding.
/// The info starts at 24; n_dims at 33, dims at 37, type at 37 + 8n, offset at 41 + 8n.
fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 1, 0);
    raw::put_tensor_info(&mut buf, "t", dims, type_id, offset);
    raw::pad_to(&mut buf, 32);
    buf.resize(buf.len() + data_len, 0);
    buf
}

/// A file holding one metadata pair whose key is `k` (at 24), type at 33, value at 37.
fn one_kv(type_id: u32, value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 0, 1);
    raw::put_string(&mut buf, "k");
    raw::put_u32(&mut buf, type_id);
    buf.extend_from_slice(value);
    buf
}

#[test]
fn bad_magic() {
    let mut bytes = sample_bytes();
    bytes[3] = b'X';
    assert!(matches!(parse(bytes), GgufError::BadMagic { found } if &found == b"GGUX"));
}

#[test]
fn unsupported_versions() {
    for version in [0, 1, 4, 99, u32::MAX] {
        let mut bytes = sample_bytes();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        assert!(
            matches!(parse(bytes), GgufError::UnsupportedVersion { version: v } if v == version),
            "version {version}"
        );
    }
    let v1 = GgufWriter::new(1).to_bytes();
    assert!(matches!(
        parse(v1),
        GgufError::UnsupportedVersion { version: 1 }
    ));
}

#[test]
fn every_truncation_of_a_metadata_only_file() {
    let mut w = GgufWriter::new(3);
    for (k, v) in common::every_value() {
        w.add_kv(k, v);
    }
    let bytes = w.to_bytes();
    assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
    for len in 0..bytes.len() {
        let err = parse(bytes[..len].to_vec());
        match err {
            GgufError::Truncated { offset, needed, .. } => {
                assert!(offset <= len as u64, "prefix {len}: offset {offset}");
                assert!(offset + needed > len as u64, "prefix {len}");
            }
            // A prefix can be too short for the count even to be plausible.
            GgufError::CountExceedsFile { .. } => assert!(len >= 24),
            other => panic!("prefix {len}: unexpected {other:?}"),
        }
    }
}

#[test]
fn every_truncation_of_a_file_with_tensors() {
    let bytes = sample_bytes();
    let file = GgufFile::from_bytes(bytes.clone()).unwrap();
    let data_offset = file.data_offset() as usize;
    let data_end = file
        .tensors()
        .iter()
        .map(|t| file.data_offset() + t.offset + t.n_bytes)
        .max()
        .unwrap();
    for len in 0..bytes.len() {
        if len as u64 >= data_end {
            // Only the last tensor's trailing padding is missing: still a whole file.
            assert!(
                GgufFile::from_bytes(bytes[..len].to_vec()).is_ok(),
                "prefix {len}"
            );
            continue;
        }
        let err = parse(bytes[..len].to_vec());
        let ok = match err {
            GgufError::Truncated { offset, needed, .. } => {
                offset <= len as u64 && offset + needed > len as u64 && len < data_offset
            }
            GgufError::CountExceedsFile { .. } => len >= 24 && len < data_offset,
            // Cut inside the data section: the header is whole, a tensor's bytes are not.
            GgufError::TensorOutOfBounds {
                start,
                n_bytes,
                file_size,
                ..
            } => len >= data_offset && start + n_bytes > file_size && file_size == len as u64,
            _ => false,
        };
        assert!(ok, "prefix {len}");
    }
}

#[test]
fn huge_counts_fail_before_allocating() {
    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 0, u64::MAX);
    assert!(matches!(
        parse(buf),
        GgufError::CountExceedsFile {
            what: "metadata pair",
            count: u64::MAX,
            offset: 16,
            max: 0
        }
    ));

    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 1 << 40, 0);
    raw::put_tensor_info(&mut buf, "t", &[1], 0, 0);
    assert!(matches!(
        parse(buf),
        GgufError::CountExceedsFile {
            what: "tensor",
            count: 0x100_0000_0000,
            offset: 8,
            max: 1
        }
    ));

    // Plausible at the header, impossible once the metadata has taken the bytes.
    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 2, 1);
    raw::put_kv(&mut buf, "k", &Value::from("x".repeat(100)));
    assert!(matches!(
        parse(buf),
        GgufError::CountExceedsFile {
            what: "tensor",
            count: 2,
            offset: 8,
            max: 0
        }
    ));
}

#[test]
fn string_lengths_past_the_end() {
    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 0, 1);
    raw::put_u64(&mut buf, 1000);
    buf.extend_from_slice(&[b'a'; 20]);
    assert!(matches!(
        parse(buf),
        GgufError::Truncated {
            offset: 32,
            needed: 1000,
            what: "metadata key"
        }
    ));

    let mut value = Vec::new();
    raw::put_u64(&mut value, u64::MAX);
    assert!(matches!(
        parse(one_kv(8, &value)),
        GgufError::Truncated {
            offset: 45,
            needed: u64::MAX,
            what: "string value"
        }
    ));

    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 1, 0);
    raw::put_u64(&mut buf, 1 << 62);
    buf.resize(buf.len() + 64, 0);
    assert!(matches!(
        parse(buf),
        GgufError::Truncated {
            offset: 32,
            needed: 0x4000_0000_0000_0000,
            what: "tensor name"
        }
    ));
}

#[test]
fn huge_array_lengths() {
    for (elem, at) in [
        (ValueType::U8, 41u64),
        (ValueType::String, 41),
        (ValueType::Array, 41),
    ] {
        let mut value = Vec::new();
        raw::put_u32(&mut value, elem.id());
        raw::put_u64(&mut value, u64::MAX / 2);
        value.extend_from_slice(&[0; 40]);
        let err = parse(one_kv(9, &value));
        assert!(
            matches!(err, GgufError::CountExceedsFile { what: "array element", offset, .. } if offset == at),
            "{elem:?}: {err:?}"
        );
    }
}

#[test]
fn array_nesting_is_bounded() {
    fn nested(depth: usize) -> Value {
        let mut v = Value::Array(Array::from_values([1u8]));
        for _ in 1..depth {
            v = Value::Array(Array::new(ValueType::Array, vec![v]).unwrap());
        }
        v
    }
    let mut ok = GgufWriter::new(3);
    ok.add_kv("deep", nested(souverain_gguf::MAX_ARRAY_DEPTH));
    assert!(GgufFile::from_bytes(ok.to_bytes()).is_ok());

    let mut deep = GgufWriter::new(3);
    deep.add_kv("deep", nested(souverain_gguf::MAX_ARRAY_DEPTH + 1));
    // key "deep" at 24..36, type at 36; the arrays' headers are 12 bytes each from 40.
    let offset = 40 + 12 * souverain_gguf::MAX_ARRAY_DEPTH as u64;
    assert!(matches!(
        parse(deep.to_bytes()),
        GgufError::NestingTooDeep { offset: o, max: 8 } if o == offset
    ));

    // A long chain of array headers must not exhaust the stack either.
    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 0, 1);
    raw::put_string(&mut buf, "k");
    raw::put_u32(&mut buf, 9);
    for _ in 0..100_000 {
        raw::put_u32(&mut buf, 9);
        raw::put_u64(&mut buf, 1);
    }
    assert!(matches!(parse(buf), GgufError::NestingTooDeep { .. }));
}

#[test]
fn unknown_value_types() {
    assert!(matches!(
        parse(one_kv(13, &[0; 16])),
        GgufError::UnknownValueType {
            type_id: 13,
            offset: 33
        }
    ));
    let mut value = Vec::new();
    raw::put_u32(&mut value, 99);
    raw::put_u64(&mut value, 1);
    assert!(matches!(
        parse(one_kv(9, &value)),
        GgufError::UnknownValueType {
            type_id: 99,
            offset: 37
        }
    ));
}

#[test]
fn invalid_bool_utf8_and_empty_key() {
    assert!(matches!(
        parse(one_kv(7, &[2])),
        GgufError::InvalidBool {
            value: 2,
            offset: 37
        }
    ));

    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 0, 1);
    raw::put_string(&mut buf, [0xffu8, 0xfe]);
    raw::put_u32(&mut buf, 0);
    raw::put_u8(&mut buf, 0);
    assert!(matches!(
        parse(buf),
        GgufError::InvalidUtf8 {
            offset: 24,
            what: "metadata key"
        }
    ));

    let mut value = Vec::new();
    raw::put_string(&mut value, [b'a', 0xc3]);
    assert!(matches!(
        parse(one_kv(8, &value)),
        GgufError::InvalidUtf8 {
            offset: 37,
            what: "string value"
        }
    ));

    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 0, 1);
    raw::put_kv(&mut buf, "", &Value::U8(0));
    assert!(matches!(parse(buf), GgufError::EmptyKey { offset: 24 }));
}

#[test]
fn duplicate_key() {
    let mut w = GgufWriter::new(3);
    w.add_kv("a", Value::U8(1))
        .add_kv("b", Value::U8(2))
        .add_kv("a", Value::U8(3));
    // Each pair is 8 + 1 + 4 + 1 = 14 bytes from 24.
    assert!(matches!(
        parse(w.to_bytes()),
        GgufError::DuplicateKey { key, offset: 52 } if key == "a"
    ));
}

#[test]
fn duplicate_tensor() {
    let mut w = sample_writer();
    w.add_tensor("norm.weight", &[1], GgmlType::F32, vec![0; 4])
        .unwrap();
    let err = parse(w.to_bytes());
    assert!(
        matches!(&err, GgufError::DuplicateTensor { name, .. } if name == "norm.weight"),
        "{err:?}"
    );
}

#[test]
fn bad_alignment_values_and_types() {
    for value in [0u32, 3, 48, 0x8000_0001] {
        let mut w = GgufWriter::new(3);
        w.add_kv("general.alignment", Value::U32(value));
        assert!(
            matches!(parse(w.to_bytes()), GgufError::BadAlignment { value: v } if v == u64::from(value)),
            "{value}"
        );
    }
    for value in [Value::U64(32), Value::I32(32), Value::from("32")] {
        let mut w = GgufWriter::new(3);
        w.add_kv("general.alignment", value);
        let err = parse(w.to_bytes());
        assert!(
            matches!(&err, GgufError::WrongType { key, expected: "u32", .. } if key == "general.alignment"),
            "{err:?}"
        );
    }
}

#[test]
fn bad_shapes() {
    assert!(matches!(
        parse(one_tensor(&[1, 1, 1, 1, 1], 0, 0, 32)),
        GgufError::TooManyDims {
            n_dims: 5,
            max: 4,
            offset: 33,
            ..
        }
    ));
    assert!(matches!(
        parse(one_tensor(&[1 << 32, 1 << 32], 0, 0, 32)),
        GgufError::ElementCountOverflow { offset: 24, .. }
    ));
    assert!(matches!(
        parse(one_tensor(&[1 << 31, 1 << 31, 4], 0, 0, 32)),
        GgufError::ElementCountOverflow { .. }
    ));
    assert!(matches!(
        parse(one_tensor(&[4, u64::MAX], 0, 0, 32)),
        GgufError::DimTooLarge {
            index: 1,
            value: u64::MAX,
            offset: 45,
            ..
        }
    ));
    assert!(matches!(
        parse(one_tensor(&[1 << 62], GgmlType::F64.id(), 0, 32)),
        GgufError::TensorSizeOverflow {
            ggml_type: GgmlType::F64,
            ..
        }
    ));
    assert!(matches!(
        parse(one_tensor(&[16, 2], GgmlType::Q4_0.id(), 0, 64)),
        GgufError::RowNotBlockMultiple {
            row_len: 16,
            block_len: 32,
            ggml_type: GgmlType::Q4_0,
            ..
        }
    ));
    // A scalar of a block type is one element, not a whole block.
    assert!(matches!(
        parse(one_tensor(&[], GgmlType::Q8_0.id(), 0, 64)),
        GgufError::RowNotBlockMultiple {
            row_len: 1,
            block_len: 32,
            ..
        }
    ));
}

#[test]
fn unknown_tensor_types() {
    for type_id in [4u32, 5, 31, 36, 40, 1000, u32::MAX] {
        assert!(
            matches!(
                parse(one_tensor(&[32], type_id, 0, 128)),
                GgufError::UnknownTensorType { type_id: t, offset: 45, .. } if t == type_id
            ),
            "{type_id}"
        );
    }
}

#[test]
fn misaligned_and_out_of_range_offsets() {
    assert!(matches!(
        parse(one_tensor(&[4], 0, 4, 64)),
        GgufError::MisalignedTensor {
            tensor_offset: 4,
            alignment: 32,
            offset: 49,
            ..
        }
    ));
    // The data section starts at 64; 16 bytes of data at 32 end at 112, past 96.
    assert!(matches!(
        parse(one_tensor(&[4], 0, 32, 32)),
        GgufError::TensorOutOfBounds {
            tensor_offset: 32,
            start: 96,
            n_bytes: 16,
            file_size: 96,
            ..
        }
    ));
    assert!(matches!(
        parse(one_tensor(&[4], 0, 1 << 20, 32)),
        GgufError::TensorOutOfBounds {
            start: 0x10_0040,
            ..
        }
    ));
    let near_max = u64::MAX - 31;
    assert!(matches!(
        parse(one_tensor(&[4], 0, near_max, 32)),
        GgufError::TensorOutOfBounds {
            start: u64::MAX,
            ..
        }
    ));
    // The largest representable tensor can never fit.
    assert!(matches!(
        parse(one_tensor(&[i64::MAX as u64], GgmlType::I8.id(), 0, 32)),
        GgufError::TensorOutOfBounds { .. }
    ));
}

#[test]
fn data_section_past_the_end() {
    // One empty tensor; the infos end at 57 and the file ends before the padding to 64.
    let mut buf = Vec::new();
    raw::put_header(&mut buf, 3, 1, 0);
    raw::put_tensor_info(&mut buf, "t", &[0], 0, 0);
    assert_eq!(buf.len(), 57);
    assert!(matches!(
        parse(buf.clone()),
        GgufError::Truncated {
            offset: 57,
            needed: 7,
            what: "padding before tensor data"
        }
    ));
    raw::pad_to(&mut buf, 32);
    let file = GgufFile::from_bytes(buf).unwrap();
    assert_eq!(file.data_offset(), 64);
}
