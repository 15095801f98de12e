//! all-MiniLM-L6-v2 against sentence-transformers: token ids exactly, and every sentence
//! vector with cosine similarity >= 0.9999.
//!
//! The golden file comes from `scripts/golden/sentence_transformers.py` (its header names the
//! versions and the weights' sha256). The model directory comes from
//! `scripts/fetch-embedding-model` (or `SOUVERAIN_EMBEDDING_MODEL`); without it the tests are
//! skipped with a note, unless `SOUVERAIN_REQUIRE_MODEL` is set (as `scripts/test` does).

use std::path::PathBuf;

use serde_json::Value;
use souverain_engine::{Embedder, EmbedderConfig, EngineError};

struct Golden {
    generated_by: String,
    model_safetensors_sha256: String,
    dimensions: usize,
    max_tokens: usize,
    cases: Vec<Case>,
}

struct Case {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f64>,
}

fn golden() -> Golden {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/minilm-embeddings.json");
    let text = std::fs::read_to_string(path).expect("read golden");
    let v: Value = serde_json::from_str(&text).expect("parse golden");
    let s = |k: &str| v[k].as_str().expect(k).to_owned();
    let n = |k: &str| v[k].as_u64().expect(k) as usize;
    let cases = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_owned(),
            token_ids: c["token_ids"]
                .as_array()
                .expect("token_ids")
                .iter()
                .map(|i| i.as_u64().expect("id") as u32)
                .collect(),
            embedding: c["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().expect("float"))
                .collect(),
        })
        .collect();
    Golden {
        generated_by: s("generated_by"),
        model_safetensors_sha256: s("model_safetensors_sha256"),
        dimensions: n("dimensions"),
        max_tokens: n("max_tokens"),
        cases,
    }
}

fn embedder(dir: &std::path::Path) -> Embedder {
    let config = EmbedderConfig {
        threads: 2,
        ..EmbedderConfig::default()
    };
    Embedder::load(dir, config).expect("load the embedding model")
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * y).sum();
    let na: f64 = a
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let nb: f64 = b.iter().map(|&y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn vectors_match_sentence_transformers() {
    let Some(dir) = testkit::embedding_model("model.safetensors") else {
        return;
    };
    let g = golden();
    assert_eq!(g.generated_by, "scripts/golden/sentence_transformers.py");
    assert_eq!(g.model_safetensors_sha256.len(), 64);
    assert!(g.cases.len() >= 20, "{} cases", g.cases.len());
    let e = embedder(&dir);
    assert_eq!(e.model_id(), dir.file_name().unwrap().to_string_lossy());
    assert_eq!(e.dimensions(), g.dimensions);
    assert_eq!(e.max_tokens(), g.max_tokens);
    assert!(e.normalizes());

    let mut id_failures = Vec::new();
    for case in &g.cases {
        let ids = e.tokenize(&case.text);
        if ids != case.token_ids {
            id_failures.push(format!(
                "{:?}\n  ours: {ids:?}\n  hf:   {:?}",
                case.text, case.token_ids
            ));
        }
    }
    assert!(id_failures.is_empty(), "{}", id_failures.join("\n"));
    // The golden set reaches close to the limit.
    assert!(
        g.cases
            .iter()
            .any(|c| c.token_ids.len() + 8 >= g.max_tokens)
    );

    // All inputs in one call (several forward batches would give the same numbers).
    let inputs: Vec<Vec<u32>> = g.cases.iter().map(|c| c.token_ids.clone()).collect();
    let vectors = e.embed(&inputs).expect("embed");
    assert_eq!(vectors.len(), g.cases.len());
    let mut min = f64::INFINITY;
    let mut report = Vec::new();
    for (case, v) in g.cases.iter().zip(&vectors) {
        assert_eq!(v.len(), g.dimensions);
        let norm: f64 = v
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{:?}: norm {norm}", case.text);
        let c = cosine(v, &case.embedding);
        min = min.min(c);
        if c < 0.9999 {
            report.push(format!("{:?}: cosine {c}", case.text));
        }
    }
    eprintln!(
        "minimum cosine similarity over {} inputs: {min:.12} (1 - min = {:.3e})",
        g.cases.len(),
        1.0 - min
    );
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn batching_does_not_change_vectors() {
    let Some(dir) = testkit::embedding_model("model.safetensors") else {
        return;
    };
    let g = golden();
    let e = embedder(&dir);
    let inputs: Vec<Vec<u32>> = g
        .cases
        .iter()
        .take(6)
        .map(|c| c.token_ids.clone())
        .collect();
    let together = e.embed(&inputs).unwrap();
    for (ids, v) in inputs.iter().zip(&together) {
        assert_eq!(&e.embed(std::slice::from_ref(ids)).unwrap()[0], v);
    }
    // A small forward batch splits the request into several passes: same numbers.
    let small = Embedder::load(
        &dir,
        EmbedderConfig {
            threads: 1,
            max_batch_tokens: 256,
            ..EmbedderConfig::default()
        },
    )
    .unwrap();
    assert_eq!(small.embed(&inputs).unwrap(), together);
}

#[test]
fn inputs_over_the_limit_are_refused_not_truncated() {
    let Some(dir) = testkit::embedding_model("model.safetensors") else {
        return;
    };
    let e = embedder(&dir);
    let long = "word ".repeat(300);
    let ids = e.tokenize(&long);
    assert_eq!(ids.len(), 302);
    let err = e.embed(&[vec![101, 102], ids]).unwrap_err();
    match err {
        EngineError::InvalidRequest(m) => assert!(m.contains("input 1 has 302 tokens"), "{m}"),
        other => panic!("{other}"),
    }
    assert!(e.embed(&[vec![]]).is_err());
    assert!(e.embed(&[vec![101, 40_000, 102]]).is_err());
    // A lower limit can be configured, not a higher one.
    let limited = Embedder::load(
        &dir,
        EmbedderConfig {
            max_tokens: Some(16),
            ..EmbedderConfig::default()
        },
    )
    .unwrap();
    assert_eq!(limited.max_tokens(), 16);
    assert!(
        Embedder::load(
            &dir,
            EmbedderConfig {
                max_tokens: Some(513),
                ..EmbedderConfig::default()
            },
        )
        .is_err()
    );
}
