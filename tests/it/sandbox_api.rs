//! The sandbox against the contract, over HTTP: every endpoint, every documented error body, the
//! seed's own requests, rate limiting, and determinism.
use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use crate::support::{KEY, http, start};
use reqwest::StatusCode;
use segsync_sandbox::RatePlan;
use segsync_sandbox::SandboxConfig;
use serde_json::{Value, json};

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(sandbox: &segsync_sandbox::Sandbox) -> Self {
        Self { base: format!("{}/partner-gateway/v1", sandbox.base_url()), http: http() }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).header("X-Api-Key", KEY);
        if let Some(body) = body {
            req = req.header("Content-Type", "application/json").body(body.to_string());
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["contacts"]
        .as_array()
        .expect("contacts array")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect()
}

// The seed's steps 1–3 and its variants, sent as the seed writes them, answer the documented shapes.
#[tokio::test]
async fn seed_requests_answer_documented_shapes() {
    let sandbox = start(support::sandbox_config(2_000)).await;
    let api = Api::new(&sandbox);

    // Step 1: filtered search.
    let (status, page) = api.get("/contacts?region=Lombardia&limit=50&offset=0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["limit"], 50);
    assert_eq!(page["offset"], 0);
    let total = page["total"].as_u64().expect("total");
    assert!(total > 50, "Lombardia holds about a sixth of 2,000 contacts, got {total}");
    for c in page["contacts"].as_array().expect("array") {
        assert_eq!(c["region"], "Lombardia");
        for field in ["id", "firstName", "lastName", "phoneNumber", "email", "city"] {
            assert!(c[field].is_string(), "{field} in {c}");
        }
        assert!(c["phoneNumber"].as_str().expect("phone").starts_with("+393"));
        assert!(c["customFields"]["totalSpent"].is_number());
        assert!(c["customFields"]["lastPurchaseDate"].is_string());
        assert!(c["customFields"]["preferredChannel"].is_string());
    }

    // Step 2: create the list.
    let (status, list) = api
        .send(
            reqwest::Method::POST,
            "/contacts/list",
            Some(json!({"name": "VIP Lombardia - Spesa > 5000 EUR", "description": "Clienti lombardi"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(list["name"], "VIP Lombardia - Spesa > 5000 EUR");
    assert_eq!(list["contactCount"], 0);
    assert!(list["createdAt"].is_string());
    let list_id = list["id"].as_str().expect("list id").to_owned();

    // Step 3: add contacts (one twice, one unknown).
    let first_five: Vec<String> = ids(&page).into_iter().take(5).collect();
    let mut body_ids = first_five.clone();
    body_ids.push(first_five[0].clone());
    body_ids.push("cnt-999999".into());
    let (status, added) = api
        .send(
            reqwest::Method::POST,
            "/contacts/list/contacts",
            Some(json!({"listId": list_id, "contactIds": body_ids})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        added,
        json!({"listId": list_id, "addedContacts": 5, "duplicateContacts": 1, "invalidContacts": 1, "totalContactsInList": 5})
    );

    // Inactivity variant.
    let (status, inactive) = api.get("/contacts?customFields.lastPurchaseDate.before=2026-01-09&limit=100").await;
    assert_eq!(status, StatusCode::OK);
    for c in inactive["contacts"].as_array().expect("array") {
        assert!(c["customFields"]["lastPurchaseDate"].as_str().expect("date") < "2026-01-09");
    }

    // Remove a contact from a list, the seed's way.
    let path = format!("/contacts/list/contacts?listId={list_id}&contactId={}", first_five[4]);
    let (status, removed) = api.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(removed, json!({"listId": list_id, "removedContacts": 1, "totalContactsInList": 4}));

    // The three documented errors.
    let (status, body) = api.get("/contacts?invalidField=x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, json!({"status": "fail", "data": {"filter": "Unknown filter field: invalidField"}}));
    let (status, body) = api.get("/contacts/cnt-999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({"status": "fail", "data": {"contactId": "Contact not found: cnt-999"}}));
    let resp = http().get(format!("{}/contacts", api.base)).send().await.expect("sent");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"status": "fail", "data": {"authentication": "Invalid or missing API key"}})
    );
    sandbox.shutdown().await;
}

// Every filter, list membership, sorting, limits and paging behave as the contract says.
#[tokio::test]
async fn search_filters_sort_and_paging() {
    let sandbox = start(support::sandbox_config(1_500)).await;
    let api = Api::new(&sandbox);

    let (_, one) = api.get("/contacts?limit=1&offset=7").await;
    let c = one["contacts"][0].clone();
    for field in ["firstName", "lastName", "email", "phoneNumber", "city", "region"] {
        let value = c[field].as_str().expect("field");
        let (status, page) = api.get(&format!("/contacts?{field}={}&limit=100", urlencode(value))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(ids(&page).contains(&c["id"].as_str().expect("id").to_owned()), "{field}={value}");
        assert!(page["contacts"].as_array().expect("array").iter().all(|x| x[field] == c[field]));
    }
    let channel = c["customFields"]["preferredChannel"].as_str().expect("channel");
    let (_, page) = api
        .get(&format!(
            "/contacts?customFields.preferredChannel={channel}&region={}&limit=100",
            urlencode(c["region"].as_str().expect("region"))
        ))
        .await;
    assert!(
        page["contacts"]
            .as_array()
            .expect("array")
            .iter()
            .all(|x| x["customFields"]["preferredChannel"] == channel && x["region"] == c["region"])
    );
    let spent = c["customFields"]["totalSpent"].as_f64().expect("spent");
    let (_, page) = api.get(&format!("/contacts?customFields.totalSpent={spent}")).await;
    assert!(ids(&page).contains(&c["id"].as_str().expect("id").to_owned()), "numeric custom-field equality");

    // Sorting by a custom field, descending.
    let (_, sorted) = api.get("/contacts?sort=customFields.totalSpent&order=desc&limit=100").await;
    let spends: Vec<f64> = sorted["contacts"]
        .as_array()
        .expect("array")
        .iter()
        .map(|x| x["customFields"]["totalSpent"].as_f64().expect("n"))
        .collect();
    assert!(spends.windows(2).all(|w| w[0] >= w[1]), "descending by totalSpent");
    let (_, by_name) = api.get("/contacts?sort=lastName&order=asc&limit=100").await;
    let names: Vec<&str> =
        by_name["contacts"].as_array().expect("array").iter().map(|x| x["lastName"].as_str().expect("s")).collect();
    assert!(names.windows(2).all(|w| w[0] <= w[1]), "ascending by lastName");

    // Paging: pages are disjoint, stable, and cover `total` exactly.
    let mut seen = HashSet::new();
    let mut offset = 0;
    loop {
        let (_, page) = api.get(&format!("/contacts?limit=100&offset={offset}")).await;
        let page_ids = ids(&page);
        if page_ids.is_empty() {
            break;
        }
        for id in page_ids {
            assert!(seen.insert(id), "a contact appeared on two pages");
        }
        offset += 100;
    }
    assert_eq!(seen.len(), 1_500);
    let (_, again) = api.get("/contacts?limit=100&offset=300").await;
    let (_, again2) = api.get("/contacts?limit=100&offset=300").await;
    assert_eq!(ids(&again), ids(&again2), "pages are stable while nothing changes");

    // Limits and invalid values.
    let (status, body) = api.get("/contacts?limit=101").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["data"]["limit"].as_str().expect("reason").contains("101"));
    let (status, body) = api.get("/contacts?sort=shoeSize").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["data"]["sort"], "Unknown sort field: shoeSize");
    let (status, _) = api.get("/contacts?customFields.lastPurchaseDate.before=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // listIds / notListIds partition the address book; an unknown list is a 404.
    let (_, list) = api.send(reqwest::Method::POST, "/contacts/list", Some(json!({"name": "Members"}))).await;
    let list_id = list["id"].as_str().expect("id").to_owned();
    let members: Vec<String> = (1..=150).map(|i| format!("cnt-{i:06}")).collect();
    api.send(
        reqwest::Method::POST,
        "/contacts/list/contacts",
        Some(json!({"listIds": [list_id], "contactIds": members})),
    )
    .await;
    let (_, inside) = api.get(&format!("/contacts?listIds={list_id}&limit=1")).await;
    let (_, outside) = api.get(&format!("/contacts?notListIds={list_id}&limit=1")).await;
    assert_eq!(inside["total"], 150);
    assert_eq!(outside["total"], 1_350);
    let (status, body) = api.get("/contacts?listIds=list-nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["data"]["listId"], "List not found: list-nope");
    sandbox.shutdown().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// Lists: search, create, add (both forms, batch cap), bulk and single removal, 404s.
#[tokio::test]
async fn lists_search_create_add_and_remove_in_both_forms() {
    let sandbox = start(support::sandbox_config(1_200)).await;
    let api = Api::new(&sandbox);
    let (status, body) =
        api.send(reqwest::Method::POST, "/contacts/list", Some(json!({"description": "no name"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["data"]["name"].is_string());
    for name in ["Geo - Lombardia", "Geo - Veneto", "VIP"] {
        let (status, _) =
            api.send(reqwest::Method::POST, "/contacts/list", Some(json!({"name": name, "description": "d"}))).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (_, found) = api.get("/contacts/list?search=geo").await;
    assert_eq!(found["total"], 2, "search is a case-insensitive substring: {found}");
    let geo = found["lists"][0]["id"].as_str().expect("id").to_owned();

    let too_many: Vec<String> = (1..=1001).map(|i| format!("cnt-{i:06}")).collect();
    let (status, body) = api
        .send(reqwest::Method::POST, "/contacts/list/contacts", Some(json!({"listId": geo, "contactIds": too_many})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["data"]["contactIds"].as_str().expect("reason").contains("1000"));
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            "/contacts/list/contacts",
            Some(json!({"listId": "list-x", "contactIds": ["cnt-000001"]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({"status": "fail", "data": {"listId": "List not found: list-x"}}));
    let (status, _) = api
        .send(reqwest::Method::POST, "/contacts/list/contacts", Some(json!({"listId": geo, "allContacts": true})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the whole-address-book form is refused");

    let thousand: Vec<String> = (1..=1000).map(|i| format!("cnt-{i:06}")).collect();
    let (_, added) = api
        .send(reqwest::Method::POST, "/contacts/list/contacts", Some(json!({"listId": geo, "contactIds": thousand})))
        .await;
    assert_eq!(added["addedContacts"], 1000);
    let bulk: Vec<String> = (1..=400).map(|i| format!("cnt-{i:06}")).chain(["cnt-999999".to_owned()]).collect();
    let (status, removed) = api
        .send(reqwest::Method::DELETE, "/contacts/list/contacts", Some(json!({"listIds": [geo], "contactIds": bulk})))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(removed, json!({"listId": geo, "removedContacts": 400, "totalContactsInList": 600}));
    // Removing a non-member is not an error.
    let (status, again) = api
        .send(reqwest::Method::DELETE, &format!("/contacts/list/contacts?listId={geo}&contactId=cnt-000001"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["removedContacts"], 0);
    let (_, listed) = api.get("/contacts/list?search=Geo - Lombardia").await;
    assert_eq!(listed["lists"][0]["contactCount"], 600);
    sandbox.shutdown().await;
}

// Contacts: create, get, update (custom fields merge), delete (also leaves every list).
#[tokio::test]
async fn contacts_are_read_created_updated_and_deleted() {
    let sandbox = start(support::sandbox_config(100)).await;
    let api = Api::new(&sandbox);
    let (status, body) =
        api.send(reqwest::Method::POST, "/contacts", Some(json!({"firstName": "No", "lastName": "Channel"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["data"]["phoneNumber"].is_string());
    let (status, created) = api
        .send(
            reqwest::Method::POST,
            "/contacts",
            Some(json!({"firstName": "Giulia", "phoneNumber": "+393401112233", "region": "Veneto",
                        "customFields": {"totalSpent": 10.5, "loyalty": "gold"}, "gender": "F"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().expect("new id").to_owned();
    assert_eq!(created["gender"], "F", "unknown fields are kept");

    let (status, updated) = api
        .send(
            reqwest::Method::PUT,
            &format!("/contacts/{id}"),
            Some(json!({"city": "Verona", "customFields": {"totalSpent": 6000.0}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["city"], "Verona");
    assert_eq!(updated["firstName"], "Giulia", "fields not sent stay");
    assert_eq!(updated["customFields"], json!({"totalSpent": 6000.0, "loyalty": "gold"}), "custom fields merge");
    let (_, fetched) = api.get(&format!("/contacts/{id}")).await;
    assert_eq!(fetched, updated);
    let (status, _) = api.send(reqwest::Method::PUT, "/contacts/cnt-nope", Some(json!({"city": "X"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api.send(reqwest::Method::PUT, &format!("/contacts/{id}"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (_, list) = api.send(reqwest::Method::POST, "/contacts/list", Some(json!({"name": "L"}))).await;
    let list_id = list["id"].as_str().expect("id").to_owned();
    api.send(reqwest::Method::POST, "/contacts/list/contacts", Some(json!({"listId": list_id, "contactIds": [id]})))
        .await;
    let (status, _) = api.send(reqwest::Method::DELETE, &format!("/contacts/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.get(&format!("/contacts/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, members) = api.get(&format!("/contacts?listIds={list_id}")).await;
    assert_eq!(members["total"], 0, "a deleted contact leaves every list");
    sandbox.shutdown().await;
}

// Basic auth with the key as password works; a wrong key is refused.
#[tokio::test]
async fn basic_auth_with_the_key_as_password_is_accepted() {
    use base64::Engine as _;
    let sandbox = start(support::sandbox_config(10)).await;
    let url = format!("{}/partner-gateway/v1/contacts?limit=1", sandbox.base_url());
    let good = base64::engine::general_purpose::STANDARD.encode(format!("ops:{KEY}"));
    let bad = base64::engine::general_purpose::STANDARD.encode("ops:wrong");
    let ok = http().get(&url).header("Authorization", format!("Basic {good}")).send().await.expect("sent");
    assert_eq!(ok.status(), StatusCode::OK);
    let refused = http().get(&url).header("Authorization", format!("Basic {bad}")).send().await.expect("sent");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    sandbox.shutdown().await;
}

// The trial plan answers 429 with retryAfter and rate headers once 10 requests land in a second.
// The 12 requests are sent at once; a burst that took longer than the one-second window (a loaded
// machine) proves nothing either way and is sent again after the window has passed.
#[tokio::test]
async fn each_plan_throttles_at_its_own_limits() {
    let sandbox = start(SandboxConfig { plan: RatePlan::Trial, ..support::sandbox_config(10) }).await;
    let url = format!("{}/partner-gateway/v1/contacts?limit=1", sandbox.base_url());
    let mut bursts = Vec::new();
    let responses = loop {
        let sent = std::time::Instant::now();
        let responses = futures_util::future::join_all(
            (0..12).map(|_| async { http().get(&url).header("X-Api-Key", KEY).send().await.expect("sent") }),
        )
        .await;
        let took = sent.elapsed();
        if took < Duration::from_millis(900) {
            break responses;
        }
        bursts.push(took);
        assert!(bursts.len() < 5, "no burst of 12 requests fit in the 1 s window: {bursts:?}");
        // The window slides: it is clear one second after the burst's last request.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    };
    for resp in &responses {
        assert!(resp.headers().contains_key("x-ratelimit-limit"));
        assert!(resp.headers().contains_key("x-ratelimit-remaining"));
    }
    let statuses: Vec<StatusCode> = responses.iter().map(|r| r.status()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 10, "{statuses:?}");
    let throttled = responses.into_iter().find(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).expect("a 429");
    let body: Value = throttled.json().await.expect("json");
    assert_eq!(body["status"], 429);
    assert_eq!(body["error"], "Too Many Requests");
    assert!(body["retryAfter"].as_u64().expect("retryAfter") >= 1);
    assert!(body["message"].as_str().expect("message").starts_with("Rate limit exceeded. Please retry after"));
    sandbox.shutdown().await;

    // The unlimited plan never throttles.
    let open = start(SandboxConfig { plan: RatePlan::Unlimited, ..support::sandbox_config(10) }).await;
    let url = format!("{}/partner-gateway/v1/contacts?limit=1", open.base_url());
    for _ in 0..200 {
        let resp = http().get(&url).header("X-Api-Key", KEY).send().await.expect("sent");
        assert_eq!(resp.status(), StatusCode::OK);
    }
    open.shutdown().await;
}

// The same seed gives the same contacts, served over HTTP.
#[tokio::test]
async fn same_seed_same_contacts() {
    let a = start(support::sandbox_config(300)).await;
    let b = start(support::sandbox_config(300)).await;
    let page = |s: &segsync_sandbox::Sandbox| {
        let url = format!("{}/partner-gateway/v1/contacts?limit=100&offset=200", s.base_url());
        async move { http().get(url).header("X-Api-Key", KEY).send().await.expect("sent").text().await.expect("body") }
    };
    assert_eq!(page(&a).await, page(&b).await);
    a.shutdown().await;
    b.shutdown().await;
}

// /_sandbox/stats counts requests by route and status.
#[tokio::test]
async fn stats_count_by_route_and_status() {
    let sandbox = start(support::sandbox_config(10)).await;
    let api = Api::new(&sandbox);
    api.get("/contacts?limit=1").await;
    api.get("/contacts?bogus=1").await;
    api.get("/contacts/cnt-000001").await;
    let stats: Value = http()
        .get(format!("http://{}/_sandbox/stats", sandbox.addr()))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["routes"]["GET /contacts"]["200"], 1);
    assert_eq!(stats["routes"]["GET /contacts"]["400"], 1);
    assert_eq!(stats["routes"]["GET /contacts/{id}"]["200"], 1);
    assert_eq!(stats["total"], 3);
    sandbox.shutdown().await;
}
