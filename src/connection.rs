//! Connects a [`Config`] to a gateway: the real one, or the bundled sandbox started in-process
//! with the configured demo data. The one place that decides which.

use anyhow::Context;

use crate::config::{Config, Endpoint};
use crate::gateway::Gateway;
use crate::ids::Account;
use segsync_sandbox::Sandbox;

/// A gateway to talk to, and the sandbox behind it when there is one.
pub struct Connection {
    pub gateway: Gateway,
    /// The account the state's bindings belong to.
    pub account: Account,
    pub sandbox: Option<Sandbox>,
}

impl Connection {
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let credentials = config.credentials()?;
        match &config.api.endpoint {
            Endpoint::Sandbox => {
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
            Endpoint::Remote { base_url, .. } => {
                let gateway = Gateway::new(config.gateway(base_url.clone(), credentials))?;
                Ok(Self { gateway, account: Account::remote(base_url.as_str()), sandbox: None })
            }
        }
    }

    pub async fn close(self) {
        if let Some(sandbox) = self.sandbox {
            sandbox.shutdown().await;
        }
    }
}
