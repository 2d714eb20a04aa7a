//! The gateway client against the real sandbox over HTTP: complete scans, faults, pacing,
//! servers that ignore `offset` or lack bulk removal, bad keys, and secrecy of the key.
use crate::support;

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{gateway, start};
use segsync::gateway::RatePlan;
use segsync::gateway::{Gateway, GatewayError, Meter, Operation, Pagination, Resource, ScanQuery};
use segsync::ids::ContactId;
use segsync_sandbox::{Faults, SandboxConfig};
use serde_json::Value;

async fn scan_all(gw: &Gateway, query: &ScanQuery) -> Result<(Vec<String>, u64), GatewayError> {
    let mut scan = gw.scan::<Value>(query);
    let mut ids = Vec::new();
    let mut pages = 0;
    while let Some(page) = scan.next().await {
        let page = page?;
        pages += 1;
        ids.extend(page.records.iter().map(|c| c["id"].as_str().expect("id").to_owned()));
    }
    Ok((ids, pages))
}

// A full scan of 20,000 contacts returns each exactly once, in 200 pages plus the empty page that ends it.
#[tokio::test]
async fn full_scan_returns_each_contact_once() {
    let sandbox = start(support::sandbox_config(20_000)).await;
    let gw = gateway(&sandbox, RatePlan::Unlimited);
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("scan");
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), 20_000);
    assert_eq!(unique.len(), 20_000);
    // One 400 to `limit=1000` teaches the seed's page size; 200 pages of 100 and the empty one.
    assert_eq!(gw.usage().requests_of(Operation::ScanContacts), 202);
    assert_eq!(sandbox.stats().count("GET /contacts"), 202);

    // Filters and notListIds narrow the read server-side.
    let (lombardia, _) =
        scan_all(&gw, &ScanQuery { filters: vec![("region".into(), "Lombardia".into())], ..Default::default() })
            .await
            .expect("filtered scan");
    let expected = sandbox.with_store(|s| {
        s.contact_ids().filter(|id| s.get(id).and_then(|c| c.region.as_deref()) == Some("Lombardia")).count()
    });
    assert_eq!(lombardia.len(), expected);
    sandbox.shutdown().await;
}

// A read whose consumer stops taking pages holds no thread: with one blocking thread in all, its
// page worker lets that thread go, a second read runs to its end, and the first read then ends
// complete. (A worker that waited on its read for good would hold the only thread for ever.)
#[test]
fn a_stalled_read_holds_no_thread_another_read_needs() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let sandbox = start(support::sandbox_config(3_000)).await;
        let gw = gateway(&sandbox, RatePlan::Unlimited);
        let mut stalled = gw.scan::<Value>(&ScanQuery::default());
        let first = stalled.next().await.expect("a first page").expect("read");
        let other = tokio::time::timeout(Duration::from_secs(60), scan_all(&gw, &ScanQuery::default()))
            .await
            .expect("the second read ends while the first waits on its consumer")
            .expect("read");
        assert_eq!(other.0.iter().collect::<HashSet<_>>().len(), 3_000);
        let mut ids: HashSet<String> = first.records.iter().map(|c| c["id"].as_str().expect("id").to_owned()).collect();
        while let Some(page) = stalled.next().await {
            ids.extend(page.expect("read").records.iter().map(|c| c["id"].as_str().expect("id").to_owned()));
        }
        assert_eq!(ids.len(), 3_000, "the stalled read, taken up again, is complete");
        sandbox.shutdown().await;
    });
}

// Page work that panics fails its read, naming the page and the panic; the pages before it
// arrive, nothing after it does, and the next read on the same client is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_page_work_fails_the_read() {
    let sandbox = start(support::sandbox_config(3_000)).await;
    let gw = gateway(&sandbox, RatePlan::Unlimited);
    // The read's order, from a whole read.
    let mut scan = gw.scan_with(&ScanQuery::default(), |records: &mut segsync::gateway::Records<'_, Value>| {
        records.map(|c| c["id"].as_str().expect("id").to_owned()).collect::<Vec<_>>()
    });
    let mut order = Vec::new();
    while let Some(page) = scan.next().await {
        order.extend(page.expect("a whole read").records);
    }
    assert_eq!(order.len(), 3_000);
    // The same read, whose work panics on the page holding the 1,501st record.
    let fifteenth = order[1_500].clone();
    let poison = fifteenth.clone();
    let mut scan = gw.scan_with(&ScanQuery::default(), move |records: &mut segsync::gateway::Records<'_, Value>| {
        let ids: Vec<String> = records.map(|c| c["id"].as_str().expect("id").to_owned()).collect();
        if ids.contains(&poison) {
            panic!("page work broke on {poison}");
        }
        ids.len()
    });
    let mut delivered = 0;
    let error = loop {
        match scan.next().await.expect("the read ends in an error, not quietly") {
            Ok(page) => delivered += page.records,
            Err(e) => break e.to_string(),
        }
    };
    assert!(error.contains("panicked") && error.contains(&format!("page work broke on {fifteenth}")), "{error}");
    assert_eq!(delivered, 1_500, "the pages before the broken one arrive: {error}");
    assert!(scan.next().await.is_none(), "nothing after the error");
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("the next read");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3_000);
    sandbox.shutdown().await;
}

