//! mboxrd output: a `From ` line per message, `From ` lines of the message (quoted or not)
//! quoted with one more `>`, LF line ends, a blank line after each message; the message
//! streamed through [`Lines`] chunk by chunk.

use std::io::{self, Write};

use spool_tools::{ArchivedEnvelope, MessageBytes};

use crate::lines::{Lines, MBOX};

/// Appends one message to an mboxrd stream, chunk by chunk as it is read.
pub fn write_message(
    out: &mut impl Write,
    env: &ArchivedEnvelope,
    message: &mut MessageBytes<'_>,
) -> io::Result<()> {
    out.write_all(from_line(env).as_bytes())?;
    let mut lines = Lines::new(&mut *out, MBOX);
    while let Some(chunk) = message.next_chunk()? {
        lines.write(chunk)?;
    }
    lines.finish()?;
    out.write_all(b"\n")
}

/// `From sender Www Mmm dd hh:mm:ss yyyy` (UTC, asctime), `MAILER-DAEMON` for `<>`.
fn from_line(env: &ArchivedEnvelope) -> String {
    let sender: String = if env.sender.is_empty() {
        "MAILER-DAEMON".to_string()
    } else {
        // The From_ line is split on white space: keep the sender one word.
        env.sender
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect()
    };
    let date = env.arrival.format("%a %b %e %H:%M:%S %Y");
    format!("From {sender} {date}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_from_line_names_the_sender_and_the_arrival() {
        let env: ArchivedEnvelope = serde_json::from_value(serde_json::json!({
            "id": "A1", "domain": "d.example", "sender": "",
            "recipients": [{"address": "u@d.example"}],
            "arrival": "2024-01-02T03:04:05.000Z"
        }))
        .unwrap();
        assert_eq!(
            from_line(&env),
            "From MAILER-DAEMON Tue Jan  2 03:04:05 2024\n"
        );
        let env = ArchivedEnvelope {
            sender: "a b@x.example".into(),
            ..env
        };
        assert_eq!(
            from_line(&env),
            "From a_b@x.example Tue Jan  2 03:04:05 2024\n"
        );
    }
}
