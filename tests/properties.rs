//! Property tests: hostile values never panic, and are either handled or reported.
//!
//! - record parsing with arbitrary bytes in every field (`parse_fields_value`,
//!   `parse_record_value`), and bytes in fields tokenwarden does not use changing nothing;
//! - timestamps: any text parses or is refused; what parses writes back to the same instant
//!   in the same format;
//! - config: any integer for any numeric setting, by environment or file, gives a config or
//!   an error that names the setting.
//!
//! Case counts are modest so that the file runs in seconds.

use std::collections::BTreeMap;

use proptest::collection::vec;
use proptest::prelude::*;
use redis::Value;
use tokenwarden::config::{Config, RANGES};
use tokenwarden::registry::record::RecordState;
use tokenwarden::registry::{parse_fields_value, parse_record_value, RECORD_FIELDS};
use tokenwarden::timestamp;

fn seed() -> Vec<(&'static str, &'static str)> {
    vec![
        ("provider_type", "goto"),
        ("status", "active"),
        ("auth_type", "oauth"),
        ("client_id", "cid"),
        ("client_secret", "cs"),
        ("account_key", "42"),
        ("access_token", "at"),
        ("refresh_token", "rt"),
        ("token_expiry", "2026-11-28T04:20:00"),
        ("scopes", "[\"a\"]"),
        ("api_base_url", "https://api.example/v1"),
        ("features_enabled", "[\"users\"]"),
        ("sync_enabled", "True"),
        ("updated_at", "2026-11-28T03:20:00"),
    ]
}

fn hgetall(pairs: &[(Vec<u8>, Vec<u8>)]) -> Value {
    Value::Array(
        pairs
            .iter()
            .flat_map(|(k, v)| [Value::BulkString(k.clone()), Value::BulkString(v.clone())])
            .collect(),
    )
}

