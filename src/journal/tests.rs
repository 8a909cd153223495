//! Unit tests of the journal on a real file system (a temporary directory per test).

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::TimeZone;

use super::*;

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tokenwarden-journal-{name}-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(n: u8) -> [u8; keys::KEY_LEN] {
    [n; keys::KEY_LEN]
}

fn keys_of(ks: &[u8]) -> Option<JournalKeys> {
    let bytes: Vec<_> = ks.iter().map(|&n| key(n)).collect();
    JournalKeys::from_bytes(&bytes)
}

fn entry(tenant: &str, provider: &str, n: u32) -> Entry {
    let t0 = Utc
        .with_ymd_and_hms(2026, 11, 28, 3, 20, 0)
        .single()
        .expect("valid time");
    Entry {
        id: EntryId::random(),
        version: FORMAT_VERSION,
        created_at: t0 + chrono::Duration::seconds(i64::from(n)),
        tenant: tenant.into(),
        provider: provider.into(),
        old_refresh_token: Secret::new(format!("old-rt-{n}")),
        old_access_token: Secret::new(format!("old-at-{n}")),
        access_token: Secret::new(format!("new-at-{n}")),
        refresh_token: Some(Secret::new(format!("new-rt-{n}"))),
        token_expiry: "2026-11-28T04:20:00.123456".into(),
        updated_at: "2026-11-28T03:20:00.123456".into(),
        expires_at: t0 + chrono::Duration::hours(1),
        refresh_token_expires_at: None,
    }
}

fn pending_file(j: &Journal, id: &EntryId) -> PathBuf {
    j.dir().join(PENDING).join(id.file_name())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test]
