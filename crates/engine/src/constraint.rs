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
//!
//! Compiling is the one thing a client can make arbitrarily deep or slow, so it never runs on
//! the caller's stack: each compilation gets a thread of its own with a large stack (at most
//! [`MAX_CONCURRENT_COMPILES`] at once; another waits for a place, bounded), a size and nesting
//! limit before it starts and a time limit while it runs, and its panics are caught. Compiled
//! grammars are kept by content ([`CACHE_ENTRIES`] of them), so a repeated schema, or the `n`
//! choices of one request, cost a copy. A grammar whose language is empty is refused.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, OnceLock, mpsc};
use std::time::Duration;

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

/// The stack of a compiling thread: llguidance's schema and grammar compilers recurse once per
/// nesting level and `$ref` hop. Address space only; pages are committed as they are touched.
const COMPILE_STACK_BYTES: usize = 256 << 20;
/// Compilations running at once; another waits for a place at most [`COMPILE_TIMEOUT`],
/// then is refused as overloaded (503).
pub(crate) const MAX_CONCURRENT_COMPILES: usize = 4;
/// A compilation that takes longer is refused (its thread finishes in the background, still
/// counted against [`MAX_CONCURRENT_COMPILES`]).
const COMPILE_TIMEOUT: Duration = Duration::from_secs(10);
/// Distinct compiled constraints kept for reuse.
const CACHE_ENTRIES: usize = 64;
/// The largest constraint, in bytes of its text (a schema as compact JSON).
pub(crate) const MAX_CONSTRAINT_BYTES: usize = 256 << 10;
/// The deepest nesting of a JSON schema (objects and arrays within each other).
pub(crate) const MAX_SCHEMA_DEPTH: usize = 64;
/// The longest chain of `$ref`s a JSON schema may make the compiler follow.
pub(crate) const MAX_REF_DEPTH: usize = 128;

/// Why a constraint was not compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CompileError {
    /// The constraint is invalid, over a limit, or its language is empty (the client's to
    /// fix). The message names the limit or the problem, never the library's internals.
    Invalid(String),
    /// [`MAX_CONCURRENT_COMPILES`] compilations kept running for [`COMPILE_TIMEOUT`];
    /// retry later.
    Busy,
}

/// Compiles constraints for one engine's vocabulary. The trie and parser factory are built
/// on first use and shared by every request after.
pub(crate) struct ConstraintCompiler {
    text: Arc<TextTokenizer>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
    running: Arc<Places>,
    cache: Mutex<Cache>,
}

/// Compiled constraints by content, oldest evicted first.
#[derive(Default)]
struct Cache {
    matchers: HashMap<String, Matcher>,
    order: VecDeque<String>,
}

impl ConstraintCompiler {
    /// A compiler for `tokenizer`'s vocabulary; builds nothing yet.
    pub(crate) fn new(text: Arc<TextTokenizer>) -> Self {
        Self {
            text,
            factory: OnceLock::new(),
            running: Arc::new(Places::default()),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Compiles `spec` into a fresh per-request constraint, or says why it cannot be.
    pub(crate) fn compile(&self, spec: &ConstraintSpec) -> Result<TokenConstraint, CompileError> {
        let key = cache_key(spec);
        if key.len() > MAX_CONSTRAINT_BYTES {
            return Err(CompileError::Invalid(format!(
                "the constraint is {} bytes; the limit is {MAX_CONSTRAINT_BYTES}",
                key.len()
            )));
        }
        if let ConstraintSpec::JsonSchema(schema) = spec
            && depth(schema) > MAX_SCHEMA_DEPTH
        {
            return Err(CompileError::Invalid(format!(
                "the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
            )));
        }
        if let ConstraintSpec::JsonSchema(schema) = spec
            && ref_depth(schema) > MAX_REF_DEPTH
        {
            return Err(CompileError::Invalid(format!(
                "the JSON schema's $ref chains are longer than {MAX_REF_DEPTH} references"
            )));
        }
        if let Some(matcher) = self.cached(&key) {
            return Ok(TokenConstraint { matcher });
        }
        let factory = self
            .factory
            .get_or_init(|| build_factory(VocabSpec::from_text(&self.text)))
            .as_ref()
            .map_err(|e| CompileError::Invalid(e.clone()))?;
        let matcher = self.compile_apart(Arc::clone(factory), spec.clone())?;
        self.remember(key, &matcher);
        Ok(TokenConstraint { matcher })
    }

    fn cached(&self, key: &str) -> Option<Matcher> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.matchers.get(key).map(Matcher::deep_clone)
    }

    fn remember(&self, key: String, matcher: &Matcher) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.matchers.contains_key(&key) {
            return;
        }
        while cache.order.len() >= CACHE_ENTRIES {
            if let Some(old) = cache.order.pop_front() {
                cache.matchers.remove(&old);
            }
        }
        cache.order.push_back(key.clone());
        cache.matchers.insert(key, matcher.deep_clone());
    }

