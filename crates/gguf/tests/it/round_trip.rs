//! Writer → reader round trips.

use crate::common;

use common::{every_value, pattern, sample_bytes, sample_writer, touch_everything};
use souverain_gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value, ValueType};

#[test]
fn every_value_type_round_trips_in_order() {
    let file = GgufFile::from_bytes(sample_bytes()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    let md = file.metadata();
    assert_eq!(md.len(), every_value().len() + 1);
    let mut iter = md.iter();
    assert_eq!(
        iter.next(),
        Some(("general.architecture", &Value::from("llama")))
    );
    for ((key, value), (want_key, want_value)) in iter.zip(every_value()) {
        assert_eq!(key, want_key);
        assert_eq!(value, &want_value, "{key}");
        assert_eq!(md.get(key), Some(&want_value));
    }
    touch_everything(&file);
}

#[test]
fn typed_getters_on_parsed_metadata() {
    let file = GgufFile::from_bytes(sample_bytes()).unwrap();
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(md.get_u32("test.u8").unwrap(), 250);
    assert_eq!(md.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(md.get_u64("test.u64").unwrap(), u64::MAX - 1);
    assert!(matches!(
        md.get_u32("test.i8"),
        Err(GgufError::OutOfRange { value: -7, .. })
    ));
    assert_eq!(md.get_f32("test.f32").unwrap(), -1.5e-3);
    assert!(md.get_bool("test.bool_true").unwrap());
    assert_eq!(md.opt_bool("test.bool_false").unwrap(), Some(false));
    assert_eq!(
        md.get_str_array("test.arr_str").unwrap(),
        vec!["a", "", "ünï"]
    );
    assert_eq!(md.get_i32_array("test.arr_i32").unwrap(), vec![-1, 0, 1]);
    assert_eq!(md.get_u32_array("test.arr_u16").unwrap(), vec![1, 65_535]);
    assert_eq!(md.get_f32_array("test.arr_f32").unwrap(), vec![0.5, -0.25]);
    let nested = md.get_array("test.arr_nested").unwrap();
    assert_eq!(nested.elem_type(), ValueType::Array);
    assert_eq!(nested.len(), 3);
    assert_eq!(
        nested.values()[2].as_array().map(Array::elem_type),
        Some(ValueType::String)
    );
    assert!(matches!(
        md.get_str("test.arr_nested"),
        Err(GgufError::WrongType {
            expected: "string",
            found: "array of array",
            ..
        })
    ));
    assert!(matches!(
        md.get_u32("missing"),
        Err(GgufError::MissingKey { .. })
    ));
    assert_eq!(md.opt_str("missing").unwrap(), None);
}

#[test]
fn tensors_round_trip_with_their_bytes() {
    let file = GgufFile::from_bytes(sample_bytes()).unwrap();
    let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["tok.weight", "norm.weight", "q.weight"]);
    let tok = file.tensor("tok.weight").unwrap();
    assert_eq!(tok.dims, vec![64, 2]);
    assert_eq!(tok.ggml_type, GgmlType::Q8_0);
    assert_eq!((tok.offset, tok.n_elements, tok.n_bytes), (0, 128, 136));
    assert_eq!((tok.row_len(), tok.n_rows()), (64, 2));
    assert_eq!(file.tensor_data(tok), &pattern(136, 1)[..]);
    let norm = file.tensor("norm.weight").unwrap();
    assert_eq!((norm.offset, norm.n_bytes), (160, 20));
    assert_eq!(file.tensor_data(norm), &pattern(20, 2)[..]);
    let q = file.tensor("q.weight").unwrap();
    assert_eq!(
        (q.dims.as_slice(), q.offset, q.n_bytes),
        (&[32, 1, 2][..], 192, 40)
    );
    assert_eq!(file.tensor_data(q), &pattern(40, 3)[..]);
    assert_eq!(file.data_offset() % 32, 0);
    assert_eq!(file.file_size(), file.data_offset() + 192 + 64);
    assert!(file.tensor("absent").is_none());
}

#[test]
fn every_ggml_type_round_trips() {
    let mut w = GgufWriter::new(2);
    w.set_alignment(64).unwrap();
    for (i, t) in GgmlType::ALL.iter().enumerate() {
        let dims = [t.block_len() * 2, 3];
        let n = t.row_bytes(dims[0] * dims[1]).unwrap() as usize;
        w.add_tensor(format!("t{i}"), &dims, *t, pattern(n, i as u8))
            .unwrap();
    }
    let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert_eq!(file.version(), 2);
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.metadata().get_u32("general.alignment").unwrap(), 64);
    assert_eq!(file.tensors().len(), GgmlType::ALL.len());
    for (i, (info, t)) in file.tensors().iter().zip(GgmlType::ALL).enumerate() {
        assert_eq!(info.ggml_type, t);
        assert_eq!(info.n_elements, t.block_len() * 6);
        assert_eq!(info.n_bytes, t.block_bytes() * 6);
        assert_eq!(info.offset % 64, 0);
        assert_eq!(
            file.tensor_data(info),
            &pattern(info.n_bytes as usize, i as u8)[..]
        );
    }
    touch_everything(&file);
}

#[test]
fn scalars_and_empty_tensors_are_accepted() {
    // ggml reads zero dimensions as a scalar and allows zero-sized dimensions.
    let mut w = GgufWriter::new(3);
    w.add_tensor("scalar", &[], GgmlType::F32, 2.5f32.to_le_bytes().to_vec())
        .unwrap();
    w.add_tensor("empty", &[0, 7], GgmlType::Q4_0, Vec::new())
        .unwrap();
    let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let scalar = file.tensor("scalar").unwrap();
    assert_eq!(
        (scalar.dims.len(), scalar.n_elements, scalar.n_bytes),
        (0, 1, 4)
    );
    assert_eq!(file.tensor_data(scalar), 2.5f32.to_le_bytes());
    let empty = file.tensor("empty").unwrap();
    assert_eq!((empty.n_elements, empty.n_bytes), (0, 0));
    assert_eq!((empty.row_len(), empty.n_rows()), (0, 7));
    assert_eq!((scalar.row_len(), scalar.n_rows()), (1, 1));
    assert!(file.tensor_data(empty).is_empty());
}

#[test]
fn file_without_tensors_has_no_data_padding() {
    let mut w = GgufWriter::new(3);
    w.add_kv("k", Value::U8(1));
    let bytes = w.to_bytes();
    let len = bytes.len() as u64;
    let file = GgufFile::from_bytes(bytes).unwrap();
    assert!(file.tensors().is_empty());
    assert_eq!(file.data_offset(), len);
    assert_eq!(file.file_size(), len);
}

#[test]
fn open_maps_a_file_and_reports_io_errors() {
    let dir = std::env::temp_dir().join(format!("souverain-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sample.gguf");
    sample_writer().write(&path).unwrap();
    let mapped = GgufFile::open(&path).unwrap();
    let owned = GgufFile::from_bytes(sample_bytes()).unwrap();
    assert_eq!(mapped.tensors(), owned.tensors());
    for info in mapped.tensors() {
        assert_eq!(mapped.tensor_data(info), owned.tensor_data(info));
    }
    assert_eq!(mapped.metadata().len(), owned.metadata().len());
    touch_everything(&mapped);

    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::Truncated {
            offset: 0,
            needed: 4,
            what: "magic"
        })
    ));

    let missing = dir.join("missing.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(&err, GgufError::Io { path, .. } if path == &missing));
    assert!(err.to_string().contains("missing.gguf"));
    std::fs::remove_dir_all(&dir).unwrap();
}
