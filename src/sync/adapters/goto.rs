//! GoTo Connect (voice admin): extensions (`id`, `number`, `name`, `type`), call queues,
//! phone numbers (`number`, `extensionId`/`routeTo`). Users are the `DIRECT_EXTENSION`
//! extensions (the catalog's filter); their email, when GoTo gives one, is `email`.

use serde_json::Value;

use super::{email, first_text, numbers, push_unique, text};
use crate::sync::model::{e164, CallQueue, Extension, Feature, PhoneNumber, Record, User};

pub fn normalize(feature: Feature, provider: &str, v: &Value) -> Option<Record> {
    let id = text(v, "id")?;
    let provider = provider.to_string();
    let name = first_text(v, &["name", "displayName"]);
    let extension = first_text(v, &["number", "extensionNumber"]);
    let raw = v.clone();
    Some(match feature {
        Feature::Users => {
            let mut phone_numbers = numbers(v, "phoneNumbers", "number");
            push_unique(
                &mut phone_numbers,
                text(v, "directNumber").map(|n| e164(&n)),
            );
            Record::User(User {
                id,
                provider,
                display_name: name,
                email: email(v, &["email", "emailAddress"]),
                extension,
                phone_numbers,
                raw,
            })
        }
        Feature::Extensions => Record::Extension(Extension {
            id,
            provider,
            display_name: name,
            extension,
            kind: text(v, "type"),
            raw,
        }),
        Feature::CallQueues => Record::CallQueue(CallQueue {
            id,
            provider,
            display_name: name.clone(),
            name,
            extension,
            member_ids: super::ids(v, "members", "id"),
            phone_numbers: numbers(v, "phoneNumbers", "number"),
            raw,
        }),
        Feature::PhoneNumbers => Record::PhoneNumber(PhoneNumber {
            id,
            provider,
            display_name: name,
            number: text(v, "number").map(|n| e164(&n)),
            assigned_to: first_text(v, &["extensionId", "routeTo/id"]),
            kind: text(v, "type"),
            raw,
        }),
        // GoTo documents no auto-attendant list.
        Feature::AutoAttendants => return None,
    })
}
