//! Credentials for the gateway. The secret is wrapped from the moment it is read: it has no
//! `Display`, its `Debug` prints `***`, and the header carrying it is marked sensitive.

use std::fmt;

use base64::Engine as _;
use reqwest::header::{HeaderName, HeaderValue};

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
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
    /// The header that authenticates a request, marked sensitive so no HTTP layer logs it.
    pub fn header(&self) -> Option<(HeaderName, HeaderValue)> {
        let (name, value) = match self {
            Self::ApiKey(key) => (HeaderName::from_static("x-api-key"), key.expose().to_owned()),
            Self::Basic { user, password } => {
                let pair = format!("{user}:{}", password.expose());
                (
                    reqwest::header::AUTHORIZATION,
                    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)),
                )
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
}
