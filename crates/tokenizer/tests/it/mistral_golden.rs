//! Token-exact agreement with mistral-common for every tokenizer file it ships.
//!
//! The golden files come from `scripts/golden/mistral_common.py`; the tokenizer files from
//! `scripts/fetch-mistral-tokenizers` (directory `$SOUVERAIN_MISTRAL_TOKENIZERS`, default
//! `~/.cache/souverain/mistral-common`). Without them the tests print a note and pass, unless
//! `SOUVERAIN_REQUIRE_MODEL=1` (as `scripts/test` sets), which makes their absence a failure.

use std::path::PathBuf;

use serde::Deserialize;
use souverain_tokenizer::{MistralChatRequest, MistralTokenizer};

#[derive(Deserialize)]
struct Golden {
    header: Header,
    chat: Vec<ChatCase>,
    text: Vec<TextCase>,
    fim: Vec<FimCase>,
}

#[derive(Deserialize)]
struct Header {
    generated_by: String,
    file: String,
    mistral_common: String,
    tokenizer_version: String,
    bos_id: u32,
    eos_id: u32,
    n_words: usize,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    derived: Option<Derived>,
}

/// A tokenizer derived from a shipped Tekken file: another version and special-token table.
#[derive(Deserialize)]
struct Derived {
    base: String,
    version: String,
    special_tokens: serde_json::Value,
}

#[derive(Deserialize)]
struct ChatCase {
    name: String,
    request: MistralChatRequest,
    #[serde(default)]
    ids: Option<Vec<u32>>,
    #[serde(default)]
    error: Option<String>,
}

/// `encode_fim(FIMRequest(prompt, suffix))`: its ids, or the error mistral-common raises.
#[derive(Deserialize)]
struct FimCase {
    name: String,
    prompt: String,
    suffix: Option<String>,
    #[serde(default)]
    ids: Option<Vec<u32>>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_with_bos_eos: String,
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mistral")
}

