//! The local journal of rotated tokens: what a provider answered, kept on disk until Redis
//! has it.
//!
//! Between a provider's token answer and a confirmed write-back, a new single-use refresh
//! token exists only in memory: if Redis is down or the process dies then, it is lost and a
//! human must re-authorise. The refresh path therefore [`Journal::append`]s the answer (durable
//! when the call returns), writes back, then [`Journal::confirm`]s. What is still pending after
//! a restart, or on a salvaged volume, is replayed into Redis by [`replay::replay_entry`], a
//! compare-and-set that never lets an old answer overwrite a newer token.
//!
//! # Layout on disk
//! The journal directory is [`dir_in`]`(state_dir)` = `{state_dir}/journal` (SPEC 6
//! `TOKENWARDEN_STATE_DIR`), mode 0700, with three subdirectories, also 0700:
//! - `pending/{id}.json`: appended, not yet confirmed (`.{id}.json.tmp`: being written);
//! - `confirmed/{id}.json`: confirmed or dropped, kept for `journal.confirmed_retention_secs`
//!   (its mtime is the time it was confirmed) for later repair, then pruned;
//! - `quarantine/{id}.json`: could not be read (truncated, unknown format, wrong or missing
//!   key, altered, moved), with a `{id}.json.reason` note; never deleted by tokenwarden.
//!
//! Files are mode 0600. The format of one file is in [`envelope`]'s docs; encryption and the key
//! file in [`keys`]. Without a key file the payload is plain JSON: the daemon calls
//! [`log_key_status`] once at start, which warns.
//!
//! # Durability
//! An append writes a temporary file in `pending/`, fsyncs it, renames it to `{id}.json` and
//! fsyncs `pending/`. Concurrent appends share that directory fsync: one writer thread
//! takes every append queued while the previous batch was on the disk, writes and fsyncs
//! each file, renames them all, fsyncs the directory once, then answers every caller (group
//! commit, `writer.rs`; [`JournalStats`] counts batches and fsyncs). A failed write fails
//! only its own append. [`Journal::confirm`] is a rename without fsync: if a crash undoes it,
//! the entry is replayed once more, which the compare-and-set makes harmless
//! (`AlreadyApplied` or `Superseded`). Pending entries of one record are replayed oldest
//! first, so that an answer made from an earlier answer lands after it.
//!
//! [`Journal::open`] also settles a crash in the middle of an append: a complete
//! `.{id}.json.tmp` is kept as pending, an incomplete one quarantined.
//!
//! # API
//! ```text
//! Journal::open(dir, Option<JournalKeys>) -> Result<Journal>     cheap to clone
//! journal.append(&Entry).await -> Result<()>                     durable when Ok
//! journal.pending() -> Result<Vec<Entry>>                        oldest first; unreadable ones quarantined
//! journal.pending_count() -> usize                               from memory
//! journal.confirm(&EntryId) / drop_entry(&EntryId) -> Result<()> pending/ -> confirmed/
//! journal.prune_confirmed(Duration) / prune_confirmed_at(now, Duration) -> Result<usize>
//! journal.recent_confirmed() -> Result<Vec<Entry>>
//! journal.list() -> Result<Vec<EntrySummary>>                    no secrets, no side effects
//! journal.writable_check() -> Result<()>                         for /readyz
//! journal.stats() -> JournalStats                                appends, batches, fsyncs, quarantined
//! JournalKeys::load(path) -> Result<JournalKeys, KeyFileError>
//! log_key_status(&journal)                                       once at start: warns when not encrypted
//! replay::replay_entry(&mut Connection, &Entry).await -> Result<ReplayResult, StoreError>
//! chain::restore(&mut Connection, &ProviderId, &[&Entry]).await   newest tokens over a consumed one
//! ```

pub mod chain;
pub mod command;
pub mod envelope;
pub mod keys;
pub mod replay;
mod writer;

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::OsRng;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::keys::ProviderId;
use crate::secret::Secret;

pub use envelope::DecodeError;
pub use keys::{JournalKeys, KeyFileError};
pub use replay::{replay_entry, ReplayResult};

