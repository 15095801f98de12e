//! Constrained decoding: the output of a request is held to a grammar (a JSON schema, any
//! JSON object, a Lark grammar or a regular expression) by masking, before every draw, the
//! tokens that cannot continue a string of the grammar.
//!
//! The grammar work is llguidance's (the library llama.cpp and vLLM use): this file only
//! describes our vocabulary to it and turns its token masks into logits of `-inf`. The
//! vocabulary (a byte trie over every token) and llguidance's parser factory are built once
//! per engine, on the first constrained request, so unconstrained serving pays nothing.
//! Each constrained request compiles its grammar into a [`TokenConstraint`] when it is
//! submitted, so a bad grammar is refused before anything is queued.

use std::sync::{Arc, OnceLock};

use crate::ConstraintSpec;
use crate::text::TextTokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

/// The vocabulary as llguidance sees it: every token's bytes, special tokens marked with
/// llguidance's `0xFF` prefix so that no grammar text can produce them.
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Only used to force tokens and heal prompts, neither of which the engine asks for;
        // the greedy split is a valid (if not canonical) tokenisation.
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Everything about a vocabulary that constraints need: token bytes, which tokens are
/// special, and which end the generation.
pub(crate) struct VocabSpec {
    /// Each token's bytes, by id.
    pub(crate) words: Vec<Vec<u8>>,
    /// Ids of special (control) tokens: no grammar text produces them.
    pub(crate) special: Vec<u32>,
    /// End-of-generation ids; the first is the main one. The mask allows them only where the
    /// grammar may end.
    pub(crate) eog: Vec<u32>,
}

impl VocabSpec {
    /// Reads the vocabulary out of the model's tokenizer.
    pub(crate) fn from_text(text: &TextTokenizer) -> Self {
        let n = text.vocab_size() as u32;
        let words = (0..n)
            .map(|id| text.token_bytes(id).unwrap_or_default())
            .collect();
        let (special, eos): (Vec<u32>, Option<u32>) = match text {
            TextTokenizer::Bpe { tokenizer, .. } => (
                (0..n).filter(|&id| tokenizer.is_special(id)).collect(),
                tokenizer.eos_id(),
            ),
            TextTokenizer::Mistral(m) => (
                (0..n).filter(|&id| m.is_special(id)).collect(),
                Some(m.eos_id()),
            ),
            TextTokenizer::HuggingFace(h) => {
                ((0..n).filter(|&id| h.is_special(id)).collect(), h.eos_id())
            }
        };
        let mut eog: Vec<u32> = eos.into_iter().collect();
        eog.extend((0..n).filter(|&id| text.is_eog(id) && Some(id) != eos));
        Self {
            words,
            special,
            eog,
        }
    }
}