fn seed_pairs() -> Vec<(Vec<u8>, Vec<u8>)> {
    seed()
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn kind(s: &RecordState) -> String {
    match s {
        RecordState::Valid(_) => "valid".into(),
        RecordState::Inactive { .. } => "inactive".into(),
        RecordState::Invalid { error, .. } => format!("invalid:{}", error.reason),
    }
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// An HMGET answer with arbitrary bytes (or nil, or a non-string) in every field.
    #[test]
    fn hmget_answers_never_panic(values in vec(prop_oneof![
        Just(Value::Nil),
        bytes().prop_map(Value::BulkString),
        any::<i64>().prop_map(Value::Int),
    ], 0..RECORD_FIELDS.len() + 2)) {
        let state = parse_fields_value(Value::Array(values), RECORD_FIELDS);
        if let RecordState::Invalid { error, .. } = &state {
            prop_assert!(!error.reason.is_empty());
        }
    }

    /// An HGETALL answer with arbitrary field names and values.
    #[test]
    fn hgetall_answers_never_panic(pairs in vec((bytes(), bytes()), 0..20)) {
        let _ = parse_record_value(hgetall(&pairs));
    }

    /// Arbitrary bytes in one used field: valid, inactive or invalid with a reason; never a
    /// panic, and the same answer from HMGET as from HGETALL.
    #[test]
    fn one_hostile_field(field in 0..RECORD_FIELDS.len(), value in bytes()) {
        let name = RECORD_FIELDS[field];
        let mut pairs = seed_pairs();
        pairs.retain(|(k, _)| k != name.as_bytes());
        pairs.push((name.as_bytes().to_vec(), value.clone()));
        let by_all = parse_record_value(hgetall(&pairs));
        let hmget: Vec<Value> = RECORD_FIELDS
            .iter()
            .map(|f| {
                pairs
                    .iter()
                    .find(|(k, _)| k == f.as_bytes())
                    .map_or(Value::Nil, |(_, v)| Value::BulkString(v.clone()))
            })
            .collect();
        let by_fields = parse_fields_value(Value::Array(hmget), RECORD_FIELDS);
        prop_assert_eq!(kind(&by_all), kind(&by_fields));
        prop_assert_eq!(by_all.fingerprint(), by_fields.fingerprint());
        if std::str::from_utf8(&value).is_err() {
            prop_assert_eq!(kind(&by_all), "invalid:bad_encoding");
        }
    }

    /// Bytes in fields tokenwarden does not use (`created_at`, extra fields) and in
    /// `access_token` change nothing the registry decides on.
    #[test]
    fn unused_fields_change_nothing(
        created_at in bytes(),
        access_token in bytes(),
        extra in vec((bytes(), bytes()), 0..6),
    ) {
        let plain = parse_record_value(hgetall(&seed_pairs()));
        let mut pairs = seed_pairs();
        pairs.retain(|(k, _)| k != b"access_token");
        pairs.push((b"created_at".to_vec(), created_at));
        pairs.push((b"access_token".to_vec(), access_token.clone()));
        for (k, v) in extra {
            if RECORD_FIELDS.iter().any(|f| f.as_bytes() == k.as_slice()) || k == b"access_token" {
                continue;
            }
            pairs.push((k, v));
        }
        let hostile = parse_record_value(hgetall(&pairs));
        prop_assert_eq!(kind(&hostile), "valid");
        prop_assert_eq!(hostile.fingerprint(), plain.fingerprint());
        if let RecordState::Valid(r) = &hostile {
            prop_assert_eq!(r.access_token_unreadable, std::str::from_utf8(&access_token).is_err());
        }
    }

    /// Any text: parsed or refused; what parses formats back to the same instant and format.
    #[test]
    fn timestamps_round_trip(text in prop_oneof![
        ".{0,40}",
        "[0-9]{1,20}(\\.[0-9]{0,9})?",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]{1,9})?)?(Z|[+-][0-9]{2}:?[0-9]{2})?",
    ]) {
        // One instant cannot be written back as what it was read as: epoch milliseconds are
        // values above 10^11 (SPEC 1.4), so `100000000000.x` (read as milliseconds) writes as
        // the integer 100000000000, which reads as seconds. 1973 is no token expiry.
        let at_threshold = timestamp::parse(&text)
            .is_ok_and(|t| t.format == timestamp::TimestampFormat::EpochMillis && t.at.timestamp_millis() == 100_000_000_000);
        if let (Ok(t), false) = (timestamp::parse(&text), at_threshold) {
            let written = timestamp::format(t.at, t.format);
            let back = timestamp::parse(&written);
            prop_assert!(back.is_ok(), "{text:?} wrote {written:?}, which does not parse");
            if let Ok(back) = back {
                // Written to the microsecond (as Python writes ISO), epoch milliseconds to the
                // millisecond, epoch floats through an f64: within a millisecond.
                let drift = (back.at - t.at).num_microseconds().map(i64::abs);
                let bound = match t.format {
                    timestamp::TimestampFormat::EpochFloat | timestamp::TimestampFormat::EpochMillis => 1_000,
                    _ => 1,
                };
                prop_assert!(drift.is_some_and(|d| d < bound), "{:?} -> {:?}: {:?}", text, written, drift);
                prop_assert_eq!(back.format, t.format);
                // And writing it again gives the very same text.
                prop_assert_eq!(timestamp::format(back.at, back.format), written);
            }
        }
    }
}

fn env_name(setting: &str) -> String {
    format!("TOKENWARDEN_{}", setting.replace('.', "_")).to_uppercase()
}

/// The error names the setting (its full path, or its key in messages of cross-checks).
fn names_setting(message: &str, setting: &str) -> bool {
    let key = setting.split_once('.').map_or(setting, |(_, k)| k);
    message.contains(setting) || message.contains(&env_name(setting)) || message.contains(key)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_integer_by_environment(i in 0..RANGES.len(), v in prop_oneof![
        any::<i64>(),
        -10i64..100_000,
        Just(i64::MAX),
        Just(i64::MIN),
    ]) {
        let setting = RANGES[i].0;
        let env: BTreeMap<String, String> = [(env_name(setting), v.to_string())].into();
        match Config::load_from(None, &env) {
            Ok(_) => {}
            Err(e) => {
                let m = e.to_string();
                prop_assert!(names_setting(&m, setting), "{setting}={v}: {m}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_integer_in_a_file(i in 0..RANGES.len(), v in any::<i64>()) {
        let setting = RANGES[i].0;
        let (section, key) = setting.split_once('.').unwrap_or(("", setting));
        let dir = std::env::temp_dir().join(format!("tw-prop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let file = dir.join("tw.toml");
        std::fs::write(&file, format!("[{section}]\n{key} = {v}\n"))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let result = Config::load_from(Some(&file), &BTreeMap::new());
        if let Err(e) = result {
            let m = e.to_string();
            prop_assert!(names_setting(&m, setting), "{setting}={v}: {m}");
        }
    }
}