// Lists: find by exact name, create without duplicates, add in batches, remove in bulk, read members.
#[tokio::test]
async fn list_operations_round_trip() {
    let sandbox = start(support::sandbox_config(3_000)).await;
    let gw = gateway(&sandbox, RatePlan::Unlimited);
    assert!(gw.find_lists("VIP").await.expect("find").is_empty());
    let list = gw.create_list("VIP", "big spenders").await.expect("create");
    gw.create_list("VIP extra", "a longer name containing the first").await.expect("create");
    let found = gw.find_lists("VIP").await.expect("find");
    assert_eq!(found.len(), 1, "exact name only");
    assert_eq!(found[0].id, list.id);

    let ids: Vec<ContactId> = (1..=2_500).map(|i| ContactId::from(format!("cnt-{i:06}"))).collect();
    let out = gw.add_members(&list.id, &ids).await.expect("add");
    assert_eq!(out.done, 2_500);
    assert_eq!(out.unconfirmed, 0);
    assert_eq!(gw.usage().requests_of(Operation::AddMembers), 3, "2,500 ids go in 3 batches");
    let removed = gw.remove_members(&list.id, &ids[..1_200]).await.expect("remove");
    assert_eq!(removed.done, 1_200);
    assert_eq!(gw.usage().requests_of(Operation::RemoveMembers), 2, "bulk form, 1,000 per call");
    let mut members = gw.read_members::<Value>(&list.id);
    let mut count = 0;
    while let Some(page) = members.next().await {
        count += page.expect("page").records.len();
    }
    assert_eq!(count, 1_300);
    let one: Value = gw.get_contact(&ContactId::from("cnt-000042")).await.expect("get");
    assert_eq!(one["id"], "cnt-000042");
    let missing = gw.get_contact::<Value>(&ContactId::from("cnt-999")).await.expect_err("404");
    assert_eq!(missing.to_string(), "get_contact: HTTP 404 from the gateway: contactId: Contact not found: cnt-999");
    sandbox.shutdown().await;
}

// With 500s, 429s, dropped connections and latency, a scan and a 5,000-id add still complete,
// and the sandbox saw exactly the requests the client's attempts (first tries plus retries) explain.
#[tokio::test]
async fn survives_a_bad_day() {
    let faults = Faults { latency: Duration::from_millis(2), error_rate: 0.06, throttle_rate: 0.03, drop_rate: 0.06 };
    let sandbox = start(SandboxConfig { faults, ..support::sandbox_config(6_000) }).await;
    let base = gateway(&sandbox, RatePlan::Unlimited);

    let scan_meter = Arc::new(Meter::default());
    let gw = base.metered(scan_meter.clone());
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("scan completes despite faults");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 6_000);
    assert_eq!(ids.len(), 6_000);
    let scan = scan_meter.usage();
    assert!(scan.retries > 0, "the faults must have hit something: {scan:?}");
    // The 400 that teaches the page size, 61 pages, and the retries.
    assert_eq!(scan.requests_of(Operation::ScanContacts), 1 + 61 + scan.retries, "{scan:?}");
    assert_eq!(sandbox.stats().count("GET /contacts"), scan.requests_of(Operation::ScanContacts));

    let add_meter = Arc::new(Meter::default());
    let gw = base.metered(add_meter.clone());
    let list = gw.create_list("Bad day", "").await.expect("create");
    let members: Vec<ContactId> = ids.iter().take(5_000).map(|s| ContactId::from(s.as_str())).collect();
    gw.add_members(&list.id, &members).await.expect("add completes despite faults");
    let total = sandbox.with_store(|s| s.list(list.id.as_str()).map(|l| l.contact_count()).unwrap_or(0));
    assert_eq!(total, 5_000);
    let lists = sandbox.with_store(|s| s.lists().iter().filter(|l| l.name == "Bad day").count());
    assert_eq!(lists, 1, "a retried create never duplicates the list");
    let add = add_meter.usage();
    let stats = sandbox.stats();
    assert_eq!(stats.count("POST /contacts/list/contacts"), add.requests_of(Operation::AddMembers));
    assert!(add.requests_of(Operation::AddMembers) <= 5 + add.retries, "{add:?}");
    sandbox.shutdown().await;
}