/// Compiles constraints for one engine's vocabulary. The trie and parser factory are built
/// on first use and shared by every request after.
pub(crate) struct ConstraintCompiler {
    text: Arc<TextTokenizer>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl ConstraintCompiler {
    /// A compiler for `tokenizer`'s vocabulary; builds nothing yet.
    pub(crate) fn new(text: Arc<TextTokenizer>) -> Self {
        Self {
            text,
            factory: OnceLock::new(),
        }
    }

    /// Compiles `spec` into a fresh per-request constraint, or says why it cannot be.
    pub(crate) fn compile(&self, spec: &ConstraintSpec) -> Result<TokenConstraint, String> {
        let factory = self
            .factory
            .get_or_init(|| build_factory(VocabSpec::from_text(&self.text)))
            .as_ref()
            .map_err(Clone::clone)?;
        compile_with(factory, spec)
    }
}

/// Builds llguidance's parser factory over a vocabulary.
fn build_factory(vocab: VocabSpec) -> Result<Arc<ParserFactory>, String> {
    let n = vocab.words.len();
    let n_u32 = u32::try_from(n).map_err(|_| format!("a vocabulary of {n} tokens is too large"))?;
    if n == 0 {
        return Err("the vocabulary is empty".into());
    }
    let Some(&eos) = vocab.eog.first() else {
        return Err("the model has no end-of-generation token to end a constrained output".into());
    };
    if let Some(&bad) = vocab
        .eog
        .iter()
        .chain(&vocab.special)
        .find(|&&t| t >= n_u32)
    {
        return Err(format!("token {bad} is outside the vocabulary of {n}"));
    }
    let mut words = vocab.words;
    for &id in &vocab.special {
        if let Some(w) = words.get_mut(id as usize) {
            // llguidance spells a special token it knows only by id as `0xFF [id]`: a name
            // that opens with `[` (Mistral's `[INST]`, `[TOOL_CALLS]`) would run into that
            // spelling and be taken for another token, so such names go in angle brackets.
            // A special token without text would be the bare marker, which llguidance
            // takes as the start of any special token: give it a name.
            if w.is_empty() {
                *w = format!("<special_{id}>").into_bytes();
            }
            let bracketed = w.first() == Some(&b'[');
            let mut marked = Vec::with_capacity(w.len() + 3);
            marked.push(TokTrie::SPECIAL_TOKEN_MARKER);
            if bracketed {
                marked.push(b'<');
            }
            marked.extend_from_slice(w);
            if bracketed {
                marked.push(b'>');
            }
            *w = marked;
        }
    }
    let info = TokRxInfo::new(n_u32, eos);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&vocab.eog);
    let env: llguidance::toktrie::TokEnv = Arc::new(Vocabulary { trie });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("{e:#}"))?;
    // llguidance logs warnings to stderr by default; the engine reports errors itself.
    factory.quiet();
    Ok(Arc::new(factory))
}

/// Compiles one constraint with a factory.
fn compile_with(factory: &ParserFactory, spec: &ConstraintSpec) -> Result<TokenConstraint, String> {
    let grammar = match spec {
        ConstraintSpec::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({
            "type": "object"
        }))),
        ConstraintSpec::JsonSchema(schema) => {
            TopLevelGrammar::from_json_schema(compact(schema.clone()))
        }
        ConstraintSpec::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        ConstraintSpec::Regex(regex) => TopLevelGrammar::from_regex(regex),
        ConstraintSpec::Gbnf(gbnf) => TopLevelGrammar::from_lark(
            crate::gbnf_to_lark(gbnf).map_err(|e| format!("invalid GBNF grammar: {e}"))?,
        ),
    };
    let parser = factory
        .create_parser(grammar)
        .map_err(|e| format!("{e:#}"))?;
    let matcher = Matcher::new(Ok(parser));
    if let Some(e) = matcher.get_error() {
        return Err(e);
    }
    Ok(TokenConstraint { matcher })
}

/// The largest integer a JSON number keeps exactly in a double (2^53 - 1).
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// The finest fraction a generated JSON number may have.
const NUMBER_RESOLUTION: f64 = 1e-10;

/// Makes a schema finite where a model could otherwise run on until its token limit, while
/// every output stays valid under the schema as given:
/// - no free whitespace between JSON tokens (unless the schema sets its own llguidance
///   options), so a small model at a high temperature cannot emit blank lines forever;
/// - integers and numbers without bounds get the bounds of exactly representable integers,
///   ±(2^53 - 1), and numbers without `multipleOf` get at most 10 fractional digits (as
///   llama.cpp's JSON-schema grammars cap a number's digits), so no number runs on forever.
pub(crate) fn compact(mut schema: Value) -> Value {
    bound_numbers(&mut schema);
    if let Value::Object(map) = &mut schema
        && !map.contains_key("x-guidance")
    {
        map.insert("x-guidance".into(), json!({ "whitespace_flexible": false }));
    }
    schema
}

