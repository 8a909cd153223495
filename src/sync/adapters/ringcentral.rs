//! RingCentral: extensions (`id`, `extensionNumber`, `name`, `type`, `contact.email`,
//! `contact.businessPhone`), call queues, IVR menus (auto attendants), phone numbers
//! (`phoneNumber`, `usageType`, `extension.id`).

use serde_json::Value;

use super::voice_admin::{self, Paths};
use super::{first_text, numbers, text, Item};
use crate::sync::model::{e164, AutoAttendant, Feature, PhoneNumber, Record};

const PATHS: Paths = Paths {
    number_key: "phoneNumber",
    user_number: "contact/businessPhone",
    emails: &["contact/email", "email"],
};

pub fn normalize(feature: Feature, provider: &str, v: &Value) -> Option<Record> {
    let name = first_text(v, &["name", "contact/name"]).or_else(|| {
        match (text(v, "contact/firstName"), text(v, "contact/lastName")) {
            (Some(f), Some(l)) => Some(format!("{f} {l}")),
            (f, l) => f.or(l),
        }
    });
    let item = Item {
        id: text(v, "id")?,
        provider: provider.to_string(),
        name,
        extension: text(v, "extensionNumber"),
        raw: v.clone(),
    };
    match feature {
        Feature::AutoAttendants => Some(Record::AutoAttendant(AutoAttendant {
            id: item.id,
            provider: item.provider,
            display_name: item.name.clone(),
            name: item.name,
            extension: item.extension,
            phone_numbers: numbers(v, "phoneNumbers", PATHS.number_key),
            raw: item.raw,
        })),
        Feature::PhoneNumbers => {
            let number = text(v, "phoneNumber").map(|n| e164(&n));
            Some(Record::PhoneNumber(PhoneNumber {
                id: item.id,
                provider: item.provider,
                display_name: number.clone(),
                number,
                assigned_to: text(v, "extension/id"),
                kind: text(v, "usageType"),
                raw: item.raw,
            }))
        }
        _ => voice_admin::normalize(feature, item, v, &PATHS),
    }
}
