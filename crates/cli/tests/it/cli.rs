//! The `souverain` binary end to end: `inspect` and `generate` on a small synthetic Llama model
//! built with the GGUF writer, and on hostile files, which must each give a clear error and a
//! non-zero exit without a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gguf::{Array, GgmlType, GgufWriter, Value, raw};

const BIN: &str = env!("CARGO_BIN_EXE_souverain");

/// A deterministic stream of small floats (xorshift), so the synthetic weights are fixed.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    }

    fn tensor(&mut self, n: usize) -> Vec<u8> {
        (0..n).flat_map(|_| self.next_f32().to_le_bytes()).collect()
    }
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the rest are
/// shifted past U+0100.
fn byte_tokens() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            char::from_u32(c).map(String::from).unwrap_or_default()
        })
        .collect()
}

const D: u64 = 32;
const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const FFN: u64 = 64;
const LAYERS: u32 = 2;

/// A tiny Llama-architecture model: 2 layers, width 32, byte-level vocabulary plus two chat
/// control tokens, F32 weights.
fn tiny_model_writer() -> GgufWriter {
    tiny_model_writer_claiming_width(D as u32)
}

/// The tiny model, with `llama.embedding_length` set to `claimed_width` in the metadata (the
/// tensors keep width 32).
fn tiny_model_writer_claiming_width(claimed_width: u32) -> GgufWriter {
    tiny_writer(claimed_width, "<|im_end|>")
}

/// The tiny model with `end` as the text of its end-of-turn token (another vocabulary when
/// it is not `<|im_end|>`).
fn tiny_writer(claimed_width: u32, end: &str) -> GgufWriter {
    tiny_writer_with_context(claimed_width, end, 256)
}

/// The tiny model with a trained context of `context` tokens.
fn tiny_writer_with_context(claimed_width: u32, end: &str, context: u32) -> GgufWriter {
    let mut tokens = byte_tokens();
    tokens.push("<|im_start|>".into());
    tokens.push(end.into());
    let vocab = tokens.len() as u64;
    let mut types = vec![1i32; 256];
    types.extend([3, 3]);
    let mut w = GgufWriter::new(3);
    w.add_kv("general.architecture", Value::from("llama"));
    w.add_kv("general.name", Value::from("tiny test llama"));
    w.add_kv("llama.block_count", Value::U32(LAYERS));
    w.add_kv("llama.context_length", Value::U32(context));
    w.add_kv("llama.embedding_length", Value::U32(claimed_width));
    w.add_kv("llama.feed_forward_length", Value::U32(FFN as u32));
    w.add_kv("llama.attention.head_count", Value::U32(HEADS));
    w.add_kv("llama.attention.head_count_kv", Value::U32(KV_HEADS));
    w.add_kv("llama.rope.freq_base", Value::F32(10000.0));
    w.add_kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    w.add_kv("tokenizer.ggml.model", Value::from("gpt2"));
    w.add_kv("tokenizer.ggml.pre", Value::from("smollm"));
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::Array(Array::from_strings(tokens)),
    );
    w.add_kv(
        "tokenizer.ggml.token_type",
        Value::Array(Array::from_values(types)),
    );
    w.add_kv(
        "tokenizer.ggml.merges",
        Value::Array(Array::from_strings(Vec::<String>::new())),
    );
    w.add_kv("tokenizer.ggml.bos_token_id", Value::U32(256));
    w.add_kv("tokenizer.ggml.eos_token_id", Value::U32(257));
    w.add_kv(
        "tokenizer.chat_template",
        Value::from(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ),
    );
    let mut rng = Rng(0x5eed);
    let head_dim = D / u64::from(HEADS);
    let kv = head_dim * u64::from(KV_HEADS);
    let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64]| {
        let n = dims.iter().product::<u64>() as usize;
        w.add_tensor(name, dims, GgmlType::F32, rng.tensor(n))
            .expect("tensor");
    };
    add(&mut w, "token_embd.weight", &[D, vocab]);
    add(&mut w, "output_norm.weight", &[D]);
    for i in 0..LAYERS {
        add(&mut w, &format!("blk.{i}.attn_norm.weight"), &[D]);
        add(&mut w, &format!("blk.{i}.attn_q.weight"), &[D, D]);
        add(&mut w, &format!("blk.{i}.attn_k.weight"), &[D, kv]);
        add(&mut w, &format!("blk.{i}.attn_v.weight"), &[D, kv]);
        add(&mut w, &format!("blk.{i}.attn_output.weight"), &[D, D]);
        add(&mut w, &format!("blk.{i}.ffn_norm.weight"), &[D]);
        add(&mut w, &format!("blk.{i}.ffn_gate.weight"), &[D, FFN]);
        add(&mut w, &format!("blk.{i}.ffn_up.weight"), &[D, FFN]);
        add(&mut w, &format!("blk.{i}.ffn_down.weight"), &[FFN, D]);
    }
    w
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("souverain-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run souverain")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn generate(path: &Path) -> Output {
    run(&[
        "generate",
        "--model",
        path.to_str().expect("utf-8 path"),
        "--prompt",
        "hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--threads",
        "2",
    ])
}

