//! mboxrd output: a `From ` line per message, `From ` lines of the message (quoted or not)
//! quoted with one more `>`, LF line ends, a blank line after each message.

use std::io::{self, Write};

use spool_tools::ArchivedEnvelope;

/// Appends one message to an mboxrd stream.
pub fn write_message(
    out: &mut impl Write,
    env: &ArchivedEnvelope,
    message: &[u8],
) -> io::Result<()> {
    out.write_all(from_line(env).as_bytes())?;
    let mut ended = true;
    for line in message.split_inclusive(|&b| b == b'\n') {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if needs_quoting(content) {
            out.write_all(b">")?;
        }
        out.write_all(content)?;
        ended = line.ends_with(b"\n");
        if ended {
            out.write_all(b"\n")?;
        }
    }
    if !ended {
        out.write_all(b"\n")?;
    }
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

/// mboxrd: `>*From ` gets one more `>`.
fn needs_quoting(line: &[u8]) -> bool {
    let rest = &line[line.iter().take_while(|&&b| b == b'>').count()..];
    rest.starts_with(b"From ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_from_lines_mboxrd_style() {
        let env: ArchivedEnvelope = serde_json::from_value(serde_json::json!({
            "id": "A1", "domain": "d.example", "sender": "",
            "recipients": [{"address": "u@d.example"}],
            "arrival": "2024-01-02T03:04:05.000Z"
        }))
        .unwrap();
        let mut out = Vec::new();
        write_message(
            &mut out,
            &env,
            b"Subject: x\r\n\r\nFrom here\r\n>From there\r\nFrom\r\nend",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "From MAILER-DAEMON Tue Jan  2 03:04:05 2024\n\
             Subject: x\n\n>From here\n>>From there\nFrom\nend\n\n"
        );
    }
}
