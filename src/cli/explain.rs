//! `explain RULE CONTACT_ID`: one contact, and why it is or is not in the segment.

use anyhow::Context;

use super::Exit;
use super::check::unselectable;
use crate::config::Config;
use crate::connection::Connection;
use crate::contact::ContactRecord;
use crate::gateway::Records;
use crate::ids::ContactId;
use crate::rules;

pub(super) async fn explain(config: &Config, rule_name: &str, contact_id: &str, verbose: bool) -> anyhow::Result<Exit> {
    let loaded = rules::Loaded::load(&config.rules_dir, config.time_zone, false);
    let rule = match loaded.select(&[rule_name.to_owned()]) {
        Ok(mut r) => r.remove(0),
        Err(e) => {
            for err in loaded.errors_of(rule_name) {
                complain!("{err}");
            }
            complain!("{e}");
            return Ok(unselectable(&e));
        }
    };
    let engine = loaded.engine;
    let suppressors: Vec<std::sync::Arc<rules::Rule>> =
        loaded.set.iter().filter(|s| s.suppresses(&rule)).cloned().collect();
    let connection = Connection::open(config, None).await?;
    let fetched = connection.gateway.get_contact::<ContactRecord>(&ContactId::from(contact_id)).await;
    let today = rules::Date(chrono::Utc::now().with_timezone(&config.time_zone).date_naive());
    // A rule with `fn list`: explained as the one list it names for this contact.
    let rule = match &fetched {
        Ok(contact) if rule.is_partitioned() => match named_list(&engine, &rule, contact, today) {
            Ok(Some(list)) => std::sync::Arc::new(rule.partition(&list)),
            Ok(None) => {
                connection.close().await;
                say!("rule      {} ({}, hash {})", rule.name, rule.path.display(), rule.short_hash());
                say!(
                    "answer    fn list names no list for contact {contact_id}: it belongs to none of this rule's lists"
                );
                return Ok(Exit::Ok);
            }
            Err(e) => {
                connection.close().await;
                say!(
                    "answer    ERROR, so the contact is neither added to nor removed from any list of {}: {e}",
                    rule.name
                );
                return Ok(Exit::Ok);
            }
        },
        _ => rule,
    };
    let in_list = match &fetched {
        Ok(_) => in_list_now(&connection.gateway, &rule.list, contact_id).await,
        Err(_) => Ok(None),
    };
    connection.close().await;
    let contact = fetched.with_context(|| format!("fetching contact {contact_id}"))?;
    let in_list = in_list.with_context(|| format!("reading the list {:?}", rule.list))?;
    say!("rule      {} ({}, hash {})", rule.name, rule.path.display(), rule.short_hash());
    say!("list      {}", rule.list);
    say!("contact   {}", contact.id);
    say!("today     {} ({})", today.0, config.time_zone);
    let map = contact.full().read_lock::<rhai::Map>().map(|m| m.clone()).unwrap_or_default();
    for term in &rule.filter {
        let (key, value) = term.query_pair();
        let verdict = match term.judge(&map) {
            Ok(true) => "passes".to_owned(),
            Ok(false) => "FAILS".to_owned(),
            Err(e) => format!("CANNOT JUDGE ({e})"),
        };
        say!("filter    {key} = {value:?}: {verdict} (contact has {})", show_field(&map, &key));
    }
    if verbose {
        say!("derived   {}", derived_text(&rule, today));
    }
    for (path, value) in fields_read(&map, &rule.mentions) {
        say!("reads     {path} = {value}");
    }
    let by = match rule.native.as_ref() {
        // `matches`, or a partitioned rule's `fn list`: whichever the rule has answers natively.
        Ok(native) if rule.engine_name() == "native" => {
            let full = contact.full();
            if native.judge(&*full, today.0).is_ok() || native.list(&*full, today.0).is_ok() {
                "native".to_owned()
            } else {
                "rhai (the native evaluator leaves this record to Rhai: Rhai errs on it, or a value is of a type it \
                 does not judge)"
                    .to_owned()
            }
        }
        _ => rule.engine_name(),
    };
    say!("engine    {by}");
    let mut answer = rule.evaluate(&engine, &contact, today);
    match &answer {
        Ok(true) => say!("answer    IN the segment: the list should hold this contact"),
        Ok(false) => say!("answer    NOT in the segment: the list should not hold this contact"),
        Err(e) => say!("answer    ERROR, so the contact is neither added nor removed: {e}"),
    }
    // A suppression rule overrides the answer: its contacts are in no list it applies to.
    for s in &suppressors {
        match s.evaluate(&engine, &contact, today) {
            Ok(true) => {
                say!("suppress  SUPPRESSED by rule {}: kept out of this list, and removed at once if in it", s.name);
                answer = Ok(false);
            }
            Ok(false) => say!("suppress  not suppressed by rule {}", s.name),
            Err(e) => {
                say!(
                    "suppress  rule {} cannot judge it ({e}): it is not added; a member is not removed for it",
                    s.name
                );
                if answer == Ok(true) {
                    answer = Err(e);
                }
            }
        }
    }
    let now = match (&in_list, &answer) {
        (None, _) => "the list does not exist yet; the rule's first run that writes creates it".to_owned(),
        (Some((list, true)), Ok(true)) => format!("IN the list ({list}), as it should be"),
        (Some((list, false)), Ok(false)) => format!("not in the list ({list}), as it should be"),
        (Some((list, false)), Ok(true)) => format!("not in the list ({list}) yet: the next run adds it"),
        (Some((list, true)), Ok(false)) => {
            format!("IN the list ({list}): the next run removes it (after REMOVE_AFTER, if the rule sets one)")
        }
        (Some((list, member)), Err(_)) => {
            format!(
                "{} the list ({list}); it stays as it is while the rule cannot judge it",
                if *member { "IN" } else { "not in" }
            )
        }
    };
    say!("list now  {now}");
    Ok(Exit::Ok)
}

/// The list a partitioned rule names for `contact` (`None`: no list, the FILTER included).
fn named_list(
    engine: &rhai::Engine,
    rule: &rules::Rule,
    contact: &ContactRecord,
    today: rules::Date,
) -> Result<Option<String>, rules::EvalError> {
    if !rule.filter_verdict(contact)? {
        return Ok(None);
    }
    rule.list_of(engine, contact.full().into_owned(), today)
}

/// Whether `contact` is in the list named `list` now, by a read of that list (the oldest of the
/// name, as a run binds it); `None` when no list carries the name.
async fn in_list_now(
    gateway: &crate::gateway::Gateway,
    list: &str,
    contact: &str,
) -> Result<Option<(crate::ids::ListId, bool)>, crate::gateway::GatewayError> {
    let Some(found) = gateway.find_lists(list).await?.into_iter().find(|l| l.name == list) else { return Ok(None) };
    let target = contact.to_owned();
    let query = crate::gateway::ScanQuery { list_ids: vec![found.id.clone()], ..Default::default() };
    let mut scan = gateway
        .scan_with(&query, move |records: &mut Records<'_, ContactRecord>| records.any(|r| r.id.as_str() == target));
    while let Some(page) = scan.next().await {
        if page?.records {
            return Ok(Some((found.id, true)));
        }
    }
    Ok(Some((found.id, false)))
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