// Under the trial plan the client paces itself: no 429 in steady state.
#[tokio::test]
async fn trial_plan_is_never_exceeded() {
    let sandbox =
        start(SandboxConfig { plan: segsync_sandbox::RatePlan::Trial, ..support::sandbox_config(1_500) }).await;
    let gw = gateway(&sandbox, RatePlan::Trial);
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("scan");
    assert_eq!(ids.len(), 1_500);
    let stats = sandbox.stats();
    assert_eq!(stats.count_outcome("GET /contacts", "200"), 16, "15 pages and the empty one that ends the read");
    assert_eq!(stats.outcome_total("429"), 0, "{stats:?}");
    assert_eq!(gw.usage().throttled, 0);
    sandbox.shutdown().await;
}

// A server that ignores `offset` (the reference's page-based kind, pages of up to 1,000): with the
// pagination left to detection it is switched to `page` and read whole, each contact once; pinned
// to `offset` it is the clear error, within a bounded number of requests.
#[tokio::test]
async fn server_ignoring_offset_is_switched_to_pages() {
    let sandbox = start(SandboxConfig { page_dialect: true, ..support::sandbox_config(5_000) }).await;
    let gw = gateway(&sandbox, RatePlan::Unlimited);
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("detected and read by page");
    assert_eq!(ids.len(), 5_000, "each contact once");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 5_000);
    let learned = gw.paging(Resource::Contacts);
    assert_eq!((learned.page_size, learned.pagination), (1000, Pagination::Page), "pages of 1,000 by `page`");
    // First page, up to 3 pages found ignoring `offset`, then pages 1..4 and the empty one.
    let requests = sandbox.stats().count("GET /contacts");
    assert!((6..=10).contains(&requests), "bounded: {requests}");
    // The next read asks by page straight away: 5 full pages and the empty one.
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("second read");
    assert_eq!(ids.len(), 5_000);
    assert_eq!(sandbox.stats().count("GET /contacts"), requests + 6);

    // Pinned to `offset`, the same server is an error naming the setting.
    let mut config = support::gateway_config(&sandbox, RatePlan::Unlimited);
    config.settings.pagination = Some(Pagination::Offset);
    let before = sandbox.stats().count("GET /contacts");
    let err = scan_all(&Gateway::new(config).expect("client"), &ScanQuery::default())
        .await
        .expect_err("must not loop or truncate");
    assert!(matches!(err, GatewayError::PagingIgnored { offset: 1000, .. }), "{err}");
    assert!(err.to_string().contains("pagination"), "names the setting: {err}");
    assert!(sandbox.stats().count("GET /contacts") - before <= 5, "bounded: {:?}", sandbox.stats());
    sandbox.shutdown().await;
}

// A seed-style server refuses `limit=1000` with a 400 naming `limit`: the client asks for 100 from
// then on, having spent one request to learn it.
#[tokio::test]
async fn refused_large_pages_fall_back_to_the_seed_size() {
    let sandbox = start(support::sandbox_config(1_500)).await;
    let gw = gateway(&sandbox, RatePlan::Unlimited);
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("scan");
    assert_eq!(ids.len(), 1_500);
    assert_eq!(gw.paging(Resource::Contacts).page_size, 100);
    assert_eq!(sandbox.stats().count_outcome("GET /contacts", "400"), 1, "{:?}", sandbox.stats());
    assert_eq!(sandbox.stats().count_outcome("GET /contacts", "200"), 16, "15 pages and the empty one");
    scan_all(&gw, &ScanQuery::default()).await.expect("again");
    assert_eq!(sandbox.stats().count_outcome("GET /contacts", "400"), 1, "learned once");
    sandbox.shutdown().await;
}