async fn plain_round_trip() {
    let tmp = TempDir::new("plain");
    let j = Journal::open(&tmp.0, None).expect("open");
    assert!(!j.encrypted());
    let mut e = entry("cloud:warriors", "goto", 1);
    e.refresh_token = None;
    e.refresh_token_expires_at = Some(e.expires_at + chrono::Duration::days(7));
    j.append(&e).await.expect("append");
    assert_eq!(j.pending_count(), 1);
    let text = std::fs::read_to_string(pending_file(&j, &e.id)).expect("file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["format"], 1);
    assert_eq!(v["id"], e.id.as_str());
    assert_eq!(v["tenant"], "cloud:warriors");
    assert!(v["key_id"].is_null());
    assert_eq!(v["payload"]["access_token"], "new-at-1");

    // A second handle on the same directory (a restart) reads it back.
    drop(j);
    let j = Journal::open(&tmp.0, None).expect("reopen");
    assert_eq!(j.pending_count(), 1);
    assert_eq!(j.pending().expect("pending"), vec![e]);
}

#[tokio::test]
async fn encrypted_round_trip_hides_the_tokens() {
    let tmp = TempDir::new("enc");
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("open");
    let e = entry("t", "goto", 2);
    j.append(&e).await.expect("append");
    let text = std::fs::read_to_string(pending_file(&j, &e.id)).expect("file");
    for secret in ["old-rt-2", "old-at-2", "new-at-2", "new-rt-2", "04:20:00"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["key_id"], keys::key_id(&key(1)));
    assert!(v["payload"].is_string());
    assert_eq!(j.pending().expect("pending"), vec![e.clone()]);

    // Debug output and listing show no secret either.
    let debug = format!("{e:?} {j:?}");
    let listed = serde_json::to_string(&j.list().expect("list")).expect("json");
    for shown in [&debug, &listed] {
        for secret in ["old-rt-2", "old-at-2", "new-at-2", "new-rt-2"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
    let rows = j.list().expect("list");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, EntryStatus::Pending);
    assert!(rows[0].encrypted);
    assert_eq!(
        rows[0].key_id.as_deref(),
        Some(keys::key_id(&key(1)).as_str())
    );
    assert_eq!(rows[0].problem, None);
}

#[tokio::test]
async fn an_entry_moved_to_another_id_or_record_does_not_open() {
    let tmp = TempDir::new("aad");
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("open");
    let e = entry("t", "goto", 3);
    j.append(&e).await.expect("append");
    let original = std::fs::read_to_string(pending_file(&j, &e.id)).expect("file");

    // Copied under another id, envelope edited to match the new name: the tag fails.
    let other_id = EntryId::random();
    let moved = original.replace(e.id.as_str(), other_id.as_str());
    std::fs::write(pending_file(&j, &other_id), moved).expect("write");
    // Copied to another record (provider edited in the envelope).
    let other_record = EntryId::random();
    let retargeted = original
        .replace(e.id.as_str(), other_record.as_str())
        .replace("\"provider\":\"goto\"", "\"provider\":\"teams\"");
    std::fs::write(pending_file(&j, &other_record), retargeted).expect("write");
    // Copied under another name only: the envelope's id does not match.
    let renamed = EntryId::random();
    std::fs::write(pending_file(&j, &renamed), &original).expect("write");

    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("reopen");
    assert_eq!(j.pending_count(), 4);
    assert_eq!(j.pending().expect("pending"), vec![e]);
    assert_eq!(j.pending_count(), 1);
    assert_eq!(j.stats().quarantined, 3);
    let q = j.dir().join(QUARANTINE);
    for id in [&other_id, &other_record, &renamed] {
        assert!(q.join(id.file_name()).is_file(), "{id} quarantined");
        let note = std::fs::read_to_string(q.join(format!("{}.reason", id.file_name())))
            .expect("reason note");
        assert!(
            note.contains("authentication failed") || note.contains("does not match"),
            "{note}"
        );
    }
}

#[tokio::test]
async fn older_keys_decrypt_and_the_first_encrypts() {
    let tmp = TempDir::new("rotate");
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("open");
    let old = entry("t", "goto", 4);
    j.append(&old).await.expect("append");
    drop(j);

    let j = Journal::open(&tmp.0, keys_of(&[2, 1])).expect("rotated");
    let new = entry("t", "teams", 5);
    j.append(&new).await.expect("append");
    assert_eq!(
        j.pending().expect("pending"),
        vec![old.clone(), new.clone()]
    );
    let ids: Vec<_> = j
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.key_id)
        .collect();
    assert_eq!(
        ids,
        vec![Some(keys::key_id(&key(1))), Some(keys::key_id(&key(2)))]
    );

    // Plain entries written before a key was configured stay readable with one.
    drop(j);
    let j = Journal::open(&tmp.0, None).expect("plain");
    let plain = entry("t", "zoom", 6);
    j.append(&plain).await.expect("append");
    drop(j);
    let j = Journal::open(&tmp.0, keys_of(&[2])).expect("keyed");
    let got = j.pending().expect("pending");
    assert_eq!(
        got,
        vec![new, plain],
        "the entry of the dropped key is quarantined"
    );
    assert!(j.dir().join(QUARANTINE).join(old.id.file_name()).is_file());
}

#[tokio::test]
async fn wrong_or_missing_key_quarantines_without_deleting() {
    let tmp = TempDir::new("wrongkey");
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("open");
    let a = entry("t", "goto", 7);
    let b = entry("t", "teams", 8);
    j.append(&a).await.expect("append");
    j.append(&b).await.expect("append");
    let bytes_a = std::fs::read(pending_file(&j, &a.id)).expect("file");
    drop(j);

    // Missing key file: encrypted entries cannot be read.
    let j = Journal::open(&tmp.0, None).expect("no keys");
    assert!(j.pending().expect("pending").is_empty());
    assert_eq!(j.pending_count(), 0);
    let q = j.dir().join(QUARANTINE);
    assert_eq!(
        std::fs::read(q.join(a.id.file_name())).expect("kept"),
        bytes_a
    );
    let note =
        std::fs::read_to_string(q.join(format!("{}.reason", a.id.file_name()))).expect("note");
    assert!(note.contains("no journal key file"), "{note}");
    drop(j);

    // A wrong key: the same. Put one back and quarantine it again (a second copy).
    std::fs::write(tmp.0.join(PENDING).join(a.id.file_name()), &bytes_a).expect("restore");
    let j = Journal::open(&tmp.0, keys_of(&[9])).expect("wrong key");
    assert!(j.pending().expect("pending").is_empty());
    let note = std::fs::read_to_string(q.join(format!("{}.1.reason", a.id.file_name())))
        .expect("note of the second copy");
    assert!(note.contains("not hold"), "{note}");
    assert_eq!(
        std::fs::read(q.join(format!("{}.1", a.id.file_name()))).expect("kept"),
        bytes_a
    );
    let rows = j.list().expect("list");
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.status == EntryStatus::Quarantined));
    assert!(rows.iter().all(|r| r.problem.is_some()));
}

