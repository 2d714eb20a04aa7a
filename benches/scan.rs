//! Scan benchmark (release): the sandbox serving a full 1,000,000-contact scan in pages of 100, the
//! client's cost per contact, and a 100,000-contact scan paced for the production plan against its
//! rate-limit bound. The sandbox runs as a child process, so CPU and memory here are the client's.
//!
//! Run: `cargo bench --bench scan` (add `-- --quick` for 200,000 contacts and no paced scan).

// A benchmark reports by printing.
#![allow(clippy::print_stdout)]

mod support;

// The same allocator as the segsync binary, so this measures what the binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use segsync::contact::ContactRecord;
use segsync::gateway::RatePlan;
use segsync::gateway::ScanQuery;

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let contacts: u64 = if quick { 200_000 } else { 1_000_000 };

    let started = Instant::now();
    let sandbox = support::SandboxChild::start(contacts, "unlimited");
    println!(
        "sandbox: generated {contacts} contacts in {} ms (ready after {} ms), RSS {:.0} MB",
        sandbox.generate_ms,
        started.elapsed().as_millis(),
        sandbox.rss_mb()
    );

    // Cost of one page far into the scan vs at its start: must not grow with the offset.
    let http = reqwest::Client::new();
    let page_ms = |offset: u64| {
        let http = http.clone();
        let url = format!("{}/partner-gateway/v1/contacts?limit=100&offset={offset}", sandbox.base_url);
        async move {
            let mut best = f64::MAX;
            for _ in 0..20 {
                let t = Instant::now();
                let body = http
                    .get(&url)
                    .header("X-Api-Key", support::KEY)
                    .send()
                    .await
                    .expect("sent")
                    .bytes()
                    .await
                    .expect("body");
                assert!(body.len() > 1000);
                best = best.min(t.elapsed().as_secs_f64() * 1000.0);
            }
            best
        }
    };
    let (first, last) = (page_ms(0).await, page_ms(contacts - 100).await);
    println!(
        "one page (best of 20): offset 0 {first:.2} ms, offset {} {last:.2} ms (ratio {:.2})",
        contacts - 100,
        last / first
    );

    for concurrency in [1, 4] {
        let gw = support::gateway(&sandbox.base_url, RatePlan::Unlimited, concurrency);
        support::reset_peak();
        let cpu = support::cpu_time();
        let t = Instant::now();
        let mut scan = gw.scan::<ContactRecord>(&ScanQuery::default());
        let (mut pages, mut seen) = (0u64, 0u64);
        while let Some(page) = scan.next().await {
            pages += 1;
            seen += page.expect("page").records.len() as u64;
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = (support::cpu_time() - cpu).as_secs_f64();
        assert_eq!(seen, contacts);
        println!(
            "full scan, {concurrency} page(s) in flight: {pages} pages in {wall:.1} s = {:.0} pages/s, {:.0} contacts/s; client CPU {:.2} µs/contact; client peak RSS {:.0} MB",
            pages as f64 / wall,
            seen as f64 / wall,
            cpu * 1e6 / seen as f64,
            support::peak_mb()
        );
    }
    println!("sandbox RSS after the scans: {:.0} MB", sandbox.rss_mb());
    drop(sandbox);

    if quick {
        return;
    }
    // 100,000 contacts under the production plan: 1,000 requests at 1,000/min is a 60 s bound.
    let sandbox = support::SandboxChild::start(100_000, "production");
    let gw = support::gateway(&sandbox.base_url, RatePlan::Production, 4);
    let t = Instant::now();
    let mut scan = gw.scan::<ContactRecord>(&ScanQuery::default());
    let mut seen = 0;
    while let Some(page) = scan.next().await {
        seen += page.expect("page").records.len();
    }
    let wall = t.elapsed().as_secs_f64();
    let usage = gw.usage();
    let bound = usage.total_requests() as f64 / (1000.0 / 60.0);
    let stats = sandbox.stats();
    println!(
        "production plan: {seen} contacts, {} requests in {wall:.1} s; bound requests/rate = {bound:.1} s; ratio {:.3} (target ≤ 1.05); 429s seen: {}",
        usage.total_requests(),
        wall / bound,
        usage.throttled
    );
    println!("sandbox stats: {stats}");
}