    /// Compiles on a thread of its own with a large stack, waiting at most
    /// [`COMPILE_TIMEOUT`].
    fn compile_apart(
        &self,
        factory: Arc<ParserFactory>,
        spec: ConstraintSpec,
    ) -> Result<Matcher, CompileError> {
        let slot = Places::take(&self.running).ok_or(CompileError::Busy)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("constraint-compile".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn(move || {
                let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    compile_with(&factory, &spec)
                }))
                .unwrap_or_else(|_| {
                    Err("the grammar library could not compile it (an internal limit)".into())
                });
                // The place is free before the caller hears back, so a caller that compiles
                // one constraint after another never finds its own last one still counted.
                drop(slot);
                let _ = tx.send(compiled);
            });
        if let Err(e) = spawned {
            return Err(CompileError::Invalid(format!(
                "no thread could be started to compile it: {e}"
            )));
        }
        match rx.recv_timeout(COMPILE_TIMEOUT) {
            Ok(compiled) => compiled.map_err(CompileError::Invalid),
            Err(_) => Err(CompileError::Invalid(format!(
                "compiling it took longer than {} s",
                COMPILE_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// The compilations running, and a signal for those waiting for a place.
#[derive(Default)]
struct Places {
    running: Mutex<usize>,
    freed: Condvar,
}

impl Places {
    /// A place among [`MAX_CONCURRENT_COMPILES`], waiting at most [`COMPILE_TIMEOUT`].
    fn take(places: &Arc<Places>) -> Option<Slot> {
        let running = places.running.lock().unwrap_or_else(|e| e.into_inner());
        let (mut running, _) = places
            .freed
            .wait_timeout_while(running, COMPILE_TIMEOUT, |n| *n >= MAX_CONCURRENT_COMPILES)
            .unwrap_or_else(|e| e.into_inner());
        if *running >= MAX_CONCURRENT_COMPILES {
            return None;
        }
        *running += 1;
        Some(Slot(Arc::clone(places)))
    }
}

/// Gives a compilation's place back when its thread ends, however it ends.
struct Slot(Arc<Places>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|e| e.into_inner());
        *running = running.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// The constraint's identity: its kind and its text (a schema as compact JSON, which keeps
/// key order).
fn cache_key(spec: &ConstraintSpec) -> String {
    match spec {
        ConstraintSpec::JsonObject => "object".to_owned(),
        ConstraintSpec::JsonSchema(schema) => format!("schema:{schema}"),
        ConstraintSpec::Lark(text) => format!("lark:{text}"),
        ConstraintSpec::Regex(text) => format!("regex:{text}"),
        ConstraintSpec::Gbnf(text) => format!("gbnf:{text}"),
    }
}

/// How deep objects and arrays nest in `value`, without recursing (the value itself may be
/// deep).
/// The local `$ref`s (`#...`) anywhere in `value`, not following them.
fn local_refs(value: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref")
                    && r.starts_with('#')
                {
                    out.push(r.as_str());
                }
                stack.extend(map.values());
            }
            _ => {}
        }
    }
    out
}

/// The longest chain of local `$ref`s the schema makes a compiler follow, one definition
/// referring to the next (a reference back into the chain, recursion, ends it: a recursive
/// schema is legitimate and compiled lazily). Walked without recursion, each target once.
fn ref_depth(schema: &Value) -> usize {
    // The chain length starting at each target, once known.
    let mut done: HashMap<&str, usize> = HashMap::new();
    let mut deepest = 0;
    for root in local_refs(schema) {
        // (target, the targets it refers to, the longest chain among those seen so far)
        let mut path: Vec<(&str, Vec<&str>, usize)> = Vec::new();
        let resolve = |r: &str| -> Vec<&str> {
            match schema.pointer(&r[1..]) {
                Some(target) => local_refs(target),
                None => Vec::new(),
            }
        };
        if !done.contains_key(root) {
            path.push((root, resolve(root), 0));
        }
        while let Some(last) = path.len().checked_sub(1) {
            match path[last].1.pop() {
                Some(child) => {
                    if let Some(&n) = done.get(child) {
                        path[last].2 = path[last].2.max(n);
                    } else if !path.iter().any(|(t, _, _)| *t == child) {
                        let children = resolve(child);
                        path.push((child, children, 0));
                    }
                }
                None => {
                    let (target, _, longest) = path.swap_remove(last);
                    done.insert(target, longest + 1);
                    if let Some((_, _, parent)) = path.last_mut() {
                        *parent = (*parent).max(longest + 1);
                    }
                }
            }
        }
        deepest = deepest.max(done.get(root).copied().unwrap_or(0));
    }
    deepest
}

fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
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
    // Errors name the problem, not the parser's state or the grammar (which may hold
    // generated text: nothing of a request's content reaches an answer or a log).
    factory.limits_mut().verbose_errors = false;
    Ok(Arc::new(factory))
}

