//! The partner-gateway client: every request segsync makes goes through here.
//!
//! Owns the wire format (wire types never leave this module), pagination, the shared rate budget,
//! retries, and request accounting. Knows nothing about rules or plans. It never sends the
//! contract's dangerous calls: there is no code path to `DELETE /contacts` or `allContacts`.
//!
//! Whatever the server does, every call is bounded: no redirect is followed (credentials never
//! leave the configured origin), a response body larger than the configured size is not read,
//! every wait (pacing, a 429's pause, backoff, the request itself) ends when the client's
//! cancellation token fires, and paged reads are checked as a whole (`scan`).

mod auth;
mod error;
mod meter;
mod pacer;
mod rate_plan;
mod scan;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::Rng;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use auth::{Credentials, Secret, scrub};
pub use error::{GatewayError, Operation};
pub use meter::{Meter, PROCESS, StatusClass, Usage};
pub use pacer::Pacer;
pub use rate_plan::{RateLimits, RatePlan};
pub use scan::{Keyed, MAX_RECORDS_PER_READ, Page, RECORD_BATCH, Records, Scan, churn_margin};

use crate::contact::Record;
use crate::ids::{ContactId, ListId};

/// The contract's limits on one call: the seed's page of at most 100, the reference's of 1,000.
pub const SEED_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const MAX_BATCH: usize = 1000;
/// 429s tolerated for one request before giving up (each one waits as the server asks).
const MAX_THROTTLED: u32 = 20;
/// A 429 wait at least this long is worth telling the operator about.
const NOTABLE_WAIT: Duration = Duration::from_secs(5);

/// How pages are addressed: the seed's `offset`, or the reference's 0-based `page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pagination {
    #[default]
    Offset,
    Page,
}

impl Pagination {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offset => "offset",
            Self::Page => "page",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "offset" => Some(Self::Offset),
            "page" => Some(Self::Page),
            _ => None,
        }
    }
}

/// The two paged resources (HTTP endpoints); each learns its own page size and pagination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `GET /contacts`: contact scans and member reads.
    Contacts,
    /// `GET /contacts/list`: the list directory.
    Lists,
}

impl Resource {
    pub const ALL: [Self; 2] = [Self::Contacts, Self::Lists];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Contacts => "contacts",
            Self::Lists => "lists",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == text)
    }
}

/// How one resource is paged: the page size asked for and how pages are addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub page_size: u32,
    pub pagination: Pagination,
}

/// What a client knows of one resource's paging.
#[derive(Debug, Clone, Copy)]
struct Learned {
    /// What reads use.
    now: Paging,
    /// When a read last probed the server (its first page settled `now`); `None`: not yet in
    /// this process, or due again.
    probed_at: Option<std::time::Instant>,
    /// What an earlier process (or an earlier probe) found: a planning estimate, never used to read.
    remembered: Option<Paging>,
}

impl Learned {
    fn new(configured: Paging) -> Self {
        Self { now: configured, probed_at: None, remembered: None }
    }
}

/// How the client paces, pages and retries: everything but where it connects and as whom.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// The plan's limits; `None` paces nothing.
    pub limits: Option<RateLimits>,
    /// The largest page asked for; a server refusing it (a 400 naming `limit`) gets the seed's 100.
    pub page_size: u32,
    pub timeout: Duration,
    pub max_retries: u32,
    /// Pages of one scan in flight at once.
    pub concurrency: usize,
    /// Pinned pagination; `None` starts with `offset` and switches to `page` on a server that
    /// ignores `offset`.
    pub pagination: Option<Pagination>,
    /// The largest response body read; a larger one fails the call unread.
    pub max_response_bytes: u64,
    /// The longest 429 wait honoured; a server asking for more fails the call at once.
    pub max_retry_after: Duration,
    /// The share of the plan's two windows segsync uses, leaving the rest to the account's other
    /// software (the campaigns sending with the same key).
    pub budget_share: f64,
}

