//! Fill-in-the-middle prompts (`Engine::tokenize_fim`) against llama.cpp, on the default model.
//!
//! SmolLM2 has no FIM tokens (llama.cpp finds none either, the golden file records it), so the
//! model is refused; two copies of it with FIM markers added (by renaming three unused control
//! tokens, and by naming three tokens in the GGUF metadata) check the layout: the prefix and
//! suffix ids are llama.cpp's own tokenisation of them as its server's `/infill` tokenises
//! them, from `scripts/golden/llamacpp_prompt_logprobs.py`.

use crate::common;

use std::path::Path;

use common::{ids, prompt_logprobs_golden};
use gguf::{Array, GgufFile, GgufWriter, Value};
use souverain_engine::{Engine, EngineConfig, EngineError};

fn load(path: &Path) -> Engine {
    let config = EngineConfig {
        threads: 1,
        max_seqs: 1,
        context_length: Some(256),
        ..EngineConfig::default()
    };
    Engine::load(path, config, &mut |_, _| {}).expect("load")
}

/// A copy of the GGUF file at `src` with its metadata changed by `edit` (same tensors).
fn derive(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&str, &Value) -> Option<Value>,
    extra: &[(&str, Value)],
) {
    let file = GgufFile::open(src).expect("open model");
    let mut w = GgufWriter::new(file.version());
    w.set_alignment(file.alignment()).expect("alignment");
    for (k, v) in file.metadata().iter() {
        if k == "general.alignment" {
            continue;
        }
        w.add_kv(k, edit(k, v).unwrap_or_else(|| v.clone()));
    }
    for (k, v) in extra {
        w.add_kv(*k, v.clone());
    }
    for t in file.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ggml_type, file.tensor_data(t).to_vec())
            .expect("tensor");
    }
    w.write(dst).expect("write derived model");
}

#[test]
fn fim_prompts_follow_llama_cpp() {
    let Some(path) = testkit::default_model() else {
        return;
    };
    let golden = prompt_logprobs_golden();
    let fim = &golden["fim"];

    // The default model has no FIM tokens, for llama.cpp as for us.
    assert!(fim["fim_pre"].is_null() && fim["fim_suf"].is_null() && fim["fim_mid"].is_null());
    let e = load(&path);
    match e.tokenize_fim("a", "b") {
        Err(EngineError::InvalidRequest(m)) => {
            assert!(m.contains("no fill-in-the-middle tokens"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let add_bos = fim["add_bos"].as_bool().expect("add_bos");
    let bos = fim["bos"].as_u64().expect("bos") as u32;
    assert!(
        !add_bos,
        "the derived models below assume SmolLM2 adds no BOS"
    );
    drop(e);

    let dir = std::env::temp_dir().join(format!("souverain-fim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tokens = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("tokens")
            .values()
            .iter()
            .map(|t| t.as_str().expect("token").to_owned())
            .collect()
    };

    // 1. Markers found by their text (StarCoder's names), as llama.cpp's vocabulary loader
    //    finds them: tokens 3, 5, 6 (`<repo_name>`, `<file_sep>`, `<filename>`) renamed.
    let by_text = dir.join("by-text.gguf");
    derive(
        &path,
        &by_text,
        |k, v| {
            (k == "tokenizer.ggml.tokens").then(|| {
                let mut t = tokens(v);
                t[3] = "<fim_prefix>".into();
                t[5] = "<fim_suffix>".into();
                t[6] = "<fim_middle>".into();
                Value::Array(Array::from_strings(t))
            })
        },
        &[],
    );
    // 2. Markers named by the metadata (tokens 7, 8, 9), and a BOS the model asks for.
    let by_metadata = dir.join("by-metadata.gguf");
    derive(
        &path,
        &by_metadata,
        |k, _| (k == "tokenizer.ggml.add_bos_token").then_some(Value::Bool(true)),
        &[
            ("tokenizer.ggml.fim_pre_token_id", Value::U32(7)),
            ("tokenizer.ggml.fim_suf_token_id", Value::U32(8)),
            ("tokenizer.ggml.fim_mid_token_id", Value::U32(9)),
        ],
    );

    let mut checked = 0;
    for (file, lead, [pre, suf, mid]) in [
        (&by_text, vec![], [3, 5, 6]),
        (&by_metadata, vec![bos], [7, 8, 9]),
    ] {
        let e = load(file);
        for case in fim["cases"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("name");
            let prefix = case["prefix"].as_str().expect("prefix");
            let suffix = case["suffix"].as_str().expect("suffix");
            let want: Vec<u32> = [
                lead.clone(),
                vec![pre],
                ids(&case["prefix_ids"]),
                vec![suf],
                ids(&case["suffix_ids"]),
                vec![mid],
            ]
            .concat();
            let got = e.tokenize_fim(prefix, suffix).expect("fim");
            assert_eq!(got, want, "{name} ({})", file.display());
            checked += 1;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(checked >= 10);
}
