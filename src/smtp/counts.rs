//! Postfix's per-session command counts for the `disconnect from` log line
//! (`ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6`). Pure code: the driver hands it what
//! the client sent while the session was reading commands.

/// Commands seen in one session, by verb, in the order first seen.
#[derive(Clone, Debug, Default)]
pub struct CommandCounts {
    verbs: Vec<(String, usize)>,
    /// Bytes of a command line not yet ended by LF.
    partial: Vec<u8>,
}

/// The verbs counted by name; anything else counts as `unknown`.
const VERBS: &[&str] = &[
    "helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset", "noop", "vrfy",
    "expn", "etrn", "help", "quit",
];

impl CommandCounts {
    /// Count the command lines in `bytes`, received while the session read commands. Stops
    /// at a `DATA` line: what follows in the same read is message content.
    pub fn commands(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            let line = std::mem::take(&mut self.partial);
            if self.count(&line) == "data" {
                return;
            }
        }
        if self.partial.len() < 1024 {
            self.partial.extend_from_slice(rest);
        }
    }

    /// Forget a partial line (the session went into DATA or ended).
    pub fn reset_line(&mut self) {
        self.partial.clear();
    }

    fn count(&mut self, line: &[u8]) -> &'static str {
        let word: String = line
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .map(|b| b.to_ascii_lowercase() as char)
            .collect();
        if word.is_empty() && line.iter().all(|b| b.is_ascii_whitespace()) {
            return "";
        }
        let verb = VERBS
            .iter()
            .find(|v| **v == word)
            .copied()
            .unwrap_or("unknown");
        match self.verbs.iter_mut().find(|(v, _)| v == verb) {
            Some((_, n)) => *n += 1,
            None => self.verbs.push((verb.to_string(), 1)),
        }
        verb
    }

    /// `ehlo=1 mail=1 ... commands=N` (`commands=0` for a client that sent nothing).
    pub fn summary(&self) -> String {
        let total: usize = self.verbs.iter().map(|(_, n)| n).sum();
        let mut s: Vec<String> = self.verbs.iter().map(|(v, n)| format!("{v}={n}")).collect();
        s.push(format!("commands={total}"));
        s.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_postfix_and_stops_at_data() {
        let mut c = CommandCounts::default();
        c.commands(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRC");
        c.commands(b"PT TO:<c@d>\r\nDATA\r\nSubject: not a command\r\n");
        c.reset_line();
        c.commands(b"QUIT\r\n");
        assert_eq!(c.summary(), "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5");
        let mut e = CommandCounts::default();
        e.commands(b"FROB\r\n\r\n");
        assert_eq!(e.summary(), "unknown=1 commands=1");
        assert_eq!(CommandCounts::default().summary(), "commands=0");
    }
}
