use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Whatever this process creates (spool files, archives, the control socket) is private
    // to its user, whatever umask it was started with.
    // SAFETY: umask(2) cannot fail.
    unsafe { libc::umask(0o077) };
    let args = match mxspool::cli::Args::try_parse() {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    match mxspool::cli::run(args) {
        Ok(code) => code,
        // `mxspool queue | head`: the reader has what it wants.
        Err(e) if mxspool::ops::output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One readable line, never a stack trace, each cause said once.
            say(&mxspool::ops::output::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Help and version as clap prints them; a usage error as one line that names what is
/// wrong (a missing argument, an unknown option) and the usage.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(2);
    }
    let text = e.render().to_string();
    let mut what = Vec::new();
    let mut usage = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage: ") {
            usage = Some(u.to_string());
        } else if line.starts_with("For more information") || line.starts_with("tip:") {
            continue;
        } else {
            what.push(line.strip_prefix("error: ").unwrap_or(line).to_string());
        }
    }
    let mut line = what.join(" ");
    if let Some(u) = usage {
        line.push_str(&format!(" (usage: {u})"));
    }
    say(&spool_tools::terminal::escape_line(&line));
    ExitCode::from(2)
}

/// One line on standard error (a closed standard error is no reason to panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "mxspool: {line}");
}
