//! The sandbox's in-memory address book: contacts, lists, memberships, and the query index.
//!
//! Owns the data and the query semantics of `GET /contacts` (filters, list membership, sort).
//! Knows nothing about HTTP: routes translate requests into calls here and results into bodies.
//! Invariant: a query's matching ids are computed once per data version and cached, so serving
//! page after page of a scan costs the same at offset 0 and at offset 999,900.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A contact as the API returns it; unknown fields are kept in `extra`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default)]
    pub custom_fields: Map<String, Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The standard fields that can be filtered and sorted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdField {
    FirstName,
    LastName,
    PhoneNumber,
    Email,
    Region,
    City,
}

impl StdField {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "firstName" => Self::FirstName,
            "lastName" => Self::LastName,
            "phoneNumber" => Self::PhoneNumber,
            "email" => Self::Email,
            "region" => Self::Region,
            "city" => Self::City,
            _ => return None,
        })
    }

    fn get(self, c: &Contact) -> Option<&str> {
        match self {
            Self::FirstName => c.first_name.as_deref(),
            Self::LastName => c.last_name.as_deref(),
            Self::PhoneNumber => c.phone_number.as_deref(),
            Self::Email => c.email.as_deref(),
            Self::Region => c.region.as_deref(),
            Self::City => c.city.as_deref(),
        }
    }
}

/// One server-side filter of `GET /contacts`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Filter {
    Std(StdField, String),
    CustomEq(String, String),
    CustomBefore(String, String),
}

impl Filter {
    fn matches(&self, c: &Contact) -> bool {
        match self {
            Self::Std(field, want) => field.get(c) == Some(want.as_str()),
            Self::CustomEq(name, want) => c.custom_fields.get(name).is_some_and(|v| value_equals(v, want)),
            Self::CustomBefore(name, date) => c
                .custom_fields
                .get(name)
                .and_then(Value::as_str)
                .is_some_and(|v| v.get(..10).is_some_and(|day| day < date.as_str())),
        }
    }
}

/// Exact match of a custom field against a query-string value: strings compare as text,
/// numbers numerically, booleans by their literal.
fn value_equals(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s == want,
        Value::Number(n) => match (n.as_f64(), want.parse::<f64>()) {
            (Some(a), Ok(b)) => a == b,
            _ => false,
        },
        Value::Bool(b) => want == if *b { "true" } else { "false" },
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SortKey {
    Std(StdField),
    Custom(String),
    Id,
}

/// Everything of a contact search except the page window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ContactQuery {
    pub filters: Vec<Filter>,
    pub list_ids: Vec<String>,
    pub not_list_ids: Vec<String>,
    pub sort: Option<(SortKey, bool)>,
}

#[derive(Debug)]
pub struct ListRecord {
    pub id: String,
    pub name: String,
    pub description: String,
    pub created_at: String,
    members: HashSet<u32>,
    version: u64,
}

impl ListRecord {
    pub fn contact_count(&self) -> usize {
        self.members.len()
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "contactCount": self.members.len(),
            "createdAt": self.created_at,
        })
    }
}

#[derive(Debug)]
pub enum StoreError {
    UnknownList(String),
    UnknownContact(String),
}

struct CachedQuery {
    contacts_version: u64,
    list_versions: Vec<u64>,
    slots: Arc<Vec<u32>>,
}

/// Counts of one membership change, in the seed's vocabulary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AddOutcome {
    pub added: usize,
    pub duplicate: usize,
    pub invalid: usize,
    pub total: usize,
}

const QUERY_CACHE_ENTRIES: usize = 64;

#[derive(Default)]
pub struct Store {
    /// Contacts by slot; a deleted contact leaves `None` so slots (and insertion order) stay stable.
    slots: Vec<Option<Contact>>,
    by_id: HashMap<String, u32>,
    next_seq: u64,
    lists: Vec<ListRecord>,
    list_by_id: HashMap<String, usize>,
    contacts_version: u64,
    cache: HashMap<ContactQuery, CachedQuery>,
}

impl Store {
    pub fn with_contacts(contacts: Vec<Contact>) -> Self {
        let mut store = Self { next_seq: contacts.len() as u64 + 1, ..Self::default() };
        store.slots.reserve(contacts.len());
        for c in contacts {
            store.insert(c);
        }
        store
    }

