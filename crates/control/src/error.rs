//! The control plane's errors: what a store can fail with, why a request is refused, and
//! what an admin operation can fail with.

use std::fmt;

/// A storage failure, from either backend.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or did not answer in time (connection refused or
    /// lost, file locked past the busy timeout). Retrying later may succeed.
    #[error("the database is unavailable: {detail}")]
    Unavailable {
        /// What the driver said.
        detail: String,
    },
    /// A write broke a uniqueness rule (an id that already exists).
    #[error("conflict: {detail}")]
    Conflict {
        /// What the driver said.
        detail: String,
    },
    /// A row the operation names does not exist.
    #[error("{kind} `{id}` does not exist")]
    NotFound {
        /// What kind of row (`organization`, `project`, `key`).
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A stored value could not be decoded (a hand-edited row, a newer schema).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table holding the row.
        table: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The database's schema is newer than this binary knows.
    #[error("the database schema is at version {found}, newer than this binary's {known}")]
    SchemaTooNew {
        /// The version found in the database.
        found: i64,
        /// The newest version this binary knows.
        known: i64,
    },
    /// Any other database error.
    #[error("database error: {detail}")]
    Other {
        /// What the driver said.
        detail: String,
    },
}

/// Which rate limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateLimitKind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

impl RateLimitKind {
    /// `requests` or `tokens`, as OpenAI names the kind of a rate-limit error.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitKind::Requests => "requests",
            RateLimitKind::Tokens => "tokens",
        }
    }
}

/// Why the control plane refuses a request. The HTTP layer maps each to a status: the key
/// cases to 401, model and region to 403, limits and budgets to 429.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denial {
    /// No key was presented.
    MissingKey,
    /// The `Authorization` header or the key in it is not well formed.
    MalformedKey {
        /// What is wrong, for the client.
        reason: String,
    },
    /// The key is well formed but not known (or its secret does not match).
    UnknownKey,
    /// The key was revoked.
    RevokedKey,
    /// The key expired.
    ExpiredKey,
    /// The key may not use this model.
    ModelNotAllowed {
        /// The model asked for.
        model: String,
    },
    /// The key's organisation may not be served in this deployment's region.
    RegionNotAllowed {
        /// This deployment's region.
        region: String,
    },
    /// A per-minute rate limit is exhausted.
    RateLimited {
        /// Requests or tokens.
        kind: RateLimitKind,
        /// The limit per minute.
        limit: u64,
        /// Seconds until the request would be admitted.
        retry_after_secs: u64,
    },
    /// The key's token budget for the period cannot cover the request.
    QuotaExceeded {
        /// Tokens asked for (prompt plus the most the completion may take).
        requested: u64,
        /// Tokens left in the period.
        remaining: u64,
        /// Seconds until the budget's period renews; `None` for a budget that never renews.
        retry_after_secs: Option<u64>,
    },
}

impl Denial {
    /// A stable machine-readable code for the case.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::MissingKey => "missing_api_key",
            Denial::MalformedKey { .. }
            | Denial::UnknownKey
            | Denial::RevokedKey
            | Denial::ExpiredKey => "invalid_api_key",
            Denial::ModelNotAllowed { .. } => "model_not_allowed",
            Denial::RegionNotAllowed { .. } => "region_not_allowed",
            Denial::RateLimited { .. } => "rate_limit_exceeded",
            Denial::QuotaExceeded { .. } => "insufficient_quota",
        }
    }

    /// True for the cases that mean "who are you?" (no usable key), as opposed to "you may
    /// not" or "not now".
    pub fn is_authentication(&self) -> bool {
        matches!(
            self,
            Denial::MissingKey
                | Denial::MalformedKey { .. }
                | Denial::UnknownKey
                | Denial::RevokedKey
                | Denial::ExpiredKey
        )
    }

    /// Seconds a client should wait before retrying, where waiting can help.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Denial::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Denial::QuotaExceeded {
                retry_after_secs, ..
            } => *retry_after_secs,
            _ => None,
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::MissingKey => f.write_str(
                "You didn't provide an API key. Provide it in an Authorization header using \
                 Bearer auth (Authorization: Bearer sk-sov-...).",
            ),
            Denial::MalformedKey { reason } => write!(f, "Malformed API key: {reason}"),
            Denial::UnknownKey => f.write_str("Incorrect API key provided."),
            Denial::RevokedKey => f.write_str("This API key has been revoked."),
            Denial::ExpiredKey => f.write_str("This API key has expired."),
            Denial::ModelNotAllowed { model } => {
                write!(f, "This API key is not allowed to use the model `{model}`.")
            }
            Denial::RegionNotAllowed { region } => write!(
                f,
                "Your organization is not allowed to be served in the region `{region}`."
            ),
            Denial::RateLimited { kind, limit, .. } => write!(
                f,
                "Rate limit reached: this key is limited to {limit} {} per minute.",
                kind.as_str()
            ),
            Denial::QuotaExceeded {
                requested,
                remaining,
                ..
            } => write!(
                f,
                "You exceeded your current quota: this request may use up to {requested} \
                 tokens and the key's budget has {remaining} left for the period."
            ),
        }
    }
}

impl std::error::Error for Denial {}

/// What a control-plane operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The request is refused (authentication, permission, limits).
    #[error("{0}")]
    Denied(Denial),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store did not answer within the configured time.
    #[error("the database did not answer within {timeout_ms} ms")]
    Timeout {
        /// The limit that passed.
        timeout_ms: u64,
    },
    /// An admin operation's input is invalid.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A background task failed to run (it panicked or the runtime is shutting down).
    #[error("a control-plane task failed: {detail}")]
    Task {
        /// What happened.
        detail: String,
    },
}

impl ControlError {
    /// True when the failure is the database being unreachable or slow: the HTTP layer
    /// answers 503 and the request may succeed later.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ControlError::Store(StoreError::Unavailable { .. }) | ControlError::Timeout { .. }
        )
    }

    /// An `Invalid` error.
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ControlError::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl From<Denial> for ControlError {
    fn from(denial: Denial) -> Self {
        ControlError::Denied(denial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_codes_and_retry() {
        assert_eq!(Denial::MissingKey.code(), "missing_api_key");
        assert!(Denial::ExpiredKey.is_authentication());
        assert!(!Denial::ModelNotAllowed { model: "m".into() }.is_authentication());
        let limited = Denial::RateLimited {
            kind: RateLimitKind::Tokens,
            limit: 100,
            retry_after_secs: 7,
        };
        assert_eq!(limited.code(), "rate_limit_exceeded");
        assert_eq!(limited.retry_after_secs(), Some(7));
        assert!(limited.to_string().contains("100 tokens per minute"));
        let quota = Denial::QuotaExceeded {
            requested: 10,
            remaining: 3,
            retry_after_secs: None,
        };
        assert_eq!(quota.code(), "insufficient_quota");
        assert_eq!(quota.retry_after_secs(), None);
    }

    #[test]
    fn unavailable_is_told_apart() {
        let down = ControlError::Store(StoreError::Unavailable {
            detail: "refused".into(),
        });
        assert!(down.is_unavailable());
        assert!(ControlError::Timeout { timeout_ms: 5 }.is_unavailable());
        assert!(!ControlError::invalid("name", "empty").is_unavailable());
    }
}
