//! RingCentral: extensions (`id`, `extensionNumber`, `name`, `type`, `contact.email`,
//! `contact.businessPhone`), call queues, IVR menus (auto attendants), phone numbers
//! (`phoneNumber`, `usageType`, `extension.id`).

use serde_json::Value;

use super::{email, first_text, numbers, push_unique, text};
use crate::sync::model::{
    e164, AutoAttendant, CallQueue, Extension, Feature, PhoneNumber, Record, User,
};

pub fn normalize(feature: Feature, provider: &str, v: &Value) -> Option<Record> {
    let id = text(v, "id")?;
    let provider = provider.to_string();
    let name = first_text(v, &["name", "contact/name"]).or_else(|| {
        match (text(v, "contact/firstName"), text(v, "contact/lastName")) {
            (Some(f), Some(l)) => Some(format!("{f} {l}")),
            (f, l) => f.or(l),
        }
    });
    let extension = text(v, "extensionNumber");
    let raw = v.clone();
    Some(match feature {
        Feature::Users => {
            let mut phone_numbers = numbers(v, "phoneNumbers", "phoneNumber");
            push_unique(
                &mut phone_numbers,
                text(v, "contact/businessPhone").map(|n| e164(&n)),
            );
            Record::User(User {
                id,
                provider,
                display_name: name,
                email: email(v, &["contact/email", "email"]),
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
            phone_numbers: numbers(v, "phoneNumbers", "phoneNumber"),
            raw,
        }),
        Feature::AutoAttendants => Record::AutoAttendant(AutoAttendant {
            id,
            provider,
            display_name: name.clone(),
            name,
            extension,
            phone_numbers: numbers(v, "phoneNumbers", "phoneNumber"),
            raw,
        }),
        Feature::PhoneNumbers => {
            let number = text(v, "phoneNumber").map(|n| e164(&n));
            Record::PhoneNumber(PhoneNumber {
                id,
                provider,
                display_name: number.clone(),
                number,
                assigned_to: text(v, "extension/id"),
                kind: text(v, "usageType"),
                raw,
            })
        }
    })
}