#[tokio::test]
async fn truncated_garbage_and_future_files_are_quarantined() {
    let tmp = TempDir::new("garbage");
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("open");
    let good = entry("t", "goto", 9);
    let cut = entry("t", "teams", 10);
    let future = entry("t", "zoom", 11);
    for e in [&good, &cut, &future] {
        j.append(e).await.expect("append");
    }
    let path = pending_file(&j, &cut.id);
    let bytes = std::fs::read(&path).expect("file");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    let path = pending_file(&j, &future.id);
    let text = std::fs::read_to_string(&path).expect("file");
    std::fs::write(&path, text.replace("\"format\":1", "\"format\":2")).expect("v2");
    std::fs::write(tmp.0.join(PENDING).join("notes.txt"), "hello").expect("junk");

    let got = j.pending().expect("pending");
    assert_eq!(got, vec![good]);
    assert_eq!(j.stats().quarantined, 3);
    let q = tmp.0.join(QUARANTINE);
    assert_eq!(
        std::fs::read(q.join(cut.id.file_name())).expect("kept"),
        &bytes[..bytes.len() / 2]
    );
    let note =
        |name: &str| std::fs::read_to_string(q.join(format!("{name}.reason"))).expect("note");
    assert!(note(&cut.id.file_name()).contains("truncated"));
    assert!(note(&future.id.file_name()).contains("format version 2"));
    assert!(note("notes.txt").contains("file name"));
    assert!(q.join("notes.txt").is_file());
    // Nothing in quarantine is ever pruned.
    let far = Utc::now() + chrono::Duration::days(365);
    assert_eq!(j.prune_confirmed_at(far, Duration::ZERO).expect("prune"), 0);
    assert!(q.join(cut.id.file_name()).is_file());
}

#[tokio::test]
async fn interrupted_writes_are_recovered_or_quarantined() {
    let tmp = TempDir::new("tmpfiles");
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("open");
    let whole = entry("t", "goto", 12);
    let half = entry("t", "teams", 13);
    j.append(&whole).await.expect("append");
    j.append(&half).await.expect("append");
    drop(j);
    let pending = tmp.0.join(PENDING);
    for (e, cut) in [(&whole, false), (&half, true)] {
        let from = pending.join(e.id.file_name());
        let bytes = std::fs::read(&from).expect("file");
        let keep = if cut { bytes.len() / 3 } else { bytes.len() };
        std::fs::write(
            pending.join(format!(".{}.tmp", e.id.file_name())),
            &bytes[..keep],
        )
        .expect("tmp");
        std::fs::remove_file(&from).expect("unrename");
    }
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("reopen");
    assert_eq!(j.pending_count(), 1);
    assert_eq!(j.pending().expect("pending"), vec![whole]);
    assert!(tmp.0.join(QUARANTINE).join(half.id.file_name()).is_file());
}

#[tokio::test]
async fn modes_are_0700_and_0600() {
    let tmp = TempDir::new("modes");
    // An existing, wider directory (as systemd's StateDirectory= makes it) is narrowed.
    std::fs::create_dir_all(&tmp.0).expect("mkdir");
    std::fs::set_permissions(&tmp.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let j = Journal::open(&tmp.0, None).expect("open");
    for d in ["", PENDING, CONFIRMED, QUARANTINE] {
        assert_eq!(mode(&tmp.0.join(d)), 0o700, "{d}");
    }
    let a = entry("t", "goto", 14);
    let b = entry("t", "teams", 15);
    j.append(&a).await.expect("append");
    j.append(&b).await.expect("append");
    assert_eq!(mode(&pending_file(&j, &a.id)), 0o600);
    j.confirm(&a.id).expect("confirm");
    assert_eq!(mode(&tmp.0.join(CONFIRMED).join(a.id.file_name())), 0o600);
    std::fs::write(pending_file(&j, &b.id), "{").expect("break it");
    std::fs::set_permissions(
        pending_file(&j, &b.id),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    assert!(j.pending().expect("pending").is_empty());
    let q = tmp.0.join(QUARANTINE);
    assert_eq!(mode(&q.join(b.id.file_name())), 0o600);
    assert_eq!(mode(&q.join(format!("{}.reason", b.id.file_name()))), 0o600);
    j.writable_check().expect("writable");
    assert!(file_names(&tmp.0.join(PENDING)).expect("ls").is_empty());
}

/// 200 appends at once share directory fsyncs: the writer takes everything queued while the
/// previous batch was on the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_directory_fsyncs() {
    let tmp = TempDir::new("group");
    let j = Journal::open(&tmp.0, keys_of(&[1])).expect("open");
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for n in 0..200u32 {
        let (j, start) = (j.clone(), std::sync::Arc::clone(&start));
        tasks.push(tokio::spawn(async move {
            let e = entry("t", &format!("p{n}"), n);
            start.wait().await;
            j.append(&e).await.map(|()| e.id)
        }));
    }
    let began = std::time::Instant::now();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task").expect("append"));
    }
    let took = began.elapsed();
    let s = j.stats();
    eprintln!(
        "200 concurrent appends: {} batches (largest {}), {} file fsyncs, {} directory fsyncs, {took:?}",
        s.batches, s.max_batch, s.file_fsyncs, s.dir_fsyncs
    );
    assert_eq!(s.appends, 200);
    assert_eq!(s.file_fsyncs, 200);
    assert!(s.dir_fsyncs >= 1 && s.dir_fsyncs <= 40, "{s:?}");
    assert_eq!(s.dir_fsyncs, s.batches);
    assert_eq!(j.pending_count(), 200);
    assert_eq!(j.pending().expect("pending").len(), 200);
    for id in &ids {
        assert!(pending_file(&j, id).is_file());
    }

    // One append alone: one batch, one directory fsync, no wait for company.
    let lone = entry("t", "lone", 999);
    j.append(&lone).await.expect("append");
    assert_eq!(j.stats().dir_fsyncs, s.dir_fsyncs + 1);
}

