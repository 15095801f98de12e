//! N-gram speculative decoding against plain decoding, on the default model: the same text
//! for greedy and for seeded sampling (the verification samples every position as a plain
//! step would), with drafts actually proposed and accepted.

use souverain_engine::{Engine, EngineConfig, Event, GenerateRequest, Speculation};
use tokio::sync::mpsc::UnboundedReceiver;

fn engine(speculation: Option<Speculation>) -> Option<Engine> {
    let path = testkit::default_model()?;
    let config = EngineConfig {
        speculation,
        ..EngineConfig::default()
    };
    Some(Engine::load(&path, config, &mut |_, _| {}).expect("load"))
}

/// Reads a generation to its end: its text and completion tokens.
fn collect(mut rx: UnboundedReceiver<Event>) -> (String, usize) {
    let mut text = String::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Logprobs(_) | Event::PromptLogprobs(_) => {}
            Event::Done { usage, .. } => return (text, usage.completion_tokens),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("the engine dropped the request")
}

/// A prompt whose answer copies most of its text: what n-gram drafts are for.
const EDIT: &str = "Rewrite the following text, replacing every 'cat' with 'dog'.\n\n\
Text: The cat sat on the mat. The cat was happy because the sun was warm and the mat was \
soft. Every morning the cat waited by the door for the children to come home from school.\n\n\
Rewritten text: The dog sat on the mat.";

fn run(e: &Engine, temperature: f32, seed: Option<u64>, n: usize) -> (String, usize) {
    let mut r = GenerateRequest::new(e.tokenize(EDIT));
    r.sampling.temperature = temperature;
    r.sampling.seed = seed;
    r.max_tokens = Some(n);
    collect(e.generate(r).expect("generate"))
}

/// Greedy output of `spec` is `plain`'s; returns it and `spec`'s draft counts after it.
fn greedy_unchanged(plain: &Engine, spec: &Engine) -> ((String, usize), (u64, u64)) {
    let greedy = run(plain, 0.0, None, 64);
    assert_eq!(run(spec, 0.0, None, 64), greedy, "greedy output changed");
    let m = spec.metrics();
    assert!(m.spec_draft_tokens > 0, "no draft was proposed");
    (greedy, (m.spec_accepted_tokens, m.spec_draft_tokens))
}

/// Seeded sampling draws the same random numbers in the same order, speculating or not.
fn seeded_unchanged(plain: &Engine, spec: &Engine) {
    for seed in [1, 7, 42] {
        assert_eq!(
            run(spec, 0.8, Some(seed), 48),
            run(plain, 0.8, Some(seed), 48),
            "seed {seed}"
        );
    }
}

#[test]
fn speculation_changes_no_output_and_accepts_drafts() {
    let (Some(plain), Some(spec)) = (engine(None), engine(Some(Speculation::default()))) else {
        return;
    };
    let (greedy, (accepted, drafted)) = greedy_unchanged(&plain, &spec);
    assert!(
        accepted > 0 && accepted <= drafted,
        "accepted {accepted} of {drafted}"
    );
    assert_eq!(plain.metrics().spec_draft_tokens, 0);
    seeded_unchanged(&plain, &spec);
    // A request that ends inside an accepted draft stops at its limit.
    let (_, n) = run(&spec, 0.0, None, 5);
    assert_eq!(n, 5);
    // Prompt log-probabilities still come first, once, with the same text after them, also
    // when the prompt's last token is computed alone (a step of one pending token, which
    // could otherwise carry a draft).
    let n_prompt = spec.tokenize(EDIT).len();
    let path = testkit::default_model().expect("model");
    let config = EngineConfig {
        speculation: Some(Speculation::default()),
        max_batch_tokens: n_prompt - 1,
        ..EngineConfig::default()
    };
    let spec = Engine::load(&path, config, &mut |_, _| {}).expect("load");
    let mut r = GenerateRequest::new(spec.tokenize(EDIT));
    r.sampling.temperature = 0.0;
    r.max_tokens = Some(32);
    r.prompt_logprobs = Some(1);
    let mut rx = spec.generate(r).expect("generate");
    let (mut events, mut text) = (Vec::new(), String::new());
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::PromptLogprobs(lp) => events.push(format!("prompt {}", lp.len())),
            Event::Text(t) => {
                events.push("text".into());
                text.push_str(&t);
            }
            Event::Logprobs(_) => {}
            Event::Done { .. } => break,
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    let n_prompt = spec.tokenize(EDIT).len();
    assert_eq!(
        events.first(),
        Some(&format!("prompt {}", n_prompt - 1)),
        "{events:?}"
    );
    assert_eq!(events.iter().filter(|e| e.starts_with("prompt")).count(), 1);
    assert!(greedy.0.starts_with(&text), "{text:?} vs {:?}", greedy.0);
}

fn with_draft_model(draft: &std::path::Path) -> Option<Engine> {
    let path = testkit::default_model()?;
    let config = EngineConfig {
        draft_model: Some(draft.to_path_buf()),
        ..EngineConfig::default()
    };
    Some(Engine::load(&path, config, &mut |_, _| {}).expect("load with a draft model"))
}

/// A draft model (`--draft-model`; here the default model drafting for itself, the only pair
/// of one vocabulary on this machine): greedy output unchanged and nearly every draft token
/// accepted (the draft decodes one position at a time, the target verifies a chunk of them;
/// the two kernels' float rounding can split a near-tie); seeded sampling unchanged too, with
/// drafts rejected where the sample is not the draft's greedy choice (so the draft cache is
/// rolled back and the verification's rejection path runs).
#[test]
fn a_draft_model_changes_no_output() {
    let Some(path) = testkit::default_model() else {
        return;
    };
    let (Some(plain), Some(spec)) = (engine(None), with_draft_model(&path)) else {
        return;
    };
    // The same model proposes what it then picks.
    let (_, (accepted, drafted)) = greedy_unchanged(&plain, &spec);
    assert!(
        accepted * 10 >= drafted * 8,
        "accepted {accepted} of {drafted}"
    );
    seeded_unchanged(&plain, &spec);
    let m = spec.metrics();
    assert!(
        m.spec_accepted_tokens < m.spec_draft_tokens,
        "sampling rejected no draft token ({} of {})",
        m.spec_accepted_tokens,
        m.spec_draft_tokens
    );
    let (_, n) = run(&spec, 0.0, None, 5);
    assert_eq!(n, 5);
}

/// A draft model of another vocabulary is refused at load, naming the draft model.
#[test]
fn a_draft_model_of_another_vocabulary_is_refused() {
    let Some(path) = testkit::default_model() else {
        return;
    };
    let tiny =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/golden/tiny/llama");
    let config = EngineConfig {
        draft_model: Some(tiny),
        ..EngineConfig::default()
    };
    let Err(err) = Engine::load(&path, config, &mut |_, _| {}) else {
        panic!("a draft model of 256 tokens was accepted");
    };
    let msg = err.to_string();
    assert!(msg.contains("draft model") && msg.contains("256"), "{msg}");
}
