//! The line format of captured output files: turning a pipe's bytes into records (keeper
//! side) and reading lines back (`GET /v1/logs`).
//!
//! Each line of `STATE/output/<stem>.log` (and of its rotated `.log.N`) is one of:
//! * a **record** `<time> <stream> <text>`: `time` is when the keeper read the bytes from the
//!   pipe (UTC, RFC 3339 with milliseconds, always [`STAMP_LEN`] characters, e.g.
//!   `2026-11-22T10:00:00.123Z`), `stream` is `out` or `err`, and `text` is the line the
//!   process wrote, without its newline, byte for byte;
//! * a **header** starting with `--- `: the line the agent writes before each command
//!   (`--- <time> <label> as <account>: <command>`), and the keeper's own notes
//!   (`--- <time> note: ...`, for output it could not capture);
//! * anything else: text written by an agent older than this format, shown as it is.
//!
//! A record's text is at most [`MAX_TEXT`] bytes: a longer line becomes several records. A
//! line still unfinished (no newline) after [`PARTIAL_FLUSH`], or when its pipe closes,
//! becomes a record as it is; what follows starts a new record.

use std::time::{Duration, SystemTime};

/// Longest text of one record; a longer line is split.
pub const MAX_TEXT: usize = 16 * 1024;
/// Length of a record's time stamp.
pub const STAMP_LEN: usize = 24;
/// An unfinished line waits this long for its newline before it is written as it is.
pub const PARTIAL_FLUSH: Duration = Duration::from_secs(1);
/// Longest record line: stamp, stream, text, separators and newline.
pub const MAX_RECORD: usize = STAMP_LEN + 1 + 3 + 1 + MAX_TEXT + 1;

/// Which of a command's outputs a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Out,
    Err,
}

impl Stream {
    /// The mark written in the file (and shown by `GET /v1/logs`).
    pub fn mark(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
        }
    }
}

