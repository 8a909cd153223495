//! GoTo Connect (voice admin): extensions (`id`, `number`, `name`, `type`), call queues,
//! phone numbers (`number`, `extensionId`/`routeTo`). Users are the `DIRECT_EXTENSION`
//! extensions (the catalog's filter); their email, when GoTo gives one, is `email`.

use serde_json::Value;

use super::voice_admin::{self, Paths};
use super::{first_text, text, Item};
use crate::sync::model::{e164, Feature, PhoneNumber, Record};

const PATHS: Paths = Paths {
    number_key: "number",
    user_number: "directNumber",
    emails: &["email", "emailAddress"],
};

pub fn normalize(feature: Feature, provider: &str, v: &Value) -> Option<Record> {
    let item = Item {
        id: text(v, "id")?,
        provider: provider.to_string(),
        name: first_text(v, &["name", "displayName"]),
        extension: first_text(v, &["number", "extensionNumber"]),
        raw: v.clone(),
    };
    match feature {
        Feature::PhoneNumbers => Some(Record::PhoneNumber(PhoneNumber {
            id: item.id,
            provider: item.provider,
            display_name: item.name,
            number: text(v, "number").map(|n| e164(&n)),
            assigned_to: first_text(v, &["extensionId", "routeTo/id"]),
            kind: text(v, "type"),
            raw: item.raw,
        })),
        // GoTo documents no auto-attendant list.
        Feature::AutoAttendants => None,
        _ => voice_admin::normalize(feature, item, v, &PATHS),
    }
}
