//! RESP2 on the wire, for the bulk sockets ([`super::bulk`]): commands encoded straight into
//! a byte buffer, replies read in place. A reply is first measured ([`frame_len`]: is it
//! complete in the buffer, and how long), then read as [`Reply`]s that borrow their strings
//! from the buffer, so a record's fields are never copied into values of their own.
//!
//! Nothing from the socket is trusted: lengths are checked against the buffer and bounded
//! ([`MAX_BULK`], [`MAX_ITEMS`], [`MAX_DEPTH`]); a malformed reply is a [`ProtocolError`],
//! never a panic.

use memchr::memchr;

/// The longest string Redis sends (its `proto-max-bulk-len` default).
pub const MAX_BULK: usize = 512 * 1024 * 1024;
/// The most items an array reply may claim.
pub const MAX_ITEMS: usize = 1 << 24;
/// Nesting of arrays (the bulk reads need one level; Redis sends a few at most).
pub const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Redis reply: {0}")]
pub struct ProtocolError(pub &'static str);

/// One reply, its strings borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `$-1` or `*-1`.
    Nil,
    Bulk(&'a [u8]),
    /// `+OK` and the like.
    Status(&'a [u8]),
    /// `-ERR ...`: the whole line.
    Error(&'a [u8]),
    Int(i64),
    Array(Items<'a>),
}

impl<'a> Reply<'a> {
    /// The bytes of a string reply (bulk or status); `None` for anything else.
    pub fn bytes(self) -> Option<&'a [u8]> {
        match self {
            Reply::Bulk(b) | Reply::Status(b) => Some(b),
            _ => None,
        }
    }

    /// The error code (`WRONGTYPE`, `NOAUTH`, ...) of an error reply.
    pub fn error_code(self) -> Option<&'a [u8]> {
        match self {
            Reply::Error(line) => line.split(|b| *b == b' ').next(),
            _ => None,
        }
    }
}

/// The items of an array reply, read one after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Items<'a> {
    buf: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Items<'a> {
    type Item = Reply<'a>;

    fn next(&mut self) -> Option<Reply<'a>> {
        if self.left == 0 {
            return None;
        }
        // The array was measured whole by `frame_len`: its items are complete.
        let (reply, used) = read(self.buf, None).ok()?;
        self.buf = self.buf.get(used..)?;
        self.left -= 1;
        Some(reply)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Items<'_> {}

/// The replies of a measured buffer, in order.
pub struct Frames<'a> {
    buf: &'a [u8],
    /// Where each reply ends in `buf`, as [`frame_len`] measured them.
    ends: std::slice::Iter<'a, usize>,
    start: usize,
}

impl<'a> Frames<'a> {
    /// Over `buf`, whose replies end at `ends` (measured by [`frame_len`], ascending).
    pub fn new(buf: &'a [u8], ends: &'a [usize]) -> Frames<'a> {
        Frames {
            buf,
            ends: ends.iter(),
            start: 0,
        }
    }

    /// The next reply; `Nil` past the end (the caller asked for more replies than it sent
    /// commands: a bug, not something Redis can cause).
    pub fn next_reply(&mut self) -> Reply<'a> {
        let Some(&end) = self.ends.next() else {
            return Reply::Nil;
        };
        let frame = self.buf.get(self.start..end).unwrap_or_default();
        self.start = end;
        read(frame, Some(frame.len())).map_or(Reply::Nil, |(r, _)| r)
    }
}

/// The length of the first reply in `buf`: `Ok(None)` while it is incomplete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    measure(buf, 0)
}

