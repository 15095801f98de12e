//! Tool calls and reasoning as real chat templates write them come back out of the output
//! parser as the calls and reasoning that were written.
//!
//! For each assistant turn of `crates/engine/tests/golden/chat_templates.json` (Qwen3,
//! Qwen3-Coder, Qwen3.5, QwQ,
//! Qwen2.5, DeepSeek-V3.1, DeepSeek-R1, Ministral 3 reasoning, Mistral Small 3.2, Devstral,
//! Mistral Nemo; the templates from `scripts/fetch-chat-templates`), the template renders the
//! conversation with and without that turn, as transformers renders it (the golden's hash is
//! checked); what the turn adds after the generation prompt is what a model following the
//! template would generate. Fed to the parser the loaded model's format sets up (the default
//! model with the template in place of its own), in pieces of every size up to 24 bytes, it
//! must give back the turn's tool calls (names and arguments), its content and, where the
//! template wrote it, its reasoning.

use engine::{ChatRequest, Engine, EngineConfig};
use serde_json::Value;
use tokenizer::ChatTemplate;

use super::tests::parse;
use super::{CallSyntax, ParserSpec};

#[test]
fn calls_and_reasoning_written_by_real_templates_parse_back() {
    let Some(model) = testkit::default_model() else {
        return;
    };
    let g = testkit::chat_templates_golden();
    let (bos, eos) = (
        g["bos_token"].as_str().expect("bos"),
        g["eos_token"].as_str().expect("eos"),
    );
    let mut turns = 0;
    for (name, entry) in g["templates"].as_object().expect("templates") {
        let Some(path) = testkit::chat_template_file(name) else {
            return;
        };
        let source = std::fs::read_to_string(&path).expect("read template");
        assert_eq!(testkit::sha256_hex(&source), entry["sha256"], "{name}");
        let template = ChatTemplate::new(&source).expect("compile");
        let config = EngineConfig {
            threads: 1,
            chat_template: Some(source.clone()),
            ..EngineConfig::default()
        };
        let engine = Engine::load(&model, config, &mut |_, _| {}).expect("load");
        let format = engine.chat_format().clone();
        let syntax = CallSyntax::of(format.tool_calls);
        for case in entry["cases"].as_array().expect("cases") {
            if case["generation_prompt"] != false {
                continue;
            }
            let label = format!("{name} / {}", case["name"].as_str().expect("name"));
            let messages = case["messages"].as_array().expect("messages");
            let tools = case["tools"].as_array().map(Vec::as_slice);
            let kwargs = case["kwargs"].as_object().cloned().unwrap_or_default();
            let render = |messages: &[Value], prompt: bool| {
                let request = ChatRequest {
                    messages: messages.to_vec(),
                    ..ChatRequest::default()
                };
                template
                    .render_json(
                        &request.template_messages(),
                        tools,
                        &kwargs,
                        prompt,
                        bos,
                        eos,
                    )
                    .unwrap_or_else(|e| panic!("{label}: {e}"))
            };
            let full = render(messages, false);
            // The golden script's templates saw a fixed date for today's.
            let today = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}")
                .and_then(|t| t.render(&[], false, "", ""))
                .expect("today");
            assert_eq!(
                testkit::sha256_hex(&full.replace(&today, "2026-01-02")),
                case["rendered_sha256"],
                "{label}: not transformers'"
            );
            let before = &messages[..messages.len() - 1];
            let prompt = render(before, true);
            // What the turn adds after the prompt; the engine's own prompt decides whether
            // the reasoning block is open.
            let request = ChatRequest {
                messages: before.to_vec(),
                tools: tools.map(<[Value]>::to_vec),
                template_kwargs: kwargs.clone(),
            };
            let (generated, reasoning_open) = match full.strip_prefix(prompt.as_str()) {
                // What a model given the engine's prompt generates: the engine says whether
                // the prompt opened the reasoning block.
                Some(rest) => (
                    rest,
                    engine
                        .encode_chat_request(&request)
                        .expect("encode")
                        .reasoning_open,
                ),
                // The template writes a past turn otherwise than after its generation prompt
                // (QwQ and R1 drop a past turn's reasoning): the turn as written, from the
                // first marker or line where it parts from the prompt.
                None => {
                    let common: String = full
                        .chars()
                        .zip(prompt.chars())
                        .take_while(|(a, b)| a == b)
                        .map(|(a, _)| a)
                        .collect();
                    let cut = common.rfind(['\n', '>', ']']).map_or(0, |i| i + 1);
                    (&full[cut..], false)
                }
            };
            // Generation stops at the first end-of-turn token (R1's template, given an empty
            // content, writes an empty answer turn after the calls).
            let stop = [eos, "<｜end▁of▁sentence｜>", "</s>"]
                .iter()
                .filter_map(|end| generated.find(end))
                .min()
                .unwrap_or(generated.len());
            let generated = generated[..stop].trim_end();
            let turn = messages.last().expect("turn");
            let want_calls: Vec<(String, String)> = turn["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let args: Value = serde_json::from_str(
                        c["function"]["arguments"].as_str().expect("arguments"),
                    )
                    .expect("json");
                    (
                        c["function"]["name"].as_str().expect("name").to_owned(),
                        args.to_string(),
                    )
                })
                .collect();
            let want_content = turn["content"].as_str().unwrap_or_default();
            let written = turn["reasoning_content"]
                .as_str()
                .filter(|r| generated.contains(r));
            let string_params = crate::tools::plan(case.get("tools"), None, None)
                .expect("tools")
                .map(|p| p.string_parameters())
                .unwrap_or_default();
            let spec = ParserSpec {
                calls: Some(syntax),
                single_call: false,
                reasoning: format.reasoning.clone(),
                reasoning_open,
                short_ids: format.short_call_ids,
                string_params,
            };
            for step in (1..=24).chain([generated.len()]) {
                let (r, c, calls) = parse(spec.clone(), generated, step);
                assert_eq!(calls, want_calls, "{label} (step {step}): {generated:?}");
                assert_eq!(
                    c.trim(),
                    want_content,
                    "{label} (step {step}): {generated:?}"
                );
                assert_eq!(
                    r.trim(),
                    written.unwrap_or(""),
                    "{label} (step {step}): {generated:?}"
                );
            }
            turns += 1;
        }
    }
    let expected = g["templates"]
        .as_object()
        .expect("templates")
        .values()
        .flat_map(|t| t["cases"].as_array().expect("cases"))
        .filter(|c| c["generation_prompt"] == false)
        .count();
    assert!(
        turns == expected && turns >= 30,
        "{turns} of {expected} turns"
    );
}
