//! `segsync sandbox`: the bundled emulator, standalone.

use std::time::Duration;

use anyhow::Context;
use segsync_sandbox::{Faults, Sandbox, SandboxConfig};
use tokio_util::sync::CancellationToken;

use super::{Exit, SandboxArgs};

pub(super) async fn serve(args: SandboxArgs) -> anyhow::Result<Exit> {
    if !(0.0..=1.0).contains(&args.fault_rate) {
        anyhow::bail!("--fault-rate must be between 0.0 and 1.0, got {}", args.fault_rate);
    }
    let config = SandboxConfig {
        contacts: args.contacts,
        seed: args.seed,
        api_key: args.api_key,
        plan: args.plan,
        faults: Faults::split(args.fault_rate, Duration::from_millis(args.latency_ms)),
        churn_per_minute: args.churn_per_minute,
        page_dialect: args.page_dialect,
        ..SandboxConfig::default()
    };
    let started = std::time::Instant::now();
    let sandbox = Sandbox::start(config, args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(
        base_url = %sandbox.base_url(),
        contacts = args.contacts,
        plan = %args.plan,
        generate_ms = started.elapsed().as_millis() as u64,
        "sandbox ready"
    );
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        crate::signals::stop_requested().await;
        stop.cancel();
    });
    sandbox.serve_until(cancel).await;
    tracing::info!("sandbox stopped");
    Ok(Exit::Ok)
}
