//! Bulk sockets: connections of their own for the full read's record batches, speaking RESP2
//! directly ([`super::resp`]). A batch's commands are written as one buffer; its replies are
//! measured as they arrive and parsed in place by the reader task of the socket, so a
//! record's fields become borrowed slices handed to the record parser, not a
//! `redis::Value` (and a heap string) each. At a start that decoding was about a third of
//! the daemon's CPU (`docs/benchmarks.md`).
//!
//! Offered where the pool reaches one node over plain TCP or a Unix socket: `redis.url`, or
//! the master the Sentinels last named. With TLS or on a Cluster [`BulkConn::open`] answers
//! `None` and the caller reads through the pool as before. The socket authenticates and
//! selects the database as the pool's connections do; every batch is bounded by
//! `redis.command_timeout_ms`, and a socket that failed or timed out once is not used again
//! (its replies could no longer be matched to its commands).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::resp::{self, Frames, Reply};
use super::{NodeSettings, Pool, Source, StoreError};

/// Reads at least this much at a time from the socket.
const READ_CHUNK: usize = 256 * 1024;

/// Where a bulk socket goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkAddr {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

/// The address a bulk socket may use and how to log in there; `None` where bulk sockets are
/// not offered (TLS, a Cluster, a Sentinel master not resolved yet).
pub fn target(pool: &Pool) -> Option<(BulkAddr, Arc<NodeSettings>)> {
    let Pool::Node { pool, nodes, .. } = pool else {
        return None;
    };
    if nodes.tls {
        return None;
    }
    let addr = match &pool.manager().source {
        Source::Node(client) => match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(h, p) => BulkAddr::Tcp(h.clone(), *p),
            redis::ConnectionAddr::Unix(path) => BulkAddr::Unix(path.clone()),
            _ => return None,
        },
        Source::Sentinel(s) => {
            let node = s.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (h, p) = node?;
            BulkAddr::Tcp(h, p)
        }
    };
    Some((addr, Arc::clone(nodes)))
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// What one batch's replies are turned into: `parse` called once per item, taking that
/// item's replies from the batch's.
struct Job<O> {
    frames: usize,
    items: usize,
    parse: fn(&mut Frames<'_>) -> O,
    done: oneshot::Sender<Result<Vec<O>, StoreError>>,
}

/// One bulk socket: batches may be sent by several tasks at once, each waits for its own
/// replies (pipelined, in order). Dropping it closes the socket.
pub struct BulkConn<O> {
    writer: tokio::sync::Mutex<Writer>,
    jobs: mpsc::UnboundedSender<Job<O>>,
    timeout: Duration,
    broken: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl<O> Drop for BulkConn<O> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Pool(format!("bulk socket: {what}: {e}"))
}

impl<O: Send + 'static> BulkConn<O> {
    /// A bulk socket to `pool`'s node, logged in; `Ok(None)` where they are not offered.
    pub async fn open(pool: &Pool) -> Result<Option<BulkConn<O>>, StoreError> {
        let Some((addr, nodes)) = target(pool) else {
            return Ok(None);
        };
        let timeout = nodes.timeout;
        let (mut reader, mut writer): (Reader, Writer) =
            match tokio::time::timeout(timeout, connect(&addr)).await {
                Ok(Ok(halves)) => halves,
                Ok(Err(e)) => return Err(failed("connect", e)),
                Err(_) => return Err(failed("connect", "timed out")),
            };
        tokio::time::timeout(timeout, login(&mut reader, &mut writer, &nodes))
            .await
            .map_err(|_| failed("login", "timed out"))??;
        let (jobs, queue) = mpsc::unbounded_channel();
        let broken = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_replies(reader, queue, Arc::clone(&broken)));
        Ok(Some(BulkConn {
            writer: tokio::sync::Mutex::new(writer),
            jobs,
            timeout,
            broken,
            reader,
        }))
    }

    /// Sends `commands` (`items` x `per_item` commands, encoded) and returns `parse` of
    /// each item's replies, in order. Per-command errors (a key of the wrong type) reach
    /// `parse` as replies; a socket error, a malformed reply or the timeout fails the batch
    /// and the socket.
    pub async fn query(
        &self,
        commands: &[u8],
        items: usize,
        per_item: usize,
        parse: fn(&mut Frames<'_>) -> O,
    ) -> Result<Vec<O>, StoreError> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(failed("query", "the socket failed before"));
        }
        let (done, answer) = oneshot::channel();
        let job = Job {
            frames: items.saturating_mul(per_item),
            items,
            parse,
            done,
        };
        let written = async {
            let mut w = self.writer.lock().await;
            // Queued under the writer's lock: the reader expects replies in write order.
            self.jobs
                .send(job)
                .map_err(|_| failed("query", "the socket is closed"))?;
            w.write_all(commands)
                .await
                .map_err(|e| failed("write", e))?;
            w.flush().await.map_err(|e| failed("write", e))
        };
        // Dropped before the answer (the caller gave up, e.g. at shutdown), the batch may be
        // half written or its replies unread: the socket is not used again.
        let mut unsettled = BreakOnDrop(Some(&self.broken));
        let result = tokio::time::timeout(self.timeout, async {
            written.await?;
            answer
                .await
                .map_err(|_| failed("read", "the socket is closed"))?
        })
        .await
        .unwrap_or_else(|_| Err(failed("read", "timed out")));
        if result.is_err() {
            self.broken.store(true, Ordering::Relaxed);
            self.reader.abort();
        }
        unsettled.0 = None;
        result
    }
}