fn measure(buf: &[u8], depth: usize) -> Result<Option<usize>, ProtocolError> {
    let Some((kind, n, head)) = header(buf)? else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(head)),
        b'$' => match n {
            None => Ok(Some(head)),
            Some(len) => {
                // The string and its CRLF.
                let end = head
                    .checked_add(len)
                    .and_then(|e| e.checked_add(2))
                    .ok_or(ProtocolError("bulk length overflows"))?;
                if buf.len() < end {
                    return Ok(None);
                }
                if buf.get(end - 2..end) != Some(b"\r\n") {
                    return Err(ProtocolError("bulk string not ended by CRLF"));
                }
                Ok(Some(end))
            }
        },
        b'*' => {
            let Some(items) = n else {
                return Ok(Some(head));
            };
            if depth >= MAX_DEPTH {
                return Err(ProtocolError("arrays nested too deep"));
            }
            let mut at = head;
            for _ in 0..items {
                let rest = buf.get(at..).unwrap_or_default();
                match measure(rest, depth + 1)? {
                    Some(len) => at += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(ProtocolError("unknown reply type")),
    }
}

/// The type byte, the length of `$` and `*` (`None`: nil; also for `+ - :`), and the length
/// of the header line with its CRLF; `Ok(None)` when the line is not complete yet.
#[allow(clippy::type_complexity)]
fn header(buf: &[u8]) -> Result<Option<(u8, Option<usize>, usize)>, ProtocolError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some(lf) = memchr(b'\n', buf) else {
        return Ok(None);
    };
    if lf < 2 || buf.get(lf - 1) != Some(&b'\r') {
        return Err(ProtocolError("line not ended by CRLF"));
    }
    let line = buf.get(1..lf - 1).unwrap_or_default();
    let head = lf + 1;
    let n = match kind {
        b'$' | b'*' => {
            if line == b"-1" {
                None
            } else {
                let n = parse_len(line)?;
                let max = if kind == b'$' { MAX_BULK } else { MAX_ITEMS };
                if n > max {
                    return Err(ProtocolError("length too large"));
                }
                Some(n)
            }
        }
        b':' => {
            parse_int(line)?;
            None
        }
        b'+' | b'-' => None,
        _ => return Err(ProtocolError("unknown reply type")),
    };
    Ok(Some((kind, n, head)))
}

fn parse_len(digits: &[u8]) -> Result<usize, ProtocolError> {
    if digits.is_empty() || digits.len() > 12 {
        return Err(ProtocolError("bad length"));
    }
    let mut n: usize = 0;
    for d in digits {
        if !d.is_ascii_digit() {
            return Err(ProtocolError("bad length"));
        }
        n = n * 10 + usize::from(d - b'0');
    }
    Ok(n)
}

fn parse_int(digits: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError("bad integer"))
}

/// Reads the first reply of `buf`, which must be complete (measured by [`frame_len`], alone
/// or as part of an array); `len` is its length when the caller knows it. Returns the reply
/// and its length.
fn read(buf: &[u8], len: Option<usize>) -> Result<(Reply<'_>, usize), ProtocolError> {
    const INCOMPLETE: ProtocolError = ProtocolError("incomplete reply");
    let (kind, n, head) = header(buf)?.ok_or(INCOMPLETE)?;
    let line = || buf.get(1..head - 2).unwrap_or_default();
    Ok(match (kind, n) {
        (b'+', _) => (Reply::Status(line()), head),
        (b'-', _) => (Reply::Error(line()), head),
        (b':', _) => (Reply::Int(parse_int(line())?), head),
        (b'$', None) | (b'*', None) => (Reply::Nil, head),
        (b'$', Some(n)) => {
            let end = head.checked_add(n).ok_or(INCOMPLETE)?;
            let s = buf.get(head..end).ok_or(INCOMPLETE)?;
            (Reply::Bulk(s), end + 2)
        }
        (b'*', Some(n)) => {
            let len = match len {
                Some(l) => l,
                None => measure(buf, 0)?.ok_or(INCOMPLETE)?,
            };
            let items = Items {
                buf: buf.get(head..len).ok_or(INCOMPLETE)?,
                left: n,
            };
            (Reply::Array(items), len)
        }
        _ => return Err(ProtocolError("unknown reply type")),
    })
}

/// Appends one command (`*n`, then each argument as a bulk string).
pub fn push_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    push_header(out, b'*', args.len());
    for a in args {
        push_bulk(out, a);
    }
}

