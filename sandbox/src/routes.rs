//! The HTTP face of the sandbox: the partner-gateway endpoints of `api-contract.md`, their error
//! bodies, and the gate every API request passes (stats, faults, auth, rate limit).
//!
//! Handlers parse and answer; the data and its semantics live in `store`.

// Early-return helpers hand back the finished error `Response`; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use rand::Rng;
use serde_json::{Map, Value, json};

use super::Shared;
use super::limits::{Admission, Injected};
use super::store::{Contact, ContactQuery, Filter, SortKey, StdField, StoreError};

pub const API_PREFIX: &str = "/api/partner-gateway/v1";
/// The seed's page limit; a sandbox playing the reference's page-based server allows 1,000.
pub(crate) const SEED_MAX_PAGE: usize = 100;
pub(crate) const PAGE_DIALECT_MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 50;
const MAX_BATCH: usize = 1000;

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/contacts", get(search_contacts).post(create_contact))
        .route("/contacts/{id}", get(get_contact).put(update_contact).delete(delete_contact))
        .route("/contacts/list", get(search_lists).post(create_list))
        .route("/contacts/list/contacts", axum::routing::post(add_members).delete(remove_members))
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared.clone());
    Router::new()
        .nest(API_PREFIX, api)
        .route("/_sandbox/stats", get(stats))
        .route("/_sandbox/churn", axum::routing::post(churn_now))
        .fallback(|| async { fail(StatusCode::NOT_FOUND, "path", "No such endpoint".into()) })
        .with_state(shared)
}

/// A JSend `fail` body naming the offending field.
fn fail(status: StatusCode, field: &str, message: String) -> Response {
    let mut data = Map::new();
    data.insert(field.into(), Value::String(message));
    (status, axum::Json(json!({"status": "fail", "data": data}))).into_response()
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::UnknownList(id) => fail(StatusCode::NOT_FOUND, "listId", format!("List not found: {id}")),
        StoreError::UnknownContact(id) => fail(StatusCode::NOT_FOUND, "contactId", format!("Contact not found: {id}")),
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.stats()).into_response()
}

/// `POST /_sandbox/churn?count=N`: N contacts change at once (benchmarks and demos; not the real API).
async fn churn_now(State(shared): State<Arc<Shared>>, Query(pairs): Query<Vec<(String, String)>>) -> Response {
    let count = pairs.iter().find(|(k, _)| k == "count").and_then(|(_, v)| v.parse::<usize>().ok()).unwrap_or(1);
    let touched = shared.churn(count);
    axum::Json(json!({"touched": touched})).into_response()
}

/// Stats, latency, faults, auth and rate limit, in that order, for every API request.
async fn gate(State(shared): State<Arc<Shared>>, matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route =
        format!("{} {}", req.method(), matched.as_ref().map_or("?", |m| m.as_str()).trim_start_matches(API_PREFIX));
    let faults = shared.config.faults;
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    let injected = if faults.any() { faults.pick(shared.draw()) } else { None };
    let response = match injected {
        Some(Injected::Drop) => {
            shared.record(&route, "dropped");
            // Headers go out, then the body fails: hyper closes the connection mid-response.
            let body = Body::from_stream(futures_util::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other("sandbox: injected dropped connection"))
            }));
            return Response::builder().status(StatusCode::OK).body(body).unwrap_or_default();
        }
        Some(Injected::ServerError) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"status": "error", "message": "sandbox: injected server fault"})),
        )
            .into_response(),
        Some(Injected::Throttle) => throttled(shared.config.plan.limits().map_or(0, |l| l.per_minute), 1),
        None => match authenticate(&shared.config.api_key, req.headers()) {
            Err(response) => response,
            Ok(key) => {
                let admission = shared.admit(&key);
                match admission {
                    Admission::Throttled { limit, retry_after_secs } => throttled(limit, retry_after_secs),
                    Admission::Unlimited => next.run(req).await,
                    Admission::Allowed { limit, remaining } => {
                        let mut response = next.run(req).await;
                        set_rate_headers(response.headers_mut(), limit, remaining);
                        response
                    }
                }
            }
        },
    };
    shared.record(&route, response.status().as_str());
    response
}

fn throttled(limit: u32, retry_after: u64) -> Response {
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({
            "status": 429,
            "error": "Too Many Requests",
            "message": format!("Rate limit exceeded. Please retry after {retry_after} seconds."),
            "retryAfter": retry_after,
        })),
    )
        .into_response();
    set_rate_headers(response.headers_mut(), limit, 0);
    response
}

fn set_rate_headers(headers: &mut HeaderMap, limit: u32, remaining: u32) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
}

