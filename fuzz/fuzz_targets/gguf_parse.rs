//! Feeds arbitrary bytes to the GGUF parser: it must return `Ok` or `Err`, never panic, hang
//! or allocate without bound, and an accepted file must keep every invariant it promises.
//!
//! Run with `cargo +nightly fuzz run gguf_parse` from `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use souverain_gguf::{GgufFile, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    assert!(file.alignment().is_power_of_two());
    assert!(file.data_offset() <= file.file_size());
    let md = file.metadata();
    let mut n = 0;
    for (key, value) in md.iter() {
        assert!(md.get(key).is_some());
        touch(value);
        // The typed getters must fail cleanly on whatever type is there.
        let _ = md.get_u32(key);
        let _ = md.get_f32(key);
        let _ = md.get_str(key);
        let _ = md.get_str_array(key);
        let _ = md.get_i32_array(key);
        let _ = md.get_f32_array(key);
        n += 1;
    }
    assert_eq!(n, md.len());
    for info in file.tensors() {
        assert_eq!(file.tensor(&info.name), Some(info));
        assert_eq!(info.offset % file.alignment(), 0);
        let bytes = file.tensor_data(info);
        assert_eq!(bytes.len() as u64, info.n_bytes);
        assert_eq!(info.ggml_type.row_bytes(info.n_elements), Some(info.n_bytes));
        // Read every byte so a bad range would be caught by the sanitizer.
        std::hint::black_box(bytes.iter().fold(0u8, |acc, b| acc ^ b));
    }
});

fn touch(value: &Value) {
    let _ = value.type_name();
    if let Value::Array(array) = value {
        for v in array.values() {
            assert_eq!(v.value_type(), array.elem_type());
            touch(v);
        }
    }
}