#[test]
fn inspect_and_generate_a_synthetic_model() {
    let dir = temp_dir("valid");
    let path = dir.join("tiny.gguf");
    tiny_model_writer().write(&path).expect("write");
    let out = run(&["inspect", path.to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("architecture:   llama"), "{stdout}");
    assert!(stdout.contains("tensors:        20"), "{stdout}");
    assert!(stdout.contains("context length: 256"), "{stdout}");
    assert!(
        stdout.contains("gpt2 (pre-tokenizer smollm, 258 tokens)"),
        "{stdout}"
    );
    assert!(stdout.contains("runnable:       yes"), "{stdout}");

    // A reader that goes away after the first line (`| head -1`) ends it quietly.
    let mut child = Command::new(BIN)
        .args(["inspect", path.to_str().expect("utf-8")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run souverain");
    drop(child.stdout.take());
    let closed = child.wait_with_output().expect("wait");
    assert!(closed.status.success(), "{}", text(&closed.stderr));
    assert!(
        !text(&closed.stderr).contains("panicked"),
        "{}",
        text(&closed.stderr)
    );

    let first = generate(&path);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).starts_with("hello"));
    // Greedy decoding is deterministic.
    assert_eq!(first.stdout, generate(&path).stdout);
    std::fs::remove_dir_all(dir).ok();
}

/// A valid file with one field changed in the header, by re-assembling it with `raw`.
fn header_only(version: u32, tensor_count: u64, kv_count: u64) -> Vec<u8> {
    let mut b = Vec::new();
    raw::put_header(&mut b, version, tensor_count, kv_count);
    b
}

#[test]
fn hostile_files_fail_cleanly_in_inspect_and_generate() {
    let dir = temp_dir("hostile");
    let valid = tiny_model_writer().to_bytes();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "truncated"),
        ("bad-magic", b"GGUX\x03\0\0\0".repeat(8), "magic"),
        ("version-1", header_only(1, 0, 0), "version"),
        ("huge-kv-count", header_only(3, 0, u64::MAX), "count"),
        ("huge-tensor-count", header_only(3, u64::MAX, 0), "count"),
        (
            "truncated-header",
            valid[..valid.len() / 3].to_vec(),
            "truncated",
        ),
    ];
    // Truncated inside the tensor data: the header is whole but a tensor runs past the end.
    cases.push((
        "truncated-data",
        valid[..valid.len() - 100].to_vec(),
        "past",
    ));
    // A string whose length runs past the end of the file.
    let mut long_string = Vec::new();
    raw::put_header(&mut long_string, 3, 0, 1);
    raw::put_string(&mut long_string, "general.name");
    raw::put_u32(&mut long_string, 8);
    raw::put_u64(&mut long_string, 1 << 40);
    cases.push(("string-past-end", long_string, "truncated"));
    // Dims whose product overflows.
    let mut overflow = Vec::new();
    raw::put_header(&mut overflow, 3, 1, 0);
    raw::put_tensor_info(&mut overflow, "t", &[u64::MAX / 2, 4], 0, 0);
    cases.push(("dims-overflow", overflow, "overflow"));
    // Unknown tensor type.
    let mut unknown = Vec::new();
    raw::put_header(&mut unknown, 3, 1, 0);
    raw::put_tensor_info(&mut unknown, "t", &[32], 1000, 0);
    cases.push(("unknown-type", unknown, "type"));
    // A structurally valid file whose tensor has the wrong shape for its hyperparameters.
    let wrong_shape = tiny_model_writer_claiming_width(48);
    cases.push(("wrong-shape", wrong_shape.to_bytes(), "shape"));

    for (name, bytes, expect) in cases {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, &bytes).expect("write");
        for out in [
            run(&["inspect", path.to_str().expect("utf-8")]),
            generate(&path),
        ] {
            let stderr = text(&out.stderr);
            assert!(
                !out.status.success(),
                "{name}: exit 0\n{}",
                text(&out.stdout)
            );
            assert!(!stderr.contains("panicked"), "{name}: {stderr}");
            assert!(stderr.contains("error:"), "{name}: {stderr}");
            assert!(
                stderr.to_lowercase().contains(expect),
                "{name}: expected {expect:?} in {stderr}"
            );
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_file_is_an_error() {
    let out = run(&["inspect", "/nonexistent/model.gguf"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("error:"));
}

fn chat(model: &Path, input: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args([
            "chat",
            "--model",
            model.to_str().expect("utf-8"),
            "--max-tokens",
            "4",
        ])
        .args(["--temperature", "0", "--threads", "1"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write turns");
    let out = child.wait_with_output().expect("chat output");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn chat_reads_turns_from_stdin_and_streams_replies() {
    let dir = temp_dir("chat");
    let path = dir.join("tiny.gguf");
    tiny_model_writer().write(&path).expect("write");
    let first = chat(&path, b"first question\n");
    let second = chat(&path, b"second question\n");
    assert!(!first.is_empty() && !second.is_empty());
    // /reset forgets the first turn, so the second reply is what a fresh chat gives; nothing
    // after /exit is answered.
    let both = chat(
        &path,
        b"first question\n/reset\nsecond question\n/exit\nnever read\n",
    );
    assert_eq!(both, first.clone() + &second);
    // Without /reset the history changes the second reply's prompt.
    let kept = chat(&path, b"first question\nsecond question\n");
    assert!(kept.starts_with(&first));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn serving_several_models_checks_them_before_listening() {
    let dir = temp_dir("several");
    let good = dir.join("tiny.gguf");
    tiny_model_writer().write(&good).expect("write");
    let good = good.to_str().expect("utf-8");
    // Every case fails before listening (and "no such host" could not be bound anyway, so a
    // check that wrongly passed fails the test instead of serving forever).
    // One bad file among several: refused at start, naming it.
    let out = run(&[
        "serve",
        "--model",
        good,
        "--model",
        "/nonexistent/other.gguf",
        "--host",
        "no such host",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nonexistent/other.gguf"),
        "{}",
        text(&out.stderr)
    );
    // Two files with the same name would answer to one id.
    let twin = dir.join("twin");
    std::fs::create_dir_all(&twin).expect("dir");
    std::fs::copy(good, twin.join("tiny.gguf")).expect("copy");
    let out = run(&[
        "serve",
        "--model",
        good,
        "--model",
        twin.join("tiny.gguf").to_str().expect("utf-8"),
        "--host",
        "no such host",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("names two models"),
        "{}",
        text(&out.stderr)
    );
    // A budget smaller than a model, a bad byte count, an alias of nothing.
    for (args, says) in [
        (vec!["--max-loaded-bytes", "1K"], "memory budget"),
        (vec!["--max-loaded-bytes", "12 parsecs"], "unknown unit"),
        (vec!["--model-alias", "a=nothing"], "no model `nothing`"),
        (vec!["--model-alias", "no-equals"], "is not ALIAS=ID"),
    ] {
        let mut all = vec!["serve", "--model", good, "--host", "no such host"];
        all.extend(args);
        let out = run(&all);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains(says),
            "{says}: {}",
            text(&out.stderr)
        );
    }
    // Commands that run one model say so.
    let out = run(&[
        "generate", "--model", good, "--model", good, "--prompt", "hi",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("runs one model"),
        "{}",
        text(&out.stderr)
    );
}

/// `--draft-model` is checked before listening: a draft of another vocabulary is refused,
/// naming it once (each cause of the error appears once), as are a second speculation method
/// and a `--draft-p-min` that is no probability.
#[test]
fn a_draft_model_is_checked_before_listening() {
    let dir = temp_dir("draft");
    let good = dir.join("tiny.gguf");
    tiny_model_writer().write(&good).expect("write");
    let good = good.to_str().expect("utf-8");
    let other = dir.join("other.gguf");
    tiny_writer(D as u32, "<|end|>")
        .write(&other)
        .expect("write");
    let other = other.to_str().expect("utf-8");
    let out = run(&[
        "serve",
        "--model",
        good,
        "--draft-model",
        other,
        "--host",
        "no such host",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert_eq!(
        err.matches("its tokens differ from the model's").count(),
        1,
        "{err}"
    );
    let out = run(&[
        "serve",
        "--model",
        good,
        "--model-draft",
        good,
        "--speculate",
        "ngram",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot be used with"),
        "{}",
        text(&out.stderr)
    );
    // A draft probability bound outside 0..=1 is refused, named.
    let out = run(&[
        "serve",
        "--model",
        good,
        "--draft-model",
        good,
        "--draft-p-min",
        "1.5",
        "--host",
        "no such host",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--draft-p-min must be between 0 and 1"),
        "{}",
        text(&out.stderr)
    );
}

/// Runs `souverain plan --cpu-profile` on `profile` for `streams`, with `extra` flags; the
/// JSON it writes.
fn predict(dir: &Path, profile: &str, streams: &str, extra: &[&str]) -> serde_json::Value {
    let out_json = dir.join("predicted.json");
    let mut args = vec![
        "plan",
        "--cpu-profile",
        profile,
        "--predict-serve-load",
        streams,
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "4",
        "--json",
        out_json.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let text = std::fs::read_to_string(&out_json).expect("predictions written");
    serde_json::from_str(&text).expect("JSON")
}

#[test]
fn a_cpu_profile_measured_here_predicts_serve_loads() {
    let dir = temp_dir("profile");
    let model = dir.join("tiny.gguf");
    // serve's KV cache (two contexts) must hold the profile's largest steps.
    tiny_writer_with_context(D as u32, "<|im_end|>", 8192)
        .write(&model)
        .expect("write");
    let profile = dir.join("profile.json");
    let profile_s = profile.to_str().expect("utf-8");
    let out = run(&[
        "bench",
        "-m",
        model.to_str().expect("utf-8"),
        "-t",
        "1",
        "-r",
        "1",
        "--profile",
        profile_s,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&profile).expect("profile")).expect("JSON");
    assert_eq!(p["format"], 5);
    assert!(p["points"].as_array().is_some_and(|v| v.len() >= 17), "{p}");
    // The one-row steps (one sequence decoding) are costed apart, from what was measured:
    // the one-row term at 128 positions near the measured one-row step there.
    let fit = |k: &str| p["fit"][k].as_f64().unwrap_or(-1.0);
    let one_row = fit("one_row_s") + fit("one_row_per_1k_context_s") * 0.128;
    let measured = p["points"]
        .as_array()
        .and_then(|v| {
            v.iter()
                .find(|q| q["decode_seqs"] == 1 && q["prefill_tokens"] == 0 && q["context"] == 128)
        })
        .and_then(|q| q["seconds"].as_f64())
        .expect("a one-row step at 128 positions");
    assert!(fit("one_row_s") > 0.0, "{p}");
    assert!(
        (one_row / measured - 1.0).abs() < 0.5,
        "{one_row} vs {measured}: {p}"
    );
    // Timed through the real server (HTTP, template, queue): some time, under a second.
    let overhead = p["request_overhead_s"]
        .as_f64()
        .expect("request_overhead_s");
    assert!((0.0..1.0).contains(&overhead), "{overhead}");
    for (k, v) in p["fit"].as_object().expect("fit") {
        assert!(
            v.as_f64().is_some_and(|v| v.is_finite() && v >= 0.0),
            "{k}: {v}"
        );
    }

    let together = predict(&dir, profile_s, "1,4", &[]);
    assert_eq!(together[0]["predicted"]["tokens"], 4);
    assert_eq!(together[1]["predicted"]["tokens"], 16);
    // Other work taking 10 ms of CPU per token (a load generator on the same cores): one
    // stream's four steps emit one token each, 40 ms more in all.
    let shared = predict(&dir, profile_s, "1", &["--other-cpu-per-token-us", "10000"]);
    let wall_of = |v: &serde_json::Value| v["predicted"]["wall_s"].as_f64().expect("wall");
    let more = wall_of(&shared[0]) - wall_of(&together[0]);
    assert!((more - 0.04).abs() < 1e-9, "{shared} {together}");
    assert_eq!(shared[0]["load"]["other_cpu_per_token_s"], 0.01);
    // One of the four requests arrives half a second late: the run lasts longer by about that.
    let requests = dir.join("requests.json");
    let one = |at: f64| format!(r#"{{"arrival_s": {at}, "prompt_tokens": 8}}"#);
    let file = format!(
        r#"{{"4": [{}, {}, {}, {}]}}"#,
        one(0.0),
        one(0.001),
        one(0.0),
        one(0.5)
    );
    std::fs::write(&requests, file).expect("write");
    let requests_s = requests.to_str().expect("utf-8");
    let late = predict(&dir, profile_s, "4", &["--requests", requests_s]);
    let wall = |v: &serde_json::Value| v["predicted"]["wall_s"].as_f64().expect("wall");
    assert!(
        wall(&late[0]) >= wall(&together[1]) + 0.49,
        "{late} {together}"
    );

    // Three requests that arrive while the first one's prompt step runs, taking 10 ms of
    // CPU each to take in: that step, and the run, are 30 ms longer.
    let burst = dir.join("burst.json");
    let file = format!(
        r#"{{"4": [{}, {}, {}, {}]}}"#,
        one(0.0),
        one(1e-6),
        one(2e-6),
        one(3e-6)
    );
    std::fs::write(&burst, file).expect("write");
    let burst_s = burst.to_str().expect("utf-8");
    let free = predict(&dir, profile_s, "4", &["--requests", burst_s]);
    let taken = predict(
        &dir,
        profile_s,
        "4",
        &["--requests", burst_s, "--other-cpu-per-request-us", "10000"],
    );
    assert!(
        (wall(&taken[0]) - wall(&free[0]) - 0.03).abs() < 1e-9,
        "{taken} {free}"
    );
    assert_eq!(taken[0]["load"]["other_cpu_per_request_s"], 0.01);
    // `plan --predict-serve-load 4` with more arguments.
    let predict_4 = |more: &[&str]| {
        let mut args = vec![
            "plan",
            "--cpu-profile",
            profile_s,
            "--predict-serve-load",
            "4",
        ];
        args.extend_from_slice(more);
        run(&args)
    };
    // Either figure out of range is refused, naming its flag.
    for flag in ["--other-cpu-per-token-us", "--other-cpu-per-request-us"] {
        for bad in ["-1", "NaN", "inf", "2000000"] {
            let out = predict_4(&[flag, bad]);
            assert!(!out.status.success(), "{flag} {bad}");
            let err = text(&out.stderr);
            assert!(err.contains(flag), "{flag} {bad}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }

    // Loads beyond memory or the profile's KV cache are refused, naming the flag, before
    // anything is predicted (a billion streams aborted on a 40 GB allocation; a billion
    // tokens each simulated for hours).
    for (args, flag) in [
        (
            ["--predict-serve-load", "4,1000000000"],
            "--predict-serve-load",
        ),
        (["--predict-serve-load", "0"], "--predict-serve-load"),
        (["--max-tokens", "1000000000"], "--max-tokens"),
        (["--max-tokens", "20000"], "--max-tokens"),
        (["--prompt-tokens", "1000000000"], "--prompt-tokens"),
    ] {
        let mut all = vec!["plan", "--cpu-profile", profile_s];
        if args[0] != "--predict-serve-load" {
            all.extend(["--predict-serve-load", "4"]);
        }
        all.extend(args);
        let out = run(&all);
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("{flag}: must be")), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!text(&out.stdout).contains("| streams |"), "{args:?}");
    }

    let bad_token = r#"{"arrival_s": 0, "prompt_tokens": 0}"#;
    for (file, names) in [
        (
            format!(r#"{{"4": [{}, {}]}}"#, one(0.0), one(1.0)),
            "one per stream",
        ),
        (
            format!(
                r#"{{"4": [{}, {}, {}, {}]}}"#,
                one(0.0),
                one(0.0),
                one(0.0),
                one(-1.0)
            ),
            "4[3].arrival_s",
        ),
        (
            format!(
                r#"{{"4": [{bad_token}, {}, {}, {}]}}"#,
                one(0.0),
                one(0.0),
                one(0.0)
            ),
            "4[0].prompt_tokens",
        ),
        (
            format!(
                r#"{{"4": [{}, {}, {}, {}]}}"#,
                one(0.0),
                r#"{"arrival_s": 0, "prompt_tokens": 8, "waits_for": 3}"#,
                one(0.0),
                one(0.0)
            ),
            "4[1].waits_for",
        ),
        (format!(r#"{{"four": [{}]}}"#, one(0.0)), "\"four\""),
        (format!(r#"{{"04": [{}]}}"#, one(0.0)), "\"04\""),
        (
            format!(r#"{{"8": [{}]}}"#, one(0.0)),
            "no requests for 4 streams",
        ),
        ("[0, 0, 0, 0]".to_string(), "expected an object"),
    ] {
        std::fs::write(&requests, &file).expect("write");
        let out = predict_4(&["--requests", requests_s]);
        assert!(!out.status.success(), "{file}");
        let err = text(&out.stderr);
        assert!(err.contains(names), "{file}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

fn first_line(out: &Output) -> String {
    text(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The Paris site's file ships in the repository: it plans, and the same site asked for
/// more than its envelope says so on its first line; out-of-range numbers name their field
/// and plan nothing.
#[test]
fn the_paris_site_plans_and_a_demand_beyond_its_envelope_says_power_binds() {
    let paris = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/plan/paris.toml");
    let paris_s = paris.to_str().expect("utf-8");
    let out = run(&["plan", paris_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = first_line(&out);
    assert!(first.starts_with("site Paris: "), "{first}");
    assert!(!first.contains("power binds"), "{first}");

    let site = std::fs::read_to_string(&paris).expect("paris.toml");
    let (head, tail) = site.split_once("requests_per_s = ").expect("a demand");
    let rest = tail.split_once('\n').expect("a line").1;
    let dir = temp_dir("paris");
    let with_rate = |rate: &str| {
        let path = dir.join(format!("paris-{rate}.toml"));
        std::fs::write(&path, format!("{head}requests_per_s = {rate}\n{rest}")).expect("write");
        run(&["plan", path.to_str().expect("utf-8")])
    };
    let out = with_rate("1e5");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = first_line(&out);
    // The share served now is the JSON plan's first month's.
    let json = dir.join("plan.json");
    let plan_path = dir.join("paris-1e5.toml");
    let out = run(&[
        "plan",
        plan_path.to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("JSON");
    let served = plan["growth"][0]["served"].as_f64().expect("served");
    assert!(served < 1.0, "{served}");
    assert_eq!(plan["growth"][0]["binding"], "power");
    let said = format!(
        "(envelope now 40.0 MW; power binds: {:.0}% of the demand can be served)",
        100.0 * served
    );
    assert!(first.contains(&said), "{first} / {said}");
    // 1e12 and 1e300 requests/s once overflowed the replica count and came out as "no
    // batch size meets the SLOs".
    for rate in ["1e12", "1e300"] {
        let out = with_rate(rate);
        assert!(!out.status.success(), "{rate}");
        let err = text(&out.stderr);
        assert!(
            err.contains("field `demand[0].requests_per_s`"),
            "{rate}: {err}"
        );
        assert!(text(&out.stdout).is_empty(), "{rate}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
