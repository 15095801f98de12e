//! Tool calling: `tools`, `tool_choice` and `parallel_tool_calls` validated, and the grammar
//! that forces a call when `tool_choice` asks for one.
//!
//! A forced call (`required`, or a named function) is held by constrained decoding to the
//! model's own call syntax with the arguments valid under the function's `parameters`
//! schema, so it always parses and validates. With `auto` the model is free and its output
//! is parsed (`output::OutputParser`).

use engine::{ChatFormat, ConstraintSpec, ToolCallFormat};
use serde_json::{Value, json};

use crate::error::ApiError;

/// What the model may do with the tools.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolChoice {
    /// Never call: the output is not parsed for calls.
    None,
    /// Call or answer, as the model decides.
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this function.
    Function(String),
}

/// A request's tools, validated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolPlan {
    /// The definitions, `{"type": "function", "function": {...}}`, as the client sent them.
    pub(crate) tools: Vec<Value>,
    pub(crate) choice: ToolChoice,
    /// More than one call per turn allowed.
    pub(crate) parallel: bool,
}

/// The longest function name OpenAI accepts.
const MAX_NAME: usize = 64;

/// Validates `tools`, `tool_choice` and `parallel_tool_calls`; `None` when the request has
/// no tools.
pub(crate) fn plan(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolPlan>, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array")),
    };
    for (i, tool) in tools.iter().enumerate() {
        check_tool(i, tool)?;
    }
    let names: Vec<&str> = tools.iter().filter_map(function_name).collect();
    let choice = match tool_choice {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            // Mistral's API calls it `any`.
            "required" | "any" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "`tool_choice` is `{other}`; expected `none`, `auto`, `required` (or \
                         Mistral's `any`) or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice",
                        "`tool_choice` as an object needs `function.name`",
                    )
                })?;
            if !names.contains(&name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` names `{name}`, which is not among `tools`"),
                ));
            }
            ToolChoice::Function(name.to_owned())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` must be a string or an object",
            ));
        }
    };
    if tools.is_empty() {
        return match choice {
            ToolChoice::None => Ok(None),
            _ => Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` needs `tools` to choose from",
            )),
        };
    }
    Ok(Some(ToolPlan {
        tools,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// OpenAI's rule for function names: 1 to 64 of a-z, A-Z, 0-9, `_` and `-`.
pub(crate) fn is_function_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn function_name(tool: &Value) -> Option<&str> {
    tool.get("function")?.get("name")?.as_str()
}

fn check_tool(i: usize, tool: &Value) -> Result<(), ApiError> {
    let param = format!("tools[{i}]");
    let bad = |msg: String| Err(ApiError::invalid(param.clone(), msg));
    let Some(obj) = tool.as_object() else {
        return bad(format!("`tools[{i}]` must be an object"));
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("function") => {}
        _ => return bad(format!("`tools[{i}].type` must be `function`")),
    }
    let Some(function) = obj.get("function").and_then(Value::as_object) else {
        return bad(format!("`tools[{i}].function` is required"));
    };
    let Some(name) = function.get("name").and_then(Value::as_str) else {
        return bad(format!("`tools[{i}].function.name` is required"));
    };
    if !is_function_name(name) {
        return bad(format!(
            "`tools[{i}].function.name` is `{name}`; it must be 1 to 64 of a-z, A-Z, 0-9, _ and -"
        ));
    }
    match function.get("parameters") {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
        Some(_) => bad(format!(
            "`tools[{i}].function.parameters` must be a JSON schema object"
        )),
    }
}

impl ToolPlan {
    /// The tools the template sees: none when `tool_choice` is `none`, only the named
    /// one when a function is forced (as vLLM does).
    pub(crate) fn visible_tools(&self) -> Option<Vec<Value>> {
        match &self.choice {
            ToolChoice::None => None,
            ToolChoice::Function(name) => Some(
                self.tools
                    .iter()
                    .filter(|t| function_name(t) == Some(name))
                    .cloned()
                    .collect(),
            ),
            _ => Some(self.tools.clone()),
        }
    }

    /// The (function, parameter) pairs whose schema declares a string ([`declares_string`]).
    pub(crate) fn string_parameters(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for tool in &self.tools {
            let Some(name) = function_name(tool) else {
                continue;
            };
            let properties = tool
                .pointer("/function/parameters/properties")
                .and_then(Value::as_object);
            for (key, schema) in properties.into_iter().flatten() {
                if declares_string(schema) {
                    out.push((name.to_owned(), key.clone()));
                }
            }
        }
        out
    }

    /// The grammar that forces the call(s) `tool_choice` asks for, in the model's syntax;
    /// `None` when the model is free. `token_id` finds the model's control tokens.
    pub(crate) fn forcing_grammar(
        &self,
        format: &ChatFormat,
        token_id: &dyn Fn(&str) -> Option<u32>,
    ) -> Option<ConstraintSpec> {
        let forced: Vec<&Value> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Function(name) => self
                .tools
                .iter()
                .filter(|t| function_name(t) == Some(name.as_str()))
                .collect(),
        };
        let functions: Vec<(&str, Value)> = forced
            .iter()
            .filter_map(|t| {
                let name = function_name(t)?;
                let params = t
                    .get("function")
                    .and_then(|f| f.get("parameters"))
                    .filter(|p| p.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"}));
                Some((name, params))
            })
            .collect();
        // A marker as a control token when the vocabulary has it, else as text.
        let marker = |text: &str| match token_id(text) {
            Some(id) => format!("<[{id}]>"),
            None => lark_string(text),
        };
        // A named function is called once (as OpenAI forces it); `required` lets the model
        // make several calls when parallel calls are allowed.
        let repeat = if self.parallel && self.choice == ToolChoice::Required {
            "+"
        } else {
            ""
        };
        let grammar = match format.tool_calls {
            ToolCallFormat::Hermes | ToolCallFormat::Prompted => {
                let alts: Vec<String> = functions
                    .iter()
                    .map(|(name, params)| {
                        let schema = engine::finite_json_schema(json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, "arguments": params},
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        }));
                        format!("%json {schema}")
                    })
                    .collect();
                format!(
                    "start: call{repeat}\ncall: {open} body \"\\n</tool_call>\\n\"\nbody: {}\n",
                    alts.join(" | "),
                    open = lark_string("<tool_call>\n"),
                )
            }
            ToolCallFormat::Mistral { named: true } => {
                let calls = marker("[TOOL_CALLS]");
                let args = marker("[ARGS]");
                let alts: Vec<String> = functions
                    .iter()
                    .map(|(name, params)| {
                        format!(
                            "{calls} {} {args} %json {}",
                            lark_string(name),
                            engine::finite_json_schema(params.clone())
                        )
                    })
                    .collect();
                format!("start: call{repeat}\ncall: {}\n", alts.join(" | "))
            }
            ToolCallFormat::Mistral { named: false } => {
                let items: Vec<Value> = functions
                    .iter()
                    .map(|(name, params)| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, "arguments": params},
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut list = json!({"type": "array", "items": {"anyOf": items}, "minItems": 1});
                if repeat.is_empty() {
                    list["maxItems"] = json!(1);
                }
                format!(
                    "start: {} %json {}\n",
                    marker("[TOOL_CALLS]"),
                    engine::finite_json_schema(list)
                )
            }
            ToolCallFormat::QwenXml => {
                // A string's value and its closing are one lazy terminal each (a value
                // regex followed by the closing literal would swallow the newline).
                let close = lark_string("\n</parameter>\n");
                let mut terminals = String::new();
                let mut n_terminals = 0;
                let alts: Vec<String> = functions
                    .iter()
                    .map(|(name, params)| {
                        let required: Vec<&str> = params
                            .get("required")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .collect();
                        let properties = params.get("properties").and_then(Value::as_object);
                        let mut parts = Vec::new();
                        for (key, schema) in properties.into_iter().flatten() {
                            let value = match xml_string_terminal(schema) {
                                Some(regex) => {
                                    let rule = format!("text{n_terminals}");
                                    n_terminals += 1;
                                    terminals.push_str(&format!("{rule}[lazy]: {regex}\n"));
                                    rule
                                }
                                None => format!("{} {close}", xml_value_rule(schema)),
                            };
                            let part =
                                format!("{} {value}", lark_string(&format!("<parameter={key}>\n")));
                            parts.push(if required.contains(&key.as_str()) {
                                part
                            } else {
                                format!("({part})?")
                            });
                        }
                        format!(
                            "{} {} {}",
                            lark_string(&format!("<tool_call>\n<function={name}>\n")),
                            parts.join(" "),
                            lark_string("</function>\n</tool_call>"),
                        )
                    })
                    .collect();
                format!(
                    "start: call{repeat}\ncall: {}\n{terminals}",
                    alts.join(" | ")
                )
            }
            ToolCallFormat::DeepSeek { fenced } => {
                use engine::deepseek::{CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP};
                let alts: Vec<String> = functions
                    .iter()
                    .map(|(name, params)| {
                        let schema = engine::finite_json_schema(params.clone());
                        if fenced {
                            format!(
                                "{} {} {} {} %json {} {} {}",
                                marker(CALL_BEGIN),
                                lark_string("function"),
                                marker(SEP),
                                lark_string(&format!("{name}\n```json\n")),
                                schema,
                                lark_string("\n```"),
                                marker(CALL_END),
                            )
                        } else {
                            format!(
                                "{} {} {} %json {} {}",
                                marker(CALL_BEGIN),
                                lark_string(name),
                                marker(SEP),
                                schema,
                                marker(CALL_END)
                            )
                        }
                    })
                    .collect();
                format!(
                    "start: {} call{repeat} {}\ncall: {}\n",
                    marker(CALLS_BEGIN),
                    marker(CALLS_END),
                    alts.join(" | ")
                )
            }
            _ => return None,
        };
        Some(ConstraintSpec::Lark(grammar))
    }
}