/// `X-Api-Key: KEY`, or HTTP Basic with the key as password (any user name).
fn authenticate(expected: &str, headers: &HeaderMap) -> Result<String, Response> {
    let by_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let by_basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| pair.split_once(':').map(|(_, pass)| pass.to_owned()));
    match by_key.or(by_basic) {
        Some(key) if key == expected => Ok(key),
        _ => Err(fail(StatusCode::UNAUTHORIZED, "authentication", "Invalid or missing API key".into())),
    }
}

/// Parses `GET /contacts` parameters; any parameter the contract does not name is an unknown filter.
/// The query, the page size, the `offset` and the offset a `page` parameter asks for (if any).
fn parse_search(
    pairs: &[(String, String)],
    max_page: usize,
) -> Result<(ContactQuery, usize, usize, Option<usize>), Response> {
    let mut query = ContactQuery::default();
    let mut limit = DEFAULT_PAGE;
    let mut offset = None;
    let mut page = None;
    let mut sort = None;
    let mut descending = false;
    let bad = |field: &str, msg: String| fail(StatusCode::BAD_REQUEST, field, msg);
    let number = |field: &str, v: &str| {
        v.parse::<usize>().map_err(|_| bad(field, format!("{field} must be a non-negative integer, got {v:?}")))
    };
    for (name, value) in pairs {
        match name.as_str() {
            "limit" => {
                limit = number("limit", value)?;
                if !(1..=max_page).contains(&limit) {
                    return Err(bad("limit", format!("limit must be between 1 and {max_page}, got {limit}")));
                }
            }
            "offset" => offset = Some(number("offset", value)?),
            "page" => page = Some(number("page", value)?),
            "sort" => sort = Some(value.clone()),
            "order" => {
                descending = match value.as_str() {
                    "asc" => false,
                    "desc" => true,
                    other => return Err(bad("order", format!("order must be asc or desc, got {other:?}"))),
                }
            }
            "listIds" => query.list_ids.extend(split_ids(value)),
            "notListIds" => query.not_list_ids.extend(split_ids(value)),
            other => {
                if let Some(field) = StdField::parse(other) {
                    query.filters.push(Filter::Std(field, value.clone()));
                } else if let Some(custom) = other.strip_prefix("customFields.").filter(|c| !c.is_empty()) {
                    match custom.strip_suffix(".before") {
                        Some(field) => {
                            if chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").is_err() {
                                return Err(bad(other, format!("expected a date YYYY-MM-DD, got {value:?}")));
                            }
                            query.filters.push(Filter::CustomBefore(field.into(), value.clone()));
                        }
                        None => query.filters.push(Filter::CustomEq(custom.into(), value.clone())),
                    }
                } else {
                    return Err(bad("filter", format!("Unknown filter field: {other}")));
                }
            }
        }
    }
    if let Some(field) = sort {
        let key = if field == "id" {
            SortKey::Id
        } else if let Some(std) = StdField::parse(&field) {
            SortKey::Std(std)
        } else if let Some(custom) = field.strip_prefix("customFields.").filter(|c| !c.is_empty()) {
            SortKey::Custom(custom.into())
        } else {
            return Err(bad("sort", format!("Unknown sort field: {field}")));
        };
        query.sort = Some((key, descending));
    }
    Ok((query, limit, offset.unwrap_or(0), page.map(|p| p * limit)))
}

fn split_ids(value: &str) -> impl Iterator<Item = String> + '_ {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
}

async fn search_contacts(State(shared): State<Arc<Shared>>, Query(pairs): Query<Vec<(String, String)>>) -> Response {
    let (query, limit, offset, page_offset) = match parse_search(&pairs, shared.max_page()) {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    // A server of the reference's page-based kind ignores `offset` (it reads `page`) and allows
    // pages of 1,000: the sandbox can play one.
    let offset = match (page_offset, shared.config.page_dialect) {
        (Some(from_page), _) => from_page,
        (None, true) => 0,
        (None, false) => offset,
    };
    let served_offset = offset;
    let mut store = shared.store();
    let slots = match store.search(&query) {
        Ok(slots) => slots,
        Err(e) => return store_error(e),
    };
    let mut body = Vec::with_capacity(512 * limit + 64);
    body.extend_from_slice(b"{\"contacts\":[");
    let window = slots.iter().skip(served_offset).take(limit);
    for (i, contact) in window.filter_map(|&s| store.slot(s)).enumerate() {
        if i > 0 {
            body.push(b',');
        }
        if serde_json::to_writer(&mut body, contact).is_err() {
            return fail(StatusCode::INTERNAL_SERVER_ERROR, "contacts", "serialization failed".into());
        }
    }
    body.extend_from_slice(format!("],\"total\":{},\"limit\":{limit},\"offset\":{offset}}}", slots.len()).as_bytes());
    drop(store);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Parses a JSON body into an object, or answers the contract's 400.
fn json_object(body: &Bytes) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(fail(StatusCode::BAD_REQUEST, "body", "expected a JSON object".into())),
        Err(e) => Err(fail(StatusCode::BAD_REQUEST, "body", format!("Malformed JSON: {e}"))),
    }
}

