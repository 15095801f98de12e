//! Stop sequences over streamed text: text that might be the start of a stop sequence is held
//! back until it is known not to be one, so a client never sees part of a stop string.

/// Holds generated text until it is safe to release.
pub(crate) struct StopMatcher {
    /// The non-empty stop strings, each with its index in the request's list.
    stops: Vec<(usize, String)>,
    pending: String,
}

/// What to do with newly generated text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StopOutcome {
    /// Send this (possibly empty) text and continue.
    Continue(String),
    /// Send this text, then stop: the stop sequence of this index (in the request's list)
    /// matched right after it.
    Stopped(String, usize),
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        let stops = stops
            .into_iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Adds generated text; returns what may be sent now.
    pub(crate) fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        // The earliest match wins; at one position, the first stop in the request's list.
        if let Some((at, index)) = self
            .stops
            .iter()
            .filter_map(|(index, s)| self.pending.find(s.as_str()).map(|at| (at, *index)))
            .min()
        {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return StopOutcome::Stopped(out, index);
        }
        // Keep the longest suffix of `pending` that is a proper prefix of some stop string.
        let mut keep = 0;
        for (_, s) in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.pending.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// The generation ended without a stop match: release what was held back.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out += &t,
                StopOutcome::Stopped(t, _) => return (out + &t, true),
            }
        }
        (out + &m.finish(), false)
    }

    #[test]
    fn stop_split_across_pieces_is_never_sent() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D more"]),
            ("abc ".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "x"]),
            ("abc ENx".into(), false)
        );
    }

    #[test]
    fn earliest_match_wins_and_unicode_is_respected() {
        assert_eq!(run(&["é!", "b"], &["aé", "!b"]), ("a".into(), true));
        assert_eq!(run(&["ü"], &["aéü"]), ("aé".into(), true));
        assert_eq!(run(&[], &["x", "y"]), ("xy".into(), false));
    }

    #[test]
    fn the_matched_stop_is_named_by_its_index_in_the_request() {
        let mut m = StopMatcher::new(vec!["".into(), "zz".into(), "END".into()]);
        assert_eq!(m.push("ab EN"), StopOutcome::Continue("ab ".into()));
        assert_eq!(m.push("D"), StopOutcome::Stopped(String::new(), 2));
    }

    #[test]
    fn held_text_is_released_at_the_end() {
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("hi\n"), StopOutcome::Continue("hi".into()));
        assert_eq!(m.finish(), "\n");
    }
}
