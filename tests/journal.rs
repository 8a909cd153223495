//! `tokenwarden journal list|replay` against a journal written by the library and a real
//! redis-server: what replay writes, what it refuses to overwrite, and that nothing prints a
//! secret.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use chrono::{TimeZone, Utc};
use serde_json::Value;
use support::{hgetall, provider_key, seed_provider, Daemon, RedisServer};
use tokenwarden::journal::{self, Entry, EntryId, Journal, JournalKeys, FORMAT_VERSION};
use tokenwarden::secret::Secret;

const TENANT: &str = "cloud:warriors";
const KEY: [u8; 32] = [0x5a; 32];

/// A state directory with a key file beside it, removed when dropped.
struct State {
    root: PathBuf,
}

impl State {
    fn new(name: &str) -> State {
        let root = std::env::temp_dir().join(format!(
            "tokenwarden-test-journal-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("state")).expect("state dir");
        std::fs::write(
            root.join("journal.key"),
            format!(
                "{}\n",
                base64::engine::general_purpose::STANDARD.encode(KEY)
            ),
        )
        .expect("key file");
        State { root }
    }

    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    fn state_arg(&self) -> String {
        self.state_dir().display().to_string()
    }

    fn key_file(&self) -> String {
        self.root.join("journal.key").display().to_string()
    }

    fn journal(&self) -> Journal {
        Journal::open(
            &journal::dir_in(&self.state_dir()),
            JournalKeys::from_bytes(&[KEY]),
        )
        .expect("open journal")
    }

    fn files(&self, sub: &str) -> Vec<String> {
        let dir = journal::dir_in(&self.state_dir()).join(sub);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|it| {
                it.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// An answer that turned `old` (refresh, access) into `new` for `provider`, `n` seconds after
/// a fixed start.
fn answer(provider: &str, old: (&str, &str), new: (Option<&str>, &str), n: i64) -> Entry {
    let t0 = Utc
        .with_ymd_and_hms(2026, 11, 28, 3, 0, 0)
        .single()
        .expect("time");
    Entry {
        id: EntryId::random(),
        version: FORMAT_VERSION,
        created_at: t0 + chrono::Duration::seconds(n),
        tenant: TENANT.into(),
        provider: provider.into(),
        old_refresh_token: Secret::new(old.0),
        old_access_token: Secret::new(old.1),
        access_token: Secret::new(new.1),
        refresh_token: new.0.map(Secret::new),
        token_expiry: format!("2026-11-28T04:00:{n:02}.123456"),
        updated_at: format!("2026-11-28T03:00:{n:02}.123456+00:00"),
        expires_at: t0 + chrono::Duration::hours(1),
        refresh_token_expires_at: None,
    }
}

/// A gateway record holding `tokens` (refresh, access), with the gateway's other fields.
fn record(tokens: (&str, &str)) -> Vec<(String, String)> {
    [
        ("provider_type", "goto"),
        ("status", "active"),
        ("auth_type", "oauth"),
        ("client_id", "client-1"),
        ("client_secret", "client-secret-do-not-print"),
        ("account_key", "4266846632996939781"),
        ("refresh_token", tokens.0),
        ("access_token", tokens.1),
        ("token_expiry", "2026-11-28T03:00:00.000001"),
        ("scopes", r#"["voice-admin.v1.read"]"#),
        ("created_at", "2025-01-15T10:30:00.123456"),
        ("updated_at", "2025-01-15T10:30:00.123456+00:00"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every token and secret the tests use: none may ever be printed.
const SECRETS: &[&str] = &[
    "rt-old",
    "at-old",
    "rt-new",
    "at-new",
    "rt-gw",
    "at-gw",
    "rt-a",
    "at-a",
    "rt-b",
    "at-b",
    "client-secret-do-not-print",
];

fn assert_no_secret(what: &str, output: &str) {
    for s in SECRETS {
        assert!(!output.contains(s), "{what} shows {s:?}:\n{output}");
    }
}

fn fields(map: &HashMap<String, String>, names: &[&str]) -> Vec<Option<String>> {
    names.iter().map(|n| map.get(*n).cloned()).collect()
}

#[tokio::test]
async fn list_and_replay_apply_only_what_is_still_current() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let state = State::new("replay");

    // Records as the gateway holds them now.
    seed_provider(
        &mut conn,
        TENANT,
        "stale",
        &record(("rt-old-1", "at-old-1")),
    );
    seed_provider(&mut conn, TENANT, "moved", &record(("rt-gw-2", "at-gw-2")));
    seed_provider(
        &mut conn,
        TENANT,
        "applied",
        &record(("rt-new-3", "at-new-3")),
    );
    seed_provider(
        &mut conn,
        TENANT,
        "keeps-rt",
        &record(("rt-old-5", "at-old-5")),
    );
    seed_provider(
        &mut conn,
        TENANT,
        "chained",
        &record(("rt-old-6", "at-old-6")),
    );
    // Same refresh token, newer access token: a non-rotating provider refreshed again since.
    seed_provider(
        &mut conn,
        TENANT,
        "same-rt",
        &record(("rt-old-7", "at-gw-7")),
    );

    let stale = answer(
        "stale",
        ("rt-old-1", "at-old-1"),
        (Some("rt-new-1"), "at-new-1"),
        1,
    );
    let moved = answer(
        "moved",
        ("rt-old-2", "at-old-2"),
        (Some("rt-new-2"), "at-new-2"),
        2,
    );
    let applied = answer(
        "applied",
        ("rt-old-3", "at-old-3"),
        (Some("rt-new-3"), "at-new-3"),
        3,
    );
    let gone = answer(
        "gone",
        ("rt-old-4", "at-old-4"),
        (Some("rt-new-4"), "at-new-4"),
        4,
    );
    let keeps_rt = answer("keeps-rt", ("rt-old-5", "at-old-5"), (None, "at-new-5"), 5);
    // Two answers for one record, the second made from the first: applied in order.
    let chain_a = answer(
        "chained",
        ("rt-old-6", "at-old-6"),
        (Some("rt-a-6"), "at-a-6"),
        6,
    );
    let chain_b = answer(
        "chained",
        ("rt-a-6", "at-a-6"),
        (Some("rt-b-6"), "at-b-6"),
        7,
    );
    let same_rt = answer(
        "same-rt",
        ("rt-old-7", "at-old-7"),
        (Some("rt-old-7"), "at-new-7"),
        8,
    );
    let entries = [
        &stale, &moved, &applied, &gone, &keeps_rt, &chain_b, &chain_a, &same_rt,
    ];
    {
        let j = state.journal();
        for e in entries {
            j.append(e).await.expect("append");
        }
        assert_eq!(j.pending_count(), entries.len());
    }
    let before: HashMap<&str, HashMap<String, String>> = [
        "stale", "moved", "applied", "keeps-rt", "chained", "same-rt",
    ]
    .into_iter()
    .map(|p| (p, hgetall(&mut conn, &provider_key(TENANT, p))))
    .collect();

    // list: one line per entry, encrypted, no secret.
    let key_env = [("TOKENWARDEN_JOURNAL_KEY_FILE", state.key_file())];
    let env: Vec<(&str, &str)> = key_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = Daemon::cli(
        &["journal", "list", "--state-dir", &state.state_arg()],
        &env,
    );
    assert_eq!(out.status.code(), Some(0));
    let listed = text(&out.stdout);
    assert_no_secret("journal list", &listed);
    assert_no_secret("journal list (stderr)", &text(&out.stderr));
    let key_id = JournalKeys::from_bytes(&[KEY])
        .expect("key")
        .encrypting_key_id()
        .to_string();
    for e in entries {
        let line = listed
            .lines()
            .find(|l| l.starts_with(e.id.as_str()))
            .unwrap_or_else(|| panic!("no line for {}:\n{listed}", e.id));
        assert!(line.contains(&format!("{TENANT}/{}", e.provider)), "{line}");
        assert!(line.contains(&format!("encrypted:{key_id}")), "{line}");
        assert!(line.contains("pending"), "{line}");
    }
    assert!(
        listed.contains("8 pending, 0 quarantined, 0 confirmed"),
        "{listed}"
    );

    // --json, and the state dir from TOKENWARDEN_STATE_DIR instead of the flag.
    let out = Daemon::cli(
        &["journal", "list", "--json"],
        &[("TOKENWARDEN_STATE_DIR", &state.state_arg())],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_no_secret("journal list --json", &text(&out.stdout));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows.len(), entries.len());
    assert!(rows
        .iter()
        .all(|r| r["encrypted"] == true && r["status"] == "pending"));
    assert!(rows
        .iter()
        .any(|r| r["id"] == stale.id.as_str() && r["provider"] == "stale"));

    // replay.
    let url = redis.url();
    let mut env = env.clone();
    env.push(("TOKENWARDEN_REDIS_URL", &url));
    let out = Daemon::cli(
        &["journal", "replay", "--state-dir", &state.state_arg()],
        &env,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_no_secret("journal replay", &stdout);
    assert_no_secret("journal replay (stderr)", &text(&out.stderr));
    let result_of = |e: &Entry| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{} ", e.id)))
            .and_then(|l| l.rsplit(": ").next())
            .unwrap_or_else(|| panic!("no result line for {}:\n{stdout}", e.provider))
            .to_string()
    };
    assert_eq!(result_of(&stale), "written");
    assert_eq!(result_of(&moved), "superseded");
    assert_eq!(result_of(&applied), "already_applied");
    assert_eq!(result_of(&gone), "gone");
    assert_eq!(result_of(&keeps_rt), "written");
    assert_eq!(result_of(&chain_a), "written");
    assert_eq!(result_of(&chain_b), "written");
    assert_eq!(result_of(&same_rt), "superseded");
    assert!(
        stdout.contains("replayed 8: 4 written, 1 already applied, 2 superseded, 1 gone"),
        "{stdout}"
    );

    let token_fields = [
        "refresh_token",
        "access_token",
        "token_expiry",
        "updated_at",
    ];
    let after = |conn: &mut redis::Connection, p: &str| hgetall(conn, &provider_key(TENANT, p));
    let untouched = |p: &str, now: &HashMap<String, String>| {
        for (k, v) in &before[p] {
            if !token_fields.contains(&k.as_str()) {
                assert_eq!(now.get(k), Some(v), "{p}: field {k} changed");
            }
        }
        assert_eq!(now.len(), before[p].len(), "{p}: fields added or removed");
    };

    // Still holding the old tokens: now holds the new ones, other fields as they were.
    let now = after(&mut conn, "stale");
    assert_eq!(
        fields(&now, &token_fields),
        vec![
            Some("rt-new-1".into()),
            Some("at-new-1".into()),
            Some(stale.token_expiry.clone()),
            Some(stale.updated_at.clone())
        ]
    );
    untouched("stale", &now);
    // Changed meanwhile by the gateway to newer tokens: not overwritten at all.
    assert_eq!(after(&mut conn, "moved"), before["moved"]);
    assert_eq!(after(&mut conn, "same-rt"), before["same-rt"]);
    // Already holding the entry's tokens: left as is.
    assert_eq!(after(&mut conn, "applied"), before["applied"]);
    // Gone: not recreated.
    let exists: i64 = redis::cmd("EXISTS")
        .arg(provider_key(TENANT, "gone"))
        .query(&mut conn)
        .expect("EXISTS");
    assert_eq!(exists, 0);
    // No new refresh token in the answer: the stored one stays.
    let now = after(&mut conn, "keeps-rt");
    assert_eq!(
        fields(&now, &token_fields[..2]),
        vec![Some("rt-old-5".into()), Some("at-new-5".into())]
    );
    untouched("keeps-rt", &now);
    // Chained answers end with the last one.
    let now = after(&mut conn, "chained");
    assert_eq!(
        fields(&now, &token_fields[..2]),
        vec![Some("rt-b-6".into()), Some("at-b-6".into())]
    );
    untouched("chained", &now);
    // Nothing else was written: only the records and the providers sets exist.
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).expect("KEYS");
    keys.sort();
    let mut expected: Vec<String> = [
        "stale", "moved", "applied", "keeps-rt", "chained", "same-rt",
    ]
    .iter()
    .map(|p| provider_key(TENANT, p))
    .chain([format!("tenant:{TENANT}:providers")])
    .collect();
    expected.sort();
    assert_eq!(keys, expected);

    // Every entry handled: nothing pending, all kept in confirmed/.
    assert!(state.files("pending").is_empty());
    assert_eq!(state.files("confirmed").len(), entries.len());

    // A second replay has nothing to do.
    let out = Daemon::cli(
        &["journal", "replay", "--state-dir", &state.state_arg()],
        &env,
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("replayed 0:"));
}

#[tokio::test]
async fn replay_stops_on_a_redis_error_and_keeps_the_entries() {
    let mut redis = RedisServer::start();
    let state = State::new("redis-down");
    let e = answer(
        "stale",
        ("rt-old-1", "at-old-1"),
        (Some("rt-new-1"), "at-new-1"),
        1,
    );
    state.journal().append(&e).await.expect("append");
    let url = redis.url();
    redis.kill();
    let key_file = state.key_file();
    let env = [
        ("TOKENWARDEN_REDIS_URL", url.as_str()),
        ("TOKENWARDEN_JOURNAL_KEY_FILE", key_file.as_str()),
        ("TOKENWARDEN_REDIS_COMMAND_TIMEOUT_MS", "500"),
    ];
    let out = Daemon::cli(
        &["journal", "replay", "--state-dir", &state.state_arg()],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_no_secret("journal replay", &text(&out.stdout));
    assert_no_secret("journal replay (stderr)", &text(&out.stderr));
    assert_eq!(state.files("pending"), vec![format!("{}.json", e.id)]);
    assert!(state.files("confirmed").is_empty());
}

#[tokio::test]
async fn unreadable_entries_are_quarantined_and_fail_the_replay() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let state = State::new("quarantine");
    seed_provider(
        &mut conn,
        TENANT,
        "stale",
        &record(("rt-old-1", "at-old-1")),
    );
    let good = answer(
        "stale",
        ("rt-old-1", "at-old-1"),
        (Some("rt-new-1"), "at-new-1"),
        1,
    );
    let cut = answer(
        "other",
        ("rt-old-2", "at-old-2"),
        (Some("rt-new-2"), "at-new-2"),
        2,
    );
    {
        let j = state.journal();
        j.append(&good).await.expect("append");
        j.append(&cut).await.expect("append");
    }
    let path = journal::dir_in(&state.state_dir())
        .join("pending")
        .join(format!("{}.json", cut.id));
    let bytes = std::fs::read(&path).expect("entry");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");

    let url = redis.url();
    let key_file = state.key_file();
    let env = [
        ("TOKENWARDEN_REDIS_URL", url.as_str()),
        ("TOKENWARDEN_JOURNAL_KEY_FILE", key_file.as_str()),
    ];
    let out = Daemon::cli(
        &["journal", "replay", "--state-dir", &state.state_arg()],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert_no_secret("journal replay", &stdout);
    assert!(
        stdout.contains(&format!("{} {TENANT}/stale: written", good.id)),
        "{stdout}"
    );
    assert!(text(&out.stderr).contains("quarantine"));
    assert_eq!(
        state.files("quarantine"),
        vec![
            format!("{}.json", cut.id),
            format!("{}.json.reason", cut.id)
        ]
    );
    let kept = journal::dir_in(&state.state_dir())
        .join("quarantine")
        .join(format!("{}.json", cut.id));
    assert_eq!(
        std::fs::read(kept).expect("kept"),
        &bytes[..bytes.len() / 2]
    );

    // list shows it, with its reason, and still no secret.
    let out = Daemon::cli(
        &["journal", "list", "--state-dir", &state.state_arg()],
        &env,
    );
    assert_eq!(out.status.code(), Some(0));
    let listed = text(&out.stdout);
    assert_no_secret("journal list", &listed);
    assert!(listed.contains("0 pending, 1 quarantined"), "{listed}");
    assert!(listed.contains("truncated"), "{listed}");
}

#[test]
fn bad_arguments_and_key_files_exit_2() {
    let state = State::new("args");
    let out = Daemon::cli(&["journal", "replay", "--no-such-flag"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let missing = state.root.join("missing.key").display().to_string();
    let out = Daemon::cli(
        &["journal", "list", "--state-dir", &state.state_arg()],
        &[("TOKENWARDEN_JOURNAL_KEY_FILE", &missing)],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("journal.key_file"));
    let bad = state.root.join("bad.key");
    std::fs::write(&bad, "c2hvcnQ=\n").expect("write");
    let out = Daemon::cli(
        &["journal", "list", "--state-dir", &state.state_arg()],
        &[("TOKENWARDEN_JOURNAL_KEY_FILE", &bad.display().to_string())],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("32 bytes"),
        "{}",
        text(&out.stderr)
    );
    // No journal yet: nothing to list, not an error.
    let out = Daemon::cli(
        &[
            "journal",
            "list",
            "--state-dir",
            &Path::new(&state.root).join("none").display().to_string(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("no journal"));
}
