//! The DATA phase: finds the end of the message and undoes dot-stuffing, across any split of
//! the input into reads.
//!
//! Only `CRLF . CRLF` ends a message (RFC 5321 4.1.1.4). A line begins only after CRLF: a bare
//! LF or a bare CR never starts a line, so none of the smuggling sequences (`LF.LF`, `CR.CR`,
//! `LF.CRLF`, `CRLF.LF`, `CRLF.CR`, NUL tricks) can end the message or start another. A
//! message that holds a bare CR or LF, a NUL, or a line longer than 1000 octets is read to its
//! real end and then refused as a whole (see [`Verdict`]); nothing after its bytes is ever
//! taken as a command until the true end.

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
pub const MAX_TEXT_LINE: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// At the start of a line (after CRLF).
    LineStart,
    /// Saw `.` at the start of a line.
    Dot,
    /// Saw `.` CR at the start of a line.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line (or at its start).
    Cr,
}

/// What was wrong with a message, if anything; decided when its end is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    TooBig,
    BareLineEnding,
    Nul,
    LineTooLong,
}

#[derive(Debug)]
pub struct DataReader {
    at: At,
    line_len: usize,
    max_size: usize,
    /// Octets of content seen (after unstuffing), counted even when no longer kept.
    seen: usize,
    body: Vec<u8>,
    bare: bool,
    nul: bool,
    long_line: bool,
}

impl DataReader {
    pub fn new(max_size: usize) -> DataReader {
        DataReader {
            at: At::LineStart,
            line_len: 0,
            max_size,
            seen: 0,
            body: Vec::with_capacity(8192),
            bare: false,
            nul: false,
            long_line: false,
        }
    }

    #[inline]
    fn emit(&mut self, b: u8) {
        self.seen += 1;
        self.line_len += 1;
        if self.line_len > MAX_TEXT_LINE {
            self.long_line = true;
        }
        if self.seen <= self.max_size {
            self.body.push(b);
        }
    }

    /// Bytes of a plain run of line content (no CR, LF, NUL).
    #[inline]
    fn emit_run(&mut self, run: &[u8]) {
        let room = self.max_size.saturating_sub(self.seen);
        self.body.extend_from_slice(&run[..run.len().min(room)]);
        self.seen += run.len();
        self.line_len += run.len();
        if self.line_len > MAX_TEXT_LINE {
            self.long_line = true;
        }
    }