/// Whether a parameter's schema declares a string: `"type": "string"`, or a list of types
/// whose only non-null one is `"string"`. In Qwen's XML calls such a value is written as text.
fn declares_string(schema: &Value) -> bool {
    match schema.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(types)) => {
            let kinds: Vec<&str> = types
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect();
            kinds == ["string"]
        }
        _ => false,
    }
}

/// For a string parameter without an `enum`: the regex (Lark `/.../`) of its text and the
/// parameter's closing. The text never holds `</` (the parser ends a value at the first
/// `</parameter>`); within length bounds, when the schema sets them, it holds no `<` at all
/// (so that the bounds count characters).
fn xml_string_terminal(schema: &Value) -> Option<String> {
    if !declares_string(schema) || schema.get("enum").is_some() {
        return None;
    }
    let bound = |key: &str| schema.get(key).and_then(Value::as_u64);
    let text = match (bound("minLength"), bound("maxLength")) {
        (None, None) => r"(?:[^<]|<[^\/])*".to_owned(),
        (min, max) => {
            let min = min.unwrap_or(0).min(4096);
            let max = max.map_or(String::new(), |m| m.clamp(min, 4096).to_string());
            format!("[^<]{{{min},{max}}}")
        }
    };
    Some(format!(r"/{text}\n<\/parameter>\n/"))
}

