//! `explain RULE CONTACT_ID`: one contact, and why it is or is not in the segment.

use anyhow::Context;

use super::Exit;
use super::check::unselectable;
use crate::config::Config;
use crate::connection::Connection;
use crate::contact::ContactRecord;
use crate::ids::ContactId;
use crate::rules;

pub(super) async fn explain(config: &Config, rule_name: &str, contact_id: &str) -> anyhow::Result<Exit> {
    let loaded = rules::Loaded::load(&config.rules_dir, config.time_zone, false);
    let rule = match loaded.select(&[rule_name.to_owned()]) {
        Ok(mut r) => r.remove(0),
        Err(e) => {
            for err in loaded.errors_of(rule_name) {
                say!("{err}");
            }
            say!("{e}");
            return Ok(unselectable(&e));
        }
    };
    let engine = loaded.engine;
    let connection = Connection::open(config, None).await?;
    let fetched = connection.gateway.get_contact::<ContactRecord>(&ContactId::from(contact_id)).await;
    connection.close().await;
    let contact = fetched.with_context(|| format!("fetching contact {contact_id}"))?;
    let today = rules::Date(chrono::Utc::now().with_timezone(&config.time_zone).date_naive());
    say!("rule      {} ({}, hash {})", rule.name, rule.path.display(), rule.short_hash());
    say!("list      {}", rule.list);
    say!("contact   {}", contact.id);
    say!("today     {} ({})", today.0, config.time_zone);
    let map = contact.map().map(|m| m.clone()).unwrap_or_default();
    for term in &rule.filter {
        let (key, value) = term.query_pair();
        let verdict = match term.judge(&map) {
            Ok(true) => "passes".to_owned(),
            Ok(false) => "FAILS".to_owned(),
            Err(e) => format!("CANNOT JUDGE ({e})"),
        };
        say!("filter    {key} = {value:?}: {verdict} (contact has {})", show_field(&map, &key));
    }
    say!("derived   {}", derived_text(&rule, today));
    for (path, value) in fields_read(&map, &rule.mentions) {
        say!("reads     {path} = {value}");
    }
    match rule.evaluate(&engine, &contact, today) {
        Ok(true) => say!("answer    IN the segment: the list should hold this contact"),
        Ok(false) => say!("answer    NOT in the segment: the list should not hold this contact"),
        Err(e) => say!("answer    ERROR, so the contact is neither added nor removed: {e}"),
    }
    Ok(Exit::Ok)
}

/// The server filter derived from `matches` for `today` (what the rule's own reads ask for), or
/// why there is none.
pub(super) fn derived_text(rule: &rules::Rule, today: rules::Date) -> String {
    match &rule.pushdown {
        rules::PushDown::None(why) => format!("no server filter from matches: {why}"),
        rules::PushDown::Terms(_) => {
            let terms: Vec<String> =
                rule.derived_filter(today).iter().map(|t| t.query_pair()).map(|(k, v)| format!("{k}={v}")).collect();
            if terms.is_empty() {
                "no server filter from matches beyond FILTER".into()
            } else {
                format!("{} (from matches; narrows the rule's own reads, matches still decides)", terms.join("&"))
            }
        }
    }
}

/// The contact's value at a dotted filter key (`customFields.x.before` reads `customFields.x`).
fn show_field(map: &rhai::Map, key: &str) -> String {
    let key = key.strip_suffix(".before").unwrap_or(key);
    let value = match key.strip_prefix("customFields.") {
        Some(custom) => {
            map.get("customFields").and_then(|c| c.read_lock::<rhai::Map>().and_then(|m| m.get(custom).cloned()))
        }
        None => map.get(key).cloned(),
    };
    value.map_or_else(|| "nothing".to_owned(), |v| format!("{v:?}"))
}

/// The contact's fields whose names the rule mentions, top-level and in `customFields`.
fn fields_read(map: &rhai::Map, mentions: &[String]) -> Vec<(String, String)> {
    let custom =
        map.get("customFields").and_then(|c| c.read_lock::<rhai::Map>().map(|m| m.clone())).unwrap_or_default();
    let mut out = Vec::new();
    for word in mentions.iter().filter(|w| *w != "customFields") {
        if let Some(v) = map.get(word.as_str()) {
            out.push((word.clone(), format!("{v:?}")));
        } else if let Some(v) = custom.get(word.as_str()) {
            out.push((format!("customFields.{word}"), format!("{v:?}")));
        } else {
            out.push((word.clone(), "(absent on this contact)".into()));
        }
    }
    out
}
