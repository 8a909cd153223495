//! Provider objects to the unified model ([`crate::sync::model`]): one file per provider
//! type, each knowing its own field names. Unknown fields are ignored (they stay in `raw`);
//! an item without an id is skipped (and counted by the caller).

pub mod goto;
pub mod ringcentral;
pub mod teams;
mod voice_admin;
pub mod zoom;

use serde_json::Value;

use super::model::{e164, CallQueue, Feature, Record};

/// The adapter of a provider type (`None`: tokenwarden has none, so it does not sync it).
pub fn adapter(provider_type: &str) -> Option<Adapter> {
    Some(match provider_type {
        "goto" => goto::normalize,
        "teams" => teams::normalize,
        "ringcentral" => ringcentral::normalize,
        "zoom" => zoom::normalize,
        _ => return None,
    })
}

/// `(feature, provider name, item) -> record`.
pub type Adapter = fn(Feature, &str, &Value) -> Option<Record>;

/// The fields every item has, as the provider's adapter reads them.
pub(crate) struct Item {
    pub id: String,
    pub provider: String,
    pub name: Option<String>,
    pub extension: Option<String>,
    pub raw: Value,
}

/// A call queue: members at `members[].id`, numbers in the array at `numbers_at` (strings,
/// or objects with `number_key`).
pub(crate) fn call_queue(item: Item, v: &Value, numbers_at: &str, number_key: &str) -> Record {
    Record::CallQueue(CallQueue {
        id: item.id,
        provider: item.provider,
        display_name: item.name.clone(),
        name: item.name,
        extension: item.extension,
        member_ids: ids(v, "members", "id"),
        phone_numbers: numbers(v, numbers_at, number_key),
        raw: item.raw,
    })
}

/// The value at a `/`-separated path of object keys.
pub(crate) fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('/').try_fold(v, |v, k| v.get(k))
}

/// A string or number at `path`, as a non-empty string.
pub(crate) fn text(v: &Value, path: &str) -> Option<String> {
    match at(v, path)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The first of `paths` that has text.
pub(crate) fn first_text(v: &Value, paths: &[&str]) -> Option<String> {
    paths.iter().find_map(|p| text(v, p))
}

/// A lower-case email, when it looks like one.
pub(crate) fn email(v: &Value, paths: &[&str]) -> Option<String> {
    first_text(v, paths)
        .filter(|e| e.contains('@'))
        .map(|e| e.to_lowercase())
}

/// Numbers from an array at `path` of strings, or of objects with `key`.
pub(crate) fn numbers(v: &Value, path: &str, key: &str) -> Vec<String> {
    match at(v, path) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|n| match n {
                Value::String(s) if !s.trim().is_empty() => Some(e164(s)),
                Value::Object(_) => text(n, key).map(|s| e164(&s)),
                _ => None,
            })
            .collect(),
        Some(Value::String(s)) if !s.trim().is_empty() => vec![e164(s)],
        _ => Vec::new(),
    }
}

/// Appends `n` unless empty or already there.
pub(crate) fn push_unique(list: &mut Vec<String>, n: Option<String>) {
    if let Some(n) = n.filter(|n| !n.is_empty()) {
        if !list.contains(&n) {
            list.push(n);
        }
    }
}

/// Ids from an array at `path` of strings/numbers, or of objects with `key`.
pub(crate) fn ids(v: &Value, path: &str, key: &str) -> Vec<String> {
    match at(v, path) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|m| match m {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Object(_) => text(m, key),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}
