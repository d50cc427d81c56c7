//! `mxspool-dist`: what the Debian package (and any other packaging) installs besides the
//! binaries, rendered from the sources so it cannot drift from them:
//!
//! - `mxspool-dist man DIR`: `mxspool(8)` and one `mxspool-COMMAND(8)` per command,
//!   `spool-tools(1)` and its commands' pages, from the clap definitions (clap_mangen);
//!   `mxspool.toml(5)` from `docs/configuration.md`. Written gzip-compressed (`.gz`, no
//!   time stamp, so builds are reproducible), as Debian installs man pages.
//! - `mxspool-dist completions DIR`: bash, zsh and fish completions of both commands
//!   (clap_complete), under the names those shells look for.

mod roff;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

#[derive(Parser)]
#[command(
    name = "mxspool-dist",
    version,
    about = "Render mxspool's man pages and completions"
)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Write the man pages (gzip-compressed) into DIR.
    Man {
        dir: PathBuf,
        /// The configuration reference rendered as mxspool.toml(5).
        #[arg(long, value_name = "PATH", default_value = CONFIG_DOC)]
        config_doc: PathBuf,
    },
    /// Write the bash, zsh and fish completions into DIR.
    Completions { dir: PathBuf },
}

const CONFIG_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
const SOURCE: &str = concat!("mxspool ", env!("CARGO_PKG_VERSION"));
const MANUAL: &str = "mxspool manual";

/// What mxspool(8) says beyond the options: the files, the exit statuses, the signals.
const MXSPOOL_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/mxspool/mxspool.toml\fR
The configuration (\fB\-\-config\fR); see \fBmxspool.toml\fR(5).
.TP
\fI/var/spool/mxspool\fR
The spool (the configuration's \fBspool\fR): a RocksDB database, mode 0700, owned by the
user mxspool runs as.
.SH EXIT STATUS
0 on success; 1 when a command fails (one line on standard error says why) or, for
\fBflush\fR, when mail stays queued; 2 for a usage error.
.SH SIGNALS
SIGHUP re-reads the configuration and its tables, as \fBmxspool reload\fR does.
SIGTERM and SIGINT stop accepting, answer idle sessions 421 4.3.2, let messages in DATA
finish, then exit.
.SH SEE ALSO
\fBmxspool.toml\fR(5), \fBspool\-tools\fR(1), \fBpostqueue\fR(1), \fBsendmail\fR(8)
"#;

const SPOOL_TOOLS_EXTRA: &str = r#".SH EXIT STATUS
0 on success; 1 when the archive is damaged or a message could not be replayed; 2 for a
usage error.
.SH SEE ALSO
\fBmxspool\fR(8), \fBmxspool\-export\fR(8), \fBmxspool\-import\fR(8)
"#;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let done = match args.what {
        What::Man { dir, config_doc } => man(&dir, &config_doc),
        What::Completions { dir } => completions(&dir),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let causes: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("mxspool-dist: {}", causes.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}

fn man(dir: &Path, config_doc: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    pages(mxspool::cli::Args::command(), "8", MXSPOOL_EXTRA, dir)?;
    pages(
        spool_tools::cli::Cli::command(),
        "1",
        SPOOL_TOOLS_EXTRA,
        dir,
    )?;
    let markdown = fs::read_to_string(config_doc)
        .with_context(|| format!("cannot read {}", config_doc.display()))?;
    let page = roff::man_page(&markdown, "mxspool.toml", "5", SOURCE, MANUAL);
    write_gz(&dir.join("mxspool.toml.5.gz"), page.as_bytes())
}

/// The page of `cmd` and of each of its (visible) subcommands, `extra` at the end of the
/// top one.
fn pages(cmd: clap::Command, section: &str, extra: &str, dir: &Path) -> anyhow::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = render(sub.clone(), section)?;
        write_gz(
            &dir.join(format!("{}.{section}.gz", display_name(sub))),
            &page,
        )?;
    }
    let mut page = render(cmd.clone(), section)?;
    page.extend_from_slice(extra.as_bytes());
    write_gz(
        &dir.join(format!("{}.{section}.gz", display_name(&cmd))),
        &page,
    )
}

fn display_name(cmd: &clap::Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

fn render(cmd: clap::Command, section: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .section(section)
        .source(SOURCE)
        .manual(MANUAL)
        .render(&mut out)?;
    Ok(out)
}

fn write_gz(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    // No file name and a zero time stamp in the header: the same input gives the same file.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(file, flate2::Compression::best());
    gz.write_all(bytes)?;
    gz.finish()?.sync_all()?;
    Ok(())
}

fn completions(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (mut cmd, name) in [
        (mxspool::cli::Args::command(), "mxspool"),
        (spool_tools::cli::Cli::command(), "spool-tools"),
    ] {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let file = match shell {
                Shell::Bash => name.to_string(),
                Shell::Zsh => format!("_{name}"),
                _ => format!("{name}.fish"),
            };
            let path = dir.join(shell.to_string()).join(file);
            fs::create_dir_all(path.parent().expect("a file in a folder"))?;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, name, &mut out);
            fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}