async fn get_contact(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.store().get(&id) {
        Some(c) => axum::Json(c).into_response(),
        None => store_error(StoreError::UnknownContact(id)),
    }
}

async fn create_contact(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let mut fields = match json_object(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    fields.remove("id");
    fields.entry("customFields").or_insert_with(|| json!({}));
    fields.insert("id".into(), Value::String(String::new()));
    let contact: Contact = match serde_json::from_value(Value::Object(fields)) {
        Ok(c) => c,
        Err(e) => return fail(StatusCode::BAD_REQUEST, "body", format!("Invalid contact: {e}")),
    };
    if contact.phone_number.is_none() && contact.email.is_none() {
        return fail(StatusCode::BAD_REQUEST, "phoneNumber", "phoneNumber or email is required".into());
    }
    let created = shared.store().create(contact);
    (StatusCode::CREATED, axum::Json(created)).into_response()
}

async fn update_contact(State(shared): State<Arc<Shared>>, Path(id): Path<String>, body: Bytes) -> Response {
    let fields = match json_object(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    for (name, value) in &fields {
        let ok = match name.as_str() {
            "customFields" => value.is_object(),
            n if StdField::parse(n).is_some() => value.is_string() || value.is_null(),
            _ => true,
        };
        if !ok {
            return fail(StatusCode::BAD_REQUEST, name, format!("invalid value for {name}: {value}"));
        }
    }
    let result = shared.store().update(&id, |c| apply_update(c, fields));
    match result {
        Ok(c) => axum::Json(c).into_response(),
        Err(e) => store_error(e),
    }
}

/// Fields not sent stay as they were; `customFields` merge key by key (null removes a key).
fn apply_update(c: &mut Contact, fields: Map<String, Value>) {
    for (name, value) in fields {
        let text = value.as_str().map(str::to_owned);
        match name.as_str() {
            "id" => {}
            "firstName" => c.first_name = text,
            "lastName" => c.last_name = text,
            "phoneNumber" => c.phone_number = text,
            "email" => c.email = text,
            "region" => c.region = text,
            "city" => c.city = text,
            "customFields" => {
                if let Value::Object(custom) = value {
                    for (k, v) in custom {
                        if v.is_null() {
                            c.custom_fields.remove(&k);
                        } else {
                            c.custom_fields.insert(k, v);
                        }
                    }
                }
            }
            _ => {
                c.extra.insert(name, value);
            }
        }
    }
}

async fn delete_contact(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.store().delete(&id) {
        Ok(()) => axum::Json(json!({"status": "success", "data": {"contactId": id}})).into_response(),
        Err(e) => store_error(e),
    }
}

async fn search_lists(State(shared): State<Arc<Shared>>, Query(pairs): Query<Vec<(String, String)>>) -> Response {
    let mut search = String::new();
    let mut limit = DEFAULT_PAGE;
    let mut offset = None;
    let mut page = None;
    let number = |field: &str, v: &str| {
        v.parse::<usize>().map_err(|_| {
            fail(StatusCode::BAD_REQUEST, field, format!("{field} must be a non-negative integer, got {v:?}"))
        })
    };
    for (name, value) in &pairs {
        let parsed = match name.as_str() {
            "search" => {
                search = value.to_lowercase();
                Ok(())
            }
            "limit" => number("limit", value).and_then(|n| {
                if (1..=shared.max_page()).contains(&n) {
                    limit = n;
                    Ok(())
                } else {
                    Err(fail(
                        StatusCode::BAD_REQUEST,
                        "limit",
                        format!("limit must be between 1 and {}, got {value:?}", shared.max_page()),
                    ))
                }
            }),
            "offset" => number("offset", value).map(|n| offset = Some(n)),
            "page" => number("page", value).map(|n| page = Some(n)),
            other => Err(fail(StatusCode::BAD_REQUEST, "filter", format!("Unknown filter field: {other}"))),
        };
        if let Err(response) = parsed {
            return response;
        }
    }
    // The same dialects as the contact search: `page` always works; `offset` unless the sandbox
    // plays a page-based server.
    let offset = match (page, shared.config.page_dialect) {
        (Some(p), _) => p * limit,
        (None, true) => 0,
        (None, false) => offset.unwrap_or(0),
    };
    let store = shared.store();
    let matching: Vec<_> = store.lists().iter().filter(|l| l.name.to_lowercase().contains(&search)).collect();
    let page: Vec<Value> = matching.iter().skip(offset).take(limit).map(|l| l.to_json()).collect();
    axum::Json(json!({"lists": page, "total": matching.len(), "limit": limit, "offset": offset})).into_response()
}

async fn create_list(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let fields = match json_object(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let name = fields.get("name").and_then(Value::as_str).map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return fail(StatusCode::BAD_REQUEST, "name", "name is required".into());
    }
    let description = fields.get("description").and_then(Value::as_str).unwrap_or_default().to_owned();
    let created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    let mut store = shared.store();
    let list = store.create_list(name.to_owned(), description, created_at);
    (StatusCode::CREATED, axum::Json(list.to_json())).into_response()
}

/// The lists and contact ids of a membership body: `listId` (seed) or `listIds` (reference).
fn membership_body(body: &Bytes) -> Result<(Vec<String>, Vec<String>), Response> {
    let fields = json_object(body)?;
    if fields.contains_key("allContacts") {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "allContacts",
            "allContacts acts on the whole address book; the sandbox refuses it".into(),
        ));
    }
    let as_id = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let lists: Vec<String> = match (fields.get("listId"), fields.get("listIds")) {
        (Some(one), _) => as_id(one).into_iter().collect(),
        (None, Some(Value::Array(many))) => many.iter().filter_map(as_id).collect(),
        _ => Vec::new(),
    };
    if lists.is_empty() {
        return Err(fail(StatusCode::BAD_REQUEST, "listId", "listId (or listIds) is required".into()));
    }
    let Some(Value::Array(ids)) = fields.get("contactIds") else {
        return Err(fail(StatusCode::BAD_REQUEST, "contactIds", "contactIds must be an array of ids".into()));
    };
    if ids.len() > MAX_BATCH {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "contactIds",
            format!("At most {MAX_BATCH} contact ids per request, got {}", ids.len()),
        ));
    }
    let ids = ids.iter().map(|v| as_id(v).unwrap_or_default()).collect();
    Ok((lists, ids))
}