/// Appends `*n\r\n` (`kind` `*`) or `$n\r\n` (`kind` `$`).
pub fn push_header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends one bulk string.
pub fn push_bulk(out: &mut Vec<u8>, s: &[u8]) {
    push_header(out, b'$', s.len());
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

/// A command of a fixed name and fixed trailing arguments around one key (`HMGET key f1
/// f2 ...`), encoded once: each use appends only the key.
pub struct KeyCommand {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl KeyCommand {
    pub fn new(name: &str, trailing: &[&str]) -> KeyCommand {
        let mut head = Vec::new();
        push_header(&mut head, b'*', 2 + trailing.len());
        push_bulk(&mut head, name.as_bytes());
        let mut tail = Vec::new();
        for a in trailing {
            push_bulk(&mut tail, a.as_bytes());
        }
        KeyCommand { head, tail }
    }

    /// An upper bound of what [`KeyCommand::push`] adds for a key of `key_len` bytes.
    pub fn encoded_len(&self, key_len: usize) -> usize {
        // `$`, up to 20 digits, two CRLFs.
        self.head.len() + self.tail.len() + key_len + 25
    }

    pub fn push(&self, out: &mut Vec<u8>, key: &[u8]) {
        out.extend_from_slice(&self.head);
        push_bulk(out, key);
        out.extend_from_slice(&self.tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] =
        b"*3\r\n$5\r\nhello\r\n$-1\r\n$0\r\n\r\n-WRONGTYPE Operation against a key\r\n+OK\r\n:-42\r\n*-1\r\n";

    #[test]
    fn replies_are_read_in_place() {
        let ends = measured(SAMPLE);
        let mut frames = Frames::new(SAMPLE, &ends);
        let Reply::Array(items) = frames.next_reply() else {
            panic!("not an array");
        };
        assert_eq!(items.len(), 3);
        let got: Vec<Reply<'_>> = items.collect();
        assert_eq!(got, [Reply::Bulk(b"hello"), Reply::Nil, Reply::Bulk(b"")]);
        let err = frames.next_reply();
        assert_eq!(err.error_code(), Some(&b"WRONGTYPE"[..]));
        assert_eq!(frames.next_reply(), Reply::Status(b"OK"));
        assert_eq!(frames.next_reply(), Reply::Int(-42));
        assert_eq!(frames.next_reply(), Reply::Nil);
        assert_eq!(frames.next_reply(), Reply::Nil, "past the end");
    }

    fn measured(buf: &[u8]) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            at += frame_len(&buf[at..])
                .expect("well formed")
                .expect("complete");
            ends.push(at);
        }
        ends
    }

    #[test]
    fn every_cut_of_a_reply_is_incomplete_and_the_whole_is_measured() {
        let mut at = 0;
        let mut lens = Vec::new();
        while at < SAMPLE.len() {
            let rest = &SAMPLE[at..];
            let len = frame_len(rest).expect("well formed").expect("complete");
            for cut in 0..len {
                assert_eq!(frame_len(&rest[..cut]), Ok(None), "cut at {cut} of {len}");
            }
            lens.push(len);
            at += len;
        }
        assert_eq!(lens.len(), 5);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for bad in [
            &b"?what\r\n"[..],
            b"$5\r\nhelloXX",
            b"$abc\r\n",
            b"$99999999999999999999\r\n",
            b"*99999999999\r\n",
            b"$-2\r\n",
            b":12x\r\n",
            b"+OK\n",
            b"\n",
        ] {
            assert!(
                frame_len(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert!(frame_len(deep.as_bytes()).is_err());
        let ok = "*1\r\n".repeat(MAX_DEPTH) + ":1\r\n";
        assert_eq!(frame_len(ok.as_bytes()), Ok(Some(ok.len())));
    }

    #[test]
    fn commands_encode_as_redis_reads_them() {
        let mut out = Vec::new();
        push_command(&mut out, &[b"SELECT", b"12"]);
        assert_eq!(out, b"*2\r\n$6\r\nSELECT\r\n$2\r\n12\r\n");
        out.clear();
        let hmget = KeyCommand::new("HMGET", &["a", "bc"]);
        hmget.push(&mut out, b"k");
        assert_eq!(
            out,
            b"*4\r\n$5\r\nHMGET\r\n$1\r\nk\r\n$1\r\na\r\n$2\r\nbc\r\n"
        );
        out.clear();
        push_header(&mut out, b'$', 0);
        push_header(&mut out, b'*', 1234567);
        assert_eq!(out, b"$0\r\n*1234567\r\n");
    }
}
