//! Paged reads: contacts, a list's members and the list directory all come through one reader.
//!
//! The reader trusts nothing a page says about other pages. `total` is only a hint for how far
//! ahead to fetch, never a size: at most `concurrency` pages are in flight, whatever it claims.
//! A read ends on its first short or empty page, and is then checked as a whole: pages fetched
//! beyond the end must be empty, the distinct records seen must agree with the first page's
//! `total` (within the churn a live account explains), and no record may repeat a whole page
//! (a server that ignores the offset). A read that fails a check is an error, never a silent
//! partial result, so nothing downstream can decide anything on it.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use bytes::Bytes;
use compact_str::CompactString;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use reqwest::Method;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{Gateway, GatewayError, ListInfo, Operation, Pagination, Paging, Resource, SEED_PAGE_SIZE};
use crate::contact::{Keep, Record};

/// More records than this in one read is not an account, it is a broken or hostile server: the
/// read fails at once instead of holding ever more ids (16 bytes each) in memory.
pub const MAX_RECORDS_PER_READ: u64 = 50_000_000;

/// A record a paged read can de-duplicate: anything parsed from its text with an id.
pub trait Keyed: Send + 'static + Sized {
    /// The record's id, as text.
    fn key(&self) -> Option<CompactString>;

    /// The record at the start of `text` (a slice of `page` running on to the page's end),
    /// keeping `keep`'s fields, and the bytes it took.
    fn parse(text: &str, page: &Bytes, keep: Option<&Arc<Keep>>) -> serde_json::Result<(Self, usize)>;
}

impl<T: Record> Keyed for T {
    fn key(&self) -> Option<CompactString> {
        self.contact_id().map(|id| id.as_str().into())
    }

    fn parse(text: &str, page: &Bytes, keep: Option<&Arc<Keep>>) -> serde_json::Result<(Self, usize)> {
        T::parse_at(text, page, keep)
    }
}

impl Keyed for ListInfo {
    fn key(&self) -> Option<CompactString> {
        Some(self.id.as_str().into())
    }

    fn parse(text: &str, _: &Bytes, _: Option<&Arc<Keep>>) -> serde_json::Result<(Self, usize)> {
        crate::contact::parse_one(text, |de| Self::deserialize(de))
    }
}

/// One page's records, parsed a few at a time as the page work asks for them (so each is judged
/// while still in cache, and a page's records are never all held at once), and checked against
/// the read's ids first: a record an earlier page returned is skipped. Each is parsed where it
/// lies in the page, in the one pass over the page's text that also finds where it ends (see
/// [`Envelope`]). A record that does not parse, or has no id, or is not followed by `,` or `]`,
/// ends the page; the page is then the read's error, whatever the work made of the records
/// before it.
pub struct Records<'a, T> {
    /// The page's text, and where its next record (or the array's `]`) starts.
    text: &'a str,
    at: usize,
    /// The array's `]` was reached (or the page failed).
    done: bool,
    /// Records parsed (new or not).
    raw: usize,
    page: &'a Bytes,
    keep: Option<&'a Arc<Keep>>,
    seen: &'a Seen,
    op: Operation,
    offset: u64,
    fresh: usize,
    error: Option<GatewayError>,
    /// Parsed and new to the read, not yet handed out (in page order).
    ready: std::collections::VecDeque<T>,
}

/// How many records are parsed before their ids go through [`Seen`] together: one lock for the
/// lot, and their lookups in one loop, whose cache misses the processor overlaps (a lookup each
/// between parses waited for each miss in turn; the ids' set is larger than any cache). Page
/// work that looks records up in large tables of its own takes them as many at a time.
pub const RECORD_BATCH: usize = 32;

impl<T> Records<'_, T> {
    /// The records handed out so far (all of the page's new ones, once the iteration ended).
    pub fn fresh(&self) -> usize {
        self.fresh
    }
}

impl<T: Keyed> Iterator for Records<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        loop {
            if let Some(record) = self.ready.pop_front() {
                self.fresh += 1;
                return Some(record);
            }
            if self.error.is_some() || self.done {
                return None;
            }
            self.parse_batch();
        }
    }
}

