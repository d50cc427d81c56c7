use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = mxspool::cli::Args::parse();
    match mxspool::cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One readable line, never a stack trace.
            eprintln!("mxspool: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
