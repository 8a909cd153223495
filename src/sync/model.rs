//! The unified data model: one serde type per synced feature (SPEC 2), the value of each
//! field of `tenant:{t}:sync:{p}:{feature}` (field = the record's `id`), whatever the
//! provider. Adapters (`sync::adapters`) turn each provider's objects into these; readers
//! (the gateway) rely on the fields documented here. Every record keeps the provider's own
//! object in `raw`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A feature tokenwarden syncs. Only these names become key names, and only when the
/// catalog gives the provider type an endpoint for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    Users,
    Extensions,
    CallQueues,
    AutoAttendants,
    PhoneNumbers,
}

impl Feature {
    pub const ALL: [Feature; 5] = [
        Feature::Users,
        Feature::Extensions,
        Feature::CallQueues,
        Feature::AutoAttendants,
        Feature::PhoneNumbers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Users => "users",
            Feature::Extensions => "extensions",
            Feature::CallQueues => "call_queues",
            Feature::AutoAttendants => "auto_attendants",
            Feature::PhoneNumbers => "phone_numbers",
        }
    }

    pub fn parse(s: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.as_str() == s.trim())
    }
}

/// A user (a person with a phone presence at the provider).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// The provider's id, as a string.
    pub id: String,
    pub provider: String,
    pub display_name: Option<String>,
    /// Lower case; `null` when the provider has none.
    pub email: Option<String>,
    pub extension: Option<String>,
    /// E.164 where the number allows ([`e164`]), else as given.
    pub phone_numbers: Vec<String>,
    pub raw: Value,
}

/// An extension of any kind (user, queue, room, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    pub id: String,
    pub provider: String,
    pub display_name: Option<String>,
    pub extension: Option<String>,
    /// The provider's kind of extension, as it names it (`DIRECT_EXTENSION`, `User`, ...).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub raw: Value,
}

/// A call queue (hunt group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallQueue {
    pub id: String,
    pub provider: String,
    pub display_name: Option<String>,
    pub name: Option<String>,
    pub extension: Option<String>,
    /// Provider ids of the members, where the list answer carries them.
    pub member_ids: Vec<String>,
    pub phone_numbers: Vec<String>,
    pub raw: Value,
}

/// An auto attendant (IVR menu, auto receptionist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoAttendant {
    pub id: String,
    pub provider: String,
    pub display_name: Option<String>,
    pub name: Option<String>,
    pub extension: Option<String>,
    pub phone_numbers: Vec<String>,
    pub raw: Value,
}

/// A phone number of the account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneNumber {
    pub id: String,
    pub provider: String,
    pub display_name: Option<String>,
    /// E.164 where the number allows, else as given.
    pub number: Option<String>,
    /// Provider id of what it is assigned to (a user, a queue, ...), if any.
    pub assigned_to: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub raw: Value,
}

/// One normalised record of any feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    User(User),
    Extension(Extension),
    CallQueue(CallQueue),
    AutoAttendant(AutoAttendant),
    PhoneNumber(PhoneNumber),
}

impl Record {
    pub fn id(&self) -> &str {
        match self {
            Record::User(r) => &r.id,
            Record::Extension(r) => &r.id,
            Record::CallQueue(r) => &r.id,
            Record::AutoAttendant(r) => &r.id,
            Record::PhoneNumber(r) => &r.id,
        }
    }
}

/// `raw` as E.164 when it can be read as one: `+` and 8 to 15 digits once spaces, dashes,
/// dots, parentheses and a `tel:` prefix are removed (`00` as international prefix becomes
/// `+`); anything else (a bare national number: its country is unknown) trimmed, as given.
pub fn e164(raw: &str) -> String {
    let t = raw.trim();
    let t = t.strip_prefix("tel:").unwrap_or(t);
    let cleaned: String = t
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}'))
        .collect();
    let digits = cleaned
        .strip_prefix('+')
        .or_else(|| cleaned.strip_prefix("00"));
    match digits {
        Some(d)
            if (8..=15).contains(&d.len())
                && d.bytes().all(|b| b.is_ascii_digit())
                && !d.starts_with('0') =>
        {
            format!("+{d}")
        }
        _ => t.to_string(),
    }
}

/// Whether `n` is an E.164 number (as [`e164`] writes it).
pub fn is_e164(n: &str) -> bool {
    n.strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_e164_where_they_can() {
        assert_eq!(e164("+1 (415) 555-0100"), "+14155550100");
        assert_eq!(e164("0049 30 1234567"), "+49301234567");
        assert_eq!(e164("tel:+44.20.7946.0000"), "+442079460000");
        assert_eq!(e164(" 4155550100 "), "4155550100");
        assert_eq!(e164("1001"), "1001");
        assert!(is_e164("+14155550100"));
        assert!(!is_e164("4155550100"));
    }

    #[test]
    fn records_serialise_with_the_documented_fields() {
        let u = Record::User(User {
            id: "7".into(),
            provider: "goto".into(),
            display_name: Some("Ann".into()),
            email: None,
            extension: Some("1001".into()),
            phone_numbers: vec!["+14155550100".into()],
            raw: serde_json::json!({"x": 1}),
        });
        let v = serde_json::to_value(&u).expect("json");
        assert_eq!(v["email"], Value::Null);
        assert_eq!(v["phone_numbers"][0], "+14155550100");
        assert_eq!(Feature::parse("call_queues"), Some(Feature::CallQueues));
        assert_eq!(Feature::parse("../x"), None);
    }
}