/// Marks the socket broken when dropped while still holding the flag.
struct BreakOnDrop<'a>(Option<&'a AtomicBool>);

impl Drop for BreakOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(broken) = self.0 {
            broken.store(true, Ordering::Relaxed);
        }
    }
}

async fn connect(addr: &BulkAddr) -> std::io::Result<(Reader, Writer)> {
    match addr {
        BulkAddr::Tcp(host, port) => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        BulkAddr::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// `AUTH` and `SELECT` as `nodes` says; an error reply names its code, never the password.
async fn login(
    reader: &mut Reader,
    writer: &mut Writer,
    nodes: &NodeSettings,
) -> Result<(), StoreError> {
    let mut out = Vec::new();
    let mut what = Vec::new();
    if let Some(password) = &nodes.password {
        match &nodes.username {
            Some(user) => {
                resp::push_command(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()])
            }
            None => resp::push_command(&mut out, &[b"AUTH", password.as_bytes()]),
        }
        what.push("AUTH");
    }
    if nodes.db != 0 {
        let db = nodes.db.to_string();
        resp::push_command(&mut out, &[b"SELECT", db.as_bytes()]);
        what.push("SELECT");
    }
    if what.is_empty() {
        return Ok(());
    }
    writer
        .write_all(&out)
        .await
        .map_err(|e| failed("write", e))?;
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    read_frames(reader, &mut buf, &mut ends, what.len()).await?;
    let mut frames = Frames::new(&buf, &ends);
    for command in what {
        match frames.next_reply() {
            Reply::Status(_) => {}
            reply => {
                let code = reply.error_code().unwrap_or(b"unexpected reply");
                return Err(failed(command, String::from_utf8_lossy(code)));
            }
        }
    }
    Ok(())
}

/// Reads until `buf` holds `n` whole replies (their ends in `ends`).
async fn read_frames(
    reader: &mut Reader,
    buf: &mut Vec<u8>,
    ends: &mut Vec<usize>,
    n: usize,
) -> Result<(), StoreError> {
    let mut at = ends.last().copied().unwrap_or(0);
    while ends.len() < n {
        match resp::frame_len(buf.get(at..).unwrap_or_default()) {
            Ok(Some(len)) => {
                at += len;
                ends.push(at);
            }
            Ok(None) => {
                buf.reserve(READ_CHUNK);
                let got = reader.read_buf(buf).await.map_err(|e| failed("read", e))?;
                if got == 0 {
                    return Err(failed("read", "closed by Redis"));
                }
            }
            Err(e) => return Err(failed("read", e)),
        }
    }
    Ok(())
}

/// The code of the first error reply other than [`super::KEY_ERROR`] among the replies
/// ending at `ends`: the batch fails instead of being parsed.
fn server_error<'a>(buf: &'a [u8], ends: &[usize]) -> Option<&'a [u8]> {
    let starts = std::iter::once(0).chain(ends.iter().copied());
    starts.zip(ends).find_map(|(start, &end)| {
        // An error reply is one line: `-CODE message\r\n`.
        let line = buf.get(start..end)?.strip_prefix(b"-")?;
        let code = line
            .split(|b| *b == b' ' || *b == b'\r')
            .next()
            .unwrap_or_default();
        (code != super::KEY_ERROR.as_bytes()).then_some(code)
    })
}

/// The socket's reader task: for each job in write order, reads its replies, parses them
/// and answers. Ends, failing the job at hand, on a socket error or a malformed reply.
async fn read_replies<O>(
    mut reader: Reader,
    mut queue: mpsc::UnboundedReceiver<Job<O>>,
    broken: Arc<AtomicBool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut ends: Vec<usize> = Vec::new();
    while let Some(job) = queue.recv().await {
        ends.clear();
        if let Err(e) = read_frames(&mut reader, &mut buf, &mut ends, job.frames).await {
            broken.store(true, Ordering::Relaxed);
            let _ = job.done.send(Err(e));
            return;
        }
        let used = ends.last().copied().unwrap_or(0);
        let answer = match server_error(&buf, &ends) {
            // A failed query retires the socket (see `query`); the next read opens another.
            Some(code) => Err(failed("read", String::from_utf8_lossy(code))),
            None => {
                let mut frames = Frames::new(buf.get(..used).unwrap_or_default(), &ends);
                Ok((0..job.items).map(|_| (job.parse)(&mut frames)).collect())
            }
        };
        let _ = job.done.send(answer);
        // What arrived past this job's replies belongs to the next one.
        buf.drain(..used);
    }
}
