//! Zoom Phone: users (`id`, `name`, `email`, `extension_number`, `phone_numbers[].number`),
//! call queues, auto receptionists (auto attendants), numbers (`number`, `assignee.id`,
//! `type`).

use serde_json::Value;

use super::{call_queue, email, first_text, numbers, text, Item};
use crate::sync::model::{e164, AutoAttendant, Feature, PhoneNumber, Record, User};

pub fn normalize(feature: Feature, provider: &str, v: &Value) -> Option<Record> {
    let item = Item {
        id: text(v, "id")?,
        provider: provider.to_string(),
        name: first_text(v, &["name", "display_name"]),
        extension: text(v, "extension_number"),
        raw: v.clone(),
    };
    Some(match feature {
        Feature::Users => Record::User(User {
            id: item.id,
            provider: item.provider,
            display_name: item.name,
            email: email(v, &["email"]),
            extension: item.extension,
            phone_numbers: numbers(v, "phone_numbers", "number"),
            raw: item.raw,
        }),
        Feature::CallQueues => call_queue(item, v, "phone_numbers", "number"),
        Feature::AutoAttendants => Record::AutoAttendant(AutoAttendant {
            id: item.id,
            provider: item.provider,
            display_name: item.name.clone(),
            name: item.name,
            extension: item.extension,
            phone_numbers: numbers(v, "phone_numbers", "number"),
            raw: item.raw,
        }),
        Feature::PhoneNumbers => {
            let number = text(v, "number").map(|n| e164(&n));
            Record::PhoneNumber(PhoneNumber {
                id: item.id,
                provider: item.provider,
                display_name: first_text(v, &["display_name"]).or_else(|| number.clone()),
                number,
                assigned_to: text(v, "assignee/id"),
                kind: text(v, "type"),
                raw: item.raw,
            })
        }
        Feature::Extensions => return None,
    })
}
