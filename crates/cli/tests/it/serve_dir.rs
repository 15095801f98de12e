//! `souverain serve --model DIR` on model directories: the Hugging Face layout (config.json +
//! model.safetensors) with Mistral's SentencePiece tokenizer, the Hugging Face layout with a
//! `tokenizer.json`, and Mistral's own layout (params.json + consolidated.safetensors) with a
//! Tekken tokenizer. The weights are random (small width, the tokenizers' real vocabularies);
//! what is checked is that each directory loads, answers chat completions, and that
//! `/tokenize` encodes chats token for token as mistral-common does (its golden ids).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_souverain");
const D: usize = 32;
const FFN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = D / HEADS;

/// Deterministic small weights.
fn weights(n: usize, seed: &mut u64) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let v = ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4;
            v.to_le_bytes()
        })
        .collect()
}

/// Writes a random Mistral-shaped model as safetensors, with tensor names in the Hugging Face
/// (`hf = true`) or Mistral convention.
fn write_weights(path: &Path, vocab: usize, hf: bool) {
    let mut seed = 0x1234_5678_9abc_def1u64;
    let kv = KV_HEADS * HEAD_DIM;
    let ones = || (0..D).flat_map(|_| 1f32.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let name = |hf_name: &str, mistral_name: &str| {
        if hf {
            hf_name.to_owned()
        } else {
            mistral_name.to_owned()
        }
    };
    tensors.push((
        name("model.embed_tokens.weight", "tok_embeddings.weight"),
        vec![vocab, D],
        weights(vocab * D, &mut seed),
    ));
    tensors.push((name("model.norm.weight", "norm.weight"), vec![D], ones()));
    tensors.push((
        name("lm_head.weight", "output.weight"),
        vec![vocab, D],
        weights(vocab * D, &mut seed),
    ));
    // Each layer's weights (Hugging Face name, Mistral name, shape), then its norms (ones).
    let layer: [(&str, &str, [usize; 2]); 7] = [
        ("self_attn.q_proj.weight", "attention.wq.weight", [D, D]),
        ("self_attn.k_proj.weight", "attention.wk.weight", [kv, D]),
        ("self_attn.v_proj.weight", "attention.wv.weight", [kv, D]),
        ("self_attn.o_proj.weight", "attention.wo.weight", [D, D]),
        ("mlp.gate_proj.weight", "feed_forward.w1.weight", [FFN, D]),
        ("mlp.down_proj.weight", "feed_forward.w2.weight", [D, FFN]),
        ("mlp.up_proj.weight", "feed_forward.w3.weight", [FFN, D]),
    ];
    let norms = [
        ("input_layernorm.weight", "attention_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ];
    for i in 0..LAYERS {
        let l = |hf_name: &str, m_name: &str| {
            name(
                &format!("model.layers.{i}.{hf_name}"),
                &format!("layers.{i}.{m_name}"),
            )
        };
        for (hf_name, m_name, [rows, cols]) in layer {
            let data = weights(rows * cols, &mut seed);
            tensors.push((l(hf_name, m_name), vec![rows, cols], data));
        }
        for (hf_name, m_name) in norms {
            tensors.push((l(hf_name, m_name), vec![D], ones()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .expect("tensor view");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

fn hf_config(vocab: usize) -> Value {
    json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": D, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": vocab, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "sliding_window": null, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    })
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--model",
            dir.to_str().expect("utf-8"),
            "--port",
            &port.to_string(),
        ])
        .args(["--threads", "2", "--model-id", "dir-model"])
        .env("RUST_LOG", "warn,souverain_api=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serve");
    let mut server = Server { child, port };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("serve exited early with {status}");
        }
        if http(port, "GET", "/health", None).is_some_and(|(code, _)| code == 200) {
            return server;
        }
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal HTTP/1.1 client: (status, JSON body).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn chat_works(server: &Server) {
    let (code, r) = http(
        server.port,
        "POST",
        "/v1/chat/completions",
        Some(
            &json!({"model": "dir-model", "max_tokens": 6, "temperature": 0,
                     "messages": [{"role": "user", "content": "Hello, how are you?"}]}),
        ),
    )
    .expect("chat");
    assert_eq!(code, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    let n = r["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=6).contains(&n), "{r}");
}

/// `/tokenize` of each golden chat (those mistral-common encodes) equals mistral-common's ids.
fn tokenize_matches_golden(server: &Server, golden: &Path) {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(golden).expect("golden")).expect("json");
    let mut checked = 0;
    for case in doc["chat"].as_array().expect("chat cases") {
        let Some(ids) = case.get("ids").filter(|v| v.is_array()) else {
            continue;
        };
        let request = &case["request"];
        if request
            .get("continue_final_message")
            .is_some_and(|v| v == true)
        {
            continue; // not expressible in /tokenize's request shape
        }
        let (code, r) = http(server.port, "POST", "/tokenize", Some(request)).expect("tokenize");
        assert_eq!(code, 200, "{}: {r}", case["name"]);
        assert_eq!(&r["tokens"], ids, "{}", case["name"]);
        checked += 1;
    }
    eprintln!("{checked} golden chats encoded as mistral-common does");
    assert!(checked >= 15, "only {checked} golden chats checked");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("souverain-dir-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn hugging_face_layout_with_sentencepiece_serves_chats() {
    let Some(tokenizer) =
        testkit::mistral_tokenizer_file("mistral_instruct_tokenizer_240323.model.v3")
    else {
        return;
    };
    let dir = temp_dir("hf-sp");
    let vocab = 32768;
    std::fs::write(dir.join("config.json"), hf_config(vocab).to_string()).expect("config");
    write_weights(&dir.join("model.safetensors"), vocab, true);
    std::fs::copy(tokenizer, dir.join("tokenizer.model.v3")).expect("tokenizer");
    let server = serve(&dir);
    chat_works(&server);
    tokenize_matches_golden(
        &server,
        &golden("mistral_instruct_tokenizer_240323.model.v3.golden.json"),
    );
    drop(server);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn mistral_layout_with_tekken_serves_chats() {
    let Some(tokenizer) = testkit::mistral_tokenizer_file("tekken_240911.json") else {
        return;
    };
    let dir = temp_dir("mistral-tekken");
    let vocab = 131072;
    let params = json!({"dim": D, "n_layers": LAYERS, "head_dim": HEAD_DIM, "hidden_dim": FFN,
                        "n_heads": HEADS, "n_kv_heads": KV_HEADS, "norm_eps": 1e-5,
                        "vocab_size": vocab, "rope_theta": 1000000.0});
    std::fs::write(dir.join("params.json"), params.to_string()).expect("params");
    write_weights(&dir.join("consolidated.safetensors"), vocab, false);
    std::fs::copy(tokenizer, dir.join("tekken.json")).expect("tokenizer");
    let server = serve(&dir);
    chat_works(&server);
    tokenize_matches_golden(&server, &golden("tekken_240911.json.golden.json"));
    drop(server);
    std::fs::remove_dir_all(dir).ok();
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tokenizer/tests/golden/mistral")
        .join(name)
}

/// SmolLM2's vocabulary (read from the default GGUF model) written as the `tokenizer.json`
/// and `tokenizer_config.json` Hugging Face ships for it; `None` (after a note) without the
/// default model, unless it is required.
fn smollm2_hf_tokenizer(dir: &Path) -> Option<usize> {
    let model = testkit::default_model()?;
    let file = gguf::GgufFile::open(&model).expect("open default model");
    let spec = engine::tokenizer_spec(file.metadata()).expect("spec");
    let types = spec.token_types.clone().unwrap_or_default();
    let vocab: serde_json::Map<String, Value> = spec
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = spec
        .tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i).is_some_and(|&t| t == 3 || t == 4))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "post_processor": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": spec.merges}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer.json");
    let config = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                        "chat_template": spec.chat_template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("config");
    Some(spec.tokens.len())
}

#[test]
fn hugging_face_layout_with_tokenizer_json_serves_chats() {
    let dir = temp_dir("hf-json");
    let Some(vocab) = smollm2_hf_tokenizer(&dir) else {
        return;
    };
    std::fs::write(dir.join("config.json"), hf_config(vocab).to_string()).expect("config");
    write_weights(&dir.join("model.safetensors"), vocab, true);
    let server = serve(&dir);
    chat_works(&server);
    // llama.cpp's ids for this text on SmolLM2 (crates/model/tests/golden).
    let (code, r) = http(
        server.port,
        "POST",
        "/tokenize",
        Some(&json!({"prompt": "The capital of France is"})),
    )
    .expect("tokenize");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["tokens"], json!([504, 3575, 282, 4649, 314]));
    let (_, chat) = http(
        server.port,
        "POST",
        "/tokenize",
        Some(&json!({"messages": [{"role": "user", "content": "Hi"}]})),
    )
    .expect("tokenize");
    let (_, text) = http(
        server.port,
        "POST",
        "/detokenize",
        Some(&json!({"tokens": chat["tokens"]})),
    )
    .expect("detokenize");
    let text = text["prompt"].as_str().expect("text");
    assert!(
        text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    drop(server);
    std::fs::remove_dir_all(dir).ok();
}

/// A tiny Mistral-layout model with `tekken` as its tokenizer file.
fn mistral_dir(name: &str, tekken: &[u8]) -> PathBuf {
    let dir = temp_dir(name);
    let vocab = 131072;
    let params = json!({"dim": D, "n_layers": LAYERS, "head_dim": HEAD_DIM, "hidden_dim": FFN,
                        "n_heads": HEADS, "n_kv_heads": KV_HEADS, "norm_eps": 1e-5,
                        "vocab_size": vocab, "rope_theta": 1000000.0});
    std::fs::write(dir.join("params.json"), params.to_string()).expect("params");
    write_weights(&dir.join("consolidated.safetensors"), vocab, false);
    std::fs::write(dir.join("tekken.json"), tekken).expect("tokenizer");
    dir
}

/// `tekken_240911.json` turned into a v13 tokenizer ([THINK], `name[ARGS]{...}` calls) the
/// way the tokenizer's golden file records it (mistral-common derives it the same way).
fn derived_v13_tekken(files: &Path) -> Vec<u8> {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(golden("tekken_240911_derived_v13.json.golden.json"))
            .expect("golden"),
    )
    .expect("json");
    let derived = &golden["header"]["derived"];
    let base = std::fs::read(files.join(derived["base"].as_str().expect("base"))).expect("base");
    let mut model: Value = serde_json::from_slice(&base).expect("tekken json");
    model["config"]["version"] = derived["version"].clone();
    model["special_tokens"] = derived["special_tokens"].clone();
    if let Some(obj) = model.as_object_mut() {
        obj.remove("image");
    }
    serde_json::to_vec(&model).expect("serialise")
}

/// A forced call on a random-weight model: the grammar holds it to Mistral's syntax and the
/// schema; the parser gives it back as OpenAI's `tool_calls`, streamed or whole; the call and
/// its result then encode as history.
fn forced_tool_calls_work(server: &Server) {
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "required": ["city"], "additionalProperties": false,
                       "properties": {"city": {"type": "string", "enum": ["Paris", "Nice"]}}}}}]);
    let request = json!({"model": "dir-model", "max_tokens": 40, "temperature": 0.7, "seed": 1,
        "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let (code, r) =
        http(server.port, "POST", "/v1/chat/completions", Some(&request)).expect("chat");
    assert_eq!(code, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{r}");
    let id = call["id"].as_str().expect("id");
    assert!(
        id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{id}"
    );
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().expect("args")).expect("json");
    assert!(
        ["Paris", "Nice"].contains(&args["city"].as_str().expect("city")),
        "{args}"
    );
    assert_eq!(args.as_object().map(|o| o.len()), Some(1), "{args}");

    // Tool call and result as history: encoded through mistral-common's rules.
    let history = json!({"model": "dir-model", "max_tokens": 4, "tools": tools,
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": null, "tool_calls": [
                         {"id": id, "type": "function", "function": {"name": "get_weather",
                          "arguments": call["function"]["arguments"]}}]},
                     {"role": "tool", "tool_call_id": id, "name": "get_weather",
                      "content": "sunny"}]});
    let (code, r) =
        http(server.port, "POST", "/v1/chat/completions", Some(&history)).expect("history");
    assert_eq!(code, 200, "{r}");
}

