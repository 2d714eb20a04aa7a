//! The partner-gateway client: every request segsync makes goes through here.
//!
//! Owns the wire format (wire types never leave this module), pagination, the shared rate budget,
//! retries, and request accounting. Knows nothing about rules or plans. It never sends the
//! contract's dangerous calls: there is no code path to `DELETE /contacts` or `allContacts`.

mod auth;
mod error;
mod meter;
mod pacer;

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use rand::Rng;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub use auth::{Credentials, Secret};
pub use error::{GatewayError, Operation};
pub use meter::{Meter, Usage};
pub use pacer::Pacer;

use crate::contact::Record;
use crate::ids::{ContactId, ListId};
use crate::plan::RateLimits;

/// The contract's limits on one call.
pub const MAX_PAGE_SIZE: u32 = 100;
pub const MAX_BATCH: usize = 1000;
/// 429s tolerated for one request before giving up (each one waits as the server asks).
const MAX_THROTTLED: u32 = 20;
/// The longest `retryAfter` we honour; a longer one is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How pages are addressed: the seed's `offset`, or the reference's 0-based `page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pagination {
    #[default]
    Offset,
    Page,
}

/// How the client paces, pages and retries: everything but where it connects and as whom.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// The plan's limits; `None` paces nothing.
    pub limits: Option<RateLimits>,
    pub page_size: u32,
    pub timeout: Duration,
    pub max_retries: u32,
    /// Pages of one scan in flight at once.
    pub concurrency: usize,
    pub pagination: Pagination,
}

impl Default for ClientSettings {
    /// The production plan, pages of 100, 30 s timeouts, 5 retries, 4 pages in flight, offsets.
    fn default() -> Self {
        Self {
            limits: crate::plan::Plan::Production.limits(),
            page_size: MAX_PAGE_SIZE,
            timeout: Duration::from_secs(30),
            max_retries: 5,
            concurrency: 4,
            pagination: Pagination::Offset,
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

/// The seed's answer to an add, summed over batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddOutcome {
    pub added: u64,
    pub duplicate: u64,
    pub invalid: u64,
}

/// One page of a scan: its contacts, de-duplicated against the pages before it (or what the
/// caller's page work made of them), and the server's count of all matches as of this page.
#[derive(Debug)]
pub struct Page<R> {
    pub records: R,
    pub total: u64,
}

/// A scan in progress: pages arrive in order; dropping it stops the requests.
pub struct Scan<R> {
    rx: mpsc::Receiver<Result<Page<R>, GatewayError>>,
    task: tokio::task::JoinHandle<()>,
}

impl<R> Scan<R> {
    /// The next page, `None` after the last one; an error ends the scan.
    pub async fn next(&mut self) -> Option<Result<Page<R>, GatewayError>> {
        self.rx.recv().await
    }
}

impl<R> Drop for Scan<R> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ids a scan has returned, as 64-bit keyed hashes: a 1M-contact scan costs 16 MB, not 60. A
/// collision (about 1 in 10^7 per million-contact scan, new keys every scan) only drops a duplicate-
/// looking record from this one scan, which can never remove anything.
struct Seen {
    hasher: RandomState,
    ids: std::sync::Mutex<HashSet<u64>>,
}

impl Seen {
    /// Keeps the records not seen before; a later page with nothing new means `offset` is ignored.
    fn fresh<T: Record>(&self, op: Operation, offset: u64, records: Vec<T>) -> Result<Vec<T>, GatewayError> {
        let before = records.len();
        let mut fresh = Vec::with_capacity(before);
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            let Some(id) = r.contact_id() else {
                return Err(GatewayError::Decode { op, message: format!("a contact at offset {offset} has no id") });
            };
            if ids.insert(self.hasher.hash_one(id.as_str())) {
                fresh.push(r);
            }
        }
        if offset > 0 && before > 0 && fresh.is_empty() {
            return Err(GatewayError::OffsetIgnored { op, offset });
        }
        Ok(fresh)
    }
}

/// What a scan reads: the contract's server-side filters and list membership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanQuery {
    /// `(name, value)` pairs such as `("region", "Lombardia")` or `("customFields.x.before", "2026-01-09")`.
    pub filters: Vec<(String, String)>,
    pub list_ids: Vec<ListId>,
    pub not_list_ids: Vec<ListId>,
}