/// The format version this build writes (and the only one it reads).
pub const FORMAT_VERSION: u32 = 1;
/// The journal's directory inside the state directory.
pub const SUBDIR: &str = "journal";
const PENDING: &str = "pending";
const CONFIRMED: &str = "confirmed";
const QUARANTINE: &str = "quarantine";
const EXT: &str = ".json";
const REASON_EXT: &str = ".reason";
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// `{state_dir}/journal`.
pub fn dir_in(state_dir: &Path) -> PathBuf {
    state_dir.join(SUBDIR)
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal: cannot encode entry {0}")]
    Encode(EntryId),
    #[error("journal: the writer thread has stopped")]
    WriterStopped,
    #[error("journal: no pending entry {0}")]
    NotFound(EntryId),
}

/// An entry's id: 128 random bits in lower-case hex; also its file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(String);

impl EntryId {
    pub fn random() -> EntryId {
        let mut bytes = [0u8; 16];
        OsRng.fill_bytes(&mut bytes);
        EntryId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// `s` if it is 32 lower-case hex characters.
    pub fn parse(s: &str) -> Option<EntryId> {
        (s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| EntryId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn file_name(&self) -> String {
        format!("{}{EXT}", self.0)
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One token answer, journaled. `Debug` shows no secret (they are [`Secret`]s).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: EntryId,
    /// Format version, [`FORMAT_VERSION`].
    pub version: u32,
    pub created_at: DateTime<Utc>,
    pub tenant: String,
    pub provider: String,
    /// What the attempt started from.
    pub old_refresh_token: Secret,
    pub old_access_token: Secret,
    /// The provider's answer.
    pub access_token: Secret,
    /// `None`: the provider returned no new refresh token (the stored one stays).
    pub refresh_token: Option<Secret>,
    /// Already formatted as the record's fields (SPEC 1.4).
    pub token_expiry: String,
    pub updated_at: String,
    pub expires_at: DateTime<Utc>,
    pub refresh_token_expires_at: Option<DateTime<Utc>>,
}

impl Entry {
    pub fn provider_id(&self) -> ProviderId {
        ProviderId::new(self.tenant.as_str(), self.provider.as_str())
    }
}

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryStatus {
    Pending,
    Confirmed,
    Quarantined,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Pending => "pending",
            EntryStatus::Confirmed => "confirmed",
            EntryStatus::Quarantined => "quarantined",
        }
    }
}

/// What `journal list` shows of an entry: its envelope, never its payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntrySummary {
    /// The file's name without `.json` (the id, for any file this journal wrote).
    pub id: String,
    pub status: EntryStatus,
    /// `None` when the envelope could not be read.
    pub created_at: Option<DateTime<Utc>>,
    pub tenant: String,
    pub provider: String,
    pub key_id: Option<String>,
    pub encrypted: bool,
    /// Why the file cannot be read (envelope problems; or the quarantine note).
    pub problem: Option<String>,
}

/// Counters since [`Journal::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Appends made durable.
    pub appends: u64,
    /// Writer batches (each ends with at most one directory fsync).
    pub batches: u64,
    /// Largest batch.
    pub max_batch: u64,
    pub file_fsyncs: u64,
    pub dir_fsyncs: u64,
    /// Files moved to `quarantine/`.
    pub quarantined: u64,
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    batches: AtomicU64,
    max_batch: AtomicU64,
    file_fsyncs: AtomicU64,
    dir_fsyncs: AtomicU64,
    quarantined: AtomicU64,
}

/// State shared with the writer thread.
#[derive(Default)]
struct Shared {
    pending: AtomicUsize,
    stats: Counters,
}