    /// Feed input. Returns how many bytes were consumed and whether the end (`CRLF.CRLF`)
    /// was reached; when it was, the bytes after the consumed ones belong to the command
    /// stream and the message is taken with [`DataReader::finish`].
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            match self.at {
                At::LineStart if b == b'.' => self.at = At::Dot,
                At::Dot if b == b'\r' => self.at = At::DotCr,
                At::DotCr if b == b'\n' => return (i, true),
                At::DotCr => {
                    // ".<CR>x": the dot was stuffing, the CR is bare.
                    self.bare = true;
                    self.emit(b'\r');
                    self.at = At::Mid;
                    i -= 1;
                }
                At::LineStart | At::Dot | At::Mid => {
                    // A leading dot (At::Dot) is dropped: dot-unstuffing.
                    match b {
                        b'\r' => self.at = At::Cr,
                        b'\n' => {
                            self.bare = true;
                            self.emit(b'\n');
                            self.at = At::Mid;
                        }
                        0 => {
                            self.nul = true;
                            self.emit(0);
                            self.at = At::Mid;
                        }
                        _ => {
                            // Fast path: copy the run up to the next CR, LF or NUL.
                            let rest = &input[i - 1..];
                            let n = rest
                                .iter()
                                .position(|&c| c == b'\r' || c == b'\n' || c == 0)
                                .unwrap_or(rest.len());
                            self.emit_run(&rest[..n]);
                            i += n - 1;
                            self.at = At::Mid;
                        }
                    }
                }
                At::Cr => match b {
                    b'\n' => {
                        self.emit(b'\r');
                        self.emit(b'\n');
                        self.line_len = 0;
                        self.at = At::LineStart;
                    }
                    b'\r' => {
                        self.bare = true;
                        self.emit(b'\r');
                    }
                    _ => {
                        self.bare = true;
                        self.emit(b'\r');
                        self.at = At::Mid;
                        i -= 1;
                    }
                },
            }
        }
        (i, false)
    }

    /// Octets of content seen so far (for the size limit).
    pub fn seen(&self) -> usize {
        self.seen
    }

    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// The content kept and not yet taken out.
    pub fn kept(&self) -> &[u8] {
        &self.body
    }

    /// Takes out everything kept (a part for the spool); reading goes on.
    pub fn take_kept(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.body, Vec::with_capacity(8192))
    }

    /// Takes out the first `n` bytes kept.
    pub fn split_kept(&mut self, n: usize) -> Vec<u8> {
        let rest = self.body.split_off(n.min(self.body.len()));
        std::mem::replace(&mut self.body, rest)
    }

    /// The message (dot-unstuffed, with its final CRLF) and what was wrong with it.
    pub fn finish(self) -> (Vec<u8>, Verdict) {
        let verdict = if self.seen > self.max_size {
            Verdict::TooBig
        } else if self.bare {
            Verdict::BareLineEnding
        } else if self.nul {
            Verdict::Nul
        } else if self.long_line {
            Verdict::LineTooLong
        } else {
            Verdict::Ok
        };
        (self.body, verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` in pieces of `chunk` bytes; the message, verdict and bytes left over.
    fn run(input: &[u8], chunk: usize, max: usize) -> Option<(Vec<u8>, Verdict, Vec<u8>)> {
        let mut r = DataReader::new(max);
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + chunk).min(input.len());
            let (used, done) = r.feed(&input[pos..end]);
            pos += used;
            if done {
                let (body, v) = r.finish();
                return Some((body, v, input[pos..].to_vec()));
            }
        }
        None
    }

    fn check(input: &[u8], expect: Option<(&[u8], Verdict, &[u8])>) {
        for chunk in [1, 2, 3, 7, 4096] {
            let got = run(input, chunk, 1 << 20);
            let got = got
                .as_ref()
                .map(|(b, v, r)| (b.as_slice(), *v, r.as_slice()));
            assert_eq!(
                got,
                expect,
                "chunk {chunk}, input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn plain_message_and_dot_unstuffing() {
        check(
            b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n",
            Some((
                b"Subject: x\r\n\r\n.leading dot\r\n",
                Verdict::Ok,
                b"QUIT\r\n",
            )),
        );
        check(b".\r\n", Some((b"", Verdict::Ok, b"")));
        check(b"a\r\n.\r", None);
    }

    #[test]
    fn smuggling_sequences_never_end_the_message() {
        // Each holds a fake end followed by a smuggled transaction, then the real end.
        let smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nevil\r\n";
        for fake in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\r\n\0.\r\n",
            b"\r\n.\0\r\n",
        ] {
            let mut input = b"Subject: s\r\n\r\nbody".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(smuggled);
            input.extend_from_slice(b".\r\nNOOP\r\n");
            for chunk in [1, 2, 5, 4096] {
                let (body, verdict, rest) = run(&input, chunk, 1 << 20).expect("real end found");
                assert_eq!(rest, b"NOOP\r\n", "fake end {fake:?} chunk {chunk}");
                assert_ne!(verdict, Verdict::Ok, "fake end {fake:?} accepted");
                assert!(
                    body.windows(4).any(|w| w == b"evil"),
                    "smuggled bytes stay data"
                );
            }
        }
    }

    #[test]
    fn verdicts() {
        check(
            b"a\nb\r\n.\r\n",
            Some((b"a\nb\r\n", Verdict::BareLineEnding, b"")),
        );
        check(
            b"a\rb\r\n.\r\n",
            Some((b"a\rb\r\n", Verdict::BareLineEnding, b"")),
        );
        check(b"a\0b\r\n.\r\n", Some((b"a\0b\r\n", Verdict::Nul, b"")));
        let mut long = vec![b'x'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(run(&long, 4096, 1 << 20).unwrap().1, Verdict::LineTooLong);
        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(run(&ok, 13, 1 << 20).unwrap().1, Verdict::Ok);
    }

    #[test]
    fn oversized_message_is_counted_not_kept() {
        let mut input = Vec::new();
        for _ in 0..100 {
            input.extend_from_slice(&[b'y'; 98]);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b".\r\n");
        let (body, verdict, _) = run(&input, 333, 1000).unwrap();
        assert_eq!(verdict, Verdict::TooBig);
        assert!(body.len() <= 1000);
    }
}