/// The time stamp of records read at `t`.
pub fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Append one record line to `buf`.
pub fn push_record(buf: &mut Vec<u8>, stamp: &str, stream: Stream, text: &[u8]) {
    buf.extend_from_slice(stamp.as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(stream.mark().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(text);
    buf.push(b'\n');
}

/// A header or note line: `--- ` and `text` with newlines shown as `\n`, cut at
/// [`MAX_TEXT`] bytes, ending with a newline.
pub fn header_line(text: &str) -> Vec<u8> {
    let mut s = String::from("--- ");
    for c in text.chars() {
        if s.len() >= MAX_TEXT {
            s.push_str(" [cut]");
            break;
        }
        match c {
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            c => s.push(c),
        }
    }
    s.push('\n');
    s.into_bytes()
}

/// Splits one pipe's bytes into records, keeping the unfinished line between reads.
#[derive(Debug)]
pub struct Splitter {
    stream: Stream,
    partial: Vec<u8>,
    /// When the unfinished line started waiting.
    since: Option<std::time::Instant>,
}

impl Splitter {
    pub fn new(stream: Stream) -> Splitter {
        Splitter {
            stream,
            partial: Vec::new(),
            since: None,
        }
    }

    /// Turn `data` (read at `stamp`) into records appended to `out`.
    pub fn feed(&mut self, data: &[u8], stamp: &str, out: &mut Vec<u8>) {
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            let line = &rest[..nl];
            rest = &rest[nl + 1..];
            if self.partial.is_empty() {
                self.emit(line, stamp, out);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.emit(&whole, stamp, out);
            }
            self.since = None;
        }
        if rest.is_empty() {
            return;
        }
        if self.partial.is_empty() {
            self.since = Some(std::time::Instant::now());
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= MAX_TEXT {
            let tail = self.partial.split_off(MAX_TEXT);
            let head = std::mem::replace(&mut self.partial, tail);
            push_record(out, stamp, self.stream, &head);
        }
        if self.partial.is_empty() {
            self.since = None;
        }
    }

    /// Write a line of any length as records of at most [`MAX_TEXT`] bytes.
    fn emit(&self, line: &[u8], stamp: &str, out: &mut Vec<u8>) {
        if line.len() <= MAX_TEXT {
            push_record(out, stamp, self.stream, line);
            return;
        }
        for piece in line.chunks(MAX_TEXT) {
            push_record(out, stamp, self.stream, piece);
        }
    }

    /// The stream this splitter reads.
    pub fn stream(&self) -> Stream {
        self.stream
    }

    /// Is an unfinished line waiting, and since when?
    pub fn waiting_since(&self) -> Option<std::time::Instant> {
        self.since
    }

    /// Write the unfinished line (if any) as a record.
    pub fn flush(&mut self, stamp: &str, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            push_record(out, stamp, self.stream, &line);
        }
        self.since = None;
    }
}

/// One line of an output file, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    Record {
        time: &'a str,
        stream: Stream,
        text: &'a [u8],
    },
    Header(&'a [u8]),
    Plain(&'a [u8]),
}

/// Classify one line (without its newline).
pub fn parse(line: &[u8]) -> Line<'_> {
    if line.starts_with(b"--- ") {
        return Line::Header(line);
    }
    let plain = Line::Plain(line);
    if line.len() < STAMP_LEN + 4 || line[STAMP_LEN] != b' ' {
        return plain;
    }
    let Ok(time) = std::str::from_utf8(&line[..STAMP_LEN]) else {
        return plain;
    };
    let b = time.as_bytes();
    let shape = b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z';
    if !shape {
        return plain;
    }
    let rest = &line[STAMP_LEN + 1..];
    let stream = match rest.get(..3) {
        Some(b"out") => Stream::Out,
        Some(b"err") => Stream::Err,
        _ => return plain,
    };
    let text = match rest.get(3) {
        None => &rest[3..],
        Some(b' ') => &rest[4..],
        Some(_) => return plain,
    };
    Line::Record { time, stream, text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(b: &[u8]) -> Vec<Line<'_>> {
        b.split(|c| *c == b'\n')
            .filter(|l| !l.is_empty())
            .map(parse)
            .collect()
    }

    #[test]
    fn records_round_trip() {
        let st = stamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(st, "2023-11-14T22:13:20.123Z");
        assert_eq!(st.len(), STAMP_LEN);
        let mut out = Vec::new();
        let mut s = Splitter::new(Stream::Err);
        s.feed(b"one\ntw", &st, &mut out);
        assert!(s.waiting_since().is_some());
        s.feed(b"o\n\nthree", &st, &mut out);
        s.flush(&st, &mut out);
        let got = lines(&out);
        let texts: Vec<&[u8]> = got
            .iter()
            .map(|l| match l {
                Line::Record {
                    stream: Stream::Err,
                    time,
                    text,
                } if *time == st => *text,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, [&b"one"[..], b"two", b"", b"three"]);
    }

    #[test]
    fn long_lines_are_split_and_nothing_is_lost() {
        let st = stamp(SystemTime::now());
        let mut out = Vec::new();
        let mut s = Splitter::new(Stream::Out);
        let long = vec![b'x'; MAX_TEXT * 2 + 5];
        s.feed(&long[..MAX_TEXT + 3], &st, &mut out);
        s.feed(&long[MAX_TEXT + 3..], &st, &mut out);
        s.feed(b"\n", &st, &mut out);
        let total: usize = lines(&out)
            .iter()
            .map(|l| match l {
                Line::Record { text, .. } => {
                    assert!(text.len() <= MAX_TEXT);
                    text.len()
                }
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(total, long.len());
        assert!(out.split(|c| *c == b'\n').all(|l| l.len() < MAX_RECORD));
    }

    #[test]
    fn headers_and_old_lines_are_told_apart() {
        assert_eq!(
            parse(b"--- 2026-01-01T00:00:00Z start_cmd as root: x"),
            Line::Header(b"--- 2026-01-01T00:00:00Z start_cmd as root: x")
        );
        assert_eq!(parse(b"hello world"), Line::Plain(b"hello world"));
        assert_eq!(
            parse(b"2026-01-01T00:00:00.000Z xyz a"),
            Line::Plain(b"2026-01-01T00:00:00.000Z xyz a")
        );
        assert!(matches!(
            parse(b"2026-01-01T00:00:00.000Z out"),
            Line::Record { text: b"", .. }
        ));
        let h = header_line("a\nb");
        assert_eq!(h, b"--- a\\nb\n");
        assert!(header_line(&"y".repeat(MAX_TEXT * 2)).len() < MAX_RECORD);
    }
}
