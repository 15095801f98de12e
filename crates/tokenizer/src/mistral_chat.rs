//! Mistral's instruct (chat) encoding, token-exact with mistral-common's
//! `MistralTokenizer.encode_chat_completion` for tokenizer versions v1, v2, v3, v7, v11 and v13.
//!
//! A request goes through the same three stages as in mistral-common: validation (message
//! order, tool-call pairing and ids, which content each version accepts), normalisation
//! (consecutive messages of one role merged with `"\n\n"`, system prompts gathered for v1-v3,
//! tool arguments and results re-printed as Python's `json.dumps` prints them, tool results
//! reordered by call for v11+), then encoding message by message:
//!
//! - v1: `[INST] {system}\n\n{user} [/INST]` as plain text (v1 has no control tokens for it),
//!   answers followed by `</s>`; no tools.
//! - v2 / v3: `[INST]`...`[/INST]` control tokens; the system prompt is prepended to the last
//!   user message; `[AVAILABLE_TOOLS]` JSON before the last user message; `[TOOL_CALLS]` JSON
//!   list; `[TOOL_RESULTS]` JSON. v2 drops tool calls and results before the last user message;
//!   v3 keeps them and adds call ids.
//! - v7: system messages stay in place as `[SYSTEM_PROMPT]`...`[/SYSTEM_PROMPT]`; tool results
//!   are `[TOOL_RESULTS] id [TOOL_CONTENT] content [/TOOL_RESULTS]`; an answer may hold text and
//!   tool calls.
//! - v11: each call is `[TOOL_CALLS] name [CALL_ID] id [ARGS] {json}`.
//! - v13 (Tekken only): tools before the first user message; no call ids; `[THINK]`...`[/THINK]`
//!   reasoning chunks where the tokenizer has those tokens.

use crate::mistral_error::MistralError;
use crate::mistral_request::{MistralChatRequest, MistralContent, MistralMessage};
use crate::pyjson::JsonValue;
use crate::sentencepiece::SentencePieceBpe;
use crate::tekken::Tekken;

/// An instruct-format version, as mistral-common's `TokenizerVersion` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum MistralVersion {
    /// `v1`: plain-text `[INST]` markers.
    V1,
    /// `v2`: control tokens, tools.
    V2,
    /// `v3`: tool call ids, full tool history.
    V3,
    /// `v7`: `[SYSTEM_PROMPT]` messages.
    V7,
    /// `v11`: `[CALL_ID]` / `[ARGS]` tool calls.
    V11,
    /// `v13`: tools first, no call ids, `[THINK]` reasoning.
    V13,
}

impl MistralVersion {
    /// `"v1"`, `"v2"`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            MistralVersion::V1 => "v1",
            MistralVersion::V2 => "v2",
            MistralVersion::V3 => "v3",
            MistralVersion::V7 => "v7",
            MistralVersion::V11 => "v11",
            MistralVersion::V13 => "v13",
        }
    }

    /// Parses `"v1"` ... `"v13"`; `None` for unknown or unimplemented versions (`v15` needs
    /// model settings, which are not implemented).
    pub fn parse(s: &str) -> Option<MistralVersion> {
        Some(match s {
            "v1" => MistralVersion::V1,
            "v2" => MistralVersion::V2,
            "v3" => MistralVersion::V3,
            "v7" => MistralVersion::V7,
            "v11" => MistralVersion::V11,
            "v13" => MistralVersion::V13,
            _ => return None,
        })
    }
}

/// The text tokenizer under the instruct format.
#[derive(Debug)]
enum TextModel {
    SentencePiece(SentencePieceBpe),
    Tekken(Tekken),
}

/// Control token ids used by the instruct formats (`None` where the vocabulary lacks one).
#[derive(Clone, Copy, Debug, Default)]
struct Specials {
    bos: u32,
    eos: u32,
    begin_inst: u32,
    end_inst: u32,
    begin_tools: u32,
    end_tools: u32,
    begin_tool_results: u32,
    end_tool_results: u32,
    tool_calls: u32,
    begin_system: u32,
    end_system: u32,
    begin_tool_content: u32,
    args: u32,
    call_id: u32,
    begin_think: Option<u32>,
    end_think: Option<u32>,
}

/// A Mistral tokenizer: the text tokenizer (SentencePiece or Tekken) and the instruct format of
/// its version.
#[derive(Debug)]
pub struct MistralTokenizer {
    model: TextModel,
    version: MistralVersion,
    specials: Specials,
}

impl MistralTokenizer {
    /// Builds the tokenizer from a file's name and bytes, as mistral-common's `from_file` does:
    /// `*.json` is Tekken (its version is inside); `tokenizer.model` is SentencePiece v1 and
    /// `*.model.vN` / `*.model.vNmM` SentencePiece vN.
    ///
    /// Errors: an unrecognised name or version, a malformed file, a vocabulary without the
    /// control tokens its version needs.
    pub fn from_bytes(file_name: &str, bytes: &[u8]) -> Result<MistralTokenizer, MistralError> {
        if file_name.ends_with(".json") {
            return MistralTokenizer::from_tekken(bytes);
        }
        let Some((_, suffix)) = file_name.rsplit_once('.') else {
            return Err(MistralError::UnsupportedModel(format!(
                "unrecognised tokenizer file name {file_name:?}"
            )));
        };
        let version = if suffix == "model" {
            MistralVersion::V1
        } else if file_name.contains(".model.") {
            let v = suffix.split('m').next().unwrap_or(suffix);
            MistralVersion::parse(v)
                .ok_or_else(|| MistralError::UnsupportedVersion(suffix.to_owned()))?
        } else {
            return Err(MistralError::UnsupportedModel(format!(
                "unrecognised tokenizer file name {file_name:?}"
            )));
        };
        MistralTokenizer::from_sentencepiece(bytes, version)
    }

