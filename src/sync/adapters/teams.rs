//! Microsoft Teams through Graph: users (`id`, `displayName`, `mail` or a
//! `userPrincipalName` that is an address, `businessPhones`, `mobilePhone`) and phone number
//! assignments (`telephoneNumber`, `assignmentTargetId`, `numberType`). Graph has no API
//! for call queues or auto attendants.

use serde_json::Value;

use super::{email, first_text, numbers, push_unique, text};
use crate::sync::model::{e164, Feature, PhoneNumber, Record, User};

pub fn normalize(feature: Feature, provider: &str, v: &Value) -> Option<Record> {
    let provider = provider.to_string();
    let raw = v.clone();
    match feature {
        Feature::Users => {
            let mut phone_numbers = numbers(v, "businessPhones", "number");
            push_unique(&mut phone_numbers, text(v, "mobilePhone").map(|n| e164(&n)));
            Some(Record::User(User {
                id: text(v, "id")?,
                provider,
                display_name: text(v, "displayName"),
                email: email(v, &["mail", "userPrincipalName"]),
                extension: None,
                phone_numbers,
                raw,
            }))
        }
        Feature::PhoneNumbers => {
            let number = text(v, "telephoneNumber").map(|n| e164(&n));
            Some(Record::PhoneNumber(PhoneNumber {
                id: first_text(v, &["id", "telephoneNumber"])?,
                provider,
                display_name: number.clone(),
                number,
                assigned_to: text(v, "assignmentTargetId"),
                kind: text(v, "numberType"),
                raw,
            }))
        }
        Feature::Extensions | Feature::CallQueues | Feature::AutoAttendants => None,
    }
}