impl<T: Keyed> Records<'_, T> {
    /// Parses up to [`RECORD_BATCH`] records, or up to the first that does not parse or has no id (the
    /// page's error, handed out after the records before it), and keeps those new to the read.
    fn parse_batch(&mut self) {
        let mut parsed = Vec::with_capacity(RECORD_BATCH);
        let mut ids = Vec::with_capacity(RECORD_BATCH);
        while parsed.len() < RECORD_BATCH && !self.done {
            let record = match T::parse(&self.text[self.at..], self.page, self.keep) {
                Ok((record, used)) => {
                    self.raw += 1;
                    self.at += used;
                    record
                }
                Err(e) => {
                    let e = Envelope::at_page(&e, self.text, self.at);
                    self.fail(format!("a record at offset {}: {e}", self.offset));
                    break;
                }
            };
            let Some(id) = record.key() else {
                self.fail(format!("a record at offset {} has no id", self.offset));
                break;
            };
            // The record ends the array (`]`) or another follows (`,`).
            let mut cursor = Envelope { text: self.text, at: self.at };
            match cursor.after_element() {
                Ok(more) => {
                    self.at = cursor.at;
                    self.done = !more;
                }
                Err(message) => {
                    self.fail(format!("the page's records at offset {}: {message}", self.offset));
                    break;
                }
            }
            parsed.push(record);
            ids.push(id);
        }
        let new = self.seen.first_times(&ids);
        self.ready.extend(parsed.into_iter().zip(new).filter_map(|(record, new)| new.then_some(record)));
    }

    fn fail(&mut self, message: String) {
        self.error = Some(GatewayError::Decode { op: self.op, message });
        self.done = true;
    }
}

/// One page of a read: its records, de-duplicated against the pages before it (or what the
/// caller's page work made of them), and the server's count of all matches as of this page.
#[derive(Debug)]
pub struct Page<R> {
    pub records: R,
    pub total: u64,
}

/// A read in progress: pages arrive in order; dropping it stops the requests.
pub struct Scan<R> {
    rx: mpsc::Receiver<Result<Page<R>, GatewayError>>,
    task: tokio::task::JoinHandle<()>,
}

impl<R> Scan<R> {
    /// The next page, `None` after the last one; an error ends the read.
    pub async fn next(&mut self) -> Option<Result<Page<R>, GatewayError>> {
        self.rx.recv().await
    }
}

impl<R> Drop for Scan<R> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a paged read asks for.
pub(super) struct Request {
    pub op: Operation,
    pub resource: Resource,
    pub path: &'static [&'static str],
    pub filters: Vec<(String, String)>,
    /// Stop after the pages holding about this many records (`ScanQuery::sample`).
    pub sample: Option<u64>,
    /// What each contact keeps (`ScanQuery::keep`).
    pub keep: Option<Arc<crate::contact::Keep>>,
}

/// A read's page work: what it makes of one page's records.
type Work<T, R> = dyn Fn(&mut Records<'_, T>) -> R + Send + Sync;

/// The churn a live account explains between the pages of one read: 1 % of the total, plus 2.
/// More than that and the read is not trusted.
pub fn churn_margin(total: u64) -> u64 {
    total / 100 + 2
}

/// A page's envelope, `{"contacts": [...], "total": N, "limit": L, ...}` in any order (`lists`
/// for the list directory), walked by hand: the records are parsed where they lie, by
/// [`Records`], so the page's text is read once, not first whole (to find where each record
/// ends) and then record by record. Everything else in it is read by `serde_json`, and it is held
/// to what a derived `Deserialize` would ask: an object, the array once, `total` once, nothing
/// after the closing brace.
struct Envelope<'a> {
    text: &'a str,
    at: usize,
}

/// What a page's envelope says besides its records.
#[derive(Default)]
struct Told {
    total: Option<u64>,
    /// The page size the server says it used (a server may serve less than asked).
    limit: Option<u64>,
    /// The records' array was there (it may be read only once).
    records: bool,
}

impl<'a> Envelope<'a> {
    fn byte(&mut self) -> Option<u8> {
        let rest = &self.text.as_bytes()[self.at..];
        self.at += rest.iter().take_while(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t')).count();
        self.text.as_bytes().get(self.at).copied()
    }

    fn expect(&mut self, want: u8, what: &str) -> Result<(), String> {
        match self.byte() {
            Some(b) if b == want => {
                self.at += 1;
                Ok(())
            }
            Some(b) => Err(format!("expected {what}, found `{}` at byte {}", char::from(b), self.at)),
            None => Err(format!("expected {what}, found the end of the page")),
        }
    }

    fn value<T: Deserialize<'a>>(&mut self) -> Result<T, String> {
        let parsed = crate::contact::parse_one(&self.text[self.at..], |de| T::deserialize(de));
        let (value, used) = parsed.map_err(|e| Self::at_page(&e, self.text, self.at))?;
        self.at += used;
        Ok(value)
    }