impl Default for ClientSettings {
    /// The production plan at 80 % of its windows, pages of up to 1,000, 30 s timeouts, 5
    /// retries, 4 pages in flight, pagination detected, bodies up to 16 MiB (a page of 1,000
    /// contacts is a few hundred KB), 429 waits up to 10 minutes.
    fn default() -> Self {
        Self {
            limits: RatePlan::Production.limits(),
            page_size: MAX_PAGE_SIZE,
            timeout: Duration::from_secs(30),
            max_retries: 5,
            concurrency: 4,
            pagination: None,
            max_response_bytes: 16 * 1024 * 1024,
            max_retry_after: Duration::from_secs(600),
            budget_share: 0.8,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The API root, e.g. `https://lora-api.agiletelecom.com/api`.
    pub base_url: Url,
    pub credentials: Credentials,
    pub settings: ClientSettings,
}

/// A contact list as the gateway describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListInfo {
    #[serde(deserialize_with = "opaque_id")]
    pub id: ListId,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub contact_count: Option<u64>,
    #[serde(default)]
    pub created_at: Option<String>,
}

/// Ids are opaque: strings, or numbers read as their decimal text.
fn opaque_id<'de, D: Deserializer<'de>, T: From<String>>(d: D) -> Result<T, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(T::from(s)),
        Value::Number(n) => Ok(T::from(n.to_string())),
        other => Err(serde::de::Error::custom(format!("expected an id, got {other}"))),
    }
}

/// What the gateway confirmed of a write, summed over batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Added (or removed) as the answers say.
    pub done: u64,
    /// Adds the server counted as already there.
    pub duplicate: u64,
    /// Ids the server did not know.
    pub invalid: u64,
    /// Ids sent whose fate no answer accounts for (a `200 {}`, or counts that do not add up).
    pub unconfirmed: u64,
    /// The list's size as the last answer gave it (`totalContactsInList`).
    pub list_total: Option<u64>,
}

const BULK_UNKNOWN: u8 = 0;
const BULK_YES: u8 = 1;
const BULK_NO: u8 = 2;

struct Inner {
    http: reqwest::Client,
    root: Url,
    auth: (HeaderName, HeaderValue),
    pacer: Pacer,
    /// Per resource, as configured and then as learned from the server.
    paging: std::sync::Mutex<[Learned; 2]>,
    /// The paging this client starts from, and goes back to when it probes again.
    configured: Paging,
    pagination_pinned: bool,
    max_retries: u32,
    concurrency: usize,
    max_response_bytes: u64,
    max_retry_after: Duration,
    /// Whether the server takes the bulk removal form, decided once per client.
    bulk_remove: AtomicU8,
    /// Held while the first bulk removal decides `bulk_remove`, so no other call races it.
    bulk_probe: tokio::sync::Mutex<()>,
}