/// `/v1/fim/completions` encodes as mistral-common's `encode_fim` (the golden's ids) and
/// answers in the chat completion's shape.
fn fim_works(server: &Server, golden_name: &str) {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(golden(golden_name)).expect("golden"))
            .expect("json");
    let case = doc["fim"]
        .as_array()
        .and_then(|cases| cases.iter().find(|c| c["ids"].is_array()))
        .expect("a FIM case mistral-common encodes");
    let body = json!({"model": "dir-model", "prompt": case["prompt"], "suffix": case["suffix"],
                      "max_tokens": 5, "temperature": 0});
    let (code, r) = http(server.port, "POST", "/v1/fim/completions", Some(&body)).expect("fim");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["object"], "chat.completion", "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    let ids = case["ids"].as_array().expect("ids").len() as u64;
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(ids), "{r}");
}

#[test]
fn mistral_tokenizers_force_and_parse_tool_calls() {
    let Some(v3_path) = testkit::mistral_tokenizer_file("tekken_240911.json") else {
        return;
    };
    let files = v3_path.parent().expect("tokenizer directory");
    // v3 Tekken: `[TOOL_CALLS]` and a JSON list; derived v13: `[TOOL_CALLS]name[ARGS]{...}`.
    let v3 = std::fs::read(&v3_path).expect("tekken");
    for (name, tekken) in [("tools-v3", v3), ("tools-v13", derived_v13_tekken(files))] {
        let dir = mistral_dir(name, &tekken);
        let server = serve(&dir);
        forced_tool_calls_work(&server);
        if name == "tools-v3" {
            fim_works(&server, "tekken_240911.json.golden.json");
        }
        drop(server);
        std::fs::remove_dir_all(dir).ok();
    }
}