    /// Builds a SentencePiece-based tokenizer of the given version from `.model` bytes.
    ///
    /// Errors: a malformed model; v13 (mistral-common requires Tekken for it); missing control
    /// tokens.
    pub fn from_sentencepiece(
        bytes: &[u8],
        version: MistralVersion,
    ) -> Result<MistralTokenizer, MistralError> {
        if version >= MistralVersion::V13 {
            return Err(MistralError::UnsupportedVersion(format!(
                "{} with SentencePiece (Tekken only)",
                version.as_str()
            )));
        }
        let sp = SentencePieceBpe::from_bytes(bytes)?;
        MistralTokenizer::build(TextModel::SentencePiece(sp), version)
    }

    /// Builds a Tekken-based tokenizer from `tekken_*.json` bytes.
    ///
    /// Errors: a malformed file, an unsupported version, missing control tokens.
    pub fn from_tekken(bytes: &[u8]) -> Result<MistralTokenizer, MistralError> {
        let tk = Tekken::from_json(bytes)?;
        let version = MistralVersion::parse(tk.version())
            .ok_or_else(|| MistralError::UnsupportedVersion(tk.version().to_owned()))?;
        MistralTokenizer::build(TextModel::Tekken(tk), version)
    }

    fn build(model: TextModel, version: MistralVersion) -> Result<MistralTokenizer, MistralError> {
        let find = |text: &str| match &model {
            TextModel::SentencePiece(sp) => sp.piece_id(text),
            TextModel::Tekken(tk) => tk.special_id(text),
        };
        let need = |text: &str, from: MistralVersion| -> Result<u32, MistralError> {
            if version < from {
                return Ok(u32::MAX);
            }
            find(text).ok_or_else(|| {
                MistralError::InvalidModel(format!(
                    "{} needs the control token {text}",
                    version.as_str()
                ))
            })
        };
        use MistralVersion::{V1, V2, V7, V11};
        let specials = Specials {
            bos: need("<s>", V1)?,
            eos: need("</s>", V1)?,
            begin_inst: need("[INST]", V2)?,
            end_inst: need("[/INST]", V2)?,
            begin_tools: need("[AVAILABLE_TOOLS]", V2)?,
            end_tools: need("[/AVAILABLE_TOOLS]", V2)?,
            begin_tool_results: need("[TOOL_RESULTS]", V2)?,
            end_tool_results: need("[/TOOL_RESULTS]", V2)?,
            tool_calls: need("[TOOL_CALLS]", V2)?,
            begin_system: need("[SYSTEM_PROMPT]", V7)?,
            end_system: need("[/SYSTEM_PROMPT]", V7)?,
            begin_tool_content: need("[TOOL_CONTENT]", V7)?,
            args: need("[ARGS]", V11)?,
            call_id: need("[CALL_ID]", V11)?,
            begin_think: find("[THINK]").filter(|_| version >= MistralVersion::V13),
            end_think: find("[/THINK]").filter(|_| version >= MistralVersion::V13),
        };
        Ok(MistralTokenizer {
            model,
            version,
            specials,
        })
    }

    /// The instruct-format version.
    pub fn version(&self) -> MistralVersion {
        self.version
    }