/// Whether the Lark grammar `lark` accepts `text` as a whole output, read byte by byte: a
/// check of grammars written by hand (tool-call syntaxes, converted GBNF) without a model's
/// vocabulary. An error when llguidance refuses the grammar.
pub fn lark_accepts(lark: &str, text: &str) -> Result<bool, String> {
    static BYTES: OnceLock<Result<Arc<ParserFactory>, String>> = OnceLock::new();
    let factory = BYTES
        .get_or_init(|| {
            // The 255 bytes UTF-8 can hold, one token each, and an end token.
            let mut words: Vec<Vec<u8>> = (0..=254u8).map(|b| vec![b]).collect();
            words.push(b"end".to_vec());
            build_factory(VocabSpec {
                words,
                special: vec![255],
                eog: vec![255],
            })
        })
        .as_ref()
        .map_err(Clone::clone)?;
    let parser = factory
        .create_parser(TopLevelGrammar::from_lark(lark.to_owned()))
        .map_err(|e| format!("{e:#}"))?;
    let mut m = Matcher::new(Ok(parser));
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    let taken = m.try_consume_tokens(&tokens).ok();
    Ok(taken == Some(tokens.len()) && m.is_accepting().unwrap_or(false))
}

/// Compiles one constraint with a factory.
fn compile_with(factory: &ParserFactory, spec: &ConstraintSpec) -> Result<Matcher, String> {
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
    // A grammar no string satisfies (`root ::= root`, a regex matching nothing, a schema
    // whose only definition refers to itself) allows no first token and does not accept
    // the empty output: refused now rather than failing at the first draw.
    let mut probe = matcher.deep_clone();
    let empty = match probe.compute_mask() {
        Ok(mask) => mask.is_zero() && !probe.is_accepting().unwrap_or(false),
        Err(_) => true,
    };
    if empty {
        return Err("its language is empty: no output can satisfy it".into());
    }
    Ok(matcher)
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
///   llama.cpp's JSON-schema grammars cap a number's digits), so no number runs on forever;
/// - objects that list `properties` and say nothing of other keys (`additionalProperties`,
///   `patternProperties`, `unevaluatedProperties`) are closed, as llama.cpp's grammars close
///   them, so a small model cannot add keys until its token limit (a schema that wants more
///   keys says `additionalProperties: true`).
pub(crate) fn compact(mut schema: Value) -> Value {
    bound_numbers(&mut schema);
    if let Value::Object(map) = &mut schema
        && !map.contains_key("x-guidance")
    {
        map.insert("x-guidance".into(), json!({ "whitespace_flexible": false }));
    }
    schema
}

/// Adds the bounds of [`compact`] to every numeric subschema and closes the objects it says;
/// literal values (`enum`, `const`, `default`, `examples`) are left alone.
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
            let open_keys = [
                "additionalProperties",
                "patternProperties",
                "unevaluatedProperties",
            ];
            if is("object", map.get("type"))
                && map.get("properties").is_some_and(Value::is_object)
                && !open_keys.iter().any(|k| map.contains_key(*k))
            {
                map.insert("additionalProperties".into(), Value::Bool(false));
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
        // The library's error describes its parser state, which holds the generated text and
        // the client's grammar: neither may reach an answer or a log, so it is not kept.
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|_| "the grammar could not compute the next allowed tokens".to_owned())?;
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
        // As in `mask`: the library's message holds request text, so it is not kept.
        self.matcher
            .consume_token(token)
            .map_err(|_| format!("the grammar refused token {token}"))
    }

    /// Whether the grammar is complete and allows nothing more than ending.
    pub(crate) fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_chains_are_measured_and_recursion_ends_them() {
        let chain = |n: usize| {
            let mut defs = serde_json::Map::new();
            for i in 0..n {
                let next = if i + 1 == n {
                    json!({"type": "integer"})
                } else {
                    json!({"$ref": format!("#/$defs/d{}", i + 1)})
                };
                defs.insert(format!("d{i}"), next);
            }
            json!({"$ref": "#/$defs/d0", "$defs": defs})
        };
        assert_eq!(ref_depth(&json!({"type": "string"})), 0);
        assert_eq!(ref_depth(&chain(1)), 1);
        assert_eq!(ref_depth(&chain(400)), 400);
        // Recursion (a tree, a schema referring to itself) is legitimate and short.
        let tree = json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
            "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}});
        assert_eq!(ref_depth(&tree), 1);
        assert_eq!(ref_depth(&json!({"properties": {"a": {"$ref": "#"}}})), 1);
        // Two branches: the longer counts; a dangling reference counts as one.
        let forked = json!({"anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/missing"}],
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/c"}, "c": {}}});
        assert_eq!(ref_depth(&forked), 3);
    }

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

    fn constrain(f: &ParserFactory, spec: &ConstraintSpec) -> Result<TokenConstraint, String> {
        compile_with(f, spec).map(|matcher| TokenConstraint { matcher })
    }

    #[test]
    fn empty_languages_deep_schemas_and_huge_constraints_are_refused() {
        let f = factory();
        let empty = [
            ConstraintSpec::Lark("start: start".into()),
            ConstraintSpec::Gbnf("root ::= root".into()),
            ConstraintSpec::JsonSchema(
                json!({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}),
            ),
        ];
        for spec in empty {
            assert!(constrain(&f, &spec).is_err(), "{spec:?} accepted");
        }
        let mut deep = json!({"type": "integer"});
        for _ in 0..MAX_SCHEMA_DEPTH {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(depth(&deep) > MAX_SCHEMA_DEPTH);
        assert_eq!(depth(&json!({"a": [1, {"b": 2}]})), 4);
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
        let mut c = constrain(&f, &ConstraintSpec::JsonObject).unwrap();
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
        let mut c = constrain(&f, &ConstraintSpec::JsonSchema(schema)).unwrap();
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
        let mut c = constrain(&f, &ConstraintSpec::Regex("-?[12]+".into())).unwrap();
        let first = allowed(&mut c);
        assert_eq!(first, vec![id("1"), id("2"), id("-")]);
        c.commit(id("1")).unwrap();
        assert!(allowed(&mut c).contains(&END), "one digit is a whole match");

        let lark = "start: \"true\" | \"false\"".to_owned();
        let mut c = constrain(&f, &ConstraintSpec::Lark(lark)).unwrap();
        let first = allowed(&mut c);
        assert!(
            first.contains(&id("true")) && first.contains(&id("false")),
            "{first:?}"
        );
        assert!(!first.contains(&id("1")), "{first:?}");

        assert!(constrain(&f, &ConstraintSpec::Lark("start: (".into())).is_err());
        assert!(constrain(&f, &ConstraintSpec::Regex("(".into())).is_err());
        let bad_schema = json!({"type": "object", "properties": {"a": {"type": "nonsense"}}});
        assert!(constrain(&f, &ConstraintSpec::JsonSchema(bad_schema)).is_err());
    }

    #[test]
    fn objects_with_properties_are_closed_unless_they_say_otherwise() {
        let closed = compact(json!({"type": "object", "properties": {"a": {"type": "integer"}}}));
        assert_eq!(closed["additionalProperties"], json!(false));
        let open = compact(
            json!({"type": "object", "properties": {"a": {"type": "integer"}},
            "additionalProperties": true}),
        );
        assert_eq!(open["additionalProperties"], json!(true));
        let free = compact(json!({"type": "object"}));
        assert!(free.get("additionalProperties").is_none());
        // Only `}` may follow the one listed key: no other key can start.
        let f = factory();
        let mut c = constrain(
            &f,
            &ConstraintSpec::JsonSchema(json!({"type": "object",
            "properties": {"a": {"type": "integer"}}, "required": ["a"]})),
        )
        .unwrap();
        for piece in ["{\"", "a", "\":", "1"] {
            c.commit(id(piece)).unwrap();
        }
        let next = allowed(&mut c);
        assert!(next.contains(&id("}")), "{next:?}");
        assert!(!next.contains(&id(",")), "{next:?}");
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
        let mut c = constrain(&f, &ConstraintSpec::JsonSchema(number)).unwrap();
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
        let mut c = constrain(&f, &ConstraintSpec::Regex("a|<\\|end\\|>".into())).unwrap();
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