const BULK_UNKNOWN: u8 = 0;
const BULK_YES: u8 = 1;
const BULK_NO: u8 = 2;

struct Inner {
    http: reqwest::Client,
    root: Url,
    auth: (HeaderName, HeaderValue),
    pacer: Pacer,
    page_size: u32,
    max_retries: u32,
    concurrency: usize,
    pagination: Pagination,
    bulk_remove: AtomicU8,
}

/// The client. Cheap to clone; clones share the connection pool and the rate budget.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
    meter: Arc<Meter>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("root", &self.inner.root.as_str()).finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Self, String> {
        let auth = config
            .credentials
            .header()
            .ok_or("the API credentials contain characters not allowed in an HTTP header")?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("segsync/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.settings.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(config.settings.concurrency.max(1) * 2)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let mut root = config.base_url.clone();
        root.path_segments_mut()
            .map_err(|()| format!("the base URL {} cannot carry a path", config.base_url))?
            .pop_if_empty()
            .extend(["partner-gateway", "v1"]);
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                root,
                auth,
                pacer: Pacer::new(config.settings.limits),
                page_size: config.settings.page_size.clamp(1, MAX_PAGE_SIZE),
                max_retries: config.settings.max_retries,
                concurrency: config.settings.concurrency.max(1),
                pagination: config.settings.pagination,
                bulk_remove: AtomicU8::new(BULK_UNKNOWN),
            }),
            meter: Arc::new(Meter::default()),
        })
    }

    /// A handle sharing everything but counting its requests in `meter` (one per run).
    pub fn metered(&self, meter: Arc<Meter>) -> Self {
        Self { inner: self.inner.clone(), meter }
    }

    pub fn usage(&self) -> Usage {
        self.meter.usage()
    }

    pub fn page_size(&self) -> u32 {
        self.inner.page_size
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.root.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    /// Sends one request, pacing it, retrying transient failures with backoff and jitter, and
    /// honouring 429s by pausing every request of this client.
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
            let waited = self.inner.pacer.acquire().await;
            self.meter.waited(op, waited);
            self.meter.request(op);
            let attempts = failures + throttled + 1;
            let mut request = self.inner.http.request(method.clone(), url.clone()).query(query);
            request = request.header(self.inner.auth.0.clone(), self.inner.auth.1.clone());
            if let Some(body) = body {
                request = request.json(body);
            }
            let outcome = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let retry_header =
                        response.headers().get(reqwest::header::RETRY_AFTER).and_then(retry_after_header);
                    match response.bytes().await {
                        Ok(bytes) => Ok((status, retry_header, bytes)),
                        Err(e) => Err(transport(op, &e)),
                    }
                }
                Err(e) => Err(transport(op, &e)),
            };
            let error = match outcome {
                Ok((status, _, bytes)) if status.is_success() => return Ok(bytes),
                Ok((StatusCode::TOO_MANY_REQUESTS, header, bytes)) => {
                    throttled += 1;
                    self.meter.throttled(op);
                    let wait = header
                        .or_else(|| retry_after_body(&bytes))
                        .unwrap_or(Duration::from_secs(1))
                        .min(MAX_RETRY_AFTER);
                    self.inner.pacer.pause_for(wait);
                    let error = GatewayError::Api { op, status: 429, message: error::api_message(&bytes), attempts };
                    if throttled > MAX_THROTTLED {
                        return Err(error);
                    }
                    tracing::debug!(op = %op, wait_ms = wait.as_millis() as u64, "rate limited by the gateway; pausing all requests");
                    self.meter.retry(op);
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
            self.meter.retry(op);
            tokio::time::sleep(delay).await;
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
        self.scan_with(query, |records: Vec<T>| records)
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
        work: impl Fn(Vec<T>) -> R + Send + Sync + 'static,
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
        filters.push(("limit".into(), self.inner.page_size.to_string()));
        let (tx, rx) = mpsc::channel(self.inner.concurrency + 1);
        let this = self.clone();
        let task = tokio::spawn(async move { this.produce(op, filters, Arc::new(work), tx).await });
        Scan { rx, task }
    }

    /// Fetches the page at `offset`, then parses, de-duplicates and works it on a blocking thread.
    async fn fetch_page<T: Record, R: Send + 'static>(
        &self,
        op: Operation,
        filters: &[(String, String)],
        offset: u64,
        seen: &Arc<Seen>,
        work: &Arc<dyn Fn(Vec<T>) -> R + Send + Sync>,
    ) -> Result<Page<R>, GatewayError> {
        let mut query: Vec<(&str, String)> = filters.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        match self.inner.pagination {
            Pagination::Offset => query.push(("offset", offset.to_string())),
            Pagination::Page => query.push(("page", (offset / u64::from(self.inner.page_size)).to_string())),
        }
        let bytes = self.call(op, Method::GET, self.url(&["contacts"]), &query, None, true).await?;
        let (seen, work) = (seen.clone(), work.clone());
        tokio::task::spawn_blocking(move || {
            let wire: PageWire<T> =
                serde_json::from_slice(&bytes).map_err(|e| GatewayError::Decode { op, message: e.to_string() })?;
            let fresh = seen.fresh(op, offset, wire.contacts)?;
            Ok(Page { records: work(fresh), total: wire.total })
        })
        .await
        .map_err(|e| GatewayError::Decode { op, message: e.to_string() })?
    }

    async fn produce<T: Record, R: Send + 'static>(
        self,
        op: Operation,
        filters: Vec<(String, String)>,
        work: Arc<dyn Fn(Vec<T>) -> R + Send + Sync>,
        tx: mpsc::Sender<Result<Page<R>, GatewayError>>,
    ) {
        let limit = u64::from(self.inner.page_size);
        let seen = Arc::new(Seen { hasher: RandomState::new(), ids: std::sync::Mutex::new(HashSet::new()) });
        let mut total = u64::MAX;
        let mut next_offset = 0;
        while next_offset < total {
            // The first page tells the total; later pages are fetched several at a time, in order.
            let offsets: Vec<u64> =
                if total == u64::MAX { vec![0] } else { (next_offset..total).step_by(limit as usize).collect() };
            next_offset = offsets.last().copied().unwrap_or(next_offset) + limit;
            let mut pages = futures_util::stream::iter(offsets)
                .map(|offset| self.fetch_page(op, &filters, offset, &seen, &work))
                .buffered(self.inner.concurrency);
            while let Some(result) = pages.next().await {
                let page = match result {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                total = if total == u64::MAX { page.total } else { total.max(page.total) };
                if tx.send(Ok(page)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// One page of lists whose name contains `search` (case-insensitive; `None` for all lists),
    /// and the total count.
    pub async fn lists_page(&self, search: Option<&str>, offset: u64) -> Result<(Vec<ListInfo>, u64), GatewayError> {
        let mut query = vec![("limit", MAX_PAGE_SIZE.to_string()), ("offset", offset.to_string())];
        if let Some(text) = search {
            query.push(("search", text.to_owned()));
        }
        let page: ListPageWire =
            self.call_json(Operation::FindList, Method::GET, self.url(&["contacts", "list"]), &query, None).await?;
        Ok((page.lists, page.total))
    }

    /// Lists whose name is exactly `name`, oldest first.
    pub async fn find_lists(&self, name: &str) -> Result<Vec<ListInfo>, GatewayError> {
        let mut found = Vec::new();
        let mut offset = 0u64;
        loop {
            let (lists, total) = self.lists_page(Some(name), offset).await?;
            let n = lists.len() as u64;
            found.extend(lists.into_iter().filter(|l| l.name == name));
            offset += n;
            if n == 0 || offset >= total {
                break;
            }
        }
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
                    self.meter.retry(Operation::CreateList);
                    tokio::time::sleep(backoff(failures)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Adds contacts to a list, at most 1,000 per call. Adding a member twice is harmless.
    pub async fn add_members(&self, list: &ListId, ids: &[ContactId]) -> Result<AddOutcome, GatewayError> {
        let mut total = AddOutcome::default();
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
            total.added += out.added_contacts;
            total.duplicate += out.duplicate_contacts;
            total.invalid += out.invalid_contacts;
        }
        Ok(total)
    }

    /// Removes contacts from a list: in bulk (1,000 per call) unless the server refused the bulk
    /// form once, then one at a time. Removing a non-member is harmless. Returns how many left.
    pub async fn remove_members(&self, list: &ListId, ids: &[ContactId]) -> Result<u64, GatewayError> {
        let mut removed = 0;
        for batch in ids.chunks(MAX_BATCH) {
            if self.inner.bulk_remove.load(Ordering::Relaxed) != BULK_NO {
                let body = json!({ "listIds": [list], "contactIds": batch });
                let url = self.url(&["contacts", "list", "contacts"]);
                match self
                    .call_json::<RemoveWire>(Operation::RemoveMembers, Method::DELETE, url, &[], Some(&body))
                    .await
                {
                    Ok(out) => {
                        self.inner.bulk_remove.store(BULK_YES, Ordering::Relaxed);
                        removed += out.removed_contacts;
                        continue;
                    }
                    Err(e) if self.refuses_bulk(&e) => {
                        self.inner.bulk_remove.store(BULK_NO, Ordering::Relaxed);
                        tracing::warn!(
                            status = e.status().unwrap_or_default(),
                            error = %e,
                            "the gateway refused the bulk removal form; removing one contact at a time from now on"
                        );
                    }
                    Err(e) => return Err(e),
                }
            }
            for id in batch {
                removed += self.remove_one(list, id).await?;
            }
        }
        Ok(removed)
    }

    /// Only the first bulk call can reveal a server without the bulk form; a missing list is not that.
    fn refuses_bulk(&self, e: &GatewayError) -> bool {
        self.inner.bulk_remove.load(Ordering::Relaxed) == BULK_UNKNOWN
            && matches!(e.status(), Some(400 | 404 | 405 | 415))
            && !e.is_unknown_list()
    }

    async fn remove_one(&self, list: &ListId, id: &ContactId) -> Result<u64, GatewayError> {
        let query = [("listId", list.to_string()), ("contactId", id.to_string())];
        let url = self.url(&["contacts", "list", "contacts"]);
        match self.call_json::<RemoveWire>(Operation::RemoveMembers, Method::DELETE, url, &query, None).await {
            Ok(out) => Ok(out.removed_contacts),
            // The contact was deleted meanwhile: it is not a member any more, which is what we wanted.
            Err(GatewayError::Api { status: 404, message, .. }) if message.starts_with("contactId:") => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// One contact, as the API returns it.
    pub async fn get_contact<T: Record>(&self, id: &ContactId) -> Result<T, GatewayError> {
        self.call_json(Operation::GetContact, Method::GET, self.url(&["contacts", id.as_str()]), &[], None).await
    }
}

#[derive(Deserialize)]
struct PageWire<T> {
    contacts: Vec<T>,
    total: u64,
}

#[derive(Deserialize)]
struct ListPageWire {
    lists: Vec<ListInfo>,
    total: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddWire {
    #[serde(default)]
    added_contacts: u64,
    #[serde(default)]
    duplicate_contacts: u64,
    #[serde(default)]
    invalid_contacts: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RemoveWire {
    #[serde(default)]
    removed_contacts: u64,
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
