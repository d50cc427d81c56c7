//! What reaches the administrator's terminal: one line per error, output that a closed pipe
//! ends quietly, and bytes from mail shown, never obeyed.
//!
//! Every command prints through here: `main` with [`error_line`], the queue commands with a
//! [`Printer`] (whether the lines come from the running server's control socket or from the
//! command's own run), the reports through [`stdout`].

use std::io::{self, IsTerminal, Write};

use spool_tools::terminal::{escape, escape_line, Safe};

use crate::admin::{raw_bytes, Line, ProgressView};

/// An error and its causes as one line, each said once (no doubled OS error text), with
/// control characters escaped.
pub fn error_line(e: &anyhow::Error) -> String {
    spool_tools::terminal::error_line(e.chain().map(|c| c.to_string()))
}

/// Whether `e` is a write to a closed pipe (`mxspool queue | head`): the reader has all it
/// wants, so the command ends quietly.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Standard output for a report: escaped when it is a terminal, raw otherwise.
pub fn stdout() -> Safe<io::BufWriter<io::StdoutLock<'static>>> {
    let out = io::stdout();
    let tty = out.is_terminal();
    Safe::new(io::BufWriter::new(out.lock()), tty)
}

/// Prints [`Line`]s: results on standard output, errors on standard error, progress as a
/// bar on a terminal. A closed standard output stops the printing, not the work.
pub struct Printer {
    view: ProgressView,
    tty_out: bool,
    closed: bool,
}

impl Default for Printer {
    fn default() -> Self {
        Printer {
            view: ProgressView::default(),
            tty_out: io::stdout().is_terminal(),
            closed: false,
        }
    }
}

impl Printer {
    /// Whether standard output was found closed (its reader went away).
    pub fn closed(&self) -> bool {
        self.closed
    }

    pub fn print(&mut self, line: Line) {
        if let Line::Progress { what, done, total } = &line {
            self.view.update(what, *done, *total);
            return;
        }
        self.view.clear();
        let bytes = match line {
            Line::Progress { .. } => return,
            Line::Err(s) => {
                let _ = writeln!(io::stderr(), "mxspool: {}", escape_line(&s));
                return;
            }
            Line::Out(s) if self.tty_out => {
                let mut b = escape(s.as_bytes());
                b.push(b'\n');
                b
            }
            Line::Out(s) => format!("{s}\n").into_bytes(),
            Line::Raw(s) if self.tty_out => escape(&raw_bytes(&s)),
            Line::Raw(s) => raw_bytes(&s),
        };
        if self.closed {
            return;
        }
        let mut out = io::stdout().lock();
        if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
            self.closed = true;
        }
    }
}