    fn insert(&mut self, c: Contact) -> u32 {
        let slot = self.slots.len() as u32;
        self.by_id.insert(c.id.clone(), slot);
        self.slots.push(Some(c));
        self.contacts_version += 1;
        slot
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn next_contact_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    pub fn get(&self, id: &str) -> Option<&Contact> {
        self.by_id.get(id).and_then(|&slot| self.slots[slot as usize].as_ref())
    }

    /// Stores a new contact and returns it; an empty id gets the next fresh one.
    pub fn create(&mut self, mut c: Contact) -> Contact {
        if c.id.is_empty() || self.by_id.contains_key(&c.id) {
            c.id = format!("cnt-{:06}", self.next_contact_seq());
        }
        self.insert(c.clone());
        c
    }

    /// Applies `change` to a contact; any change invalidates cached queries.
    pub fn update(&mut self, id: &str, change: impl FnOnce(&mut Contact)) -> Result<Contact, StoreError> {
        let slot = *self.by_id.get(id).ok_or_else(|| StoreError::UnknownContact(id.into()))?;
        let contact = self.slots[slot as usize].as_mut().ok_or_else(|| StoreError::UnknownContact(id.into()))?;
        change(contact);
        self.contacts_version += 1;
        Ok(contact.clone())
    }

    /// Deletes a contact; it also leaves every list.
    pub fn delete(&mut self, id: &str) -> Result<(), StoreError> {
        let slot = self.by_id.remove(id).ok_or_else(|| StoreError::UnknownContact(id.into()))?;
        self.slots[slot as usize] = None;
        for list in &mut self.lists {
            if list.members.remove(&slot) {
                list.version += 1;
            }
        }
        self.contacts_version += 1;
        Ok(())
    }

    /// Ids of every live contact, in insertion order.
    pub fn contact_ids(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().flatten().map(|c| c.id.as_str())
    }

    pub fn list(&self, id: &str) -> Result<&ListRecord, StoreError> {
        self.list_by_id.get(id).map(|&i| &self.lists[i]).ok_or_else(|| StoreError::UnknownList(id.into()))
    }

    /// The ids of a list's members, sorted (for tests that compare end states).
    pub fn member_ids(&self, list_id: &str) -> Result<Vec<String>, StoreError> {
        let list = self.list(list_id)?;
        let mut ids: Vec<String> = list.members.iter().filter_map(|&s| self.slot(s).map(|c| c.id.clone())).collect();
        ids.sort();
        Ok(ids)
    }

    pub fn lists(&self) -> &[ListRecord] {
        &self.lists
    }

    pub fn create_list(&mut self, name: String, description: String, created_at: String) -> &ListRecord {
        let seq = self.lists.len() + 1;
        let mut slug: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        while slug.contains("--") {
            slug = slug.replace("--", "-");
        }
        let slug = slug.trim_matches('-');
        let slug = if slug.is_empty() { "list" } else { slug };
        let id = format!("list-{slug}-{seq:03}");
        self.list_by_id.insert(id.clone(), self.lists.len());
        self.lists.push(ListRecord { id, name, description, created_at, members: HashSet::new(), version: 0 });
        &self.lists[self.lists.len() - 1]
    }

    /// Renames a list, as someone would by hand on the platform (tests only: the contract has no
    /// list update).
    pub fn rename_list(&mut self, id: &str, name: &str) {
        if let Some(&index) = self.list_by_id.get(id) {
            self.lists[index].name = name.to_owned();
            self.lists[index].version += 1;
        }
    }

    /// Forgets a list, as if someone deleted it on the gateway (tests only: the contract has no list delete).
    pub fn drop_list(&mut self, id: &str) {
        if let Some(index) = self.list_by_id.remove(id) {
            // Keep indexes stable: the record stays, unreachable by id.
            self.lists[index].members.clear();
            self.lists[index].name.clear();
            self.lists[index].version += 1;
        }
    }

    pub fn add_members(&mut self, list_id: &str, contact_ids: &[String]) -> Result<AddOutcome, StoreError> {
        let index = *self.list_by_id.get(list_id).ok_or_else(|| StoreError::UnknownList(list_id.into()))?;
        let list = &mut self.lists[index];
        let mut out = AddOutcome::default();
        for id in contact_ids {
            match self.by_id.get(id) {
                None => out.invalid += 1,
                Some(&slot) if list.members.insert(slot) => out.added += 1,
                Some(_) => out.duplicate += 1,
            }
        }
        if out.added > 0 {
            list.version += 1;
        }
        out.total = list.members.len();
        Ok(out)
    }

    /// Removes members; ids that are not members (or not contacts) are skipped, not errors.
    pub fn remove_members(&mut self, list_id: &str, contact_ids: &[String]) -> Result<(usize, usize), StoreError> {
        let index = *self.list_by_id.get(list_id).ok_or_else(|| StoreError::UnknownList(list_id.into()))?;
        let list = &mut self.lists[index];
        let mut removed = 0;
        for id in contact_ids {
            if let Some(slot) = self.by_id.get(id)
                && list.members.remove(slot)
            {
                removed += 1;
            }
        }
        if removed > 0 {
            list.version += 1;
        }
        Ok((removed, list.members.len()))
    }

    /// The slots matching `query`, in the query's order; cached until the data it depends on changes.
    pub fn search(&mut self, query: &ContactQuery) -> Result<Arc<Vec<u32>>, StoreError> {
        let list_indexes: Vec<usize> = query
            .list_ids
            .iter()
            .chain(&query.not_list_ids)
            .map(|id| self.list_by_id.get(id).copied().ok_or_else(|| StoreError::UnknownList(id.clone())))
            .collect::<Result<_, _>>()?;
        let list_versions: Vec<u64> = list_indexes.iter().map(|&i| self.lists[i].version).collect();
        if let Some(hit) = self.cache.get(query)
            && hit.contacts_version == self.contacts_version
            && hit.list_versions == list_versions
        {
            return Ok(hit.slots.clone());
        }
        let (include, exclude) = list_indexes.split_at(query.list_ids.len());
        let slots = Arc::new(self.compute(query, include, exclude));
        if self.cache.len() >= QUERY_CACHE_ENTRIES {
            let version = self.contacts_version;
            self.cache.retain(|_, c| c.contacts_version == version);
            if self.cache.len() >= QUERY_CACHE_ENTRIES {
                self.cache.clear();
            }
        }
        self.cache.insert(
            query.clone(),
            CachedQuery { contacts_version: self.contacts_version, list_versions, slots: slots.clone() },
        );
        Ok(slots)
    }

    fn compute(&self, query: &ContactQuery, include: &[usize], exclude: &[usize]) -> Vec<u32> {
        let keep = |slot: u32| {
            let Some(c) = &self.slots[slot as usize] else { return false };
            exclude.iter().all(|&l| !self.lists[l].members.contains(&slot))
                && query.filters.iter().all(|f| f.matches(c))
        };
        let mut slots: Vec<u32> = if include.is_empty() {
            (0..self.slots.len() as u32).filter(|&s| keep(s)).collect()
        } else {
            // Members of any of the lists, each once, in insertion order.
            let mut union: Vec<u32> = include.iter().flat_map(|&l| self.lists[l].members.iter().copied()).collect();
            union.sort_unstable();
            union.dedup();
            union.retain(|&s| keep(s));
            union
        };
        if let Some((key, descending)) = &query.sort {
            // Stable sort over insertion order: ties keep a deterministic order.
            slots.sort_by(|&a, &b| {
                let (Some(ca), Some(cb)) = (&self.slots[a as usize], &self.slots[b as usize]) else {
                    return Ordering::Equal;
                };
                let ord = compare_by(key, ca, cb);
                if *descending { ord.reverse() } else { ord }
            });
        }
        slots
    }

    pub fn slot(&self, slot: u32) -> Option<&Contact> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }
}

