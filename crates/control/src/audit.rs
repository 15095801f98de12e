//! The tamper-evident audit log. Each entry's hash is SHA-256 over the previous entry's hash
//! and the entry's own fields (each length-prefixed, so no two different entries hash the same
//! bytes); the store also keeps the chain's head (last sequence number and hash) in a row of
//! its own, updated in the same transaction as each append.
//!
//! [`verify`] walks the log in sequence order and tells each kind of tampering apart by the
//! shape of the broken links: an *edited* entry no longer matches its own hash; a *deleted*
//! entry leaves a successor whose predecessor hash names no entry; an *inserted* entry is one
//! that nothing links to while its neighbours link past it; a *reordered* entry names as its
//! predecessor an entry that comes after it. Deleting entries at the end shows against the
//! head row. Whoever can rewrite the whole log and the head together can forge a consistent
//! chain: publish [`VerifyReport::head_hash`] elsewhere to anchor it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::to_hex;

/// The predecessor hash of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An entry before it is appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditDraft {
    /// When it happened.
    pub at_ms: i64,
    /// Who did it: `admin`, `key:<id>`, `anonymous`, `system`.
    pub actor: String,
    /// What: `org.create`, `key.revoke`, `key.use`, `auth.failure`, ...
    pub action: String,
    /// What it was done to (an id, or empty).
    pub target: String,
    /// Details as compact JSON.
    pub detail: String,
}

/// An entry in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its position, from 1.
    pub seq: i64,
    /// When it happened.
    pub at_ms: i64,
    /// Who did it.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// Details as compact JSON.
    pub detail: String,
    /// The previous entry's hash (hex), [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// This entry's hash (hex).
    pub hash: String,
}

/// The chain's head as the store records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// The last sequence number (0 for an empty log).
    pub seq: i64,
    /// The last hash ([`GENESIS_HASH`] for an empty log).
    pub hash: String,
}

impl AuditHead {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        AuditHead {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// The hash of an entry with these fields after `prev_hash`.
pub fn entry_hash(prev_hash: &str, draft: &AuditDraft) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(prev_hash.as_bytes());
    field(&draft.at_ms.to_le_bytes());
    field(draft.actor.as_bytes());
    field(draft.action.as_bytes());
    field(draft.target.as_bytes());
    field(draft.detail.as_bytes());
    to_hex(&hasher.finalize())
}

/// The entry that follows `head`; the store writes it and makes it the new head.
pub fn seal(head: &AuditHead, draft: &AuditDraft) -> AuditEntry {
    AuditEntry {
        seq: head.seq.saturating_add(1),
        at_ms: draft.at_ms,
        actor: draft.actor.clone(),
        action: draft.action.clone(),
        target: draft.target.clone(),
        detail: draft.detail.clone(),
        prev_hash: head.hash.clone(),
        hash: entry_hash(&head.hash, draft),
    }
}

impl AuditEntry {
    fn draft(&self) -> AuditDraft {
        AuditDraft {
            at_ms: self.at_ms,
            actor: self.actor.clone(),
            action: self.action.clone(),
            target: self.target.clone(),
            detail: self.detail.clone(),
        }
    }
}

/// One finding of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Tamper {
    /// The entry's fields no longer match its hash, or its sequence number was changed.
    Edited {
        /// The entry.
        seq: i64,
    },
    /// Entries are missing before `before_seq` (`None`: at the end of the log).
    Deleted {
        /// The last intact entry before the gap (0: the start).
        after_seq: i64,
        /// The first entry after the gap, `None` when the end was cut.
        before_seq: Option<i64>,
        /// How many entries the sequence numbers say are missing.
        missing: i64,
    },
    /// The entry was not appended through the chain.
    Inserted {
        /// The entry.
        seq: i64,
    },
    /// The entry comes before an entry it was chained after.
    Reordered {
        /// The entry out of place.
        seq: i64,
        /// The entry it should follow.
        should_follow_seq: i64,
    },
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tamper::Edited { seq } => write!(f, "entry #{seq} was edited"),
            Tamper::Deleted {
                after_seq,
                before_seq: Some(before),
                missing,
            } => write!(
                f,
                "{missing} entr{} deleted between #{after_seq} and #{before}",
                if *missing == 1 { "y was" } else { "ies were" }
            ),
            Tamper::Deleted {
                after_seq,
                before_seq: None,
                missing,
            } => write!(
                f,
                "{missing} entr{} deleted after #{after_seq}, at the end of the log",
                if *missing == 1 { "y was" } else { "ies were" }
            ),
            Tamper::Inserted { seq } => write!(f, "entry #{seq} was inserted"),
            Tamper::Reordered {
                seq,
                should_follow_seq,
            } => write!(
                f,
                "entry #{seq} was moved: it was chained after entry #{should_follow_seq}"
            ),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: usize,
    /// The head's sequence number as the store records it.
    pub head_seq: i64,
    /// The head's hash: publish it to anchor the chain.
    pub head_hash: String,
    /// Every problem found, in log order; empty when the chain is intact.
    pub problems: Vec<Tamper>,
}

