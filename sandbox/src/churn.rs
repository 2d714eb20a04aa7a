//! Churn on demand: every minute some contacts make a purchase, some move region, a few are
//! created and a few deleted, so "keeps lists continuously in sync" can be watched.
//!
//! Works in six ticks a minute so the demo moves steadily; it only mutates through `Store`.

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use rand::Rng;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::demo::DemoData;
use super::store::Store;

const TICKS_PER_MINUTE: u32 = 6;

pub(super) async fn run(shared: Arc<Shared>, today: NaiveDate, cancel: CancellationToken) {
    let mut data = DemoData::new(shared.config.seed.wrapping_add(1), today);
    let per_tick = shared.config.churn_per_minute.div_ceil(TICKS_PER_MINUTE).max(1);
    let mut ticker = tokio::time::interval(Duration::from_secs(60 / u64::from(TICKS_PER_MINUTE)));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let day = chrono::Utc::now().date_naive();
        churn_once(&mut shared.store(), &mut data, per_tick as usize, day);
    }
}

/// Changes `count` random contacts at once: purchases today (spend up), every tenth moves region,
/// and about 2 % sign-ups and 2 % deletions. Returns how many contacts it touched.
pub fn churn_once(store: &mut Store, data: &mut DemoData, count: usize, day: NaiveDate) -> usize {
    {
        let per_tick = count as u32;
        let day = day.to_string();
        let ids: Vec<String> = {
            let live: Vec<&str> = store.contact_ids().collect();
            if live.is_empty() {
                return 0;
            }
            (0..per_tick).map(|_| live[data.rng().random_range(0..live.len())].to_owned()).collect()
        };
        for (i, id) in ids.iter().enumerate() {
            let spend: f64 = (data.rng().random_range(2_000..80_000u32) as f64) / 100.0;
            let moves = i % 10 == 9;
            let (region, city) = data.region_and_city();
            let _ = store.update(id, |c| {
                let before = c.custom_fields.get("totalSpent").and_then(|v| v.as_f64()).unwrap_or(0.0);
                let total = ((before + spend) * 100.0).round() / 100.0;
                c.custom_fields.insert("totalSpent".into(), json!(total));
                c.custom_fields.insert("lastPurchaseDate".into(), json!(day));
                if moves {
                    c.region = Some(region.into());
                    c.city = Some(city.into());
                }
            });
        }
        // About 2 % of the churn are sign-ups and 2 % are deletions.
        let births = (per_tick / 50).max(u32::from(data.rng().random_bool(0.5)));
        for _ in 0..births {
            let seq = store.next_contact_seq();
            let fresh = data.contact(seq);
            store.create(fresh);
        }
        let deaths = (per_tick / 50).max(u32::from(data.rng().random_bool(0.3)));
        for id in ids.iter().take(deaths as usize) {
            let _ = store.delete(id);
        }
        ids.len() + births as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A churn step makes purchases today (spend only goes up) and keeps the book about the same size.
    #[test]
    fn churn_makes_purchases_today() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 28).expect("date");
        let mut store = super::super::generate(2_000, 1, today);
        let before: f64 = total_spent(&store);
        let mut data = DemoData::new(9, today);
        let touched = churn_once(&mut store, &mut data, 100, today);
        assert!(touched >= 100);
        let bought_today = store
            .contact_ids()
            .filter(|id| {
                store
                    .get(id)
                    .and_then(|c| c.custom_fields.get("lastPurchaseDate")?.as_str().map(str::to_owned))
                    .as_deref()
                    == Some("2026-11-28")
            })
            .count();
        assert!(bought_today >= 90, "{bought_today}");
        assert!((1_990..=2_010).contains(&store.len()), "{}", store.len());
        assert!(total_spent(&store) > before * 0.99);
    }

    fn total_spent(store: &Store) -> f64 {
        store.contact_ids().filter_map(|id| store.get(id)?.custom_fields.get("totalSpent")?.as_f64()).sum()
    }
}