// HTTP Basic credentials (the key as password) authenticate like the key header.
#[tokio::test]
async fn basic_credentials_work() {
    let sandbox = start(support::sandbox_config(300)).await;
    let mut config = support::gateway_config(&sandbox, RatePlan::Unlimited);
    config.credentials = segsync::gateway::Credentials::Basic {
        user: "ops".into(),
        password: segsync::gateway::Secret::new(support::KEY),
    };
    let gw = Gateway::new(config).expect("client");
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("scan with Basic auth");
    assert_eq!(ids.len(), 300);
    sandbox.shutdown().await;
}

// A server without the bulk removal form gets one-at-a-time removals after the first refusal.
#[tokio::test]
async fn falls_back_to_single_removal() {
    let sandbox = start(SandboxConfig { bulk_remove: false, ..support::sandbox_config(100) }).await;
    let gw = gateway(&sandbox, RatePlan::Unlimited);
    let list = gw.create_list("L", "").await.expect("create");
    let ids: Vec<ContactId> = (1..=30).map(|i| ContactId::from(format!("cnt-{i:06}"))).collect();
    gw.add_members(&list.id, &ids).await.expect("add");
    assert_eq!(gw.remove_members(&list.id, &ids[..10]).await.expect("remove").done, 10);
    assert_eq!(gw.remove_members(&list.id, &ids[10..20]).await.expect("remove").done, 10);
    let stats = sandbox.stats();
    assert_eq!(stats.count_outcome("DELETE /contacts/list/contacts", "400"), 1, "only the first bulk call is tried");
    assert_eq!(stats.count_outcome("DELETE /contacts/list/contacts", "200"), 20);
    sandbox.shutdown().await;
}

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// A wrong key gives one clear error and one request; the key appears in no log line or error text.
#[tokio::test]
async fn wrong_key_fails_once_and_keys_stay_secret() {
    let captured = Captured::default();
    let sink = captured.clone();
    let _guard =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || sink.clone()).finish();
    let _guard = tracing::subscriber::set_default(_guard);

    let sandbox = start(support::sandbox_config(500)).await;
    let mut config = support::gateway_config(&sandbox, RatePlan::Unlimited);
    let wrong = "wrong-key-77c1e0";
    config.credentials = segsync::gateway::Credentials::ApiKey(segsync::gateway::Secret::new(wrong));
    let gw = Gateway::new(config.clone()).expect("client");
    let err = scan_all(&gw, &ScanQuery::default()).await.expect_err("401");
    assert_eq!(err.to_string(), "scan_contacts: HTTP 401 from the gateway: authentication: Invalid or missing API key");
    assert_eq!(sandbox.stats().total, 1, "no retry storm");

    // A good key through a faulty server, with every log level on.
    let right = gateway(&sandbox, RatePlan::Unlimited);
    let _ = scan_all(&right, &ScanQuery::default()).await.expect("scan");
    let text = format!("{err} {err:?} {gw:?} {config:?}");
    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
    for secret in [wrong, support::KEY] {
        assert!(!text.contains(secret), "secret in error/debug text: {text}");
        assert!(!logs.contains(secret), "secret in logs");
    }
    sandbox.shutdown().await;
}

/// An offset-only server (it ignores `page`) in front of `sandbox`, which during an episode also
/// ignores `offset` from row 1,000 on.
fn offset_server_with_an_episode(episode: Arc<std::sync::atomic::AtomicBool>) -> support::hostile::Behaviour {
    support::hostile::Behaviour::default().rewrite(move |query| {
        query.retain(|(k, _)| k != "page");
        if episode.load(std::sync::atomic::Ordering::SeqCst) {
            query.retain(|(k, v)| k != "offset" || v.parse::<u64>().is_ok_and(|o| o < 1000));
        }
    })
}

// One episode of `offset` ignored teaches `page`; once the server recovers (and ignores `page`),
// the same client (the daemon's) reads by `offset` again in the same read, instead of failing
// every scan forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_pagination_recovers_with_the_server() {
    let sandbox = start(support::sandbox_config(3_000)).await;
    let episode = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hostile =
        support::hostile::Hostile::start(&sandbox.base_url(), offset_server_with_an_episode(episode.clone())).await;
    let mut config = support::gateway_config(&sandbox, RatePlan::Unlimited);
    config.base_url = hostile.base_url.parse().expect("url");
    let gw = Gateway::new(config).expect("client");
    let err = scan_all(&gw, &ScanQuery::default()).await.expect_err("ignores both forms during the episode");
    assert!(matches!(err, GatewayError::PagingIgnored { .. }), "{err}");
    assert_eq!(gw.paging(Resource::Contacts).pagination, Pagination::Page, "the episode taught `page`");
    episode.store(false, std::sync::atomic::Ordering::SeqCst);
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("recovered");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3_000, "each contact once");
    assert_eq!(gw.paging(Resource::Contacts).pagination, Pagination::Offset, "back to `offset`");
    sandbox.shutdown().await;
}

