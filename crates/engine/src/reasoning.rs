//! Counting reasoning tokens: which generated tokens fall inside the model's reasoning block
//! (`<think>`...`</think>`, `[THINK]`...`[/THINK]`), for `usage.completion_tokens_details.
//! reasoning_tokens`.
//!
//! The rule is the one the API's output parser applies to the text: one block, at the start
//! of the output (or already open when the prompt opened it); an opening marker after other
//! text is just text. A token counts as reasoning if the block was open before it or is open
//! after it, so both markers count.

use crate::ReasoningSpec;

/// Follows one generation's text, token by token.
#[derive(Debug)]
pub(crate) struct ReasoningCounter {
    spec: ReasoningSpec,
    state: State,
    /// Text not yet matched against a marker (at most a marker's length, less one byte).
    tail: String,
    count: usize,
    /// Tokens seen at the start that may belong to an opening marker not complete yet.
    waiting: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: an opening marker may come.
    Start,
    Inside,
    /// The block is over, or text came first: no more reasoning.
    After,
}

impl ReasoningCounter {
    pub(crate) fn new(spec: ReasoningSpec) -> Self {
        let state = if spec.starts_inside {
            State::Inside
        } else {
            State::Start
        };
        Self {
            spec,
            state,
            tail: String::new(),
            count: 0,
            waiting: 0,
        }
    }

    /// Takes the text one generated token produced (possibly empty).
    pub(crate) fn push(&mut self, piece: &str) {
        let before = self.state;
        if self.state != State::After {
            self.tail.push_str(piece);
            self.scan();
        }
        match (before, self.state) {
            (State::Start, State::Start) => self.waiting += 1,
            // The tokens that spelled the opening marker count with it.
            (State::Start, State::Inside) => self.count += std::mem::take(&mut self.waiting) + 1,
            (State::Inside, _) => self.count += 1,
            _ => self.waiting = 0,
        }
    }

    /// Tokens counted as reasoning so far.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    fn scan(&mut self) {
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.tail.trim_start();
                    if trimmed.starts_with(self.spec.open.as_str()) {
                        self.tail = trimmed[self.spec.open.len()..].to_owned();
                        self.state = State::Inside;
                    } else if self.spec.open.starts_with(trimmed) {
                        // Whitespace and perhaps the start of the marker: wait for more.
                        return;
                    } else {
                        self.state = State::After;
                        self.tail.clear();
                        return;
                    }
                }
                State::Inside => {
                    if self.tail.contains(self.spec.close.as_str()) {
                        self.tail.clear();
                        self.state = State::After;
                    } else {
                        let keep = self.spec.close.len().saturating_sub(1);
                        let mut cut = self.tail.len().saturating_sub(keep);
                        while !self.tail.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        self.tail.drain(..cut);
                    }
                    return;
                }
                State::After => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(starts_inside: bool) -> ReasoningSpec {
        ReasoningSpec {
            open: "<think>".into(),
            close: "</think>".into(),
            starts_inside,
        }
    }

    fn count(starts_inside: bool, pieces: &[&str]) -> usize {
        let mut c = ReasoningCounter::new(spec(starts_inside));
        for p in pieces {
            c.push(p);
        }
        c.count()
    }

    #[test]
    fn markers_split_over_tokens_are_found() {
        // "<think>" "a" "b" "</" "think>" "answer"
        assert_eq!(count(false, &["<think>", "a", "b", "</", "think>", "x"]), 5);
        // Whitespace before the marker and the marker's pieces count with the block.
        assert_eq!(
            count(false, &["\n", "<th", "ink>", "a", "</think>", "x", "y"]),
            5
        );
    }

    #[test]
    fn prompt_opened_block_counts_from_the_first_token() {
        assert_eq!(count(true, &["a", "b", "</think>", "c"]), 3);
        assert_eq!(count(true, &["a", "b"]), 2);
    }

    #[test]
    fn an_opening_marker_after_text_is_text() {
        assert_eq!(count(false, &["hi", "<think>", "a", "</think>"]), 0);
    }

    #[test]
    fn multibyte_text_inside_does_not_break_the_tail() {
        assert_eq!(count(true, &["é", "日本", "</thi", "nk>", "z"]), 4);
    }
}
