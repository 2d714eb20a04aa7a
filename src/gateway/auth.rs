//! Credentials for the gateway. The secret is wrapped from the moment it is read: it has no
//! `Display`, its `Debug` prints `***`, and the header carrying it is marked sensitive.
//!
//! Every secret is also registered, when it is wrapped, in a process-wide list that [`scrub`]
//! removes from any text. The three exits text has — the log writer, the command line's output
//! and the gateway's error messages — all pass through `scrub`, so a server that echoes the key
//! back (in a 401 body, say) cannot make it appear anywhere.

use std::borrow::Cow;
use std::fmt;
use std::sync::RwLock;

use base64::Engine as _;
use reqwest::header::{HeaderName, HeaderValue};

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Every secret this process has read (and the forms it is sent in), longest first.
static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Secrets shorter than this are not scrubbed: replacing every "a" in a text would hide
/// everything and protect nothing (such a key is refused as too short anyway).
const MIN_SCRUBBED: usize = 4;

fn register(value: &str) {
    if value.len() < MIN_SCRUBBED {
        return;
    }
    let mut all = SECRETS.write().unwrap_or_else(|p| p.into_inner());
    if !all.iter().any(|s| s == value) {
        all.push(value.to_owned());
        // Longest first, so a secret that contains another is replaced whole.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// `text` with every registered secret replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let all = SECRETS.read().unwrap_or_else(|p| p.into_inner());
    if !all.iter().any(|s| text.contains(s.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_owned();
    for secret in all.iter() {
        out = out.replace(secret.as_str(), "***");
    }
    Cow::Owned(out)
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        register(&value);
        Self(value)
    }

    /// The secret itself; only the request builder should call this.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `X-Api-Key: <key>`.
    ApiKey(Secret),
    /// `Authorization: Basic base64(user:password)`.
    Basic { user: String, password: Secret },
}

impl Credentials {
    /// HMAC-SHA256 of the credentials under `salt`, as 32 hex digits: names whose account a state
    /// belongs to without holding the key, and without being the key's plain (guessable) hash.
    pub fn fingerprint(&self, salt: &[u8]) -> String {
        use hmac::Mac;
        let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(salt) {
            Ok(mac) => mac,
            // HMAC takes keys of any length; this arm is never taken.
            Err(_) => return String::new(),
        };
        match self {
            Self::ApiKey(key) => mac.update(key.expose().as_bytes()),
            Self::Basic { user, password } => {
                mac.update(user.as_bytes());
                mac.update(b"\0");
                mac.update(password.expose().as_bytes());
            }
        }
        mac.finalize().into_bytes().iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    /// The header that authenticates a request, marked sensitive so no HTTP layer logs it.
    pub fn header(&self) -> Option<(HeaderName, HeaderValue)> {
        let (name, value) = match self {
            Self::ApiKey(key) => (HeaderName::from_static("x-api-key"), key.expose().to_owned()),
            Self::Basic { user, password } => {
                let pair = format!("{user}:{}", password.expose());
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                // The header's form of the password is as secret as the password.
                register(&encoded);
                (reqwest::header::AUTHORIZATION, format!("Basic {encoded}"))
            }
        };
        let mut value = HeaderValue::from_str(&value).ok()?;
        value.set_sensitive(true);
        Some((name, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Debug output of credentials never contains the secret.
    #[test]
    fn debug_hides_the_secret() {
        let creds = Credentials::Basic { user: "ops".into(), password: Secret::new("hunter2-very-secret") };
        let shown = format!("{creds:?} {:?}", Credentials::ApiKey(Secret::new("k-123456")));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("k-123456"), "{shown}");
        assert!(shown.contains("***"));
    }

    // Text that carries a registered secret, or the Basic header's encoding of it, is scrubbed.
    #[test]
    fn scrub_removes_every_registered_form() {
        let creds = Credentials::Basic { user: "ops".into(), password: Secret::new("pw-scrub-test-77") };
        let (_, header) = creds.header().expect("header");
        let header = header.to_str().expect("ascii").to_owned();
        let text = format!("Invalid password 'pw-scrub-test-77' for {header}");
        let clean = scrub(&text);
        assert!(!clean.contains("pw-scrub-test-77"), "{clean}");
        assert!(!clean.contains(header.trim_start_matches("Basic ")), "{clean}");
        assert_eq!(scrub("nothing secret here"), "nothing secret here");
    }
}