    /// `"sentencepiece"` or `"tekken"`.
    pub fn kind(&self) -> &'static str {
        match self.model {
            TextModel::SentencePiece(_) => "sentencepiece",
            TextModel::Tekken(_) => "tekken",
        }
    }

    /// Vocabulary size (special tokens included).
    pub fn vocab_size(&self) -> usize {
        match &self.model {
            TextModel::SentencePiece(sp) => sp.vocab_size(),
            TextModel::Tekken(tk) => tk.vocab_size(),
        }
    }

    /// The beginning-of-sequence id.
    pub fn bos_id(&self) -> u32 {
        self.specials.bos
    }

    /// The end-of-sequence id (the end of an assistant turn).
    pub fn eos_id(&self) -> u32 {
        self.specials.eos
    }

    /// The id of a control / special token by its text (`"[INST]"`), if the vocabulary has it.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        match &self.model {
            TextModel::SentencePiece(sp) => sp.piece_id(text).filter(|&id| sp.is_control(id)),
            TextModel::Tekken(tk) => tk.special_id(text),
        }
    }

    /// The id mistral-common's `get_special_token` gives for `text`: with SentencePiece any
    /// piece of that text, else the unknown token's id (as `piece_to_id` does); with Tekken the
    /// special token of that text, else `None` (where mistral-common raises).
    pub(crate) fn special_token_lookup(&self, text: &str) -> Option<u32> {
        match &self.model {
            TextModel::SentencePiece(sp) => Some(sp.piece_id(text).unwrap_or_else(|| sp.unk_id())),
            TextModel::Tekken(tk) => tk.special_id(text),
        }
    }

    /// Whether `id` is a control / special token (never produced from text, dropped by
    /// [`decode`](Self::decode) unless asked to keep it).
    pub fn is_special(&self, id: u32) -> bool {
        match &self.model {
            TextModel::SentencePiece(sp) => sp.is_control(id),
            TextModel::Tekken(tk) => tk.is_special(id),
        }
    }

    /// Encodes plain text; control-token text (`"[INST]"`, `"</s>"`) stays text.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if bos {
            out.push(self.specials.bos);
        }
        out.extend(self.text(text));
        if eos {
            out.push(self.specials.eos);
        }
        out
    }

    fn text(&self, text: &str) -> Vec<u32> {
        match &self.model {
            TextModel::SentencePiece(sp) => sp.encode(text),
            TextModel::Tekken(tk) => tk.encode(text),
        }
    }

    /// Decodes ids to text, as mistral-common's `decode` does with the IGNORE policy (special
    /// tokens dropped). With `keep_special`, special tokens are written as their text between
    /// the decoded runs of ordinary tokens.
    ///
    /// Errors: an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String, MistralError> {
        match &self.model {
            TextModel::Tekken(tk) => tk.decode(ids, keep_special),
            TextModel::SentencePiece(sp) if !keep_special => sp.decode(ids),
            TextModel::SentencePiece(sp) => {
                let mut out = String::new();
                let mut run = Vec::new();
                for &id in ids {
                    if sp.is_control(id) {
                        out.push_str(&sp.decode(&run)?);
                        run.clear();
                        out.push_str(sp.piece(id).unwrap_or_default());
                    } else {
                        run.push(id);
                    }
                }
                out.push_str(&sp.decode(&run)?);
                Ok(out)
            }
        }
    }

    /// The raw bytes of one token for streaming output: spaces for `▁`, the byte of a byte
    /// piece, nothing for special tokens. (SentencePiece drops the very first space of a whole
    /// decode; a streaming caller that wants the same text drops it too.)
    ///
    /// Errors: an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, MistralError> {
        match &self.model {
            TextModel::Tekken(tk) => tk.token_bytes(id, false).map(<[u8]>::to_vec),
            TextModel::SentencePiece(sp) => {
                let piece = sp.piece(id).ok_or(MistralError::UnknownTokenId {
                    id,
                    vocab_size: sp.vocab_size(),
                })?;
                use crate::sentencepiece::PieceType;
                Ok(match sp.piece_type(id) {
                    Some(PieceType::Control) => Vec::new(),
                    Some(PieceType::Byte) => piece
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .map(|b| vec![b])
                        .unwrap_or_default(),
                    Some(PieceType::Unknown) => " \u{2047} ".as_bytes().to_vec(),
                    _ => piece.replace('\u{2581}', " ").into_bytes(),
                })
            }
        }
    }

    /// Encodes a chat request exactly as mistral-common's `encode_chat_completion` does (in its
    /// default validation mode): BOS, every message in the version's format, and, when the
    /// conversation ends with a user or tool message, the `[/INST]` or `[/TOOL_RESULTS]` that
    /// makes the model answer next.
    ///
    /// Errors: [`MistralError::InvalidRequest`] for a conversation mistral-common rejects,
    /// [`MistralError::Unsupported`] for what this version cannot encode.
    pub fn encode_chat(&self, request: &MistralChatRequest) -> Result<Vec<u32>, MistralError> {
        let messages = convert(request)?;
        let tools = convert_tools(request)?;
        validate(self.version, &messages, &tools)?;
        let normalized = normalize(self.version, &messages)?;
        self.encode_instruct(&normalized, &tools)
    }

    fn unsupported(&self, what: impl Into<String>) -> MistralError {
        MistralError::Unsupported {
            version: self.version.as_str(),
            what: what.into(),
        }
    }

    fn encode_instruct(
        &self,
        n: &Normalized,
        tools: &[JsonValue],
    ) -> Result<Vec<u32>, MistralError> {
        let msgs = &n.messages;
        let first_user = msgs.iter().position(|m| m.role == Role::User);
        let last_user = msgs.iter().rposition(|m| m.role == Role::User);
        if self.version == MistralVersion::V2 {
            self.check_v2_tool_results(msgs, last_user)?;
        }
        let mut out = vec![self.specials.bos];
        for (i, m) in msgs.iter().enumerate() {
            let before_last_user = last_user.is_some_and(|l| i < l);
            match m.role {
                Role::User => out.extend(self.encode_user(
                    m,
                    tools,
                    Some(i) == last_user,
                    Some(i) == first_user,
                    n.system_prompt.as_deref(),
                )?),
                Role::Tool => out.extend(self.encode_tool(m, before_last_user)?),
                Role::Assistant => {
                    if m.prefix && i + 1 != msgs.len() {
                        return Err(MistralError::InvalidRequest(
                            "a prefix assistant message must be the last message".into(),
                        ));
                    }
                    out.extend(self.encode_assistant(m, before_last_user)?);
                }
                Role::System => out.extend(self.encode_system(m)?),
            }
        }
        Ok(out)
    }

    fn check_v2_tool_results(
        &self,
        msgs: &[Msg],
        last_user: Option<usize>,
    ) -> Result<(), MistralError> {
        let mut tool_call_turn = false;
        let mut results = 0;
        for (i, m) in msgs.iter().enumerate() {
            if last_user.is_some_and(|l| i < l) {
                continue;
            }
            match m.role {
                Role::Assistant => {
                    tool_call_turn = m.calls.as_ref().is_some_and(|c| !c.is_empty());
                    results = 0;
                }
                Role::Tool if tool_call_turn => {
                    results += 1;
                    if results > 1 {
                        return Err(self.unsupported("several tool results for one assistant turn"));
                    }
                }
                Role::Tool => {}
                _ => {
                    tool_call_turn = false;
                    results = 0;
                }
            }
        }
        Ok(())
    }

    fn encode_user(
        &self,
        m: &Msg,
        tools: &[JsonValue],
        is_last: bool,
        is_first: bool,
        system_prompt: Option<&str>,
    ) -> Result<Vec<u32>, MistralError> {
        let system_prompt = system_prompt.filter(|s| !s.is_empty());
        let Some(Content::Text(text)) = &m.content else {
            return Err(MistralError::InvalidRequest(
                "user content must be text".into(),
            ));
        };
        if self.version == MistralVersion::V1 {
            let content = match system_prompt {
                Some(sp) if is_first => format!("{sp}\n\n{text}"),
                _ => text.clone(),
            };
            return Ok(self.text(&format!("[INST] {content} [/INST]")));
        }
        let s = &self.specials;
        let mut out = Vec::new();
        let tools_here = if self.version >= MistralVersion::V13 {
            is_first
        } else {
            is_last
        };
        if tools_here && !tools.is_empty() {
            out.push(s.begin_tools);
            out.extend(self.text(&JsonValue::Array(tools.to_vec()).to_python_json()));
            out.push(s.end_tools);
        }
        out.push(s.begin_inst);
        match system_prompt {
            Some(sp) if is_last && self.version < MistralVersion::V7 => {
                out.extend(self.text(&format!("{sp}\n\n{text}")));
            }
            _ => out.extend(self.text(text)),
        }
        out.push(s.end_inst);
        Ok(out)
    }

    fn encode_tool(&self, m: &Msg, before_last_user: bool) -> Result<Vec<u32>, MistralError> {
        let s = &self.specials;
        let content = match &m.content {
            Some(Content::Text(t)) => t.as_str(),
            None => "",
            Some(Content::Chunks(_)) => {
                return Err(MistralError::InvalidRequest(
                    "tool content must be text".into(),
                ));
            }
        };
        let call_id = || {
            m.call_id.clone().ok_or_else(|| {
                MistralError::InvalidRequest("a tool message needs its tool_call_id".into())
            })
        };
        let json = match self.version {
            MistralVersion::V1 => return Err(self.unsupported("tools")),
            MistralVersion::V2 => {
                if before_last_user {
                    return Ok(Vec::new());
                }
                let name = m.name.clone().map_or(JsonValue::Null, JsonValue::String);
                JsonValue::Array(vec![JsonValue::Object(vec![
                    ("name".into(), name),
                    ("content".into(), parse_json_content(content)),
                ])])
            }
            MistralVersion::V3 => JsonValue::Object(vec![
                ("content".into(), parse_json_content(content)),
                ("call_id".into(), JsonValue::String(call_id()?)),
            ]),
            MistralVersion::V7 | MistralVersion::V11 => {
                let mut out = vec![s.begin_tool_results];
                out.extend(self.text(&call_id()?));
                out.push(s.begin_tool_content);
                out.extend(self.text(content));
                out.push(s.end_tool_results);
                return Ok(out);
            }
            MistralVersion::V13 => {
                call_id()?;
                let mut out = vec![s.begin_tool_results];
                out.extend(self.text(content));
                out.push(s.end_tool_results);
                return Ok(out);
            }
        };
        let mut out = vec![s.begin_tool_results];
        out.extend(self.text(&json.to_python_json()));
        out.push(s.end_tool_results);
        Ok(out)
    }

    fn encode_assistant(&self, m: &Msg, before_last_user: bool) -> Result<Vec<u32>, MistralError> {
        let s = &self.specials;
        let calls: &[Call] = m.calls.as_deref().unwrap_or(&[]);
        let has_content = m.content.as_ref().is_some_and(Content::truthy);
        let mut out = Vec::new();
        match self.version {
            MistralVersion::V1 => {
                if !calls.is_empty() {
                    return Err(self.unsupported("tools"));
                }
                match &m.content {
                    Some(Content::Text(t)) if !t.is_empty() => out.extend(self.text(t)),
                    _ => {
                        return Err(MistralError::InvalidRequest(
                            "an assistant message needs text content".into(),
                        ));
                    }
                }
            }
            MistralVersion::V2 | MistralVersion::V3 => {
                if !calls.is_empty() && has_content {
                    return Err(MistralError::InvalidRequest(
                        "tool calls and content in one assistant message".into(),
                    ));
                }
                if !calls.is_empty() {
                    if self.version == MistralVersion::V2 && before_last_user {
                        return Ok(Vec::new());
                    }
                    out.extend(self.tool_calls_json(calls));
                } else {
                    match &m.content {
                        Some(Content::Text(t)) if !t.is_empty() => {
                            out.extend(self.text(t.trim_end_matches(' ')));
                        }
                        _ => {
                            return Err(MistralError::InvalidRequest(
                                "an assistant message needs text content or tool calls".into(),
                            ));
                        }
                    }
                }
            }
            MistralVersion::V7 | MistralVersion::V11 | MistralVersion::V13 => {
                if !has_content && calls.is_empty() {
                    return Err(MistralError::InvalidRequest(
                        "an assistant message needs content or tool calls".into(),
                    ));
                }
                match &m.content {
                    Some(Content::Text(t)) if !t.is_empty() => {
                        out.extend(self.text(t.trim_end_matches(' ')));
                    }
                    Some(Content::Chunks(chunks)) => out.extend(self.encode_chunks(chunks)?),
                    _ => {}
                }
                if !calls.is_empty() {
                    match self.version {
                        MistralVersion::V7 => out.extend(self.tool_calls_json(calls)),
                        _ => {
                            for c in calls {
                                out.push(s.tool_calls);
                                out.extend(self.text(&c.name));
                                if self.version == MistralVersion::V11 && id_given(&c.id) {
                                    out.push(s.call_id);
                                    out.extend(self.text(&c.id));
                                }
                                out.push(s.args);
                                out.extend(
                                    self.text(&parse_json_content(&c.arguments).to_python_json()),
                                );
                            }
                        }
                    }
                }
            }
        }
        if !m.prefix {
            out.push(s.eos);
        }
        Ok(out)
    }

    /// `[TOOL_CALLS]` and the JSON list of calls (v2-v7).
    fn tool_calls_json(&self, calls: &[Call]) -> Vec<u32> {
        let list = calls
            .iter()
            .map(|c| {
                let mut entry = vec![
                    ("name".to_owned(), JsonValue::String(c.name.clone())),
                    ("arguments".to_owned(), parse_json_content(&c.arguments)),
                ];
                if self.version >= MistralVersion::V3 && id_given(&c.id) {
                    entry.push(("id".to_owned(), JsonValue::String(c.id.clone())));
                }
                JsonValue::Object(entry)
            })
            .collect();
        let mut out = vec![self.specials.tool_calls];
        out.extend(self.text(&JsonValue::Array(list).to_python_json()));
        out
    }

    fn encode_system(&self, m: &Msg) -> Result<Vec<u32>, MistralError> {
        let mut out = vec![self.specials.begin_system];
        match &m.content {
            Some(Content::Text(t)) => out.extend(self.text(t)),
            Some(Content::Chunks(chunks)) => out.extend(self.encode_chunks(chunks)?),
            None => {}
        }
        out.push(self.specials.end_system);
        Ok(out)
    }

    fn encode_chunks(&self, chunks: &[Chunk]) -> Result<Vec<u32>, MistralError> {
        let mut out = Vec::new();
        for c in chunks {
            match c {
                Chunk::Text(t) => out.extend(self.text(t)),
                Chunk::Think { text, closed } => {
                    if self.version < MistralVersion::V13 {
                        return Err(self.unsupported("reasoning (thinking) chunks"));
                    }
                    let (Some(begin), Some(end)) =
                        (self.specials.begin_think, self.specials.end_think)
                    else {
                        return Err(self.unsupported(
                            "reasoning (thinking) chunks: the vocabulary has no [THINK] tokens",
                        ));
                    };
                    out.push(begin);
                    out.extend(self.text(text));
                    if *closed {
                        out.push(end);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Whether a tool call id counts as given (mistral-common's placeholder is `"null"`).
fn id_given(id: &str) -> bool {
    !id.is_empty() && id != "null"
}

/// `json.loads(text)` when it parses, else the text itself as a JSON string.
fn parse_json_content(text: &str) -> JsonValue {
    JsonValue::parse(text).unwrap_or_else(|_| JsonValue::String(text.to_owned()))
}

/// mistral-common's `_normalize_json_content`: empty becomes `{}`, JSON is re-printed, anything
/// else is kept.
fn normalize_json_content(text: &str) -> String {
    if text.is_empty() {
        return "{}".to_owned();
    }
    match JsonValue::parse(text) {
        Ok(v) => v.to_python_json(),
        Err(_) => text.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Messages after conversion from the request.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Clone, Debug, PartialEq)]
enum Chunk {
    Text(String),
    Think { text: String, closed: bool },
}

#[derive(Clone, Debug, PartialEq)]
enum Content {
    Text(String),
    Chunks(Vec<Chunk>),
}

impl Content {
    /// Python truthiness: a non-empty string or a non-empty list.
    fn truthy(&self) -> bool {
        match self {
            Content::Text(t) => !t.is_empty(),
            Content::Chunks(c) => !c.is_empty(),
        }
    }

    fn chunks(&self) -> &[Chunk] {
        match self {
            Content::Text(_) => &[],
            Content::Chunks(c) => c,
        }
    }
}

#[derive(Clone, Debug)]
struct Call {
    id: String,
    name: String,
    arguments: String,
}

#[derive(Clone, Debug)]
struct Msg {
    role: Role,
    content: Option<Content>,
    calls: Option<Vec<Call>>,
    call_id: Option<String>,
    name: Option<String>,
    prefix: bool,
}

impl Msg {
    fn empty_user() -> Msg {
        Msg {
            role: Role::User,
            content: Some(Content::Text(String::new())),
            calls: None,
            call_id: None,
            name: None,
            prefix: false,
        }
    }
}

fn invalid(message: impl Into<String>) -> MistralError {
    MistralError::InvalidRequest(message.into())
}

fn convert_content(content: &Option<MistralContent>) -> Result<Option<Content>, MistralError> {
    let Some(content) = content else {
        return Ok(None);
    };
    Ok(Some(match content {
        MistralContent::Text(t) => Content::Text(t.clone()),
        MistralContent::Chunks(chunks) => {
            let mut out = Vec::with_capacity(chunks.len());
            for c in chunks {
                match c.kind.as_str() {
                    "text" => out.push(Chunk::Text(
                        c.text
                            .clone()
                            .ok_or_else(|| invalid("a text chunk needs \"text\""))?,
                    )),
                    "thinking" => out.push(Chunk::Think {
                        text: c
                            .thinking
                            .clone()
                            .ok_or_else(|| invalid("a thinking chunk needs \"thinking\""))?,
                        closed: c.closed.unwrap_or(true),
                    }),
                    other => {
                        return Err(MistralError::Unsupported {
                            version: "any",
                            what: format!("{other:?} content chunks"),
                        });
                    }
                }
            }
            Content::Chunks(out)
        }
    }))
}

fn convert_message(m: &MistralMessage) -> Result<Msg, MistralError> {
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => return Err(invalid(format!("unknown message role {other:?}"))),
    };
    let mut msg = Msg {
        role,
        content: convert_content(&m.content)?,
        calls: None,
        call_id: None,
        name: None,
        prefix: false,
    };
    match role {
        Role::Assistant => {
            msg.prefix = m.prefix;
            if let Some(calls) = &m.tool_calls {
                msg.calls = Some(
                    calls
                        .iter()
                        .map(|c| Call {
                            id: c.id.clone().unwrap_or_else(|| "null".to_owned()),
                            name: c.function.name.clone(),
                            arguments: match &c.function.arguments {
                                JsonValue::String(s) => s.clone(),
                                other => other.to_python_json(),
                            },
                        })
                        .collect(),
                );
            }
            let thinking = match (&m.reasoning_content, &m.reasoning) {
                (None, None) => None,
                (Some(a), Some(b)) if a != b => {
                    return Err(invalid("reasoning_content and reasoning differ"));
                }
                (Some(a), _) => Some(a.clone()),
                (None, Some(b)) => Some(b.clone()),
            };
            if let Some(text) = thinking {
                let think = Chunk::Think { text, closed: true };
                msg.content = Some(match msg.content.take() {
                    None => Content::Chunks(vec![think]),
                    Some(Content::Text(t)) => Content::Chunks(vec![think, Chunk::Text(t)]),
                    Some(Content::Chunks(mut c)) => {
                        if c.iter().any(|x| matches!(x, Chunk::Think { .. })) {
                            return Err(invalid(
                                "thinking chunks in content and a reasoning field together",
                            ));
                        }
                        c.insert(0, think);
                        Content::Chunks(c)
                    }
                });
            }
        }
        Role::Tool => {
            msg.call_id = Some(
                m.tool_call_id
                    .clone()
                    .ok_or_else(|| invalid("a tool message needs tool_call_id"))?,
            );
            msg.name.clone_from(&m.name);
        }
        Role::System | Role::User => {}
    }
    Ok(msg)
}

fn convert(request: &MistralChatRequest) -> Result<Vec<Msg>, MistralError> {
    let mut msgs = request
        .messages
        .iter()
        .map(convert_message)
        .collect::<Result<Vec<_>, _>>()?;
    if request.continue_final_message {
        match msgs.last_mut() {
            Some(m) if m.role == Role::Assistant => m.prefix = true,
            _ => {
                return Err(invalid(
                    "continue_final_message needs an assistant message last",
                ));
            }
        }
    }
    Ok(msgs)
}

/// Tools as mistral-common dumps them: `{"type": ..., "function": {"name", "description",
/// "parameters"}}`.
fn convert_tools(request: &MistralChatRequest) -> Result<Vec<JsonValue>, MistralError> {
    let Some(tools) = &request.tools else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(tools.len());
    for t in tools {
        let kind = t.kind.clone().unwrap_or_else(|| "function".to_owned());
        if kind != "function" {
            return Err(invalid(format!("tool type {kind:?} (only \"function\")")));
        }
        if !valid_name(&t.function.name) {
            return Err(invalid(format!(
                "function name {:?} must be 1-64 of a-z, A-Z, 0-9, _ and -",
                t.function.name
            )));
        }
        let parameters = t
            .function
            .parameters
            .clone()
            .unwrap_or(JsonValue::Object(Vec::new()));
        if !matches!(parameters, JsonValue::Object(_)) {
            return Err(invalid("function parameters must be a JSON object"));
        }
        out.push(JsonValue::Object(vec![
            ("type".into(), JsonValue::String(kind)),
            (
                "function".into(),
                JsonValue::Object(vec![
                    ("name".into(), JsonValue::String(t.function.name.clone())),
                    (
                        "description".into(),
                        JsonValue::String(t.function.description.clone().unwrap_or_default()),
                    ),
                    ("parameters".into(), parameters),
                ]),
            ),
        ]));
    }
    Ok(out)
}

/// `^[a-zA-Z0-9_-]{1,64}$`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `^[a-zA-Z0-9]{9}$`.
fn valid_call_id(id: &str) -> bool {
    id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

// ---------------------------------------------------------------------------------------------
// Validation (mistral-common's `MistralRequestValidator*`, default "test" mode).

fn validate(
    version: MistralVersion,
    msgs: &[Msg],
    _tools: &[JsonValue],
) -> Result<(), MistralError> {
    use MistralVersion::{V3, V7, V11, V13};
    let Some(last) = msgs.last() else {
        return Err(invalid("the conversation has no messages"));
    };
    if msgs.len() == 1 && !matches!(last.role, Role::User | Role::System) {
        return Err(invalid(
            "the conversation must start with a user or system message",
        ));
    }
    if msgs.len() > 1 && last.role == Role::Assistant && !last.prefix {
        return Err(invalid(
            "the last message must be a user or tool message (or an assistant prefix)",
        ));
    }
    for pair in msgs.windows(2) {
        let [a, b] = pair else { continue };
        let ok = match a.role {
            Role::System | Role::User => {
                matches!(b.role, Role::User | Role::Assistant | Role::System)
            }
            Role::Assistant | Role::Tool => {
                matches!(b.role, Role::Assistant | Role::User | Role::Tool)
            }
        };
        if !ok {
            return Err(invalid(format!(
                "unexpected role {:?} after role {:?}",
                b.role, a.role
            )));
        }
    }
    check_tool_pairing(version, msgs)?;

    for (i, m) in msgs.iter().enumerate() {
        let is_last = i + 1 == msgs.len();
        let has_think = m
            .content
            .as_ref()
            .is_some_and(|c| c.chunks().iter().any(|x| matches!(x, Chunk::Think { .. })));
        match m.role {
            Role::User => {
                if has_think {
                    return Err(invalid("thinking chunks in a user message"));
                }
            }
            Role::Assistant => {
                if has_think && version < V11 {
                    return Err(invalid("thinking chunks in an assistant message"));
                }
                let has_calls = m.calls.as_ref().is_some_and(|c| !c.is_empty());
                let has_content = m.content.as_ref().is_some_and(Content::truthy);
                if version < V7 && has_content == has_calls {
                    return Err(invalid(
                        "an assistant message needs either content or tool calls, not both",
                    ));
                }
                for c in m.calls.iter().flatten() {
                    if version >= V13 {
                        if !id_given(&c.id) {
                            return Err(invalid("tool calls need an id"));
                        }
                    } else if version >= V3 && !valid_call_id(&c.id) {
                        return Err(invalid(format!(
                            "tool call id {:?} must be 9 characters of a-z, A-Z, 0-9",
                            c.id
                        )));
                    }
                    if !valid_name(&c.name) {
                        return Err(invalid(format!(
                            "function name {:?} must be 1-64 of a-z, A-Z, 0-9, _ and -",
                            c.name
                        )));
                    }
                }
                if m.prefix && !is_last {
                    return Err(invalid(
                        "a prefix assistant message must be the last message",
                    ));
                }
            }
            Role::Tool => {
                if has_think {
                    return Err(invalid("thinking chunks in a tool message"));
                }
                if let Some(name) = &m.name
                    && !valid_name(name)
                {
                    return Err(invalid(format!(
                        "tool name {name:?} must be 1-64 of a-z, A-Z, 0-9, _ and -"
                    )));
                }
                let id = m.call_id.as_deref().unwrap_or("");
                if version >= V13 {
                    if !id_given(id) {
                        return Err(invalid("tool messages need a tool_call_id"));
                    }
                } else if version >= V3 && !valid_call_id(id) {
                    return Err(invalid(format!(
                        "tool_call_id {id:?} must be 9 characters of a-z, A-Z, 0-9"
                    )));
                }
            }
            Role::System => {
                if m.content.is_none() {
                    return Err(invalid("a system message needs content"));
                }
                if has_think && version < V7 {
                    return Err(invalid("thinking chunks in a system message"));
                }
            }
        }
    }
    Ok(())
}

/// Each assistant turn's tool calls must be answered before the next assistant message (by
/// count before v11, by id from v11 on). The first message is not looked at, as in
/// mistral-common.
fn check_tool_pairing(version: MistralVersion, msgs: &[Msg]) -> Result<(), MistralError> {
    let mismatch = || invalid("not the same number of function calls and responses");
    if version < MistralVersion::V11 {
        let mut expected: i64 = 0;
        for m in msgs.iter().skip(1) {
            match m.role {
                Role::Tool => expected -= 1,
                Role::Assistant => {
                    if expected != 0 {
                        return Err(mismatch());
                    }
                    if let Some(calls) = &m.calls {
                        expected = calls.len() as i64;
                    }
                }
                _ => {}
            }
        }
        return Ok(());
    }
    let mut expected: Vec<&str> = Vec::new();
    let mut observed: Vec<&str> = Vec::new();
    for m in msgs.iter().skip(1) {
        match m.role {
            Role::Tool => {
                let id = m.call_id.as_deref().unwrap_or("");
                if observed.contains(&id) {
                    return Err(invalid(format!("duplicate tool call id {id:?} in results")));
                }
                if !expected.contains(&id) {
                    return Err(invalid(format!(
                        "unexpected tool call id {id:?} in results"
                    )));
                }
                observed.push(id);
            }
            Role::Assistant => {
                if expected.len() != observed.len() {
                    return Err(mismatch());
                }
                expected.clear();
                observed.clear();
                for c in m.calls.iter().flatten() {
                    if expected.contains(&c.id.as_str()) {
                        return Err(invalid(format!("duplicate tool call id {:?}", c.id)));
                    }
                    expected.push(&c.id);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Normalisation (mistral-common's `InstructRequestNormalizer*`).

struct Normalized {
    messages: Vec<Msg>,
    /// v1-v3: all system messages, joined.
    system_prompt: Option<String>,
}

/// Merges the contents of several messages: text joined with `msg_join` across messages and
/// `chunk_join` within one; a non-text chunk ends the current text.
fn aggregate_content<'a>(
    contents: impl IntoIterator<Item = Option<&'a Content>>,
    msg_join: &str,
    chunk_join: &str,
) -> Content {
    let mut all: Vec<Chunk> = Vec::new();
    let mut cur = String::new();
    let mut cur_parts = 0usize;
    let flush = |cur: &mut String, cur_parts: &mut usize, all: &mut Vec<Chunk>| {
        if *cur_parts > 0 {
            all.push(Chunk::Text(std::mem::take(cur)));
            *cur_parts = 0;
        }
    };
    for content in contents {
        let mut needs_msg_sep = cur_parts > 0;
        let Some(content) = content.filter(|c| c.truthy()) else {
            continue;
        };
        match content {
            Content::Text(t) => {
                if needs_msg_sep {
                    cur.push_str(msg_join);
                }
                cur.push_str(t);
                cur_parts += 1;
            }
            Content::Chunks(chunks) => {
                for chunk in chunks {
                    match chunk {
                        Chunk::Text(t) => {
                            if t.is_empty() {
                                continue;
                            }
                            if cur_parts == 0 {
                            } else if needs_msg_sep {
                                cur.push_str(msg_join);
                            } else {
                                cur.push_str(chunk_join);
                            }
                            cur.push_str(t);
                            cur_parts += 1;
                            needs_msg_sep = false;
                        }
                        other => {
                            flush(&mut cur, &mut cur_parts, &mut all);
                            all.push(other.clone());
                        }
                    }
                }
            }
        }
    }
    if all.is_empty() {
        return Content::Text(cur);
    }
    flush(&mut cur, &mut cur_parts, &mut all);
    Content::Chunks(all)
}

const JOIN: &str = "\n\n";

fn normalize(version: MistralVersion, msgs: &[Msg]) -> Result<Normalized, MistralError> {
    let v7 = version >= MistralVersion::V7;
    let system_prompt = if v7 {
        None
    } else {
        let parts: Vec<String> = msgs
            .iter()
            .filter(|m| m.role == Role::System && m.content.as_ref().is_some_and(Content::truthy))
            .map(
                |m| match aggregate_content([m.content.as_ref()], JOIN, JOIN) {
                    Content::Text(t) => Ok(t),
                    Content::Chunks(_) => Err(invalid("system content must be text")),
                },
            )
            .collect::<Result<_, _>>()?;
        if parts.is_empty() {
            None
        } else {
            Some(parts.join(JOIN))
        }
    };

    let mut out: Vec<Msg> = Vec::new();
    let mut latest_call_ids: Vec<String> = Vec::new();
    let mut start = 0;
    while start < msgs.len() {
        let role = msgs.get(start).map(|m| m.role);
        let end = msgs
            .iter()
            .skip(start)
            .position(|m| Some(m.role) != role)
            .map_or(msgs.len(), |p| start + p);
        let group = msgs.get(start..end).unwrap_or(&[]);
        match role {
            Some(Role::Tool) => {
                let mut tools = Vec::with_capacity(group.len());
                for m in group {
                    let content = match aggregate_content([m.content.as_ref()], JOIN, JOIN) {
                        Content::Text(t) => t,
                        Content::Chunks(_) => return Err(invalid("tool content must be text")),
                    };
                    let content = if v7 {
                        content
                    } else {
                        normalize_json_content(&content)
                    };
                    tools.push(Msg {
                        content: Some(Content::Text(content)),
                        ..m.clone()
                    });
                }
                if version >= MistralVersion::V11 {
                    sort_tool_results(&mut tools, &latest_call_ids);
                }
                latest_call_ids.clear();
                out.extend(tools);
            }
            Some(Role::Assistant) => {
                let content =
                    aggregate_content(group.iter().map(|m| m.content.as_ref()), JOIN, JOIN);
                let mut calls = Vec::new();
                let mut prefix = false;
                for m in group {
                    if !v7
                        && m.calls.as_ref().is_some_and(|c| !c.is_empty())
                        && m.content.as_ref().is_some_and(Content::truthy)
                    {
                        return Err(invalid(
                            "tool calls and content cannot be in one assistant message",
                        ));
                    }
                    for c in m.calls.iter().flatten() {
                        calls.push(Call {
                            arguments: normalize_json_content(&c.arguments),
                            ..c.clone()
                        });
                    }
                    prefix |= m.prefix;
                }
                latest_call_ids.extend(calls.iter().map(|c| c.id.clone()));
                out.push(Msg {
                    role: Role::Assistant,
                    content: Some(content),
                    calls: if calls.is_empty() { None } else { Some(calls) },
                    call_id: None,
                    name: None,
                    prefix,
                });
            }
            Some(Role::User) => out.push(Msg {
                content: Some(aggregate_content(
                    group.iter().map(|m| m.content.as_ref()),
                    JOIN,
                    JOIN,
                )),
                ..Msg::empty_user()
            }),
            Some(Role::System) if v7 => {
                for m in group {
                    out.push(Msg {
                        role: Role::System,
                        content: Some(aggregate_content([m.content.as_ref()], JOIN, JOIN)),
                        calls: None,
                        call_id: None,
                        name: None,
                        prefix: false,
                    });
                }
            }
            Some(Role::System) | None => {}
        }
        start = end;
    }
    let needs_user = match out.first() {
        None => true,
        Some(first) => !v7 && first.role != Role::User,
    };
    if needs_user {
        out.insert(0, Msg::empty_user());
    }
    Ok(Normalized {
        messages: out,
        system_prompt,
    })
}

/// v11+: tool results follow the order of the calls they answer (stable otherwise).
fn sort_tool_results(tools: &mut [Msg], latest_call_ids: &[String]) {
    let call_index = |id: &str| latest_call_ids.iter().rposition(|c| c == id);
    let result_index = |tools: &[Msg], id: Option<&str>| {
        tools
            .iter()
            .rposition(|t| t.call_id.as_deref() == id)
            .unwrap_or(0)
    };
    let keys: Vec<(usize, usize)> = tools
        .iter()
        .map(|t| {
            let id = t.call_id.as_deref();
            (
                call_index(id.unwrap_or("null")).unwrap_or(usize::MAX),
                result_index(tools, id),
            )
        })
        .collect();
    let mut order: Vec<usize> = (0..tools.len()).collect();
    order.sort_by_key(|&i| keys.get(i).copied().unwrap_or((usize::MAX, usize::MAX)));
    let sorted: Vec<Msg> = order
        .iter()
        .filter_map(|&i| tools.get(i).cloned())
        .collect();
    for (slot, m) in tools.iter_mut().zip(sorted) {
        *slot = m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tekken::version_number;

    fn text(t: &str) -> Content {
        Content::Text(t.into())
    }

    #[test]
    fn aggregation_joins_like_mistral_common() {
        let a = text("one");
        let b = text("");
        let c = Content::Chunks(vec![
            Chunk::Text("x".into()),
            Chunk::Text("y".into()),
            Chunk::Think {
                text: "t".into(),
                closed: true,
            },
            Chunk::Text("z".into()),
        ]);
        assert_eq!(
            aggregate_content([Some(&a), Some(&b), None, Some(&a)], JOIN, JOIN),
            text("one\n\none")
        );
        assert_eq!(
            aggregate_content([Some(&a), Some(&c)], JOIN, "|"),
            Content::Chunks(vec![
                Chunk::Text("one\n\nx|y".into()),
                Chunk::Think {
                    text: "t".into(),
                    closed: true
                },
                Chunk::Text("z".into()),
            ])
        );
        assert_eq!(aggregate_content([None], JOIN, JOIN), text(""));
    }

    #[test]
    fn json_content_is_normalised_like_python() {
        assert_eq!(normalize_json_content(""), "{}");
        assert_eq!(
            normalize_json_content("{\"b\":1,\"a\":\"é\"}"),
            "{\"b\": 1, \"a\": \"é\"}"
        );
        assert_eq!(normalize_json_content("not json"), "not json");
        assert_eq!(parse_json_content("25"), JsonValue::Int(25));
        assert_eq!(parse_json_content("cold"), JsonValue::String("cold".into()));
    }

    #[test]
    fn names_and_ids() {
        assert!(valid_name("get_weather-2"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(valid_call_id("abcDEF789"));
        assert!(!valid_call_id("call_1234"));
        assert_eq!(version_number("v13"), Some(13));
        assert_eq!(version_number("v4"), None);
    }
}