// What a client learned is probed again once it is older than the daemon's interval: a server
// that stopped refusing large pages gets them again.
#[tokio::test]
async fn learned_page_size_is_probed_again() {
    let sandbox = start(support::sandbox_config(1_500)).await;
    let gw = gateway(&sandbox, RatePlan::Unlimited);
    scan_all(&gw, &ScanQuery::default()).await.expect("scan");
    assert_eq!(gw.paging(Resource::Contacts).page_size, 100);
    gw.reprobe_older_than(Duration::from_secs(3600));
    assert_eq!(gw.paging(Resource::Contacts).page_size, 100, "not yet due");
    assert_eq!(gw.expected_paging(Resource::Contacts).page_size, 100);
    gw.reprobe_older_than(Duration::ZERO);
    assert_eq!(gw.paging(Resource::Contacts).page_size, 1000, "due: probed from the configuration");
    assert_eq!(gw.expected_paging(Resource::Contacts).page_size, 100, "planning still expects 100");
    scan_all(&gw, &ScanQuery::default()).await.expect("scan");
    assert_eq!(sandbox.stats().count_outcome("GET /contacts", "400"), 2, "probed once more: {:?}", sandbox.stats());
    sandbox.shutdown().await;
}

// A server that serves fewer rows than asked while its total counts more (no 400, `limit` not
// echoed) is telling its page size: the read adapts to it in the same read and completes.
#[tokio::test]
async fn short_pages_teach_the_page_size() {
    let sandbox = start(support::sandbox_config(3_000)).await;
    let behaviour = support::hostile::Behaviour::default()
        .rewrite(|query| {
            for (k, v) in query.iter_mut() {
                if k == "limit" {
                    *v = v.parse::<u64>().map_or(v.clone(), |l| l.min(100).to_string());
                }
            }
        })
        .edit(|_, body| {
            if let Some(object) = body.as_object_mut() {
                object.remove("limit");
            }
        });
    let hostile = support::hostile::Hostile::start(&sandbox.base_url(), behaviour).await;
    let mut config = support::gateway_config(&sandbox, RatePlan::Unlimited);
    config.base_url = hostile.base_url.parse().expect("url");
    let gw = Gateway::new(config).expect("client");
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("adapts");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3_000);
    assert_eq!(gw.paging(Resource::Contacts).page_size, 100);
    assert_eq!(sandbox.stats().count("GET /contacts"), 31, "30 pages of 100 and the empty one");
    sandbox.shutdown().await;
}

// An echoed `limit` smaller than the rows served is not believed; a 400 that merely contains the
// word "limit" is the read's error, not a page size.
#[tokio::test]
async fn echoes_and_other_limits_teach_nothing() {
    let sandbox = start(SandboxConfig { page_dialect: true, ..support::sandbox_config(3_000) }).await;
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refuse = refused.clone();
    let behaviour = support::hostile::Behaviour::default()
        .edit(|_, body| {
            if body.get("contacts").is_some() {
                body["limit"] = 5.into();
            }
        })
        .answer(move |_| {
            refuse.swap(false, std::sync::atomic::Ordering::SeqCst).then(|| {
                support::hostile::json(
                    400,
                    serde_json::json!({"status": 400, "message": "limit exceeded for export quota"}),
                )
            })
        });
    let hostile = support::hostile::Hostile::start(&sandbox.base_url(), behaviour).await;
    let mut config = support::gateway_config(&sandbox, RatePlan::Unlimited);
    config.base_url = hostile.base_url.parse().expect("url");
    let gw = Gateway::new(config).expect("client");
    let err = scan_all(&gw, &ScanQuery::default()).await.expect_err("another limit is an error");
    assert!(err.to_string().contains("export quota"), "{err}");
    assert_eq!(gw.paging(Resource::Contacts).page_size, 1000, "nothing learned from it");
    let (ids, _) = scan_all(&gw, &ScanQuery::default()).await.expect("next read");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3_000);
    assert_eq!(gw.paging(Resource::Contacts).page_size, 1000, "an echo of 5 over 1,000 rows is not believed");
    assert!(sandbox.stats().count("GET /contacts") <= 8, "pages of 1,000: {:?}", sandbox.stats());
    sandbox.shutdown().await;
}