impl Shared {
    fn pending_removed(&self) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

struct Inner {
    dir: PathBuf,
    pending_dir: PathBuf,
    confirmed_dir: PathBuf,
    quarantine_dir: PathBuf,
    keys: Option<JournalKeys>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<writer::Request>,
    writer: std::thread::JoinHandle<()>,
}

/// The journal. Clones share one directory, one writer thread and one pending count.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.inner.dir)
            .field("keys", &self.inner.keys)
            .field("pending", &self.pending_count())
            .finish()
    }
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path` (and missing parents) mode 0700; narrows an existing one to 0700.
fn ensure_dir(path: &Path) -> Result<(), JournalError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(|e| io_error("create directory", path, e))?;
    let meta = std::fs::metadata(path).map_err(|e| io_error("stat", path, e))?;
    if meta.permissions().mode() & 0o777 != DIR_MODE {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| io_error("set mode 0700 on", path, e))?;
    }
    Ok(())
}

/// The file names in `dir` (not `.`-prefixed ones: files being written, checks).
fn file_names(dir: &Path) -> Result<Vec<String>, JournalError> {
    let mut names = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|e| io_error("read directory", dir, e))? {
        let item = item.map_err(|e| io_error("read directory", dir, e))?;
        if item.file_type().map(|t| t.is_file()).unwrap_or(false) {
            let name = item.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The id part of an entry file's name (`{id}.json`), if it has that shape.
fn id_of(name: &str) -> Option<&str> {
    name.strip_suffix(EXT)
        .filter(|stem| EntryId::parse(stem).is_some())
}

impl Journal {
    /// Opens (creating) the journal in `dir` (normally [`dir_in`]`(state_dir)`). Entries left
    /// half-written by a crash are kept when they read back whole, quarantined otherwise.
    pub fn open(dir: &Path, keys: Option<JournalKeys>) -> Result<Journal, JournalError> {
        let pending_dir = dir.join(PENDING);
        let confirmed_dir = dir.join(CONFIRMED);
        let quarantine_dir = dir.join(QUARANTINE);
        for d in [dir, &pending_dir, &confirmed_dir, &quarantine_dir] {
            ensure_dir(d)?;
        }
        let shared = Arc::new(Shared::default());
        let (tx, writer) = writer::spawn(pending_dir.clone(), Arc::clone(&shared))?;
        let journal = Journal {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                pending_dir,
                confirmed_dir,
                quarantine_dir,
                keys,
                shared,
                tx,
                writer,
            }),
        };
        journal.recover_temporaries()?;
        let n = file_names(&journal.inner.pending_dir)?.len();
        journal.inner.shared.pending.store(n, Ordering::Relaxed);
        Ok(journal)
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether entries are encrypted.
    pub fn encrypted(&self) -> bool {
        self.inner.keys.is_some()
    }

    /// `.{id}.json.tmp` files: a crash between write and rename. The caller never heard back,
    /// but a complete file still holds a token answer: keep it.
    fn recover_temporaries(&self) -> Result<(), JournalError> {
        let dir = &self.inner.pending_dir;
        let mut kept = false;
        for item in std::fs::read_dir(dir).map_err(|e| io_error("read directory", dir, e))? {
            let item = item.map_err(|e| io_error("read directory", dir, e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(final_name) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .map(str::to_string)
            else {
                continue;
            };
            let path = item.path();
            let readable = id_of(&final_name).is_some_and(|id| {
                std::fs::read(&path).is_ok_and(|bytes| {
                    envelope::decode(&bytes, id, self.inner.keys.as_ref()).is_ok()
                })
            });
            let target = dir.join(&final_name);
            if readable && !target.exists() {
                std::fs::rename(&path, &target)
                    .map_err(|e| io_error("rename a journal entry", &target, e))?;
                tracing::warn!(entry = %final_name, "journal: kept an entry whose write was interrupted");
                kept = true;
            } else {
                self.quarantine(
                    &path,
                    &final_name,
                    "write was interrupted (incomplete file)",
                );
            }
        }
        if kept {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error("fsync", dir, e))?;
        }
        Ok(())
    }

    /// Writes `e` to `pending/`; durable on disk when this returns `Ok`.
    pub async fn append(&self, e: &Entry) -> Result<(), JournalError> {
        let bytes = envelope::encode(e, self.inner.keys.as_ref())
            .map_err(|_| JournalError::Encode(e.id.clone()))?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .tx
            .send(writer::Request {
                name: e.id.file_name(),
                bytes,
                reply,
            })
            .map_err(|_| JournalError::WriterStopped)?;
        answer.await.map_err(|_| JournalError::WriterStopped)?
    }

    /// Every readable pending entry, oldest first. A file that cannot be read is moved to
    /// `quarantine/` (an error log line, counted in [`JournalStats::quarantined`]) and left out.
    pub fn pending(&self) -> Result<Vec<Entry>, JournalError> {
        let dir = &self.inner.pending_dir;
        let mut entries = Vec::new();
        for name in file_names(dir)? {
            let path = dir.join(&name);
            let Some(id) = id_of(&name) else {
                self.quarantine(&path, &name, "not a journal entry file name");
                continue;
            };
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Confirmed meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::error!(entry = %name, error = %e, "journal: cannot read a pending entry");
                    continue;
                }
            };
            match envelope::decode(&bytes, id, self.inner.keys.as_ref()) {
                Ok(entry) => entries.push(entry),
                Err(reason) => self.quarantine(&path, &name, &reason.to_string()),
            }
        }
        entries.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(entries)
    }

    /// Moves `path` (a file in `pending/`) to `quarantine/`, with a note of why. Never
    /// deletes; when the move fails the file stays where it is (and is tried again later).
    fn quarantine(&self, path: &Path, name: &str, reason: &str) {
        let qdir = &self.inner.quarantine_dir;
        let mut target = qdir.join(name);
        let mut n = 0u32;
        while target.exists() {
            n = n.saturating_add(1);
            target = qdir.join(format!("{name}.{n}"));
        }
        if let Err(e) = std::fs::rename(path, &target) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(entry = %name, reason, error = %e, "journal: unreadable entry could not be moved to quarantine");
            }
            return;
        }
        if path.parent() == Some(self.inner.pending_dir.as_path()) {
            self.inner.shared.pending_removed();
        }
        self.inner
            .shared
            .stats
            .quarantined
            .fetch_add(1, Ordering::Relaxed);
        let note = format!(
            "{}: {reason}\n",
            Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let mut note_path = target.into_os_string();
        note_path.push(REASON_EXT);
        let _ = write_small(Path::new(&note_path), note.as_bytes());
        tracing::error!(entry = %name, reason, "journal: unreadable entry moved to quarantine");
    }

    /// How many entries are pending (kept in memory; no disk access).
    pub fn pending_count(&self) -> usize {
        self.inner.shared.pending.load(Ordering::Relaxed)
    }

    /// Redis has the entry: moves it to `confirmed/`. Confirming twice is not an error.
    pub fn confirm(&self, id: &EntryId) -> Result<(), JournalError> {
        self.retire(id)
    }

    /// The entry will never be applied (superseded, record gone): moves it to `confirmed/`
    /// as well, where it is kept for the retention like a confirmed one.
    pub fn drop_entry(&self, id: &EntryId) -> Result<(), JournalError> {
        self.retire(id)
    }

    fn retire(&self, id: &EntryId) -> Result<(), JournalError> {
        let name = id.file_name();
        let from = self.inner.pending_dir.join(&name);
        let to = self.inner.confirmed_dir.join(&name);
        // The mtime becomes the confirmation time, from which the retention counts.
        match OpenOptions::new().write(true).open(&from) {
            Ok(f) => f
                .set_modified(SystemTime::now())
                .map_err(|e| io_error("set the time of", &from, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return if to.exists() {
                    Ok(())
                } else {
                    Err(JournalError::NotFound(id.clone()))
                };
            }
            Err(e) => return Err(io_error("open", &from, e)),
        }
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                self.inner.shared.pending_removed();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => Ok(()),
            Err(e) => Err(io_error("move to confirmed/", &from, e)),
        }
    }

    /// Deletes confirmed entries confirmed `retention` or longer ago.
    pub fn prune_confirmed(&self, retention: Duration) -> Result<usize, JournalError> {
        self.prune_confirmed_at(Utc::now(), retention)
    }

    /// As [`Journal::prune_confirmed`], with the clock given.
    pub fn prune_confirmed_at(
        &self,
        now: DateTime<Utc>,
        retention: Duration,
    ) -> Result<usize, JournalError> {
        let now = SystemTime::from(now);
        let dir = &self.inner.confirmed_dir;
        let mut removed = 0;
        for name in file_names(dir)? {
            if id_of(&name).is_none() {
                continue;
            }
            let path = dir.join(&name);
            let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
                continue;
            };
            let due = modified.checked_add(retention).is_some_and(|t| t <= now);
            if due {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("remove", &path, e)),
                }
            }
        }
        Ok(removed)
    }

    /// The entries still kept in `confirmed/`, oldest first (unreadable ones are skipped
    /// with a warning: what they held is in Redis already).
    pub fn recent_confirmed(&self) -> Result<Vec<Entry>, JournalError> {
        let dir = &self.inner.confirmed_dir;
        let mut entries = Vec::new();
        for name in file_names(dir)? {
            let Some(id) = id_of(&name) else { continue };
            let Ok(bytes) = std::fs::read(dir.join(&name)) else {
                continue;
            };
            match envelope::decode(&bytes, id, self.inner.keys.as_ref()) {
                Ok(e) => entries.push(e),
                Err(reason) => {
                    tracing::warn!(entry = %name, reason = %reason, "journal: unreadable confirmed entry skipped");
                }
            }
        }
        entries.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(entries)
    }

    /// Every file of the journal (pending, then quarantined, then confirmed), from the
    /// envelopes only: no payload is opened, nothing is moved.
    pub fn list(&self) -> Result<Vec<EntrySummary>, JournalError> {
        let mut out = Vec::new();
        for (status, dir) in [
            (EntryStatus::Pending, &self.inner.pending_dir),
            (EntryStatus::Quarantined, &self.inner.quarantine_dir),
            (EntryStatus::Confirmed, &self.inner.confirmed_dir),
        ] {
            let mut rows = Vec::new();
            for name in file_names(dir)? {
                if name.ends_with(REASON_EXT) {
                    continue;
                }
                let path = dir.join(&name);
                let stem = name.strip_suffix(EXT).unwrap_or(&name);
                let mut row = EntrySummary {
                    id: stem.to_string(),
                    status,
                    created_at: None,
                    tenant: String::new(),
                    provider: String::new(),
                    key_id: None,
                    encrypted: false,
                    problem: None,
                };
                // A quarantined file may be `{id}.json.N`: its id is before `.json`.
                let id = name.split(EXT).next().unwrap_or_default();
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| envelope::envelope(&b, id).map_err(|e| e.to_string()))
                {
                    Ok(env) => {
                        row.created_at = Some(env.created_at);
                        row.tenant = env.tenant;
                        row.provider = env.provider;
                        row.encrypted = env.key_id.is_some();
                        if let (Some(kid), Some(keys)) = (&env.key_id, &self.inner.keys) {
                            if !keys.has_key(kid) {
                                row.problem = Some(format!("key {kid} is not in the key file"));
                            }
                        }
                        row.key_id = env.key_id;
                    }
                    Err(problem) => row.problem = Some(problem),
                }
                if status == EntryStatus::Quarantined {
                    let mut note = path.into_os_string();
                    note.push(REASON_EXT);
                    if let Ok(text) = std::fs::read_to_string(&note) {
                        row.problem = Some(text.trim().to_string());
                    }
                }
                rows.push(row);
            }
            rows.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            out.extend(rows);
        }
        Ok(out)
    }

    /// Whether an append could succeed now: the writer runs and `pending/` takes a file.
    pub fn writable_check(&self) -> Result<(), JournalError> {
        if self.inner.writer.is_finished() {
            return Err(JournalError::WriterStopped);
        }
        let path = self
            .inner
            .pending_dir
            .join(format!(".writable-check-{}", std::process::id()));
        let written = write_small(&path, b"ok\n");
        let _ = std::fs::remove_file(&path);
        written.map_err(|e| io_error("write", &path, e))
    }

    /// Counters since open.
    pub fn stats(&self) -> JournalStats {
        let s = &self.inner.shared.stats;
        JournalStats {
            appends: s.appends.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            max_batch: s.max_batch.load(Ordering::Relaxed),
            file_fsyncs: s.file_fsyncs.load(Ordering::Relaxed),
            dir_fsyncs: s.dir_fsyncs.load(Ordering::Relaxed),
            quarantined: s.quarantined.load(Ordering::Relaxed),
        }
    }
}

fn write_small(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.write_all(bytes)
}

/// Logs, once at start, whether the journal encrypts: a warning when it does not.
pub fn log_key_status(journal: &Journal) {
    match &journal.inner.keys {
        Some(keys) => tracing::info!(
            dir = %journal.dir().display(),
            key_id = keys.encrypting_key_id(),
            keys = keys.key_ids().len(),
            "journal entries are encrypted"
        ),
        None => tracing::warn!(
            dir = %journal.dir().display(),
            "journal entries are NOT encrypted: rotated tokens are stored in plain text; set TOKENWARDEN_JOURNAL_KEY_FILE (journal.key_file)"
        ),
    }
}

#[cfg(test)]
mod tests;
