//! Bytes from mail or archives, made safe for a terminal.
//!
//! A message can carry escape sequences (`ESC ]`, `ESC [`), carriage returns that overwrite
//! what was printed, and bytes that are not UTF-8. Shown raw, they let a sender retitle or
//! reprogram the administrator's terminal. [`escape`] keeps printable text, tabs and line
//! ends (LF, CRLF), and writes everything else visibly (`\x1b`; a CR without its LF as
//! `\x0d`); [`Safe`] does that to a writer when it is a terminal.

use std::io::{self, Write};

/// `bytes` with every control character but tab and newline (and the CR of a CRLF), and
/// every byte that is not part of valid UTF-8, written as `\xNN`.
pub fn escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, &[][..]),
            Err(e) => {
                let (v, b) = rest.split_at(e.valid_up_to());
                let v = std::str::from_utf8(v).unwrap_or("");
                (v, b)
            }
        };
        let chars: Vec<char> = valid.chars().collect();
        for (i, &c) in chars.iter().enumerate() {
            let keep = match c {
                '\t' | '\n' => true,
                '\r' => chars.get(i + 1) == Some(&'\n'),
                c => !c.is_control() && !is_bidi_control(c),
            };
            if keep {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            } else {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                }
            }
        }
        if bad.is_empty() {
            break;
        }
        out.extend_from_slice(format!("\\x{:02x}", bad[0]).as_bytes());
        rest = &bad[1..];
    }
    out
}

/// A one-line text made safe: [`escape`], and newlines written as `\x0a` too.
pub fn escape_line(s: &str) -> String {
    let escaped = escape(s.as_bytes());
    String::from_utf8_lossy(&escaped).replace('\n', "\\x0a")
}

/// An error and its causes as one line: each cause after a colon unless the text so far
/// already says it (an I/O error wrapped with context often repeats its source), with
/// control characters shown, never obeyed.
pub fn error_line<I, S>(causes: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut line = String::new();
    for c in causes {
        let c = c.as_ref().trim();
        if c.is_empty() || line.contains(c) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(c);
    }
    escape_line(&line.replace(['\r', '\n'], " "))
}

/// Unicode's bidirectional overrides, which reorder what follows them on screen.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A writer that escapes what goes through it ([`escape`]) when `escape` is set, and
/// passes it unchanged otherwise (output to a file or a pipe keeps its bytes). What is
/// written in chunks is escaped as if written at once: a CR at the end of one write, or a
/// UTF-8 character cut between two, waits for the next.
pub struct Safe<W: Write> {
    inner: W,
    escape: bool,
    /// The end of the last write whose meaning depends on the next byte: a CR (part of a
    /// CRLF or not) or the start of a UTF-8 character (at most 3 bytes).
    pending: Vec<u8>,
}

impl<W: Write> Safe<W> {
    pub fn new(inner: W, escape: bool) -> Safe<W> {
        Safe {
            inner,
            escape,
            pending: Vec::new(),
        }
    }
}

/// How many bytes at the end of `bytes` are a CR or an incomplete UTF-8 character.
fn undecided_tail(bytes: &[u8]) -> usize {
    if bytes.last() == Some(&b'\r') {
        return 1;
    }
    for i in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - i];
        if b & 0xc0 == 0x80 {
            continue;
        }
        let need = match b {
            0xf0.. => 4,
            0xe0.. => 3,
            0xc0.. => 2,
            _ => 1,
        };
        return if need > i { i } else { 0 };
    }
    0
}

impl<W: Write> Write for Safe<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.escape {
            return self.inner.write(data);
        }
        let mut chunk = std::mem::take(&mut self.pending);
        chunk.extend_from_slice(data);
        let keep = undecided_tail(&chunk);
        self.pending = chunk.split_off(chunk.len() - keep);
        self.inner.write_all(&escape(&chunk))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let rest = std::mem::take(&mut self.pending);
        self.inner.write_all(&escape(&rest))?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_are_shown_not_obeyed() {
        assert_eq!(
            escape(b"a\x1b]0;owned\x07b\r\n"),
            b"a\\x1b]0;owned\\x07b\r\n"
        );
        assert_eq!(escape(b"x\ry\tz\n"), b"x\\x0dy\tz\n");
        assert_eq!(escape(b"caf\xc3\xa9 \xff"), "café \\xff".as_bytes());
        assert_eq!(escape("\u{202e}abc".as_bytes()), b"\\xe2\\x80\\xaeabc");
        assert_eq!(escape_line("a\nb"), "a\\x0ab");
        let os = "No such file or directory (os error 2)";
        assert_eq!(
            error_line([format!("x.tar: {os}"), os.to_string()]),
            format!("x.tar: {os}")
        );
        assert_eq!(error_line(["a", "b"]), "a: b");
    }

    #[test]
    fn the_writer_escapes_only_when_asked_and_keeps_split_crlf() {
        let mut v = Vec::new();
        {
            let mut w = Safe::new(&mut v, true);
            w.write_all(b"a\r").unwrap();
            w.write_all(b"\nb\x1b").unwrap();
            w.flush().unwrap();
        }
        assert_eq!(v, b"a\r\nb\\x1b");
        // A character cut between two writes is shown whole; one cut at the end is not.
        let mut v = Vec::new();
        {
            let mut w = Safe::new(&mut v, true);
            for b in "é€😀x".as_bytes() {
                w.write_all(&[*b]).unwrap();
            }
            w.write_all(b"\xe2\x82").unwrap();
            w.flush().unwrap();
        }
        assert_eq!(v, "é€😀x\\xe2\\x82".as_bytes());
        let mut raw = Vec::new();
        Safe::new(&mut raw, false).write_all(b"\x1b").unwrap();
        assert_eq!(raw, b"\x1b");
    }
}