#[tokio::test]
async fn confirm_drop_and_prune_with_an_explicit_clock() {
    let tmp = TempDir::new("prune");
    let j = Journal::open(&tmp.0, None).expect("open");
    let a = entry("t", "goto", 16);
    let b = entry("t", "teams", 17);
    let c = entry("t", "zoom", 18);
    for e in [&a, &b, &c] {
        j.append(e).await.expect("append");
    }
    assert_eq!(j.pending_count(), 3);
    j.confirm(&a.id).expect("confirm");
    let confirmed_at = Utc::now();
    j.drop_entry(&b.id).expect("drop");
    j.confirm(&a.id).expect("confirming twice is fine");
    assert!(matches!(
        j.confirm(&EntryId::random()),
        Err(JournalError::NotFound(_))
    ));
    assert_eq!(j.pending_count(), 1);
    assert_eq!(j.pending().expect("pending"), vec![c.clone()]);
    assert_eq!(
        j.recent_confirmed().expect("recent"),
        vec![a.clone(), b.clone()]
    );
    let statuses: Vec<_> = j
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        vec![
            EntryStatus::Pending,
            EntryStatus::Confirmed,
            EntryStatus::Confirmed
        ]
    );

    let retention = Duration::from_secs(600);
    let before = confirmed_at + chrono::Duration::seconds(590);
    assert_eq!(j.prune_confirmed_at(before, retention).expect("prune"), 0);
    assert_eq!(j.recent_confirmed().expect("recent").len(), 2);
    let after = confirmed_at + chrono::Duration::seconds(601);
    assert_eq!(j.prune_confirmed_at(after, retention).expect("prune"), 2);
    assert!(j.recent_confirmed().expect("recent").is_empty());
    // Pending entries are never pruned, whatever their age.
    assert_eq!(j.pending().expect("pending"), vec![c]);
}

#[test]
fn entry_ids_are_128_bit_hex() {
    let a = EntryId::random();
    let b = EntryId::random();
    assert_ne!(a, b);
    assert_eq!(a.as_str().len(), 32);
    assert_eq!(EntryId::parse(a.as_str()), Some(a.clone()));
    assert_eq!(a.to_string(), a.as_str());
    assert_eq!(EntryId::parse("../../etc/passwd"), None);
    assert_eq!(EntryId::parse(&a.as_str().to_uppercase()), None);
    assert_eq!(
        dir_in(Path::new("/var/lib/tokenwarden")),
        Path::new("/var/lib/tokenwarden/journal")
    );
}

#[test]
fn the_journal_can_be_shared_across_tasks() {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    shared::<Journal>();
    fn send<F: std::future::Future + Send>(_: F) {}
    let tmp = TempDir::new("send");
    let j = Journal::open(&tmp.0, None).expect("open");
    let e = entry("t", "goto", 0);
    // The append future itself is Send (the refresh path runs it inside spawned tasks).
    send(j.append(&e));
}