    /// The envelope's fields up to the records' array (its first record, or its `]`, is next:
    /// `true`), or to its end (`false`: no array after `told.records`).
    fn fields(&mut self, told: &mut Told) -> Result<bool, String> {
        if self.at == 0 {
            self.expect(b'{', "a JSON object")?;
            if self.byte() == Some(b'}') {
                self.at += 1;
                return self.end();
            }
        } else if !self.next_field()? {
            return self.end();
        }
        loop {
            let crate::slots::Key(key) = self.value()?;
            self.expect(b':', "`:`")?;
            match &*key {
                "contacts" | "lists" if told.records => return Err(format!("duplicate field `{key}`")),
                "contacts" | "lists" => {
                    told.records = true;
                    self.expect(b'[', &format!("an array of records in `{key}`"))?;
                    if self.byte() == Some(b']') {
                        self.at += 1;
                    } else {
                        return Ok(true);
                    }
                }
                "total" if told.total.is_some() => return Err("duplicate field `total`".into()),
                "total" => told.total = Some(self.value()?),
                "limit" if told.limit.is_some() => return Err("duplicate field `limit`".into()),
                "limit" => told.limit = self.value()?,
                _ => {
                    self.value::<serde::de::IgnoredAny>()?;
                }
            }
            if !self.next_field()? {
                return self.end();
            }
        }
    }

    /// After a field's value: `,` (another field follows: `true`) or `}` (the object ends).
    fn next_field(&mut self) -> Result<bool, String> {
        self.separator(b'}', "`,` or `}`")
    }

    /// After an array element: `,` (another follows: `true`) or `]` (the array ends).
    fn after_element(&mut self) -> Result<bool, String> {
        self.separator(b']', "`,` or `]` after a record")
    }

    /// `,` before another member (`true`), or `close` (`false`); nothing else, no trailing comma.
    fn separator(&mut self, close: u8, what: &str) -> Result<bool, String> {
        if self.byte() == Some(b',') {
            self.at += 1;
            return match self.byte() {
                Some(b) if b == close => Err(format!("a trailing comma at byte {}", self.at)),
                _ => Ok(true),
            };
        }
        self.expect(close, what).map(|()| false)
    }

    /// The object closed: nothing but whitespace may follow.
    fn end(&mut self) -> Result<bool, String> {
        match self.byte() {
            None => Ok(false),
            Some(_) => Err(format!("trailing characters at byte {}", self.at)),
        }
    }

    /// `e`, from a parse that began at byte `start` of `text`, with its position in the page.
    fn at_page(e: &serde_json::Error, text: &str, start: usize) -> String {
        let message = e.to_string();
        if e.line() == 0 {
            return message;
        }
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let code = message.strip_suffix(&suffix).unwrap_or(&message);
        let before = &text[..start];
        let line = before.matches('\n').count() + e.line();
        let column = match e.line() {
            1 => before.len() - before.rfind('\n').map_or(0, |n| n + 1) + e.column(),
            _ => e.column(),
        };
        format!("{code} at line {line} column {column}")
    }
}

/// The ids a read has returned, as 64-bit keyed hashes: a 1M-contact read costs 16 MB, not 60. A
/// collision (about 1 in 10^7 per million-record read, new keys every read) only drops a
/// duplicate-looking record from this one read, which can never remove anything.
struct Seen {
    /// SipHash, keyed per read: a record's 64-bit fingerprint.
    hasher: RandomState,
    /// The fingerprints seen (already well mixed, so the set's own hash is the cheap one). One set,
    /// not shards: a million fingerprints make one allocation above mimalloc's large-object size,
    /// returned to the system when the read ends; 64 shards held ~20 MB more between passes (and
    /// the lock was not the cost: the set's cache misses are, shards or not).
    ids: std::sync::Mutex<hashbrown::HashSet<u64>>,
}

impl Seen {
    fn new() -> Self {
        Self { hasher: RandomState::new(), ids: Default::default() }
    }

    /// Whether each of `ids` is new to this read (and from now on, seen): an id twice in `ids`
    /// is new the first time only.
    fn first_times(&self, ids: &[CompactString]) -> Vec<bool> {
        let hashes: Vec<u64> = ids.iter().map(|id| self.hasher.hash_one(id.as_str())).collect();
        let mut set = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        hashes.into_iter().map(|hash| set.insert(hash)).collect()
    }
}

/// A page as fetched: the raw count (before de-duplication) decides where the read ends.
struct Fetched<R> {
    offset: u64,
    raw: usize,
    /// The page size the server says it served.
    served_limit: Option<u64>,
    fresh: usize,
    page: Page<R>,
}

