//! Connects a [`Config`] to a gateway: the real one, or the bundled sandbox started in-process
//! with the configured demo data. The one place that decides which.

use anyhow::Context;

use crate::config::{Config, Server};
use crate::gateway::{Credentials, Gateway};
use crate::ids::Account;
use crate::state::State;
use segsync_sandbox::Sandbox;

/// A gateway to talk to, and the sandbox behind it when there is one.
pub struct Connection {
    pub gateway: Gateway,
    /// The account the state's bindings belong to.
    pub account: Account,
    pub sandbox: Option<Sandbox>,
}

impl Connection {
    /// Connects, and names the account: with the state, by the base URL and the key's
    /// fingerprint in that state, setting aside (with a warning) whatever another key left there;
    /// without it (`explain`, which remembers nothing), by the base URL alone.
    pub async fn open(config: &Config, state: Option<&State>) -> anyhow::Result<Self> {
        let credentials = config.credentials()?;
        match &config.api.server {
            Server::Sandbox => {
                let sandbox = Sandbox::start(config.sandbox.clone(), "127.0.0.1:0".parse()?)
                    .await
                    .context("starting the bundled sandbox")?;
                let base = sandbox.base_url().parse().context("the sandbox URL")?;
                let gateway = Gateway::new(config.gateway(base, credentials))?;
                tracing::info!(
                    base_url = %sandbox.base_url(),
                    contacts = config.sandbox.contacts,
                    churn_per_minute = config.sandbox.churn_per_minute,
                    plan = %config.api.plan,
                    "bundled sandbox started"
                );
                Ok(Self { gateway, account: Account::sandbox_started_now(), sandbox: Some(sandbox) })
            }
            Server::Remote { base_url, .. } => {
                let account = match state {
                    Some(state) => Self::account(state, base_url.as_str(), &credentials).await?,
                    None => Account::remote(base_url.as_str()),
                };
                let gateway = Gateway::new(config.gateway(base_url.clone(), credentials))?;
                Ok(Self { gateway, account, sandbox: None })
            }
        }
    }

    /// Connects again for `config` (SIGHUP: the key is read again): a fresh gateway on the same
    /// server, re-naming the account (a new key is a new account), or a whole new connection
    /// when the server changed, returning the old one (passes in flight may still use it).
    pub async fn reopen(&mut self, config: &Config, state: &State) -> anyhow::Result<Option<Connection>> {
        match (&config.api.server, &self.sandbox) {
            (Server::Sandbox, Some(sandbox)) => {
                let base = sandbox.base_url().parse().context("the sandbox URL")?;
                self.gateway = Gateway::new(config.gateway(base, config.credentials()?))?;
                Ok(None)
            }
            (Server::Remote { base_url, .. }, None) if base_url.as_str() == self.account.base_url() => {
                let credentials = config.credentials()?;
                self.account = Self::account(state, base_url.as_str(), &credentials).await?;
                self.gateway = Gateway::new(config.gateway(base_url.clone(), credentials))?;
                Ok(None)
            }
            _ => Ok(Some(std::mem::replace(self, Self::open(config, Some(state)).await?))),
        }
    }

    /// The account `credentials` name at `base_url` in `state`, setting aside (with a warning)
    /// whatever another key left there. On a blocking thread: a pass may be committing.
    async fn account(state: &State, base_url: &str, credentials: &Credentials) -> anyhow::Result<Account> {
        let (state, base_url, credentials) = (state.clone(), base_url.to_owned(), credentials.clone());
        let named = tokio::task::spawn_blocking(move || {
            let account = state.account(&base_url, &credentials)?;
            let aside = state.set_aside_others(&account)?;
            Ok::<_, crate::state::StateError>((account, aside))
        });
        let (account, aside) = named.await.context("naming the account")??;
        for other in aside {
            tracing::warn!(
                base_url = %other.base_url,
                key_fingerprint = other.key_fingerprint.as_deref(),
                bindings = other.bindings,
                cached_lists = other.cached_lists,
                pending_removals = other.pending_removals,
                "state set aside"
            );
        }
        Ok(account)
    }

    pub async fn close(self) {
        if let Some(sandbox) = self.sandbox {
            sandbox.shutdown().await;
        }
    }
}
