//! Reads the default model, SmolLM2-135M-Instruct Q4_1, when it is on this machine.
//!
//! It is found through `SOUVERAIN_TEST_MODEL`, then the model cache (`scripts/fetch-model`);
//! when it is absent the test is skipped with a note, unless `SOUVERAIN_REQUIRE_MODEL` is set
//! (as `scripts/test` does), which makes its absence a failure.

use crate::common;

use common::touch_everything;
use souverain_gguf::{GgmlType, GgufFile};

#[test]
fn smollm2_header_matches_llama_cpp() {
    let Some(path) = testkit::default_model() else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(file.metadata().len(), 33);
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(md.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(file.alignment(), 32);
    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.n_bytes, 576 / 32 * 34 * 49152);
    let tokens = md.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    touch_everything(&file);
    // The last tensor ends within one alignment of the end of the file.
    let end = file
        .tensors()
        .iter()
        .map(|t| file.data_offset() + t.offset + t.n_bytes)
        .max()
        .unwrap();
    assert!(file.file_size() - end < file.alignment());
}