/// The bytes of a shipped tokenizer file, or `None` (after a note) when absent and not required.
fn tokenizer_file(name: &str) -> Option<Vec<u8>> {
    let path = testkit::mistral_tokenizer_file(name)?;
    Some(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn load(golden: &Golden) -> Option<MistralTokenizer> {
    let h = &golden.header;
    match &h.derived {
        None => {
            let bytes = tokenizer_file(&h.file)?;
            Some(MistralTokenizer::from_bytes(&h.file, &bytes).expect("load tokenizer"))
        }
        Some(d) => {
            let bytes = tokenizer_file(&d.base)?;
            let mut model: serde_json::Value = serde_json::from_slice(&bytes).expect("base json");
            model["config"]["version"] = serde_json::Value::String(d.version.clone());
            model["special_tokens"] = d.special_tokens.clone();
            if let Some(obj) = model.as_object_mut() {
                obj.remove("image");
            }
            let text = serde_json::to_vec(&model).expect("serialise derived");
            Some(MistralTokenizer::from_tekken(&text).expect("load derived tokenizer"))
        }
    }
}

fn check(golden_name: &str) {
    let path = golden_dir().join(golden_name);
    let text = std::fs::read_to_string(&path).expect("read golden");
    let golden: Golden = serde_json::from_str(&text).expect("parse golden");
    let h = &golden.header;
    assert_eq!(h.generated_by, "scripts/golden/mistral_common.py");
    assert!(!h.mistral_common.is_empty());
    assert!(
        h.sha256.as_ref().is_some_and(|s| s.len() == 64) || h.derived.is_some(),
        "golden header names no file checksum"
    );
    assert!(
        golden.chat.len() >= 15,
        "only {} chat cases",
        golden.chat.len()
    );
    assert!(
        golden.fim.len() >= 10,
        "only {} FIM cases",
        golden.fim.len()
    );
    let Some(tok) = load(&golden) else { return };
    assert_eq!(tok.version().as_str(), h.tokenizer_version);
    assert_eq!(tok.vocab_size(), h.n_words);
    assert_eq!((tok.bos_id(), tok.eos_id()), (h.bos_id, h.eos_id));

    let mut failures = Vec::new();
    for case in &golden.chat {
        let got = tok.encode_chat(&case.request);
        match (&case.ids, &case.error, got) {
            (Some(want), _, Ok(got)) if *want == got => {}
            (Some(want), _, Ok(got)) => failures.push(format!(
                "chat {}:\n  want {want:?}\n  got  {got:?}\n  want text {:?}\n  got text  {:?}",
                case.name,
                tok.decode(want, true).unwrap_or_default(),
                tok.decode(&got, true).unwrap_or_default()
            )),
            (Some(_), _, Err(e)) => {
                failures.push(format!("chat {}: unexpected error {e}", case.name))
            }
            (None, Some(_), Err(_)) => {}
            (None, want, Ok(got)) => failures.push(format!(
                "chat {}: mistral-common refuses ({want:?}) but we encoded {got:?}",
                case.name
            )),
            (None, None, Err(e)) => {
                failures.push(format!("chat {}: golden has no answer ({e})", case.name))
            }
        }
    }
    for case in &golden.fim {
        let suffix = case.suffix.as_deref().unwrap_or("");
        match (&case.ids, &case.error, tok.encode_fim(&case.prompt, suffix)) {
            (Some(want), _, Ok(got)) if *want == got => {}
            (Some(want), _, Ok(got)) => failures.push(format!(
                "fim {}:\n  want {want:?}\n  got  {got:?}",
                case.name
            )),
            (Some(_), _, Err(e)) => {
                failures.push(format!("fim {}: unexpected error {e}", case.name))
            }
            (None, Some(_), Err(_)) => {}
            (None, want, Ok(got)) => failures.push(format!(
                "fim {}: mistral-common refuses ({want:?}) but we encoded {got:?}",
                case.name
            )),
            (None, None, Err(e)) => {
                failures.push(format!("fim {}: golden has no answer ({e})", case.name))
            }
        }
    }
    for case in &golden.text {
        let got = tok.encode(&case.text, false, false);
        if got != case.ids {
            failures.push(format!(
                "encode {:?}\n  want {:?}\n  got  {got:?}",
                case.text, case.ids
            ));
        }
        match tok.decode(&case.ids, false) {
            Ok(d) if d == case.decoded => {}
            other => failures.push(format!(
                "decode {:?}: want {:?}, got {other:?}",
                case.ids, case.decoded
            )),
        }
        let with_bos: Vec<u32> = [tok.bos_id()]
            .into_iter()
            .chain(case.ids.iter().copied())
            .chain([tok.eos_id()])
            .collect();
        match tok.decode(&with_bos, false) {
            Ok(d) if d == case.decoded_with_bos_eos => {}
            other => failures.push(format!(
                "decode {with_bos:?}: want {:?}, got {other:?}",
                case.decoded_with_bos_eos
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{}: {} failures\n{}",
        h.file,
        failures.len(),
        failures.join("\n")
    );
}

macro_rules! golden_tests {
    ($($name:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $name() {
                check($file);
            }
        )*

        #[test]
        fn every_golden_file_has_a_test() {
            let mut listed = vec![$($file),*];
            listed.sort_unstable();
            let mut found: Vec<String> = std::fs::read_dir(golden_dir())
                .expect("golden dir")
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".golden.json"))
                .collect();
            found.sort_unstable();
            assert_eq!(found, listed);
        }
    };
}

golden_tests! {
    sentencepiece_v1 => "tokenizer.model.v1.golden.json",
    sentencepiece_v2 => "mistral_instruct_tokenizer_240216.model.v2.golden.json",
    sentencepiece_v3 => "mistral_instruct_tokenizer_240323.model.v3.golden.json",
    sentencepiece_v7 => "mistral_instruct_tokenizer_241114.model.v7.golden.json",
    sentencepiece_v7m1 => "mistral_instruct_tokenizer_241114.model.v7m1.golden.json",
    tekken_240718_v3 => "tekken_240718.json.golden.json",
    tekken_240911_v3 => "tekken_240911.json.golden.json",
    tekken_derived_v11 => "tekken_240911_derived_v11.json.golden.json",
    tekken_derived_v13 => "tekken_240911_derived_v13.json.golden.json",
}
