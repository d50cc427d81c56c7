//! A message's lines rewritten as its bytes go by, chunk by chunk: line ends made CRLF or
//! LF, and the start of each line quoted (SMTP's dot-stuffing, mboxrd's `>From `). What
//! depends on bytes not yet seen (a CR that may be half of a CRLF, a line that may turn out
//! to start with `>>From `) is kept as state, never as bytes: the output is the same
//! however the message is cut.

use std::io::{self, Write};

/// What is done to the start of each line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quote {
    /// Nothing.
    None,
    /// A leading `.` is doubled (RFC 5321 section 4.5.2).
    Dot,
    /// A line matching `>*From ` gets one more `>` (mboxrd).
    From,
}

/// How lines are rewritten.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    /// Written for each line end (LF or CRLF in the message, and a CR before the end).
    pub end: &'static [u8],
    pub quote: Quote,
    /// The last line gets a line end even when the message has none (and a CR at the
    /// very end is dropped, as before an LF); otherwise the message ends as it ends.
    pub close: bool,
}

/// SMTP DATA: CRLF, dot-stuffing, every line ended (the caller adds `.` CRLF).
pub const SMTP: Style = Style {
    end: b"\r\n",
    quote: Quote::Dot,
    close: true,
};
/// mboxrd: LF, `>From ` quoting, every line ended.
pub const MBOX: Style = Style {
    end: b"\n",
    quote: Quote::From,
    close: true,
};
/// A local command's standard input: CRLF becomes LF, nothing else changes.
pub const LF: Style = Style {
    end: b"\n",
    quote: Quote::None,
    close: false,
};

const FROM: &[u8] = b"From ";

/// Writes a message through `out`, rewritten as `style` says; [`Lines::finish`] ends it.
pub struct Lines<W: Write> {
    out: W,
    style: Style,
    /// At the start of a line, its quoting still undecided.
    at_start: bool,
    /// Nothing of the current line was seen yet.
    empty: bool,
    /// `Quote::From` at the start of a line: the `>` seen, then how much of `From `.
    quotes: u64,
    matched: usize,
    /// The last byte was a CR (written only once the next is known not to be LF).
    cr: bool,
}

impl<W: Write> Lines<W> {
    pub fn new(out: W, style: Style) -> Lines<W> {
        Lines {
            out,
            style,
            at_start: true,
            empty: true,
            quotes: 0,
            matched: 0,
            cr: false,
        }
    }

    /// The next bytes of the message.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while let Some(&b) = data.first() {
            if self.at_start {
                match self.style.quote {
                    Quote::None => self.at_start = false,
                    Quote::Dot => {
                        self.at_start = false;
                        if b == b'.' {
                            self.out.write_all(b".")?;
                        }
                    }
                    Quote::From => {
                        if self.matched == 0 && b == b'>' {
                            self.quotes += 1;
                        } else if b == FROM[self.matched] {
                            self.matched += 1;
                        } else {
                            // Not a From_ line: what was held back goes out as it was.
                            self.undecided(false)?;
                            continue;
                        }
                        self.empty = false;
                        data = &data[1..];
                        if self.matched == FROM.len() {
                            self.undecided(true)?;
                        }
                        continue;
                    }
                }
            }
            if self.cr {
                self.cr = false;
                if b == b'\n' {
                    self.end_line()?;
                    data = &data[1..];
                    continue;
                }
                self.out.write_all(b"\r")?;
            }
            let run = data
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .unwrap_or(data.len());
            self.out.write_all(&data[..run])?;
            self.empty = false;
            match data.get(run) {
                None => break,
                Some(b'\r') => self.cr = true,
                Some(_) => self.end_line()?,
            }
            data = &data[run + 1..];
        }
        Ok(())
    }

    /// The message is over: ends its last line as the style says; gives `out` back.
    pub fn finish(mut self) -> io::Result<W> {
        if self.at_start {
            self.undecided(false)?;
        }
        if self.cr && !self.style.close {
            self.out.write_all(b"\r")?;
        }
        if self.style.close && !self.empty {
            self.out.write_all(self.style.end)?;
        }
        Ok(self.out)
    }

    /// Writes the start of a line held back for `Quote::From`, with one more `>` when it
    /// is a From_ line; the rest of the line goes as it is.
    fn undecided(&mut self, quote: bool) -> io::Result<()> {
        let quotes = self.quotes + u64::from(quote);
        for _ in 0..quotes {
            self.out.write_all(b">")?;
        }
        self.out.write_all(&FROM[..self.matched])?;
        self.at_start = false;
        self.quotes = 0;
        self.matched = 0;
        Ok(())
    }

    fn end_line(&mut self) -> io::Result<()> {
        self.out.write_all(self.style.end)?;
        self.at_start = true;
        self.empty = true;
        Ok(())
    }
}

