//! What can go wrong talking to the gateway, and the one place that decides what is worth a retry.

use std::fmt;
use std::time::Duration;

use super::Pagination;
use super::auth::scrub;

/// The client's operations, as they appear in errors, logs and request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    ScanContacts,
    ReadMembers,
    FindList,
    CreateList,
    AddMembers,
    RemoveMembers,
    GetContact,
}

impl Operation {
    pub const ALL: [Operation; 7] = [
        Self::ScanContacts,
        Self::ReadMembers,
        Self::FindList,
        Self::CreateList,
        Self::AddMembers,
        Self::RemoveMembers,
        Self::GetContact,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScanContacts => "scan_contacts",
            Self::ReadMembers => "read_members",
            Self::FindList => "find_list",
            Self::CreateList => "create_list",
            Self::AddMembers => "add_members",
            Self::RemoveMembers => "remove_members",
            Self::GetContact => "get_contact",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in one call. Every text field is shown through [`scrub`], so a
/// server that echoes the key in its answer cannot put it into an error message.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway answered with an error status; `message` is its own (`data` of the JSend body).
    #[error("{op}: HTTP {status} from the gateway: {}{}", scrub(message), attempts_note(*attempts))]
    Api { op: Operation, status: u16, message: String, attempts: u32 },
    /// No answer: connection refused or dropped, timeout.
    #[error("{op}: {}{}", scrub(message), attempts_note(*attempts))]
    Transport { op: Operation, message: String, attempts: u32 },
    /// An answer that does not follow the contract.
    #[error("{op}: unexpected response from the gateway: {}", scrub(message))]
    Decode { op: Operation, message: String },
    /// The same contacts came back for a later page: the server ignores how pages were addressed.
    #[error(
        "{op}: the gateway returned the same records for offset {offset} as for an earlier page, so it ignores \
         `{}`; {}",
        pagination.as_str(),
        match pagination {
            Pagination::Offset => "set `pagination = \"page\"` (or remove the `pagination` setting) under [api] in config.toml",
            Pagination::Page => "it pages neither by `page` nor (as pinned or learned before) by `offset`",
        }
    )]
    PagingIgnored { op: Operation, offset: u64, pagination: Pagination },
    /// A paged read whose pages disagree with each other or with the total they announce; the
    /// read is incomplete or unbounded, so nothing may be decided on it.
    #[error("{op}: the gateway's pages are inconsistent, so this read is not trusted: {}", scrub(message))]
    Inconsistent { op: Operation, message: String },
    /// A 3xx: never followed, so credentials never go to another host.
    #[error(
        "{op}: the gateway answered HTTP {status} redirecting to {}; segsync does not follow redirects (the API key \
         must not go to another address): set api.base_url to the final address",
        scrub(location)
    )]
    Redirect { op: Operation, status: u16, location: String },
    /// A response body above the configured size.
    #[error("{op}: the gateway's answer is larger than {limit} bytes (api.max_response_bytes); it was not read")]
    TooLarge { op: Operation, limit: u64 },
    /// A 429 asking for a longer wait than the configured cap.
    #[error(
        "{op}: the gateway asked to wait {}s before retrying (HTTP 429), more than api.max_retry_after_secs ({}s); \
         giving up on this run",
        asked.as_secs(), cap.as_secs()
    )]
    RetryAfterTooLong { op: Operation, asked: Duration, cap: Duration },
    /// The client could not be built (credentials that cannot be sent, a base URL without a path).
    #[error("{}", scrub(message))]
    Setup { message: String },
    /// Shutdown was requested while this call waited or was in flight.
    #[error("{op}: cancelled, the daemon is stopping")]
    Cancelled { op: Operation },
}

fn attempts_note(attempts: u32) -> String {
    if attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() }
}

impl GatewayError {
    /// Worth retrying: no answer, a timeout, a 408, a 429 or a server fault.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            Self::Decode { .. }
            | Self::PagingIgnored { .. }
            | Self::Inconsistent { .. }
            | Self::Redirect { .. }
            | Self::TooLarge { .. }
            | Self::RetryAfterTooLong { .. }
            | Self::Setup { .. }
            | Self::Cancelled { .. } => false,
        }
    }

    /// The HTTP status, when the gateway answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn with_attempts(mut self, n: u32) -> Self {
        match &mut self {
            Self::Api { attempts, .. } | Self::Transport { attempts, .. } => *attempts = n,
            _ => {}
        }
        self
    }

    /// Whether this is the gateway saying a list does not exist (404 naming `listId`).
    pub fn is_unknown_list(&self) -> bool {
        matches!(self, Self::Api { status: 404, message, .. } if message.starts_with("listId:"))
    }
}

/// Whether a 400's message (as [`api_message`] words it) is about the `limit` parameter: the
/// JSend `data` names the field `limit`, or the message speaks of the parameter and its range.
/// A message that merely contains the word ("limit exceeded for export quota") is not.
pub fn names_limit_parameter(message: &str) -> bool {
    if message.split("; ").any(|part| part.trim_start().starts_with("limit:")) {
        return true;
    }
    let lower = message.to_lowercase();
    [
        "limit must",
        "limit should",
        "limit parameter",
        "parameter limit",
        "parameter 'limit'",
        "invalid limit",
        "limit is invalid",
        "limit out of range",
        "limit is out of range",
        "limit too large",
        "limit is too large",
        "maximum limit",
        "max limit",
        "'limit'",
        "\"limit\"",
        "`limit`",
    ]
    .iter()
    .any(|phrase| lower.contains(phrase))
}

/// The API's own words from an error body: JSend `data` ("field: reason; …"), else `message`,
/// else the start of the body.
pub fn api_message(body: &[u8]) -> String {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(serde_json::Value::Object(data)) = map.get("data") {
            let parts: Vec<String> = data
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect();
            if !parts.is_empty() {
                return parts.join("; ");
            }
        }
        if let Some(m) = map.get("message").and_then(|m| m.as_str()) {
            return m.to_owned();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() { "(empty body)".into() } else { text.chars().take(200).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A 400 is "limit refused" only when it is about the `limit` parameter.
    #[test]
    fn limit_refusals_name_the_parameter() {
        for refusal in [
            "limit: limit must be between 1 and 100, got 1000",
            "filter: unknown; limit: too large",
            "Invalid limit: 1000",
            "The 'limit' parameter must be at most 100",
            "limit must be <= 100",
        ] {
            assert!(names_limit_parameter(refusal), "{refusal}");
        }
        for other in
            ["limit exceeded for export quota", "rate limit reached", "filter: unknown field", "daily limit hit"]
        {
            assert!(!names_limit_parameter(other), "{other}");
        }
    }

    // The API's own reason is lifted out of the seed's JSend body, field first.
    #[test]
    fn message_comes_from_jsend_data() {
        let body = br#"{"status":"fail","data":{"filter":"Unknown filter field: invalidField"}}"#;
        assert_eq!(api_message(body), "filter: Unknown filter field: invalidField");
        assert_eq!(api_message(br#"{"status":"error","message":"boom"}"#), "boom");
        assert_eq!(api_message(b"<html>bad gateway</html>"), "<html>bad gateway</html>");
    }

    // Only answers that can change on a retry are transient.
    #[test]
    fn transient_classification() {
        let api = |status| GatewayError::Api { op: Operation::AddMembers, status, message: String::new(), attempts: 1 };
        assert!(api(500).is_transient());
        assert!(api(429).is_transient());
        assert!(!api(401).is_transient());
        assert!(!api(404).is_transient());
    }
}
