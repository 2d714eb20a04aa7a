//! Connects a [`Config`] to a gateway: the real one, or the bundled sandbox started in-process
//! with the configured demo data. The one place that decides which.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::config::{Config, Endpoint};
use crate::gateway::Gateway;
use segsync_sandbox::Sandbox;

/// A gateway to talk to, and the sandbox behind it when there is one.
pub struct Connection {
    pub gateway: Gateway,
    /// Names the account for state bindings: the base URL, or a fresh name per sandbox start
    /// (a new sandbox has none of the old one's lists).
    pub endpoint: String,
    pub sandbox: Option<Sandbox>,
}

impl Connection {
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let credentials = config.credentials().map_err(anyhow::Error::msg)?;
        match &config.api.endpoint {
            Endpoint::Sandbox => {
                let sandbox = Sandbox::start(config.sandbox.clone(), "127.0.0.1:0".parse()?)
                    .await
                    .context("starting the bundled sandbox")?;
                let base = sandbox.base_url().parse().context("the sandbox URL")?;
                let gateway = Gateway::new(config.gateway(base, credentials)).map_err(anyhow::Error::msg)?;
                let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
                tracing::info!(
                    base_url = %sandbox.base_url(),
                    contacts = config.sandbox.contacts,
                    churn_per_minute = config.sandbox.churn_per_minute,
                    plan = %config.api.plan,
                    "bundled sandbox started"
                );
                Ok(Self { gateway, endpoint: format!("sandbox@{nanos}"), sandbox: Some(sandbox) })
            }
            Endpoint::Remote { base_url, .. } => {
                let gateway =
                    Gateway::new(config.gateway(base_url.clone(), credentials)).map_err(anyhow::Error::msg)?;
                Ok(Self { gateway, endpoint: base_url.to_string(), sandbox: None })
            }
        }
    }

    pub async fn close(self) {
        if let Some(sandbox) = self.sandbox {
            sandbox.shutdown().await;
        }
    }
}
