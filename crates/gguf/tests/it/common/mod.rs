//! Helpers shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use souverain_gguf::{Array, GgmlType, GgufFile, GgufWriter, Value, ValueType};

/// One value of every scalar type, strings, and arrays including nested and empty ones.
pub fn every_value() -> Vec<(&'static str, Value)> {
    let nested_u8 = Array::new(
        ValueType::Array,
        vec![
            Value::Array(Array::from_values([1u8, 2, 3])),
            Value::Array(Array::from_values(Vec::<u8>::new())),
            Value::Array(Array::from_strings(["mixed", "inner", "types"])),
        ],
    )
    .unwrap();
    let triple = Array::new(
        ValueType::Array,
        vec![Value::Array(
            Array::new(ValueType::Array, vec![Value::Array(nested_u8.clone())]).unwrap(),
        )],
    )
    .unwrap();
    vec![
        ("test.u8", Value::U8(250)),
        ("test.i8", Value::I8(-7)),
        ("test.u16", Value::U16(65_000)),
        ("test.i16", Value::I16(-32_000)),
        ("test.u32", Value::U32(4_000_000_000)),
        ("test.i32", Value::I32(-2_000_000_000)),
        ("test.u64", Value::U64(u64::MAX - 1)),
        ("test.i64", Value::I64(i64::MIN + 1)),
        ("test.f32", Value::F32(-1.5e-3)),
        ("test.f64", Value::F64(std::f64::consts::PI)),
        ("test.bool_true", Value::Bool(true)),
        ("test.bool_false", Value::Bool(false)),
        ("test.string", Value::from("héllo, wörld ✓")),
        ("test.empty_string", Value::from("")),
        ("test.arr_u8", Value::Array(Array::from_values([0u8, 255]))),
        (
            "test.arr_i8",
            Value::Array(Array::from_values([-128i8, 127])),
        ),
        (
            "test.arr_u16",
            Value::Array(Array::from_values([1u16, 65_535])),
        ),
        ("test.arr_i16", Value::Array(Array::from_values([-1i16, 1]))),
        (
            "test.arr_u32",
            Value::Array(Array::from_values([7u32, 8, 9])),
        ),
        (
            "test.arr_i32",
            Value::Array(Array::from_values([-1i32, 0, 1])),
        ),
        ("test.arr_u64", Value::Array(Array::from_values([u64::MAX]))),
        ("test.arr_i64", Value::Array(Array::from_values([i64::MIN]))),
        (
            "test.arr_f32",
            Value::Array(Array::from_values([0.5f32, -0.25])),
        ),
        ("test.arr_f64", Value::Array(Array::from_values([1e300f64]))),
        (
            "test.arr_bool",
            Value::Array(Array::from_values([true, false, true])),
        ),
        (
            "test.arr_str",
            Value::Array(Array::from_strings(["a", "", "ünï"])),
        ),
        (
            "test.arr_empty",
            Value::Array(Array::from_values(Vec::<f32>::new())),
        ),
        ("test.arr_nested", Value::Array(nested_u8)),
        ("test.arr_triple", Value::Array(triple)),
    ]
}

/// Deterministic bytes for a tensor of `n` bytes.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A writer holding every value and three small tensors.
pub fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new(3);
    w.add_kv("general.architecture", Value::from("llama"));
    for (k, v) in every_value() {
        w.add_kv(k, v);
    }
    w.add_tensor("tok.weight", &[64, 2], GgmlType::Q8_0, pattern(136, 1))
        .unwrap();
    w.add_tensor("norm.weight", &[5], GgmlType::F32, pattern(20, 2))
        .unwrap();
    w.add_tensor("q.weight", &[32, 1, 2], GgmlType::Q4_1, pattern(40, 3))
        .unwrap();
    w
}

/// The bytes of [`sample_writer`].
pub fn sample_bytes() -> Vec<u8> {
    sample_writer().to_bytes()
}

/// Reads everything a parsed file offers, checking the invariants every accepted file keeps.
pub fn touch_everything(file: &GgufFile) {
    let mut n = 0usize;
    for (key, value) in file.metadata().iter() {
        assert!(!key.is_empty());
        assert!(file.metadata().get(key).is_some());
        let _ = value.type_name();
        n += 1;
    }
    assert_eq!(n, file.metadata().len());
    assert!(file.alignment().is_power_of_two());
    assert!(file.data_offset() <= file.file_size());
    for info in file.tensors() {
        assert_eq!(file.tensor(&info.name), Some(info));
        assert!(info.dims.len() <= souverain_gguf::MAX_DIMS);
        assert_eq!(info.offset % file.alignment(), 0);
        let data = file.tensor_data(info);
        assert_eq!(data.len() as u64, info.n_bytes);
        assert_eq!(
            info.ggml_type.row_bytes(info.n_elements),
            Some(info.n_bytes)
        );
    }
}
