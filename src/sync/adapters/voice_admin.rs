//! What GoTo and RingCentral share: users, extensions and call queues are the same kinds of
//! objects in both voice-admin APIs, with their fields in different places ([`Paths`]).

use serde_json::Value;

use super::{call_queue, email, numbers, push_unique, text, Item};
use crate::sync::model::{e164, Extension, Feature, Record, User};

/// Where one API keeps the fields [`normalize`] reads.
pub struct Paths {
    /// The key of a number inside a `phoneNumbers` item object.
    pub number_key: &'static str,
    /// A user's own number besides `phoneNumbers`.
    pub user_number: &'static str,
    /// A user's email, first match wins.
    pub emails: &'static [&'static str],
}

/// Users, extensions and call queues; `None` for the features each API shapes its own way.
pub fn normalize(feature: Feature, item: Item, v: &Value, paths: &Paths) -> Option<Record> {
    Some(match feature {
        Feature::Users => {
            let mut phone_numbers = numbers(v, "phoneNumbers", paths.number_key);
            push_unique(
                &mut phone_numbers,
                text(v, paths.user_number).map(|n| e164(&n)),
            );
            Record::User(User {
                id: item.id,
                provider: item.provider,
                display_name: item.name,
                email: email(v, paths.emails),
                extension: item.extension,
                phone_numbers,
                raw: item.raw,
            })
        }
        Feature::Extensions => Record::Extension(Extension {
            id: item.id,
            provider: item.provider,
            display_name: item.name,
            extension: item.extension,
            kind: text(v, "type"),
            raw: item.raw,
        }),
        Feature::CallQueues => call_queue(item, v, "phoneNumbers", paths.number_key),
        Feature::AutoAttendants | Feature::PhoneNumbers => return None,
    })
}
