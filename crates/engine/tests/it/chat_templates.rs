//! Real chat templates render what transformers renders.
//!
//! The templates (Qwen3, Qwen3-Coder, Qwen3.5, QwQ, Qwen2.5, DeepSeek-V3.1, DeepSeek-R1, Ministral 3 reasoning,
//! Mistral Small 3.2, Devstral, Mistral Nemo, Llama 3.1, Gemma 2) come from llama-cpp-python's
//! source package (`scripts/fetch-chat-templates`); `scripts/golden/chat_templates.py` rendered
//! each conversation of `tests/golden/chat_templates.json` with transformers'
//! `render_jinja_template` and kept the sha256 of the text. Here the default model is loaded
//! with each template in place of its own (`--chat-template-file`), and the engine's prompt
//! for each conversation must hash the same; the turns a template writes for an assistant
//! message (no generation prompt, which the engine always adds) are rendered by the template
//! alone, as the golden script hands them over. Without the templates or the model the tests
//! are skipped with a note, unless `SOUVERAIN_REQUIRE_MODEL` is set (as `scripts/test` does).

use serde_json::Value;
use souverain_engine::{ChatRequest, Engine, EngineConfig, ToolCallFormat};
use tokenizer::ChatTemplate;

/// The request of a golden case.
fn request(case: &Value) -> ChatRequest {
    ChatRequest {
        messages: case["messages"].as_array().expect("messages").clone(),
        tools: case["tools"].as_array().cloned(),
        template_kwargs: case["kwargs"].as_object().cloned().unwrap_or_default(),
    }
}

/// Today's date as the golden script's fixed one, in the formats the templates print.
fn undate(text: &str) -> String {
    let today = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}")
        .expect("template")
        .render(&[], false, "", "")
        .expect("today");
    text.replace(&today, "2026-01-02")
}

/// Does the case's engine rendering differ from the template's on purpose? DeepSeek's
/// templates do not describe tools, so the engine adds their description to the system
/// message (`deepseek_tools_are_described_in_their_call_syntax`).
fn engine_adds_to_it(entry: &Value, case: &Value) -> bool {
    entry["calls"] == "deepseek" && case["tools"].is_array()
}

#[test]
fn real_chat_templates_render_as_transformers_does() {
    let Some(model) = testkit::default_model() else {
        return;
    };
    let g = testkit::chat_templates_golden();
    let (bos, eos) = (
        g["bos_token"].as_str().expect("bos"),
        g["eos_token"].as_str().expect("eos"),
    );
    let mut checked = 0;
    for (name, entry) in g["templates"].as_object().expect("templates") {
        let Some(path) = testkit::chat_template_file(name) else {
            return;
        };
        let source = std::fs::read_to_string(&path).expect("read template");
        assert_eq!(
            testkit::sha256_hex(&source),
            entry["sha256"],
            "{name}: not the golden's template"
        );
        let config = EngineConfig {
            threads: 1,
            chat_template: Some(source.clone()),
            ..EngineConfig::default()
        };
        let engine = Engine::load(&model, config, &mut |_, _| {}).expect("load");
        let template = ChatTemplate::new(&source).expect("compile");

        // The format the engine reads off the template.
        let format = engine.chat_format();
        let calls = match format.tool_calls {
            ToolCallFormat::Hermes => "hermes",
            ToolCallFormat::QwenXml => "qwen-xml",
            ToolCallFormat::Mistral { .. } => "mistral",
            ToolCallFormat::DeepSeek { .. } => "deepseek",
            ToolCallFormat::Prompted => "prompted",
            _ => "other",
        };
        let expected = entry["calls"].as_str().unwrap_or("prompted");
        assert_eq!(calls, expected, "{name}: tool-call format");
        assert_eq!(
            format.reasoning.is_some(),
            entry["think"] == true,
            "{name}: reasoning markers {:?}",
            format.reasoning
        );

        for case in entry["cases"].as_array().expect("cases") {
            let label = format!("{name} / {}", case["name"].as_str().expect("name"));
            let req = request(case);
            let through_engine =
                case["generation_prompt"] != false && !engine_adds_to_it(entry, case);
            let rendered = if through_engine {
                engine.render_chat_request(&req).map_err(|e| e.to_string())
            } else {
                template
                    .render_json(
                        &req.template_messages(),
                        req.tools.as_deref(),
                        &req.template_kwargs,
                        case["generation_prompt"] != false,
                        bos,
                        eos,
                    )
                    .map_err(|e| e.to_string())
            };
            match (rendered, case.get("raises")) {
                (Err(e), Some(_)) => assert!(!e.is_empty(), "{label}"),
                (Ok(text), Some(raised)) => {
                    panic!("{label}: transformers raised {raised}, we rendered {text:?}")
                }
                (Err(e), None) => panic!("{label}: {e}"),
                (Ok(text), None) => {
                    let text = undate(&text);
                    assert_eq!(
                        (testkit::sha256_hex(&text), text.len() as u64),
                        (
                            case["rendered_sha256"].as_str().expect("sha").to_owned(),
                            case["rendered_len"].as_u64().expect("len"),
                        ),
                        "{label}: rendered differently from transformers; ours:\n{text}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 70, "only {checked} cases");
}

#[test]
fn deepseek_tools_are_described_in_their_call_syntax() {
    let Some(model) = testkit::default_model() else {
        return;
    };
    let g = testkit::chat_templates_golden();
    for (name, fenced) in [
        ("deepseek-ai-DeepSeek-V3.1.jinja", false),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", true),
    ] {
        let Some(path) = testkit::chat_template_file(name) else {
            return;
        };
        let source = std::fs::read_to_string(&path).expect("read template");
        let config = EngineConfig {
            threads: 1,
            chat_template: Some(source),
            ..EngineConfig::default()
        };
        let engine = Engine::load(&model, config, &mut |_, _| {}).expect("load");
        assert_eq!(
            engine.chat_format().tool_calls,
            ToolCallFormat::DeepSeek { fenced },
            "{name}"
        );
        let case = g["templates"][name]["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .find(|c| c["name"] == "tools_first_turn")
            .expect("case");
        let with_tools = engine.render_chat_request(&request(case)).expect("render");
        let mut without = request(case);
        without.tools = None;
        let plain = engine.render_chat_request(&without).expect("render");
        // The system message gains the tools and the call syntax; the rest is the template's.
        assert!(with_tools.starts_with("<|im_start|>You help with the weather.\n\n## Tools"));
        assert!(
            with_tools.contains("\"name\":\"get_weather\""),
            "{with_tools}"
        );
        let example = if fenced {
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>function name\n```json\n"
        } else {
            "<｜tool▁call▁begin｜>function name<｜tool▁sep｜>{"
        };
        assert!(with_tools.contains(example), "{with_tools}");
        let user_turn = &plain[plain.find("<｜User｜>").expect("user turn")..];
        assert!(with_tools.ends_with(user_turn), "{with_tools}");
        assert!(!plain.contains("get_weather"));
    }
}