fn compare_by(key: &SortKey, a: &Contact, b: &Contact) -> Ordering {
    match key {
        SortKey::Id => a.id.cmp(&b.id),
        SortKey::Std(f) => cmp_missing_last(f.get(a), f.get(b), |x, y| x.cmp(y)),
        SortKey::Custom(name) => cmp_missing_last(a.custom_fields.get(name), b.custom_fields.get(name), compare_values),
    }
}

fn cmp_missing_last<T>(a: Option<T>, b: Option<T>, cmp: impl Fn(&T, &T) -> Ordering) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => cmp(&x, &y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

fn compare_values(a: &&Value, b: &&Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_f64().unwrap_or(0.0).partial_cmp(&y.as_f64().unwrap_or(0.0)).unwrap_or(Ordering::Equal)
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        // Mixed types: numbers before strings before anything else, deterministically.
        _ => rank(a).cmp(&rank(b)),
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Number(_) => 0,
        Value::String(_) => 1,
        Value::Bool(_) => 2,
        _ => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(id: &str, region: &str, spent: f64) -> Contact {
        let mut custom = Map::new();
        custom.insert("totalSpent".into(), serde_json::json!(spent));
        Contact {
            id: id.into(),
            first_name: None,
            last_name: None,
            phone_number: None,
            email: None,
            region: Some(region.into()),
            city: None,
            custom_fields: custom,
            extra: Map::new(),
        }
    }

    // A cached search is reused while nothing changes and recomputed after a membership change.
    #[test]
    fn search_cache_follows_list_versions() {
        let mut store = Store::with_contacts(vec![contact("a", "X", 1.0), contact("b", "Y", 2.0)]);
        let list = store.create_list("L".into(), String::new(), String::new()).id.clone();
        let q = ContactQuery { not_list_ids: vec![list.clone()], ..Default::default() };
        let first = store.search(&q).expect("search");
        let again = store.search(&q).expect("search");
        assert!(Arc::ptr_eq(&first, &again));
        store.add_members(&list, &["a".into()]).expect("add");
        let after = store.search(&q).expect("search");
        assert_eq!(after.as_slice(), &[1]);
    }

    // Sorting by a numeric custom field is numeric, descending when asked.
    #[test]
    fn sorts_by_custom_field_numerically() {
        let mut store =
            Store::with_contacts(vec![contact("a", "X", 9.0), contact("b", "X", 100.0), contact("c", "X", 20.0)]);
        let q = ContactQuery { sort: Some((SortKey::Custom("totalSpent".into()), true)), ..Default::default() };
        let slots = store.search(&q).expect("search");
        let ids: Vec<_> = slots.iter().map(|&s| store.slot(s).expect("live").id.clone()).collect();
        assert_eq!(ids, ["b", "c", "a"]);
    }
}