impl Gateway {
    /// Starts a paged read of `req`; each page's records go through `work` on the blocking thread
    /// that parsed them, and the stream yields `work`'s results in page order.
    pub(super) fn paged<T: Keyed, R: Send + 'static>(
        &self,
        req: Request,
        work: impl Fn(&mut Records<'_, T>) -> R + Send + Sync + 'static,
    ) -> Scan<R> {
        let (tx, rx) = mpsc::channel(self.inner.concurrency + 1);
        let this = self.clone();
        let task = tokio::spawn(async move {
            let work: Arc<Work<T, R>> = Arc::new(work);
            this.produce(req, &work, &tx).await;
            // The page work (and what it holds, e.g. member sets shared with the caller) goes
            // before the channel closes, so a caller that saw the end holds the only references.
            drop(work);
            drop(tx);
        });
        Scan { rx, task }
    }

    /// Fetches the page at `offset`, then parses, de-duplicates and works it on a blocking thread.
    async fn fetch_page<T: Keyed, R: Send + 'static>(
        &self,
        req: &Request,
        offset: u64,
        paging: Paging,
        seen: &Arc<Seen>,
        work: &Arc<Work<T, R>>,
        workers: &PageWorkers,
    ) -> Result<Fetched<R>, GatewayError> {
        let op = req.op;
        let mut query: Vec<(&str, String)> = req.filters.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let limit = u64::from(paging.page_size);
        query.push(("limit", limit.to_string()));
        match paging.pagination {
            Pagination::Offset => query.push(("offset", offset.to_string())),
            Pagination::Page => query.push(("page", (offset / limit).to_string())),
        }
        let bytes = self.call(op, Method::GET, self.url(req.path), &query, None, true).await?;
        let (seen, work, meter, keep) = (seen.clone(), work.clone(), self.meter.clone(), req.keep.clone());
        let (done, worked) = tokio::sync::oneshot::channel();
        workers.submit(Box::new(move || {
            // The page's own copy: each record holds one, and a count every page thread shared
            // would be one cache line they all wrote, once a record.
            let keep = keep.map(|k| Arc::new(crate::contact::Keep::clone(&k)));
            let worked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                work_page(&bytes, op, offset, paging, &seen, keep.as_ref(), &*work, &meter)
            }));
            let _ = done.send(worked.unwrap_or_else(|panic| {
                let message = format!("the page at offset {offset} panicked: {}", crate::fault::panic_message(&*panic));
                Err(GatewayError::Decode { op, message })
            }));
        }));
        // No answer: the read is being dropped (its workers stop), so no one waits for this one.
        worked.await.unwrap_or_else(|_| Err(GatewayError::Decode { op, message: "the read stopped".into() }))
    }

    /// The first page of a read, alone: it probes the server and settles the page size.
    /// - A 400 that names the `limit` parameter means the server does not take pages that large:
    ///   the seed's 100 then. Any other 400 is the read's error, whatever words it contains.
    /// - An echoed `limit` smaller than asked is believed only when the page holds no more rows
    ///   than it says (a server that serves 1,000 rows and echoes 5 is not paging by 5).
    /// - A page with fewer rows than asked while the total counts more than that page (beyond
    ///   churn) tells the server's page size: the read goes on with pages of that many rows.
    async fn first_page<T: Keyed, R: Send + 'static>(
        &self,
        req: &Request,
        paging: &mut Paging,
        seen: &Arc<Seen>,
        work: &Arc<Work<T, R>>,
        workers: &PageWorkers,
    ) -> Result<Fetched<R>, GatewayError> {
        let mut reason = None;
        loop {
            match self.fetch_page(req, 0, *paging, seen, work, workers).await {
                Err(GatewayError::Api { status: 400, message, .. })
                    if paging.page_size > SEED_PAGE_SIZE && super::error::names_limit_parameter(&message) =>
                {
                    reason = Some(format!("the gateway refused limit {}: {message}", paging.page_size));
                    paging.page_size = SEED_PAGE_SIZE;
                }
                Ok(fetched) => {
                    let asked = u64::from(paging.page_size);
                    let raw = fetched.raw as u64;
                    let total = fetched.page.total;
                    if let Some(served) = fetched.served_limit.filter(|&l| l > 0 && l < asked && raw <= l) {
                        reason = Some(format!("asked for pages of {asked}, the gateway served {served}"));
                        paging.page_size = served as u32;
                    } else if raw > 0 && raw < asked && total > raw + churn_margin(total) {
                        reason = Some(format!(
                            "asked for pages of {asked}, the gateway served {raw} row(s) while counting {total}"
                        ));
                        paging.page_size = raw as u32;
                    }
                    self.learn(req.resource, *paging, reason.as_deref());
                    return Ok(fetched);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn produce<T: Keyed, R: Send + 'static>(
        &self,
        req: Request,
        work: &Arc<Work<T, R>>,
        tx: &mpsc::Sender<Result<Page<R>, GatewayError>>,
    ) {
        let mut paging = self.paging(req.resource);
        let seen = Arc::new(Seen::new());
        let workers = PageWorkers::new(self.inner.concurrency);
        let first = self.first_page(&req, &mut paging, &seen, work, &workers).await;
        let mut read = Read::new(req.op, u64::from(paging.page_size));
        let stop_at = req.sample.unwrap_or(u64::MAX);
        let mut in_flight = FuturesOrdered::new();
        in_flight.push_back(futures_util::future::Either::Left(std::future::ready(first)));
        let mut next_offset = read.limit;
        // A read may change its pagination once, either way: a server that ignores `offset` is
        // asked by `page`, and one that ignores `page` (after an episode that taught `page`) by
        // `offset` again. A server that ignores both fails the read.
        let mut switched = false;
        loop {
            // Keep up to `concurrency` pages in flight, but only where the first page's total says
            // there are records; past it, one page at a time until a short or empty one.
            while read.end.is_none() && in_flight.len() < self.inner.concurrency && next_offset < stop_at {
                let ahead = read.first_total.is_some_and(|total| next_offset < total);
                if !(ahead || in_flight.is_empty()) {
                    break;
                }
                in_flight.push_back(futures_util::future::Either::Right(self.fetch_page(
                    &req,
                    next_offset,
                    paging,
                    &seen,
                    work,
                    &workers,
                )));
                next_offset += read.limit;
            }
            let Some(result) = in_flight.next().await else { break };
            let outcome = match result {
                // A server that ignores `offset` is asked by `page` instead (unless the config
                // pins the pagination): the records so far stand, the read goes on from there.
                Err(GatewayError::PagingIgnored { offset, pagination, .. })
                    if !self.inner.pagination_pinned && !switched =>
                {
                    switched = true;
                    let (to, reason) = match pagination {
                        Pagination::Offset => (Pagination::Page, "the gateway ignores `offset` and pages by `page`"),
                        Pagination::Page => (Pagination::Offset, "the gateway ignores `page` and pages by `offset`"),
                    };
                    paging.pagination = to;
                    self.learn(req.resource, paging, Some(reason));
                    in_flight = FuturesOrdered::new();
                    next_offset = offset;
                    continue;
                }
                result => result.and_then(|fetched| read.accept(fetched)),
            };
            match outcome {
                Ok(Some(page)) => {
                    if tx.send(Ok(page)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if let Err(e) = read.finish(stop_at) {
            let _ = tx.send(Err(e)).await;
        }
    }
}

/// Parses one fetched page, de-duplicates its records against the read's and puts them through
/// `work`: the part of a page's handling that runs on a page worker.
#[allow(clippy::too_many_arguments)]
fn work_page<T: Keyed, R>(
    bytes: &Bytes,
    op: Operation,
    offset: u64,
    paging: Paging,
    seen: &Seen,
    keep: Option<&Arc<Keep>>,
    work: &Work<T, R>,
    meter: &super::Meter,
) -> Result<Fetched<R>, GatewayError> {
    let decode = |message: String| GatewayError::Decode { op, message };
    let text = std::str::from_utf8(bytes).map_err(|e| decode(format!("the page is not UTF-8: {e}")))?;
    let mut told = Told::default();
    let mut envelope = Envelope { text, at: 0 };
    let has_records = envelope.fields(&mut told).map_err(decode)?;
    let mut records = Records {
        text,
        at: envelope.at,
        done: !has_records,
        raw: 0,
        page: bytes,
        keep,
        seen,
        op,
        offset,
        fresh: 0,
        error: None,
        ready: Default::default(),
    };
    let worked = work(&mut records);
    // Whatever the work left unread is still checked and counted.
    records.by_ref().for_each(drop);
    let raw = records.raw;
    meter.records(op, raw as u64);
    super::PROCESS.records(op, raw as u64);
    if let Some(e) = records.error {
        return Err(e);
    }
    // The envelope's fields after the records.
    if has_records {
        envelope.at = records.at;
        envelope.fields(&mut told).map_err(decode)?;
    }
    let Some(total) = told.total else { return Err(decode("missing field `total`".into())) };
    if !told.records {
        return Err(decode("missing field `contacts`".into()));
    }
    // A full later page with nothing new means `offset` (or `page`) is ignored.
    if offset > 0 && raw > 0 && records.fresh == 0 {
        return Err(GatewayError::PagingIgnored { op, offset, pagination: paging.pagination });
    }
    Ok(Fetched { offset, raw, served_limit: told.limit, fresh: records.fresh, page: Page { records: worked, total } })
}

/// A page's parse and work, queued for a page worker.
type Job = Box<dyn FnOnce() + Send>;

/// The threads that parse and work one read's pages: at most one per core (and per page in
/// flight). Pages are CPU work: more threads than cores would only take turns on them, each
/// switch refilling caches, and a page handed to whichever of the runtime's blocking threads was
/// free ran on a cold cache and allocator heap. A worker takes queued pages one after another,
/// waits [`PageWorkers::LINGER`] for the next, and then goes back to the runtime's blocking pool:
/// a read that waits on its consumer holds no thread that another read or the state needs.
struct PageWorkers {
    shared: Arc<Shared>,
    most: usize,
}

#[derive(Default)]
struct Shared {
    queue: std::sync::Mutex<Queue>,
    more: std::sync::Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: std::collections::VecDeque<Job>,
    running: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// The read is gone: queued pages are dropped, not worked.
    closed: bool,
}

impl PageWorkers {
    /// How long a worker waits for the read's next page before it lets its thread go: longer
    /// than a page's round trip, far shorter than anything a thread's absence could hold up.
    const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

    fn new(in_flight: usize) -> Self {
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from));
        Self { shared: Default::default(), most: in_flight.min(cores).max(1) }
    }

    fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Queue> {
        shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `job` for a waiting worker, or a new one if fewer than the most are running.
    fn submit(&self, job: Job) {
        let mut queue = Self::lock(&self.shared);
        queue.jobs.push_back(job);
        // Each waiting worker takes one of the queued jobs.
        if queue.jobs.len() <= queue.idle {
            drop(queue);
            self.shared.more.notify_one();
        } else if queue.running < self.most {
            queue.running += 1;
            drop(queue);
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || Self::work(&shared));
        }
    }

    /// A worker: works queued pages until none comes for [`Self::LINGER`] (a job catches its own
    /// panics).
    fn work(shared: &Shared) {
        loop {
            let job = {
                let mut queue = Self::lock(shared);
                if queue.jobs.is_empty() && !queue.closed {
                    queue.idle += 1;
                    queue = shared
                        .more
                        .wait_timeout_while(queue, Self::LINGER, |q| q.jobs.is_empty() && !q.closed)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                    queue.idle -= 1;
                }
                match queue.jobs.pop_front() {
                    Some(job) if !queue.closed => job,
                    _ => {
                        queue.running -= 1;
                        return;
                    }
                }
            };
            job();
        }
    }
}

impl Drop for PageWorkers {
    fn drop(&mut self) {
        let mut queue = Self::lock(&self.shared);
        queue.closed = true;
        // Dropped outside the lock: their results have no reader.
        let jobs = std::mem::take(&mut queue.jobs);
        drop(queue);
        self.shared.more.notify_all();
        drop(jobs);
    }
}

/// The checks of one paged read, page by page and at its end.
struct Read {
    op: Operation,
    limit: u64,
    first_total: Option<u64>,
    distinct: u64,
    /// The offset of the first short or empty page: the end of the read.
    end: Option<u64>,
}

impl Read {
    fn new(op: Operation, limit: u64) -> Self {
        Self { op, limit, first_total: None, distinct: 0, end: None }
    }

    fn inconsistent(&self, message: String) -> GatewayError {
        GatewayError::Inconsistent { op: self.op, message }
    }

    /// Checks one page (in order); `Some` is a page to hand on, `None` an empty page past the end.
    fn accept<R>(&mut self, fetched: Fetched<R>) -> Result<Option<Page<R>>, GatewayError> {
        let Fetched { offset, raw, fresh, page, .. } = fetched;
        if let Some(end) = self.end {
            if raw > 0 {
                return Err(self.inconsistent(format!(
                    "the page at offset {end} was the last (short or empty), yet the page at offset {offset} \
                     returned {raw} record(s)"
                )));
            }
            return Ok(None);
        }
        let first = *self.first_total.get_or_insert(page.total);
        if first > MAX_RECORDS_PER_READ {
            return Err(self.inconsistent(format!(
                "the first page announces {first} records, more than segsync reads in one pass \
                 ({MAX_RECORDS_PER_READ})"
            )));
        }
        let margin = churn_margin(first);
        if page.total.abs_diff(first) > margin {
            return Err(self.inconsistent(format!(
                "the total changed from {first} to {} while reading (offset {offset}), more than churn explains",
                page.total
            )));
        }
        self.distinct += fresh as u64;
        if self.distinct > first + margin {
            return Err(self.inconsistent(format!(
                "{} distinct records by offset {offset}, more than the {first} the first page announced",
                self.distinct
            )));
        }
        if (raw as u64) < self.limit {
            self.end = Some(offset);
        }
        Ok(Some(page))
    }

    /// The whole read (or a sample's first `stop_at` records) agrees with what its first page announced.
    fn finish(&self, stop_at: u64) -> Result<(), GatewayError> {
        let first = self.first_total.unwrap_or(0).min(stop_at);
        if self.distinct + churn_margin(first) < first {
            return Err(self.inconsistent(format!(
                "read {} distinct records, but the first page announced {first}; the server stopped short",
                self.distinct
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(offset: u64, raw: usize, total: u64) -> Fetched<()> {
        Fetched { offset, raw, served_limit: None, fresh: raw, page: Page { records: (), total } }
    }

    // A read ends on its first short page and then accepts only empty pages.
    #[test]
    fn ends_on_the_first_short_page() {
        let mut read = Read::new(Operation::ScanContacts, 100);
        assert!(read.accept(fetched(0, 100, 150)).expect("ok").is_some());
        assert!(read.accept(fetched(100, 50, 150)).expect("ok").is_some());
        assert_eq!(read.end, Some(100));
        assert!(read.accept(fetched(200, 0, 150)).expect("ok").is_none());
        let err = read.accept(fetched(300, 3, 150)).expect_err("records past the end");
        assert!(err.to_string().contains("offset 300 returned 3"), "{err}");
    }

    // A read that delivers fewer records than announced fails; within the churn margin it passes.
    #[test]
    fn short_reads_fail_beyond_the_margin() {
        let mut read = Read::new(Operation::ScanContacts, 100);
        for page in 0..10 {
            read.accept(fetched(page * 100, 100, 3000)).expect("ok");
        }
        read.accept(fetched(1000, 0, 3000)).expect("ok");
        let err = read.finish(u64::MAX).expect_err("1000 of 3000");
        assert!(err.to_string().contains("read 1000 distinct records, but the first page announced 3000"), "{err}");
        // 100 announced: a margin of 3, so 97 delivered is churn and 96 is not.
        let mut close = Read::new(Operation::ScanContacts, 100);
        close.accept(fetched(0, 97, 100)).expect("ok");
        close.finish(u64::MAX).expect("3 missing of 100 is churn");
        let mut short = Read::new(Operation::ScanContacts, 100);
        short.accept(fetched(0, 96, 100)).expect("ok");
        assert!(short.finish(u64::MAX).is_err(), "4 missing of 100 is not churn");
    }

    /// `text` as one page at offset 100 through `work_page`: each new record's id and raw text,
    /// and the page's total and echoed limit; or the page's error.
    #[allow(clippy::type_complexity)]
    fn walk(text: &str) -> Result<(Vec<(String, String)>, usize, u64, Option<u64>), String> {
        use crate::contact::ContactRecord;
        let page = Bytes::copy_from_slice(text.as_bytes());
        let keep = Some(Arc::new(Keep::new(["region".to_owned()])));
        let work: &Work<ContactRecord, Vec<(String, String)>> = &|records| {
            records
                .map(|r| (r.id.as_str().to_owned(), String::from_utf8_lossy(r.text().expect("narrowed")).into()))
                .collect()
        };
        let paging = Paging { page_size: 100, pagination: Pagination::Offset };
        let meter = super::super::Meter::default();
        let fetched = work_page(&page, Operation::ScanContacts, 100, paging, &Seen::new(), keep.as_ref(), work, &meter)
            .map_err(|e| e.to_string())?;
        Ok((fetched.page.records, fetched.raw, fetched.page.total, fetched.served_limit))
    }

    // A page's fields come in any order, with fields segsync does not know (holding brackets,
    // braces and quotes in strings) skipped whole; each record is parsed where it lies and keeps
    // its exact text, escapes and all.
    #[test]
    fn a_page_is_read_in_one_pass_whatever_its_order() {
        let records = r#"[ {"id":"a","region":"Ve\"ne]to"} ,
            {"id":"b","x":{"y":["]","}",{"z":"\\"}]}}, {"id":"a"} ]"#;
        let pages = [
            format!(r#"{{"contacts":{records},"total":3,"limit":100}}"#),
            format!(r#" {{ "total" : 3 , "note":"}}],{{\"" , "limit":100, "contacts" : {records} }} "#),
            format!(
                "{{\n\"limit\": 100,\n\"extra\": [1, {{\"a\": [2]}}],\n\"contacts\": {records},\n\"total\": 3\n}}\n"
            ),
        ];
        for text in &pages {
            let (got, raw, total, limit) = walk(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            // `a` twice: counted raw, handed out once.
            assert_eq!((raw, total, limit), (3, 3, Some(100)), "{text}");
            let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids, ["a", "b"], "{text}");
            assert_eq!(got[0].1, r#"{"id":"a","region":"Ve\"ne]to"}"#);
            assert_eq!(got[1].1, r#"{"id":"b","x":{"y":["]","}",{"z":"\\"}]}}"#);
        }
        // An empty page, its array first or last.
        assert_eq!(walk(r#"{"contacts":[],"total":0}"#).expect("empty").1, 0);
        assert_eq!(walk(r#"{"total":0,"limit":null,"lists":[ ]}"#).expect("empty").1, 0);
    }

    // Whatever is wrong with a page's text fails the page, with what and where: a derived
    // `Deserialize` of the envelope would refuse each of these too.
    #[test]
    fn a_broken_page_fails_with_what_and_where() {
        let cases = [
            (r#"{"contacts":[{"id":"a"}]}"#, "missing field `total`"),
            (r#"{"total":1}"#, "missing field `contacts`"),
            (r#"{"contacts":[{"id":"a"}],"total":1,"contacts":[]}"#, "duplicate field `contacts`"),
            (r#"{"lists":[],"total":1,"contacts":[]}"#, "duplicate field `contacts`"),
            (r#"{"total":1,"total":1,"contacts":[]}"#, "duplicate field `total`"),
            (r#"{"contacts":[{"id":"a"}],"total":1} x"#, "trailing characters at byte 36"),
            (r#"{"contacts":[{"id":"a"},],"total":1}"#, "a trailing comma at byte 24"),
            (r#"{"contacts":[{"id":"a"} {"id":"b"}],"total":2}"#, "expected `,` or `]` after a record, found `{`"),
            (r#"{"contacts":{"id":"a"},"total":1}"#, "expected an array of records in `contacts`, found `{`"),
            (r#"{"contacts":[{"id":"a"}],"total":-1}"#, "expected u64"),
            (r#"{"contacts":[{"id":"a"}],"total":1"#, "expected `,` or `}`, found the end of the page"),
            (r#"[{"id":"a"}]"#, "expected a JSON object, found `[`"),
            (r#"{"contacts":[{"id":"a"},{"id":"b","region":"#, "a record at offset 100: EOF while parsing a value"),
            (r#"{"contacts":[5],"total":1}"#, "a record at offset 100: a contact must be a JSON object"),
            (r#"{"contacts":[{"region":"x"}],"total":1}"#, "a record at offset 100: a contact without an id"),
        ];
        for (text, want) in cases {
            let err = walk(text).map(|(got, ..)| got).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
        // A broken record on the page's third line is placed on the page, not in the record.
        let text = "{\"total\": 2,\n\"contacts\": [{\"id\": \"a\"},\n  {\"id\": \"b\", \"region\": tru}]}";
        let err = walk(text).map(|(got, ..)| got).expect_err("broken");
        assert!(err.contains("expected ident at line 3 column"), "{err}");
        // Not UTF-8.
        let page = Bytes::from_static(b"{\"contacts\":[{\"id\":\"\xff\"}],\"total\":1}");
        let work: &Work<crate::contact::ContactRecord, usize> = &|records| records.count();
        let paging = Paging { page_size: 100, pagination: Pagination::Offset };
        let meter = super::super::Meter::default();
        let err = work_page(&page, Operation::ScanContacts, 0, paging, &Seen::new(), None, work, &meter).err();
        assert!(err.is_some_and(|e| e.to_string().contains("the page is not UTF-8")));
    }

    // A total that moves more than churn explains, or an absurd one, fails at once.
    #[test]
    fn totals_are_checked() {
        let mut read = Read::new(Operation::ScanContacts, 100);
        read.accept(fetched(0, 100, 1000)).expect("ok");
        assert!(read.accept(fetched(100, 100, 1500)).is_err());
        let mut absurd = Read::new(Operation::ScanContacts, 100);
        assert!(absurd.accept(fetched(0, 100, 1_000_000_000_000_000)).is_err());
    }
}