/// The client. Cheap to clone; clones share the connection pool and the rate budget.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
    meter: Arc<Meter>,
    /// Once cancelled, every wait and request of this handle ends with `Cancelled`.
    cancel: CancellationToken,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("root", &self.inner.root.as_str()).finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        let setup = |message: String| GatewayError::Setup { message };
        let auth = config
            .credentials
            .header()
            .ok_or_else(|| setup("the API credentials contain characters not allowed in an HTTP header".into()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("segsync/", env!("CARGO_PKG_VERSION")))
            // A redirect is answered, never followed: the key goes to the configured origin only.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.settings.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(config.settings.concurrency.max(1) * 2)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| setup(format!("building the HTTP client: {e}")))?;
        let mut root = config.base_url.clone();
        root.path_segments_mut()
            .map_err(|()| setup(format!("the base URL {} cannot carry a path", config.base_url)))?
            .pop_if_empty()
            .extend(["partner-gateway", "v1"]);
        let configured = Paging {
            page_size: config.settings.page_size.clamp(1, MAX_PAGE_SIZE),
            pagination: config.settings.pagination.unwrap_or_default(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                root,
                auth,
                pacer: Pacer::new(config.settings.limits, config.settings.budget_share),
                paging: std::sync::Mutex::new([Learned::new(configured); 2]),
                configured,
                pagination_pinned: config.settings.pagination.is_some(),
                max_retries: config.settings.max_retries,
                concurrency: config.settings.concurrency.max(1),
                max_response_bytes: config.settings.max_response_bytes,
                max_retry_after: config.settings.max_retry_after,
                bulk_remove: AtomicU8::new(BULK_UNKNOWN),
                bulk_probe: tokio::sync::Mutex::new(()),
            }),
            meter: Arc::new(Meter::default()),
            cancel: CancellationToken::new(),
        })
    }

    /// A handle sharing everything but counting its requests in `meter` (one per run).
    pub fn metered(&self, meter: Arc<Meter>) -> Self {
        Self { meter, ..self.clone() }
    }

    /// A handle whose every wait and request ends (with [`GatewayError::Cancelled`]) once
    /// `cancel` fires: shutdown never waits on the server or on the rate budget.
    pub fn cancelled_by(&self, cancel: CancellationToken) -> Self {
        Self { cancel, ..self.clone() }
    }

    pub fn usage(&self) -> Usage {
        self.meter.usage()
    }

    /// Counts in this handle's meter and in the process-wide one.
    fn count(&self, f: impl Fn(&Meter)) {
        f(&self.meter);
        f(&PROCESS);
    }

    /// The paging `resource`'s reads use now: as configured until a read has probed the server,
    /// then as it answered.
    pub fn paging(&self, resource: Resource) -> Paging {
        self.inner.paging.lock().unwrap_or_else(|p| p.into_inner())[resource as usize].now
    }

    /// The paging `resource` is expected to take, for planning a pass: what this process learned,
    /// else what an earlier one remembered, else the configuration.
    pub fn expected_paging(&self, resource: Resource) -> Paging {
        let all = self.inner.paging.lock().unwrap_or_else(|p| p.into_inner());
        let learned = &all[resource as usize];
        match (learned.probed_at, learned.remembered) {
            (None, Some(remembered)) => remembered,
            _ => learned.now,
        }
    }

    /// Takes the paging an earlier process remembered, as an expectation only: the reads of this
    /// process probe the server again from the configuration (a server that recovered, or a
    /// lesson that was wrong, is never kept forever).
    pub fn remember(&self, resource: Resource, remembered: Paging) {
        let mut all = self.inner.paging.lock().unwrap_or_else(|p| p.into_inner());
        all[resource as usize].remembered = Some(remembered);
    }

    /// Probes the server again (from the configuration) on the next read of every resource whose
    /// paging was last probed `max_age` ago or longer. The daemon calls it every pass with
    /// `[state] verify_members_every`.
    pub fn reprobe_older_than(&self, max_age: Duration) {
        let mut all = self.inner.paging.lock().unwrap_or_else(|p| p.into_inner());
        for learned in all.iter_mut() {
            if learned.probed_at.is_some_and(|at| at.elapsed() >= max_age) {
                *learned = Learned { remembered: Some(learned.now), ..Learned::new(self.inner.configured) };
            }
        }
    }

    /// Records that a read probed `resource` and what it answered to, saying it in the log once
    /// when that differs from what reads used.
    fn learn(&self, resource: Resource, paging: Paging, reason: Option<&str>) {
        let mut all = self.inner.paging.lock().unwrap_or_else(|p| p.into_inner());
        let learned = &mut all[resource as usize];
        learned.probed_at = Some(std::time::Instant::now());
        if learned.now != paging {
            learned.now = paging;
            tracing::info!(
                endpoint = resource.as_str(),
                page_size = paging.page_size,
                pagination = paging.pagination.as_str(),
                reason = reason.unwrap_or("the gateway answered the configured paging"),
                "paging learned"
            );
        }
    }

    /// The least time `n` requests take under the rate plan (`None`: unpaced).
    pub fn least_time(&self, n: u64) -> Option<Duration> {
        self.inner.pacer.least_time(n)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.root.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    /// Runs `f` unless shutdown comes first.
    async fn unless_cancelled<F: Future>(&self, op: Operation, f: F) -> Result<F::Output, GatewayError> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(GatewayError::Cancelled { op }),
            out = f => Ok(out),
        }
    }

    /// One request and its whole body, bounded in size; redirects are errors.
    async fn attempt(
        &self,
        op: Operation,
        method: &Method,
        url: &Url,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(StatusCode, Option<Duration>, Bytes), GatewayError> {
        let mut request = self.inner.http.request(method.clone(), url.clone()).query(query);
        request = request.header(self.inner.auth.0.clone(), self.inner.auth.1.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = request.send().await.map_err(|e| transport(op, &e))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|l| url.join(l).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_else(|| l.to_owned()))
                .unwrap_or_else(|| "(no Location header)".into());
            return Err(GatewayError::Redirect { op, status: status.as_u16(), location });
        }
        let retry_header = response.headers().get(reqwest::header::RETRY_AFTER).and_then(retry_after_header);
        let limit = self.inner.max_response_bytes;
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(GatewayError::TooLarge { op, limit });
        }
        // Room for the announced body at once (not a copy per doubling); no more than 4 MiB on
        // a header's word alone.
        let announced = response.content_length().unwrap_or(0).min(4 << 20);
        let mut bytes = BytesMut::with_capacity(announced as usize);
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(op, &e))? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(GatewayError::TooLarge { op, limit });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((status, retry_header, bytes.freeze()))
    }

    /// Sends one request, pacing it, retrying transient failures with backoff and jitter, and
    /// honouring 429s by pausing every request of this client. Every wait ends on cancellation.
    async fn call(
        &self,
        op: Operation,
        method: Method,
        url: Url,
        query: &[(&str, String)],
        body: Option<&Value>,
        retry_transient: bool,
    ) -> Result<Bytes, GatewayError> {
        let mut failures = 0u32;
        let mut throttled = 0u32;
        loop {
            let waited = self.unless_cancelled(op, self.inner.pacer.acquire()).await?;
            self.count(|m| m.waited(op, waited));
            self.count(|m| m.request(op));
            let attempts = failures + throttled + 1;
            let outcome = self.unless_cancelled(op, self.attempt(op, &method, &url, query, body)).await?;
            let class = match &outcome {
                Ok((status, _, _)) => StatusClass::of(status.as_u16()),
                Err(GatewayError::Redirect { .. }) => StatusClass::Redirect,
                Err(GatewayError::TooLarge { .. }) => StatusClass::Success,
                Err(_) => StatusClass::NoAnswer,
            };
            self.count(|m| m.answered(op, class));
            let error = match outcome {
                Ok((status, _, bytes)) if status.is_success() => return Ok(bytes),
                Ok((StatusCode::TOO_MANY_REQUESTS, header, bytes)) => {
                    throttled += 1;
                    self.count(|m| m.throttled(op));
                    let wait = header.or_else(|| retry_after_body(&bytes)).unwrap_or(Duration::from_secs(1));
                    if wait > self.inner.max_retry_after {
                        return Err(GatewayError::RetryAfterTooLong {
                            op,
                            asked: wait,
                            cap: self.inner.max_retry_after,
                        });
                    }
                    self.inner.pacer.pause_for(wait);
                    let error = GatewayError::Api { op, status: 429, message: error::api_message(&bytes), attempts };
                    if throttled > MAX_THROTTLED {
                        return Err(error);
                    }
                    if wait >= NOTABLE_WAIT {
                        tracing::info!(op = %op, wait_ms = wait.as_millis() as u64, "rate limited");
                    } else {
                        tracing::debug!(op = %op, wait_ms = wait.as_millis() as u64, "rate limited");
                    }
                    self.count(|m| m.retry(op));
                    continue;
                }
                Ok((status, _, bytes)) => {
                    GatewayError::Api { op, status: status.as_u16(), message: error::api_message(&bytes), attempts }
                }
                Err(e) => e.with_attempts(attempts),
            };
            if !error.is_transient() || !retry_transient || failures >= self.inner.max_retries {
                return Err(error);
            }
            failures += 1;
            let delay = backoff(failures);
            tracing::debug!(op = %op, error = %error, delay_ms = delay.as_millis() as u64, "retrying");
            self.count(|m| m.retry(op));
            self.unless_cancelled(op, tokio::time::sleep(delay)).await?;
        }
    }

    async fn call_json<T: DeserializeOwned + Send + 'static>(
        &self,
        op: Operation,
        method: Method,
        url: Url,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T, GatewayError> {
        let bytes = self.call(op, method, url, query, body, true).await?;
        decode(op, bytes).await
    }

    /// Streams every contact matching `query`, page by page, each contact once.
    pub fn scan<T: Record>(&self, query: &ScanQuery) -> Scan<Vec<T>> {
        self.scan_with(query, |records: &mut Records<'_, T>| records.collect())
    }

    /// Reads every member of `list` (full records), page by page.
    pub fn read_members<T: Record>(&self, list: &ListId) -> Scan<Vec<T>> {
        self.scan(&ScanQuery { list_ids: vec![list.clone()], ..ScanQuery::default() })
    }

    /// Like [`Gateway::scan`], but each page's contacts go through `work` on the same blocking
    /// thread that parsed them (several pages at once), and the stream yields `work`'s results in
    /// page order. Records never cross threads: parsing, judging and freeing stay on one.
    pub fn scan_with<T: Record, R: Send + 'static>(
        &self,
        query: &ScanQuery,
        work: impl Fn(&mut Records<'_, T>) -> R + Send + Sync + 'static,
    ) -> Scan<R> {
        let op = if query.list_ids.is_empty() { Operation::ScanContacts } else { Operation::ReadMembers };
        let mut filters = query.filters.clone();
        let join = |ids: &[ListId]| ids.iter().map(ListId::as_str).collect::<Vec<_>>().join(",");
        if !query.list_ids.is_empty() {
            filters.push(("listIds".into(), join(&query.list_ids)));
        }
        if !query.not_list_ids.is_empty() {
            filters.push(("notListIds".into(), join(&query.not_list_ids)));
        }
        let request = scan::Request {
            op,
            resource: Resource::Contacts,
            path: &["contacts"],
            filters,
            sample: query.sample,
            keep: query.keep.clone(),
        };
        self.paged(request, work)
    }

    /// Every list whose name contains `search` (case-insensitive; `None` for all lists): a
    /// complete read of the directory with the same pagination and checks as contact reads, or
    /// an error. Never a partial answer, so "not found" is a fact, not a missed page.
    pub async fn lists(&self, search: Option<&str>) -> Result<Vec<ListInfo>, GatewayError> {
        let filters = search.map(|text| vec![("search".to_owned(), text.to_owned())]).unwrap_or_default();
        let mut scan = self.paged(
            scan::Request {
                op: Operation::FindList,
                resource: Resource::Lists,
                path: &["contacts", "list"],
                filters,
                sample: None,
                keep: None,
            },
            |lists: &mut Records<'_, ListInfo>| lists.collect::<Vec<_>>(),
        );
        let mut all = Vec::new();
        while let Some(page) = self.unless_cancelled(Operation::FindList, scan.next()).await? {
            all.extend(page?.records);
        }
        Ok(all)
    }

    /// Lists whose name is exactly `name`, oldest first, from a complete directory read.
    pub async fn find_lists(&self, name: &str) -> Result<Vec<ListInfo>, GatewayError> {
        let mut found: Vec<ListInfo> = self.lists(Some(name)).await?.into_iter().filter(|l| l.name == name).collect();
        sort_oldest_first(&mut found);
        Ok(found)
    }

    /// Creates a list. A create whose answer was lost is not blindly repeated: before each retry
    /// the list is looked up by name, so a retry never makes a duplicate.
    pub async fn create_list(&self, name: &str, description: &str) -> Result<ListInfo, GatewayError> {
        let body = json!({ "name": name, "description": description });
        let url = self.url(&["contacts", "list"]);
        let mut failures = 0;
        loop {
            match self.call(Operation::CreateList, Method::POST, url.clone(), &[], Some(&body), false).await {
                Ok(bytes) => return decode(Operation::CreateList, bytes).await,
                Err(e) if e.is_transient() && failures < self.inner.max_retries => {
                    failures += 1;
                    tracing::debug!(error = %e, "creating a list failed; checking whether it was created anyway");
                    if let Some(list) = self.find_lists(name).await?.into_iter().next() {
                        return Ok(list);
                    }
                    self.count(|m| m.retry(Operation::CreateList));
                    self.unless_cancelled(Operation::CreateList, tokio::time::sleep(backoff(failures))).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Adds contacts to a list, at most 1,000 per call. Adding a member twice is harmless. Ids
    /// whose fate the answer does not account for are counted as unconfirmed.
    pub async fn add_members(&self, list: &ListId, ids: &[ContactId]) -> Result<WriteOutcome, GatewayError> {
        let mut total = WriteOutcome::default();
        for batch in ids.chunks(MAX_BATCH) {
            let body = json!({ "listId": list, "contactIds": batch });
            let out: AddWire = self
                .call_json(
                    Operation::AddMembers,
                    Method::POST,
                    self.url(&["contacts", "list", "contacts"]),
                    &[],
                    Some(&body),
                )
                .await?;
            let sent = batch.len() as u64;
            match out.added_contacts {
                Some(added) => {
                    let (duplicate, invalid) = (out.duplicate_contacts.unwrap_or(0), out.invalid_contacts.unwrap_or(0));
                    total.done += added;
                    total.duplicate += duplicate;
                    total.invalid += invalid;
                    total.unconfirmed += sent.saturating_sub(added + duplicate + invalid);
                }
                None => total.unconfirmed += sent,
            }
            total.list_total = out.total_contacts_in_list;
        }
        Ok(total)
    }

    /// Removes contacts from a list: in bulk (1,000 per call) unless the server refuses the bulk
    /// form, then one at a time. Which form the server takes is decided once per client, by the
    /// first bulk call, while every other removal waits for the answer. Removing a non-member
    /// is harmless.
    pub async fn remove_members(&self, list: &ListId, ids: &[ContactId]) -> Result<WriteOutcome, GatewayError> {
        let mut total = WriteOutcome::default();
        for batch in ids.chunks(MAX_BATCH) {
            if self.inner.bulk_remove.load(Ordering::Acquire) == BULK_UNKNOWN {
                let _deciding = self.unless_cancelled(Operation::RemoveMembers, self.inner.bulk_probe.lock()).await?;
                if self.inner.bulk_remove.load(Ordering::Acquire) == BULK_UNKNOWN {
                    match self.remove_bulk(list, batch).await {
                        Ok(out) => {
                            self.inner.bulk_remove.store(BULK_YES, Ordering::Release);
                            total.merge(out);
                            continue;
                        }
                        Err(e) if matches!(e.status(), Some(400 | 404 | 405 | 415)) && !e.is_unknown_list() => {
                            self.inner.bulk_remove.store(BULK_NO, Ordering::Release);
                            tracing::warn!(
                                status = e.status().unwrap_or_default(),
                                error = %e,
                                "bulk removal refused"
                            );
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if self.inner.bulk_remove.load(Ordering::Acquire) == BULK_YES {
                total.merge(self.remove_bulk(list, batch).await?);
            } else {
                for id in batch {
                    total.merge(self.remove_one(list, id).await?);
                }
            }
        }
        Ok(total)
    }

    async fn remove_bulk(&self, list: &ListId, batch: &[ContactId]) -> Result<WriteOutcome, GatewayError> {
        let body = json!({ "listIds": [list], "contactIds": batch });
        let url = self.url(&["contacts", "list", "contacts"]);
        let out: RemoveWire = self.call_json(Operation::RemoveMembers, Method::DELETE, url, &[], Some(&body)).await?;
        Ok(out.outcome(batch.len() as u64))
    }

    async fn remove_one(&self, list: &ListId, id: &ContactId) -> Result<WriteOutcome, GatewayError> {
        let query = [("listId", list.to_string()), ("contactId", id.to_string())];
        let url = self.url(&["contacts", "list", "contacts"]);
        match self.call_json::<RemoveWire>(Operation::RemoveMembers, Method::DELETE, url, &query, None).await {
            Ok(out) => Ok(out.outcome(1)),
            // The contact was deleted meanwhile: it is not a member any more, which is what we wanted.
            Err(GatewayError::Api { status: 404, message, .. }) if message.starts_with("contactId:") => {
                Ok(WriteOutcome::default())
            }
            Err(e) => Err(e),
        }
    }

    /// One contact, as the API returns it.
    pub async fn get_contact<T: Record>(&self, id: &ContactId) -> Result<T, GatewayError> {
        self.call_json(Operation::GetContact, Method::GET, self.url(&["contacts", id.as_str()]), &[], None).await
    }
}

impl WriteOutcome {
    pub fn merge(&mut self, other: WriteOutcome) {
        self.done += other.done;
        self.duplicate += other.duplicate;
        self.invalid += other.invalid;
        self.unconfirmed += other.unconfirmed;
        self.list_total = other.list_total.or(self.list_total);
    }
}

/// What a scan reads: the contract's server-side filters and list membership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanQuery {
    /// `(name, value)` pairs such as `("region", "Lombardia")` or `("customFields.x.before", "2026-01-09")`.
    pub filters: Vec<(String, String)>,
    pub list_ids: Vec<ListId>,
    pub not_list_ids: Vec<ListId>,
    /// A sample, not a read: only the first pages, about this many records. Incomplete by design,
    /// so what it returns may inform people (`check --sample`, a finding) but never decide a removal.
    pub sample: Option<u64>,
    /// The contact fields the read's work reads, when it reads only some (`None`: every field).
    /// The server still sends every field; the others are skipped while parsing.
    pub keep: Option<Arc<crate::contact::Keep>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddWire {
    added_contacts: Option<u64>,
    duplicate_contacts: Option<u64>,
    invalid_contacts: Option<u64>,
    total_contacts_in_list: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RemoveWire {
    removed_contacts: Option<u64>,
    total_contacts_in_list: Option<u64>,
}

impl RemoveWire {
    /// Removing a non-member removes nothing, so fewer than sent is fine; no count at all is not.
    fn outcome(&self, sent: u64) -> WriteOutcome {
        let list_total = self.total_contacts_in_list;
        match self.removed_contacts {
            Some(n) => WriteOutcome { done: n, list_total, ..WriteOutcome::default() },
            None => WriteOutcome { unconfirmed: sent, list_total, ..WriteOutcome::default() },
        }
    }
}

/// Oldest first (by creation time, then id), so "the" list of a name is stable.
pub fn sort_oldest_first(lists: &mut [ListInfo]) {
    lists.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
}

/// Parses a response body off the async workers (a page of contacts is real CPU work).
async fn decode<T: DeserializeOwned + Send + 'static>(op: Operation, bytes: Bytes) -> Result<T, GatewayError> {
    tokio::task::spawn_blocking(move || serde_json::from_slice::<T>(&bytes))
        .await
        .map_err(|e| GatewayError::Decode { op, message: e.to_string() })?
        .map_err(|e| GatewayError::Decode { op, message: e.to_string() })
}

fn transport(op: Operation, e: &reqwest::Error) -> GatewayError {
    // The chain of causes, without the URL's query (it carries no secret, but it is noise).
    let mut message = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "connection failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    GatewayError::Transport { op, message, attempts: 1 }
}

/// Exponential backoff with jitter: 250 ms, 500 ms, 1 s … capped at 10 s, each drawn from its upper half.
fn backoff(failures: u32) -> Duration {
    let ceiling =
        Duration::from_millis(250).saturating_mul(1 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(10));
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn retry_after_header(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

/// The documented `retryAfter` field of a 429 body, in seconds.
fn retry_after_body(body: &[u8]) -> Option<Duration> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let secs = v.get("retryAfter")?;
    secs.as_f64().or_else(|| secs.as_str()?.parse().ok()).map(|s| Duration::from_secs_f64(s.max(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Both forms of Retry-After and the body's retryAfter are understood.
    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after_header(&HeaderValue::from_static("12")), Some(Duration::from_secs(12)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let parsed = retry_after_header(&HeaderValue::from_str(&later).expect("header")).expect("date form");
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30), "{parsed:?}");
        assert_eq!(retry_after_body(br#"{"status":429,"retryAfter":12}"#), Some(Duration::from_secs(12)));
        assert_eq!(retry_after_body(br#"{"status":429}"#), None);
    }

    // Backoff grows, is capped, and never collapses to zero.
    #[test]
    fn backoff_grows_and_caps() {
        for failures in 1..20 {
            let d = backoff(failures);
            assert!(d >= Duration::from_millis(125) && d <= Duration::from_secs(10), "{failures}: {d:?}");
        }
        assert!(backoff(6) >= Duration::from_secs(4));
    }
}