/// The Lark rule for a non-text parameter value in Qwen's XML calls: a string enum's values
/// as literals, any other schema as JSON.
fn xml_value_rule(schema: &Value) -> String {
    if let Some(values) = schema.get("enum").and_then(Value::as_array)
        && declares_string(schema)
    {
        let literals: Vec<String> = values
            .iter()
            .filter_map(Value::as_str)
            .map(lark_string)
            .collect();
        if !literals.is_empty() {
            return format!("({})", literals.join(" | "));
        }
    }
    format!("%json {}", engine::finite_json_schema(schema.clone()))
}

/// A Lark string literal for `text`.
fn lark_string(text: &str) -> String {
    // Lark strings take JSON's escapes.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools_for_any() -> Value {
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}])
    }

    /// The forcing grammar of a required call to `get_weather` (a bounded string, an enum, an
    /// optional integer, a nullable string) in `format`'s syntax, markers as text.
    fn forced(format: ToolCallFormat) -> String {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
                "note": {"type": ["string", "null"]}},
            "required": ["city", "unit"]}}}]);
        let plan = plan(Some(&tools), Some(&json!("required")), Some(false))
            .unwrap()
            .unwrap();
        let format = ChatFormat {
            tool_calls: format,
            reasoning: None,
            short_call_ids: false,
        };
        match plan.forcing_grammar(&format, &|_| None) {
            Some(ConstraintSpec::Lark(lark)) => lark,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forced_calls_accept_what_the_templates_write() {
        let accepts = |lark: &str, text: &str| {
            engine::lark_accepts(lark, text).unwrap_or_else(|e| panic!("{e}\n{lark}"))
        };
        let xml = forced(ToolCallFormat::QwenXml);
        let call = |params: &str| {
            format!("<tool_call>\n<function=get_weather>\n{params}</function>\n</tool_call>")
        };
        let p = |k: &str, v: &str| format!("<parameter={k}>\n{v}\n</parameter>\n");
        for (params, ok) in [
            (p("city", "Paris") + &p("unit", "celsius"), true),
            (p("city", "") + &p("unit", "fahrenheit"), true),
            (
                p("city", "a b c\nd") + &p("unit", "celsius") + &p("days", "3"),
                true,
            ),
            (p("city", "a<b") + &p("unit", "celsius"), false),
            (
                p("city", "Paris") + &p("unit", "celsius") + &p("note", "x < y <b>"),
                true,
            ),
            (
                p("city", "Paris") + &p("unit", "celsius") + &p("note", "a</b>"),
                false,
            ),
            (
                p("city", "Paris") + &p("unit", "celsius") + &p("note", "two\nlines"),
                true,
            ),
            (p("city", &"x".repeat(40)) + &p("unit", "celsius"), true),
            (p("city", &"x".repeat(41)) + &p("unit", "celsius"), false),
            (p("unit", "celsius"), false),
            (p("city", "Paris") + &p("unit", "kelvin"), false),
            (
                p("city", "Paris") + &p("unit", "celsius") + &p("days", "three"),
                false,
            ),
        ] {
            assert_eq!(accepts(&xml, &call(&params)), ok, "{params:?}\n{xml}");
        }
        // Forced JSON is compact (no free whitespace, `finite_json_schema`).
        let args = r#"{"city":"Paris","unit":"celsius"}"#;
        let v31 = forced(ToolCallFormat::DeepSeek { fenced: false });
        assert!(accepts(
            &v31,
            &format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{args}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            )
        ));
        let r1 = forced(ToolCallFormat::DeepSeek { fenced: true });
        assert!(accepts(
            &r1,
            &format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{args}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            )
        ));
        assert!(!accepts(
            &r1,
            &format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{args}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            )
        ));
        let hermes = forced(ToolCallFormat::Hermes);
        assert!(accepts(
            &hermes,
            &format!(
                "<tool_call>\n{{\"name\":\"get_weather\",\"arguments\":{args}}}\n</tool_call>\n"
            )
        ));
    }

    #[test]
    fn choices_are_validated() {
        let tools = weather();
        assert_eq!(plan(None, None, None).unwrap(), None);
        let p = plan(Some(&tools), None, None).unwrap().unwrap();
        assert_eq!(p.choice, ToolChoice::Auto);
        assert!(p.parallel);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let p = plan(Some(&tools), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(p.choice, ToolChoice::Function("get_weather".into()));
        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(
            plan(Some(&tools), Some(&unknown), None)
                .unwrap_err()
                .param(),
            Some("tool_choice")
        );
        assert!(plan(None, Some(&json!("required")), None).is_err());
        let any = plan(Some(&tools_for_any()), Some(&json!("any")), None).unwrap();
        assert_eq!(any.map(|p| p.choice), Some(ToolChoice::Required));
        assert!(plan(Some(&json!([{"type": "function"}])), None, None).is_err());
        assert!(
            plan(
                Some(&json!([{"type": "function", "function": {"name": "a b"}}])),
                None,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn forcing_grammars_name_the_function() {
        let tools = weather();
        let p = plan(Some(&tools), Some(&json!("required")), Some(false))
            .unwrap()
            .unwrap();
        let hermes = ChatFormat {
            tool_calls: ToolCallFormat::Prompted,
            reasoning: None,
            short_call_ids: false,
        };
        let Some(ConstraintSpec::Lark(g)) = p.forcing_grammar(&hermes, &|_| None) else {
            panic!("no grammar");
        };
        assert!(g.starts_with("start: call\n"), "{g}");
        assert!(g.contains("\"const\":\"get_weather\""), "{g}");
        let mistral = ChatFormat {
            tool_calls: ToolCallFormat::Mistral { named: true },
            reasoning: None,
            short_call_ids: true,
        };
        let Some(ConstraintSpec::Lark(g)) = p.forcing_grammar(&mistral, &|t| {
            (t == "[TOOL_CALLS]")
                .then_some(9)
                .or((t == "[ARGS]").then_some(32))
        }) else {
            panic!("no grammar");
        };
        assert!(g.contains("<[9]> \"get_weather\" <[32]> %json"), "{g}");
        let auto = plan(Some(&tools), None, None).unwrap().unwrap();
        assert!(auto.forcing_grammar(&hermes, &|_| None).is_none());
    }
}