/// A whole message rewritten (for the tests).
#[cfg(test)]
pub fn rewrite(style: Style, chunks: &[&[u8]]) -> Vec<u8> {
    let mut l = Lines::new(Vec::new(), style);
    for c in chunks {
        l.write(c).unwrap();
    }
    l.finish().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `message` rewritten in one piece, then cut at every place into two and into single
    /// bytes: always the same output.
    fn same_however_cut(style: Style, message: &[u8]) -> Vec<u8> {
        let whole = rewrite(style, &[message]);
        for at in 0..=message.len() {
            let (a, b) = message.split_at(at);
            assert_eq!(
                rewrite(style, &[a, b]),
                whole,
                "{style:?} cut at {at}: {:?} | {:?}",
                String::from_utf8_lossy(a),
                String::from_utf8_lossy(b)
            );
        }
        let bytes: Vec<&[u8]> = message.chunks(1).collect();
        assert_eq!(rewrite(style, &bytes), whole, "{style:?} byte by byte");
        whole
    }

    #[test]
    fn smtp_dot_stuffs_and_ends_every_line_with_crlf_across_cuts() {
        assert_eq!(
            same_however_cut(SMTP, b"a\r\n.b\n..c\r\nlast"),
            b"a\r\n..b\r\n...c\r\nlast\r\n"
        );
        assert_eq!(same_however_cut(SMTP, b""), b"");
        assert_eq!(same_however_cut(SMTP, b".\r\n"), b"..\r\n");
        assert_eq!(same_however_cut(SMTP, b"x\r\n.\r\n"), b"x\r\n..\r\n");
        // A lone CR stays inside a line; one at the very end is dropped like a CRLF's.
        assert_eq!(same_however_cut(SMTP, b"a\rb\r\r\nc\r"), b"a\rb\r\r\nc\r\n");
        assert_eq!(same_however_cut(SMTP, b"\r"), b"\r\n");
        assert_eq!(same_however_cut(SMTP, b"\n\n.x"), b"\r\n\r\n..x\r\n");
    }

    #[test]
    fn the_dot_of_a_crlf_dot_cut_between_chunks_is_stuffed() {
        // `\r\n.` split after the CR and after the LF: the dot starts a line either way.
        assert_eq!(rewrite(SMTP, &[b"a\r", b"\n.b"]), b"a\r\n..b\r\n");
        assert_eq!(rewrite(SMTP, &[b"a\r\n", b".\r\n"]), b"a\r\n..\r\n");
        // A dot after a lone CR is no line start.
        assert_eq!(rewrite(SMTP, &[b"a\r", b".b"]), b"a\r.b\r\n");
    }

    #[test]
    fn mbox_quotes_from_lines_across_cuts() {
        assert_eq!(
            same_however_cut(
                MBOX,
                b"Subject: x\r\n\r\nFrom here\r\n>From there\r\nFrom\r\n>>From \r\nFro\r\n\
                  >Fromage\r\n>\r\nend"
            ),
            b"Subject: x\n\n>From here\n>>From there\nFrom\n>>>From \nFro\n>Fromage\n>\nend\n"
        );
        assert_eq!(same_however_cut(MBOX, b"From"), b"From\n");
        assert_eq!(same_however_cut(MBOX, b">>"), b">>\n");
        assert_eq!(same_however_cut(MBOX, b"a\r\r\n"), b"a\r\n");
        // Only at the start of a line.
        assert_eq!(same_however_cut(MBOX, b"x From y\n"), b"x From y\n");
    }

    #[test]
    fn a_from_line_cut_between_chunks_is_quoted() {
        assert_eq!(rewrite(MBOX, &[b"a\n", b"From b\n"]), b"a\n>From b\n");
        assert_eq!(rewrite(MBOX, &[b"a\r\nFr", b"om b\r\n"]), b"a\n>From b\n");
        assert_eq!(
            rewrite(MBOX, &[b"a\r", b"\n>", b">From", b" b"]),
            b"a\n>>>From b\n"
        );
        assert_eq!(rewrite(MBOX, &[b"a\nFrom", b"\n"]), b"a\nFrom\n");
    }

    #[test]
    fn lf_turns_crlf_into_lf_and_nothing_else() {
        assert_eq!(same_however_cut(LF, b"a\r\nb\rc\n\r\n"), b"a\nb\rc\n\n");
        assert_eq!(same_however_cut(LF, b".x\r\nFrom y\r"), b".x\nFrom y\r");
        assert_eq!(rewrite(LF, &[b"a\r", b"\nb"]), b"a\nb");
    }
}