/// Adds the bounds of [`compact`] to every numeric subschema; literal values (`enum`,
/// `const`, `default`, `examples`) are left alone.
fn bound_numbers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is = |kind: &str, t: Option<&Value>| match t {
                Some(Value::String(s)) => s == kind,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(kind)),
                _ => false,
            };
            let integer = is("integer", map.get("type"));
            let number = is("number", map.get("type"));
            if integer || number {
                if !map.contains_key("minimum") && !map.contains_key("exclusiveMinimum") {
                    map.insert("minimum".into(), json!(-MAX_SAFE_INTEGER));
                }
                if !map.contains_key("maximum") && !map.contains_key("exclusiveMaximum") {
                    map.insert("maximum".into(), json!(MAX_SAFE_INTEGER));
                }
            }
            if number && !integer && !map.contains_key("multipleOf") {
                map.insert("multipleOf".into(), json!(NUMBER_RESOLUTION));
            }
            for (key, value) in map.iter_mut() {
                if !matches!(key.as_str(), "enum" | "const" | "default" | "examples") {
                    bound_numbers(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_numbers),
        _ => {}
    }
}

/// One request's constraint: where it stands in its grammar.
pub(crate) struct TokenConstraint {
    matcher: Matcher,
}

impl TokenConstraint {
    /// Sets the logit of every token the grammar does not allow next to `-inf`.
    pub(crate) fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| format!("constraint failed: {e:#}"))?;
        let allowed = mask.len();
        for (id, logit) in logits.iter_mut().enumerate() {
            if id >= allowed || !mask.is_allowed(id as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past the sampled `token`.
    pub(crate) fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("constraint failed: {e:#}"))
    }

    /// Whether the grammar is complete and allows nothing more than ending.
    pub(crate) fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny vocabulary: single characters, a few multi-byte pieces, and an end token.
    fn factory() -> Arc<ParserFactory> {
        let pieces = [
            "{", "}", "\"", ":", ",", "a", "b", "1", "2", "-", " ", "\n", "true", "false", "{\"",
            "\":", "ab", "x", "[", "]", "null", ".",
        ];
        let mut words: Vec<Vec<u8>> = pieces.iter().map(|p| p.as_bytes().to_vec()).collect();
        words.push(b"<|end|>".to_vec());
        let end = words.len() as u32 - 1;
        build_factory(VocabSpec {
            words,
            special: vec![end],
            eog: vec![end],
        })
        .unwrap()
    }

    fn id(piece: &str) -> u32 {
        [
            "{", "}", "\"", ":", ",", "a", "b", "1", "2", "-", " ", "\n", "true", "false", "{\"",
            "\":", "ab", "x", "[", "]", "null", ".",
        ]
        .iter()
        .position(|p| *p == piece)
        .unwrap() as u32
    }

    const END: u32 = 22;

    fn allowed(c: &mut TokenConstraint) -> Vec<u32> {
        let mut logits = vec![0.0f32; 23];
        c.mask(&mut logits).unwrap();
        (0..23)
            .filter(|&i| logits[i as usize].is_finite())
            .collect()
    }

    #[test]
    fn json_object_starts_with_a_brace_and_ends_only_when_closed() {
        let f = factory();
        let mut c = compile_with(&f, &ConstraintSpec::JsonObject).unwrap();
        let first = allowed(&mut c);
        assert!(
            first.contains(&id("{")) && first.contains(&id("{\"")),
            "{first:?}"
        );
        assert!(
            !first.contains(&id("a")) && !first.contains(&END),
            "{first:?}"
        );
        for t in ["{\"", "a", "\":", "1"] {
            c.commit(id(t)).unwrap();
            assert!(!c.is_finished());
        }
        let next = allowed(&mut c);
        assert!(
            next.contains(&id("}")) && next.contains(&id(",")),
            "{next:?}"
        );
        assert!(!next.contains(&END), "an open object may not end: {next:?}");
        c.commit(id("}")).unwrap();
        assert!(c.is_finished());
        assert_eq!(allowed(&mut c), vec![END]);
    }

    #[test]
    fn json_schema_allows_only_its_enum_and_required_keys() {
        let f = factory();
        let schema = json!({
            "type": "object",
            "properties": {"a": {"enum": ["ab", "b"]}},
            "required": ["a"],
            "additionalProperties": false
        });
        let mut c = compile_with(&f, &ConstraintSpec::JsonSchema(schema)).unwrap();
        c.commit(id("{\"")).unwrap();
        assert_eq!(allowed(&mut c), vec![id("a")], "the only key is \"a\"");
        for t in ["a", "\":", "\""] {
            c.commit(id(t)).unwrap();
        }
        let values = allowed(&mut c);
        assert!(
            values.contains(&id("ab")) && values.contains(&id("b")),
            "{values:?}"
        );
        assert!(
            !values.contains(&id("x")) && !values.contains(&id("1")),
            "{values:?}"
        );
        assert!(
            c.commit(id("x")).is_err(),
            "a token outside the grammar is refused"
        );
    }

    #[test]
    fn regex_and_lark_constrain_and_bad_grammars_are_errors() {
        let f = factory();
        let mut c = compile_with(&f, &ConstraintSpec::Regex("-?[12]+".into())).unwrap();
        let first = allowed(&mut c);
        assert_eq!(first, vec![id("1"), id("2"), id("-")]);
        c.commit(id("1")).unwrap();
        assert!(allowed(&mut c).contains(&END), "one digit is a whole match");

        let lark = "start: \"true\" | \"false\"".to_owned();
        let mut c = compile_with(&f, &ConstraintSpec::Lark(lark)).unwrap();
        let first = allowed(&mut c);
        assert!(
            first.contains(&id("true")) && first.contains(&id("false")),
            "{first:?}"
        );
        assert!(!first.contains(&id("1")), "{first:?}");

        assert!(compile_with(&f, &ConstraintSpec::Lark("start: (".into())).is_err());
        assert!(compile_with(&f, &ConstraintSpec::Regex("(".into())).is_err());
        let bad_schema = json!({"type": "object", "properties": {"a": {"type": "nonsense"}}});
        assert!(compile_with(&f, &ConstraintSpec::JsonSchema(bad_schema)).is_err());
    }

    #[test]
    fn numbers_get_finite_digits_and_literals_are_untouched() {
        let schema = json!({
            "type": "object",
            "properties": {
                "n": {"type": "number", "minimum": 0},
                "i": {"type": ["integer", "null"], "exclusiveMaximum": 5},
                "e": {"enum": [{"type": "number"}]}
            }
        });
        let out = compact(schema);
        let p = &out["properties"];
        assert_eq!(p["n"]["minimum"], json!(0));
        assert_eq!(p["n"]["maximum"], json!(MAX_SAFE_INTEGER));
        assert_eq!(p["n"]["multipleOf"], json!(NUMBER_RESOLUTION));
        assert_eq!(p["i"]["minimum"], json!(-MAX_SAFE_INTEGER));
        assert!(p["i"].get("maximum").is_none() && p["i"].get("multipleOf").is_none());
        assert_eq!(p["e"], json!({"enum": [{"type": "number"}]}));
        assert_eq!(out["x-guidance"], json!({"whitespace_flexible": false}));

        // The bounded number grammar still compiles and cannot run past ten decimals.
        let f = factory();
        let number = json!({"type": "number"});
        let mut c = compile_with(&f, &ConstraintSpec::JsonSchema(number)).unwrap();
        for t in ["1", "."] {
            c.commit(id(t)).unwrap();
        }
        for _ in 0..10 {
            assert!(allowed(&mut c).contains(&id("2")));
            c.commit(id("2")).unwrap();
        }
        assert!(
            !allowed(&mut c).contains(&id("2")),
            "an eleventh decimal is refused"
        );
    }

    #[test]
    fn special_tokens_are_never_grammar_text() {
        let f = factory();
        // A regex that matches the end token's text still cannot produce the token.
        let mut c = compile_with(&f, &ConstraintSpec::Regex("a|<\\|end\\|>".into())).unwrap();
        assert_eq!(allowed(&mut c), vec![id("a")]);
    }

    #[test]
    fn a_vocabulary_without_an_end_token_is_refused() {
        let err = build_factory(VocabSpec {
            words: vec![b"a".to_vec()],
            special: vec![],
            eog: vec![],
        })
        .err()
        .unwrap();
        assert!(err.contains("end-of-generation"), "{err}");
    }
}