async fn add_members(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let (lists, ids) = match membership_body(&body) {
        Ok(parsed) => parsed,
        Err(r) => return r,
    };
    let mut store = shared.store();
    if let Some(missing) = lists.iter().find(|l| store.list(l).is_err()) {
        return store_error(StoreError::UnknownList(missing.clone()));
    }
    let mut results = Vec::new();
    for list in &lists {
        match store.add_members(list, &ids) {
            Ok(out) => results.push(json!({
                "listId": list,
                "addedContacts": out.added,
                "duplicateContacts": out.duplicate,
                "invalidContacts": out.invalid,
                "totalContactsInList": out.total,
            })),
            Err(e) => return store_error(e),
        }
    }
    let body = if results.len() == 1 { results.remove(0) } else { json!({ "results": results }) };
    axum::Json(body).into_response()
}

async fn remove_members(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery, body: Bytes) -> Response {
    let (lists, ids) = if body.is_empty() {
        let pairs: Vec<(String, String)> = serde_urlencoded_pairs(raw.as_deref().unwrap_or_default());
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match (get("listId"), get("contactId")) {
            (Some(list), Some(contact)) => (vec![list], vec![contact]),
            (None, _) => return fail(StatusCode::BAD_REQUEST, "listId", "listId is required".into()),
            (_, None) => return fail(StatusCode::BAD_REQUEST, "contactId", "contactId is required".into()),
        }
    } else if !shared.config.bulk_remove {
        // A server that only knows the seed's one-at-a-time form.
        return fail(StatusCode::BAD_REQUEST, "listId", "listId query parameter is required".into());
    } else {
        match membership_body(&body) {
            Ok(parsed) => parsed,
            Err(r) => return r,
        }
    };
    let mut store = shared.store();
    if let Some(missing) = lists.iter().find(|l| store.list(l).is_err()) {
        return store_error(StoreError::UnknownList(missing.clone()));
    }
    let mut results = Vec::new();
    for list in &lists {
        match store.remove_members(list, &ids) {
            Ok((removed, total)) => results.push(json!({
                "listId": list,
                "removedContacts": removed,
                "totalContactsInList": total,
            })),
            Err(e) => return store_error(e),
        }
    }
    let body = if results.len() == 1 { results.remove(0) } else { json!({ "results": results }) };
    axum::Json(body).into_response()
}

fn serde_urlencoded_pairs(raw: &str) -> Vec<(String, String)> {
    Query::<Vec<(String, String)>>::try_from_uri(&format!("/?{raw}").parse().unwrap_or_default())
        .map(|q| q.0)
        .unwrap_or_default()
}

impl Shared {
    fn draw(&self) -> f64 {
        self.fault_rng.lock().unwrap_or_else(|p| p.into_inner()).random()
    }
}
