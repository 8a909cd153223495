//! The journal's one writer thread: group commit of appends.
//!
//! Every [`Journal::append`](super::Journal::append) queues its encoded bytes here and waits
//! for the answer. The thread takes the first queued request and every other one already
//! waiting (up to `MAX_BATCH`), then for the whole batch: writes each entry to a temporary
//! name in `pending/` (`.{id}.json.tmp`, mode 0600, created exclusively) and fsyncs it;
//! renames each to `pending/{id}.json`; fsyncs `pending/` once; and only then answers every
//! caller. While one batch is on the disk the next one queues up, so under load many appends
//! share one directory fsync, with no added wait when the load is light.
//!
//! A request that fails (disk full, ...) fails alone, its temporary file removed; a failed
//! directory fsync fails the whole batch (its files are in place but maybe not durable: the
//! callers must not count on them, and replaying them later is harmless).
//!
//! A plain thread rather than a tokio task: the work is blocking file I/O, and the journal
//! then works the same under any runtime. It ends when the last [`Journal`](super::Journal)
//! handle is dropped.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use tokio::sync::oneshot;

use super::{JournalError, Shared, FILE_MODE};

/// Most appends one batch takes (bounds the latency of the first in the batch).
pub(super) const MAX_BATCH: usize = 512;

pub(super) struct Request {
    /// Final file name, `{id}.json`.
    pub name: String,
    pub bytes: Vec<u8>,
    pub reply: oneshot::Sender<Result<(), JournalError>>,
}

pub(super) fn spawn(
    pending_dir: PathBuf,
    shared: Arc<Shared>,
) -> Result<(mpsc::Sender<Request>, std::thread::JoinHandle<()>), JournalError> {
    let (tx, rx) = mpsc::channel::<Request>();
    let handle = std::thread::Builder::new()
        .name("tokenwarden-journal".into())
        .spawn(move || run(&pending_dir, &rx, &shared))
        .map_err(|source| JournalError::Io {
            op: "start the journal writer",
            path: PathBuf::new(),
            source,
        })?;
    Ok((tx, handle))
}

fn run(dir: &Path, rx: &mpsc::Receiver<Request>, shared: &Shared) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        write_batch(dir, batch, shared);
    }
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn write_batch(dir: &Path, batch: Vec<Request>, shared: &Shared) {
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
    shared.stats.max_batch.fetch_max(n, Ordering::Relaxed);

    // 1. Each file, under its temporary name, on the disk.
    let mut staged: Vec<(Request, Result<PathBuf, JournalError>)> = batch
        .into_iter()
        .map(|req| {
            let tmp = dir.join(format!(".{}.tmp", req.name));
            let written = write_file(&tmp, &req.bytes, shared);
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            let result = written.map(|()| tmp);
            (req, result)
        })
        .collect();

    // 2. Renamed into place.
    let mut renamed = 0usize;
    for (req, result) in &mut staged {
        let Ok(tmp) = result else { continue };
        let target = dir.join(&req.name);
        match std::fs::rename(&*tmp, &target) {
            Ok(()) => {
                renamed += 1;
                shared.pending.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&*tmp);
                *result = Err(io_error("rename a journal entry", &target, e));
            }
        }
    }

    // 3. One directory fsync makes every rename of the batch durable.
    let dir_sync = if renamed > 0 {
        shared.stats.dir_fsyncs.fetch_add(1, Ordering::Relaxed);
        File::open(dir).and_then(|d| d.sync_all())
    } else {
        Ok(())
    };

    // 4. Answers.
    for (req, result) in staged {
        let answer = match (result, &dir_sync) {
            (Err(e), _) => Err(e),
            (Ok(_), Ok(())) => Ok(()),
            (Ok(_), Err(e)) => Err(io_error(
                "fsync the journal directory",
                dir,
                std::io::Error::new(e.kind(), e.to_string()),
            )),
        };
        if answer.is_ok() {
            shared.stats.appends.fetch_add(1, Ordering::Relaxed);
        }
        // A caller that stopped waiting still has its entry on disk; nothing to undo.
        let _ = req.reply.send(answer);
    }
}

fn write_file(path: &Path, bytes: &[u8], shared: &Shared) -> Result<(), JournalError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| io_error("create a journal entry", path, e))?;
    f.write_all(bytes)
        .map_err(|e| io_error("write a journal entry", path, e))?;
    shared.stats.file_fsyncs.fetch_add(1, Ordering::Relaxed);
    f.sync_all()
        .map_err(|e| io_error("fsync a journal entry", path, e))
}
