//! Zoom Phone: users (`id`, `name`, `email`, `extension_number`, `phone_numbers[].number`),
//! call queues, auto receptionists (auto attendants), numbers (`number`, `assignee.id`,
//! `type`).

use serde_json::Value;

use super::{email, first_text, numbers, text};
use crate::sync::model::{e164, AutoAttendant, CallQueue, Feature, PhoneNumber, Record, User};

pub fn normalize(feature: Feature, provider: &str, v: &Value) -> Option<Record> {
    let id = text(v, "id")?;
    let provider = provider.to_string();
    let name = first_text(v, &["name", "display_name"]);
    let extension = text(v, "extension_number");
    let raw = v.clone();
    Some(match feature {
        Feature::Users => Record::User(User {
            id,
            provider,
            display_name: name,
            email: email(v, &["email"]),
            extension,
            phone_numbers: numbers(v, "phone_numbers", "number"),
            raw,
        }),
        Feature::CallQueues => Record::CallQueue(CallQueue {
            id,
            provider,
            display_name: name.clone(),
            name,
            extension,
            member_ids: super::ids(v, "members", "id"),
            phone_numbers: numbers(v, "phone_numbers", "number"),
            raw,
        }),
        Feature::AutoAttendants => Record::AutoAttendant(AutoAttendant {
            id,
            provider,
            display_name: name.clone(),
            name,
            extension,
            phone_numbers: numbers(v, "phone_numbers", "number"),
            raw,
        }),
        Feature::PhoneNumbers => {
            let number = text(v, "number").map(|n| e164(&n));
            Record::PhoneNumber(PhoneNumber {
                id,
                provider,
                display_name: first_text(v, &["display_name"]).or_else(|| number.clone()),
                number,
                assigned_to: text(v, "assignee/id"),
                kind: text(v, "type"),
                raw,
            })
        }
        Feature::Extensions => return None,
    })
}