impl VerifyReport {
    /// True when nothing was found.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a log read in sequence order against its recorded head.
pub fn verify(entries: &[AuditEntry], head: &AuditHead) -> VerifyReport {
    let mut problems = Vec::new();
    let position: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.hash.as_str(), i))
        .collect();
    let linked_to: HashSet<&str> = entries.iter().map(|e| e.prev_hash.as_str()).collect();
    let is_referenced = |e: &AuditEntry| linked_to.contains(e.hash.as_str());

    for (i, entry) in entries.iter().enumerate() {
        if entry_hash(&entry.prev_hash, &entry.draft()) != entry.hash {
            problems.push(Tamper::Edited { seq: entry.seq });
        }
        let (prev_seq, expected_prev) = match i.checked_sub(1).and_then(|p| entries.get(p)) {
            Some(prev) => (prev.seq, prev.hash.as_str()),
            None => (0, GENESIS_HASH),
        };
        if entry.prev_hash == expected_prev {
            if entry.seq != prev_seq.saturating_add(1)
                && !matches!(problems.last(), Some(Tamper::Edited { seq }) if *seq == entry.seq)
            {
                problems.push(Tamper::Edited { seq: entry.seq });
            }
            continue;
        }
        match position.get(entry.prev_hash.as_str()).copied() {
            // Chained after an entry that now comes later: moved.
            Some(j) if j > i => problems.push(Tamper::Reordered {
                seq: entry.seq,
                should_follow_seq: entries.get(j).map_or(0, |e| e.seq),
            }),
            // Chained after an earlier entry: whatever sits between and nothing links to
            // was inserted. (Entries something links to were moved, and reported there.)
            Some(j) => {
                for between in entries.iter().take(i).skip(j + 1) {
                    if !is_referenced(between)
                        && !problems.contains(&Tamper::Inserted { seq: between.seq })
                    {
                        problems.push(Tamper::Inserted { seq: between.seq });
                    }
                }
            }
            None => {
                // Nothing links to this entry and the next one links past it: it was
                // inserted, and the next step reports it.
                let next_links_past = entries
                    .get(i + 1)
                    .is_some_and(|next| next.prev_hash == expected_prev);
                if next_links_past && !is_referenced(entry) {
                    continue;
                }
                problems.push(Tamper::Deleted {
                    after_seq: prev_seq,
                    before_seq: Some(entry.seq),
                    missing: entry.seq.saturating_sub(prev_seq).saturating_sub(1).max(1),
                });
            }
        }
    }

    // The end of the log against the head row.
    let (last_seq, last_hash) = entries
        .last()
        .map_or((0, GENESIS_HASH), |e| (e.seq, e.hash.as_str()));
    if last_hash != head.hash {
        if let Some(j) = position.get(head.hash.as_str()).copied() {
            // The head is inside the log: whatever follows it was appended outside the chain.
            for e in entries.iter().skip(j + 1) {
                problems.push(Tamper::Inserted { seq: e.seq });
            }
        } else if head.seq > last_seq {
            problems.push(Tamper::Deleted {
                after_seq: last_seq,
                before_seq: None,
                missing: head.seq - last_seq,
            });
        } else {
            // The head names no entry and no later position: the last entry was replaced.
            problems.push(Tamper::Edited { seq: last_seq });
        }
    }

    VerifyReport {
        entries: entries.len(),
        head_seq: head.seq,
        head_hash: head.hash.clone(),
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(n: i64) -> AuditDraft {
        AuditDraft {
            at_ms: 1_000 + n,
            actor: "admin".into(),
            action: "org.create".into(),
            target: format!("org_{n}"),
            detail: format!("{{\"n\":{n}}}"),
        }
    }

    /// A chain of `n` entries and its head.
    fn chain(n: i64) -> (Vec<AuditEntry>, AuditHead) {
        let mut head = AuditHead::genesis();
        let mut entries = Vec::new();
        for i in 1..=n {
            let entry = seal(&head, &draft(i));
            head = AuditHead {
                seq: entry.seq,
                hash: entry.hash.clone(),
            };
            entries.push(entry);
        }
        (entries, head)
    }

    #[test]
    fn intact_chain_verifies() {
        let (entries, head) = chain(6);
        let report = verify(&entries, &head);
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!(report.entries, 6);
        assert!(verify(&[], &AuditHead::genesis()).is_intact());
    }

    #[test]
    fn each_field_is_covered_by_the_hash() {
        let (entries, head) = chain(3);
        for field in 0..5 {
            let mut tampered = entries.clone();
            let e = &mut tampered[1];
            match field {
                0 => e.at_ms += 1,
                1 => e.actor.push('x'),
                2 => e.action.push('x'),
                3 => e.target.push('x'),
                _ => e.detail.push(' '),
            }
            assert_eq!(
                verify(&tampered, &head).problems,
                vec![Tamper::Edited { seq: 2 }],
                "field {field}"
            );
        }
    }

    #[test]
    fn deletion_in_the_middle_and_at_the_end() {
        let (entries, head) = chain(6);
        let mut middle = entries.clone();
        middle.remove(2);
        assert_eq!(
            verify(&middle, &head).problems,
            vec![Tamper::Deleted {
                after_seq: 2,
                before_seq: Some(4),
                missing: 1
            }]
        );
        let mut first = entries.clone();
        first.remove(0);
        assert_eq!(
            verify(&first, &head).problems,
            vec![Tamper::Deleted {
                after_seq: 0,
                before_seq: Some(2),
                missing: 1
            }]
        );
        let mut tail = entries.clone();
        tail.truncate(4);
        assert_eq!(
            verify(&tail, &head).problems,
            vec![Tamper::Deleted {
                after_seq: 4,
                before_seq: None,
                missing: 2
            }]
        );
    }

    /// An entry forged with a correct hash, placed at `index` with the later entries
    /// renumbered, as an attacker with write access to the table would.
    fn insert_forged(entries: &[AuditEntry], index: usize, chained: bool) -> Vec<AuditEntry> {
        let mut out = entries.to_vec();
        let prev = if chained {
            out[index - 1].hash.clone()
        } else {
            "ab".repeat(32)
        };
        let forged_draft = draft(99);
        let forged = AuditEntry {
            seq: out[index].seq,
            hash: entry_hash(&prev, &forged_draft),
            prev_hash: prev,
            at_ms: forged_draft.at_ms,
            actor: forged_draft.actor,
            action: forged_draft.action,
            target: forged_draft.target,
            detail: forged_draft.detail,
        };
        for e in out.iter_mut().skip(index) {
            e.seq += 1;
        }
        out.insert(index, forged);
        out
    }

    #[test]
    fn insertion_is_named() {
        let (entries, head) = chain(5);
        for chained in [true, false] {
            let tampered = insert_forged(&entries, 2, chained);
            assert_eq!(
                verify(&tampered, &head).problems,
                vec![Tamper::Inserted { seq: 3 }],
                "chained {chained}"
            );
        }
        // Appended at the end with a correct link: the head row does not name it.
        let (mut appended, head) = chain(3);
        let extra = seal(
            &AuditHead {
                seq: 3,
                hash: appended[2].hash.clone(),
            },
            &draft(9),
        );
        appended.push(extra);
        assert_eq!(
            verify(&appended, &head).problems,
            vec![Tamper::Inserted { seq: 4 }]
        );
    }

    #[test]
    fn reordering_is_named() {
        let (entries, head) = chain(6);
        // Swap #3 and #4 by exchanging their sequence numbers.
        let mut swapped = entries.clone();
        swapped.swap(2, 3);
        swapped[2].seq = 3;
        swapped[3].seq = 4;
        assert_eq!(
            verify(&swapped, &head).problems,
            vec![Tamper::Reordered {
                seq: 3,
                should_follow_seq: 4
            }]
        );
        // Move #2 to after #5.
        let mut moved = entries.clone();
        let e = moved.remove(1);
        moved.insert(4, e);
        for (i, e) in moved.iter_mut().enumerate() {
            e.seq = i as i64 + 1;
        }
        let problems = verify(&moved, &head).problems;
        assert_eq!(
            problems,
            vec![Tamper::Reordered {
                seq: 2,
                should_follow_seq: 5
            }]
        );
    }

    #[test]
    fn messages_name_the_entries() {
        assert_eq!(Tamper::Edited { seq: 4 }.to_string(), "entry #4 was edited");
        assert_eq!(
            Tamper::Deleted {
                after_seq: 2,
                before_seq: Some(4),
                missing: 1
            }
            .to_string(),
            "1 entry was deleted between #2 and #4"
        );
        assert!(
            Tamper::Reordered {
                seq: 3,
                should_follow_seq: 4
            }
            .to_string()
            .contains("#3")
        );
    }
}
