//! The bundled emulator of the partner gateway (`api-contract.md`), for the demo, the tests and
//! the benchmarks. Started in-process on `127.0.0.1:0` or standalone by `segsync sandbox`.
//!
//! It must not be mistaken for the real service: `/_sandbox/stats` and the fault knobs exist only
//! here. It is a crate of its own that does not depend on segsync, so its independence from the
//! client — the reason it can check the client — is enforced by the build, not by convention.

mod churn;
pub mod demo;
pub mod limits;
pub mod rate_plan;
mod routes;
pub mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::NaiveDate;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use limits::{Faults, Stats};
pub use rate_plan::{RateLimits, RatePlan};
pub use routes::API_PREFIX;
use store::Store;

/// Everything that shapes one sandbox instance.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub contacts: u64,
    pub seed: u64,
    /// The day demo purchase dates are relative to; `None` means today (UTC).
    pub today: Option<NaiveDate>,
    pub api_key: String,
    pub plan: RatePlan,
    pub faults: Faults,
    pub churn_per_minute: u32,
    /// Play a server of the reference's page-based kind: it ignores `offset` (`page` still works)
    /// and allows `limit` up to 1,000 (the seed's server: 100).
    pub page_dialect: bool,
    /// Accept the reference's bulk removal body; `false` plays a seed-only server.
    pub bulk_remove: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            contacts: 20_000,
            seed: 42,
            today: None,
            api_key: "sandbox-key".into(),
            plan: RatePlan::Unlimited,
            faults: Faults::default(),
            churn_per_minute: 0,
            page_dialect: false,
            bulk_remove: true,
        }
    }
}

pub(crate) struct Shared {
    config: SandboxConfig,
    store: Mutex<Store>,
    limiter: Mutex<limits::Limiter>,
    stats: Mutex<Stats>,
    fault_rng: Mutex<SmallRng>,
    /// Drives `POST /_sandbox/churn` (a separate stream from the background churn).
    churn_data: Mutex<demo::DemoData>,
}

/// Locks a mutex; a poisoned lock (a panic elsewhere) still holds consistent sandbox data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The largest `limit` a page may ask for.
    fn max_page(&self) -> usize {
        if self.config.page_dialect { routes::PAGE_DIALECT_MAX_PAGE } else { routes::SEED_MAX_PAGE }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn admit(&self, key: &str) -> limits::Admission {
        lock(&self.limiter).admit(key, tokio::time::Instant::now())
    }

    fn record(&self, route: &str, outcome: &str) {
        lock(&self.stats).record(route, outcome);
    }

    fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// Changes `count` contacts now (as the background churn would); returns how many were touched.
    fn churn(&self, count: usize) -> usize {
        let day = chrono::Utc::now().date_naive();
        churn::churn_once(&mut self.store(), &mut lock(&self.churn_data), count, day)
    }
}

/// A running sandbox. Dropping it does not stop it; call [`Sandbox::shutdown`] or cancel the token.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Sandbox {
    /// Generates the demo contacts and serves them on `listen` (use port 0 for any free port).
    pub async fn start(config: SandboxConfig, listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let today = config.today.unwrap_or_else(|| chrono::Utc::now().date_naive());
        let (count, seed) = (config.contacts, config.seed);
        let store =
            tokio::task::spawn_blocking(move || generate(count, seed, today)).await.map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            limiter: Mutex::new(limits::Limiter::new(config.plan.limits())),
            fault_rng: Mutex::new(SmallRng::seed_from_u64(config.seed ^ 0x5eed)),
            stats: Mutex::new(Stats::default()),
            churn_data: Mutex::new(demo::DemoData::new(config.seed.wrapping_add(2), today)),
            store: Mutex::new(store),
            config,
        });
        let cancel = CancellationToken::new();
        if shared.config.churn_per_minute > 0 {
            tokio::spawn(churn::run(shared.clone(), today, cancel.child_token()));
        }
        let app = routes::router(shared.clone());
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "sandbox server stopped");
            }
        });
        Ok(Self { addr, shared, cancel, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL a client uses, as the real one: `http://127.0.0.1:PORT/api`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    pub fn api_key(&self) -> &str {
        &self.shared.config.api_key
    }

    /// Request counts so far (also served at `GET /_sandbox/stats`).
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Changes `count` random contacts now, as the churn does (purchases, moves, sign-ups, deletions).
    pub fn churn(&self, count: usize) -> usize {
        self.shared.churn(count)
    }

    /// Runs `f` on the sandbox's data directly, for tests that inspect the end state.
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut self.shared.store())
    }

    /// Stops serving and waits for the server task.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Serves until `cancel` fires (used by `segsync sandbox`).
    pub async fn serve_until(self, cancel: CancellationToken) {
        cancel.cancelled().await;
        self.shutdown().await;
    }
}

/// Builds a store of `count` deterministic demo contacts.
pub fn generate(count: u64, seed: u64, today: NaiveDate) -> Store {
    let mut data = demo::DemoData::new(seed, today);
    let contacts = (1..=count).map(|seq| data.contact(seq)).collect();
    Store::with_contacts(contacts)
}
