//! The Debian package: `contrib/deb/build` makes it (cargo-deb must be installed; CI
//! installs it), and what is inside is what an administrator gets: both binaries stripped,
//! the man pages (rendered), the completions, the unit, the configuration as a conffile,
//! the postinst that creates the user and the spool. Unpacked into a scratch directory it
//! runs; as root under CI it is installed, removed and purged for real.

use std::path::Path;
use std::process::Command;

use crate::harness::*;

fn listing(deb: &Path) -> Vec<String> {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb), 60);
    check_ok("dpkg-deb -c", &out);
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

fn field(deb: &Path, name: &str) -> String {
    let out = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name), 60);
    check_ok("dpkg-deb -f", &out);
    text(&out.stdout).trim().to_string()
}

/// The ELF section names of `binary` (readelf, from binutils).
fn sections(binary: &Path) -> String {
    let out = run(Command::new(tool("readelf")).arg("-S").arg(binary), 60);
    check_ok("readelf -S", &out);
    text(&out.stdout)
}

/// `man -l PAGE` renders without a warning and says `want`.
fn assert_man_renders(page: &Path, want: &str) {
    let out = run(
        Command::new(tool("man"))
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat"),
        60,
    );
    check_ok(&format!("man -l {}", page.display()), &out);
    // Bold and underline as overstrikes (`X\x08X`, `_\x08X`): the letters alone.
    let raw = text(&out.stdout);
    let mut shown = String::new();
    for c in raw.chars() {
        if c == '\u{8}' {
            shown.pop();
        } else {
            shown.push(c);
        }
    }
    assert!(
        shown.contains(want),
        "{}: no {want:?} in\n{shown}",
        page.display()
    );
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}: {}",
        page.display(),
        text(&out.stderr)
    );
}

#[test]
fn the_debian_package_carries_binaries_manual_completions_unit_and_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("mxspool.deb");
    // Needs cargo-deb: a missing one fails here, with the build's own message.
    let out = run(
        Command::new("bash")
            .arg(root.join("contrib/deb/build"))
            .arg(&deb)
            .env("CARGO_TARGET_DIR", target_dir())
            .current_dir(root),
        1800,
    );
    check_ok("contrib/deb/build", &out);
    assert!(deb.is_file(), "no package at {}", deb.display());

    assert_eq!(field(&deb, "Package"), "mxspool");
    assert_eq!(field(&deb, "Section"), "mail");
    assert!(field(&deb, "Depends").contains("libc6"));

    let files = listing(&deb);
    for want in [
        "/usr/bin/mxspool",
        "/usr/bin/spool-tools",
        "/etc/mxspool/mxspool.toml",
        "/usr/lib/systemd/system/mxspool.service",
        "/usr/share/man/man8/mxspool.8.gz",
        "/usr/share/man/man8/mxspool-queue.8.gz",
        "/usr/share/man/man8/mxspool-flush.8.gz",
        "/usr/share/man/man1/spool-tools.1.gz",
        "/usr/share/man/man5/mxspool.toml.5.gz",
        "/usr/share/bash-completion/completions/mxspool",
        "/usr/share/bash-completion/completions/spool-tools",
        "/usr/share/zsh/vendor-completions/_mxspool",
        "/usr/share/fish/vendor_completions.d/mxspool.fish",
        "/usr/share/doc/mxspool/docs/configuration.md",
    ] {
        assert!(files.iter().any(|f| f == want), "no {want} in {files:#?}");
    }

    // The configuration is a conffile; the maintainer scripts are there.
    let control = dir.path().join("control");
    let out = run(
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
        60,
    );
    check_ok("dpkg-deb -e", &out);
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/mxspool/mxspool.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("useradd --system"), "{postinst}");
    assert!(
        postinst.contains("install -d -m 0700 -o mxspool"),
        "{postinst}"
    );

    // Unpacked: the binaries run and carry no debug info; the pages render.
    let unpacked = dir.path().join("root");
    let out = run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        120,
    );
    check_ok("dpkg-deb -x", &out);
    for bin in ["mxspool", "spool-tools"] {
        let path = unpacked.join("usr/bin").join(bin);
        let out = run(Command::new(&path).arg("--version"), 30);
        check_ok(&format!("{bin} --version"), &out);
        assert_eq!(
            text(&out.stdout).trim(),
            format!("{bin} {}", env!("CARGO_PKG_VERSION"))
        );
        let s = sections(&path);
        assert!(!s.contains(".debug_info"), "{bin} is not stripped:\n{s}");
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 64 << 20, "{bin} is {size} bytes");
    }
    let man = unpacked.join("usr/share/man");
    assert_man_renders(&man.join("man8/mxspool.8.gz"), "mxspool-flush(8)");
    assert_man_renders(&man.join("man8/mxspool-queue.8.gz"), "--json");
    assert_man_renders(&man.join("man1/spool-tools.1.gz"), "spool-tools");
    assert_man_renders(&man.join("man5/mxspool.toml.5.gz"), "max_message_size");
    let bash =
        std::fs::read_to_string(unpacked.join("usr/share/bash-completion/completions/mxspool"))
            .unwrap();
    assert!(
        bash.contains("complete -F") && bash.contains("flush"),
        "{bash}"
    );
    // The packaged configuration parses once its one required key is given.
    let config = std::fs::read_to_string(unpacked.join("etc/mxspool/mxspool.toml")).unwrap();
    let edited = dir.path().join("edited.toml");
    std::fs::write(
        &edited,
        config.replace(
            "# hostname = \"mx2.example.net\"",
            "hostname = \"mx2.example.net\"",
        ),
    )
    .unwrap();
    let out = run(
        Command::new(BIN)
            .arg("--config")
            .arg(&edited)
            .arg("check-config"),
        30,
    );
    check_ok("check-config of the packaged configuration", &out);

    if std::env::var_os("CI").is_some() {
        install_for_real(&deb);
    }
}

/// Under CI (root, a throw-away machine): `dpkg -i` creates the user and the private spool;
/// `dpkg -r` removes the binaries and keeps the conffile; `dpkg -P` removes it and keeps
/// the spool.
fn install_for_real(deb: &Path) {
    // SAFETY: getuid(2) cannot fail.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "CI installs the package as root"
    );
    let out = run(Command::new("dpkg").arg("-i").arg(deb), 300);
    check_ok("dpkg -i", &out);
    let out = run(Command::new("/usr/bin/mxspool").arg("--version"), 30);
    check_ok("/usr/bin/mxspool --version", &out);
    let out = run(Command::new("getent").args(["passwd", "mxspool"]), 30);
    check_ok("getent passwd mxspool", &out);
    let uid: u32 = text(&out.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    let spool = std::fs::metadata("/var/spool/mxspool").unwrap();
    assert_eq!(spool.uid(), uid);
    assert_eq!(spool.mode() & 0o7777, 0o700);
    // (The pages themselves were rendered from the unpacked package above: a slim image's
    // dpkg may be told to leave /usr/share/man out.)
    let out = run(
        Command::new(tool("systemd-analyze")).args([
            "verify",
            "--man=no",
            "/usr/lib/systemd/system/mxspool.service",
        ]),
        60,
    );
    check_ok("systemd-analyze verify of the installed unit", &out);

    let out = run(Command::new("dpkg").args(["-r", "mxspool"]), 300);
    check_ok("dpkg -r", &out);
    assert!(!Path::new("/usr/bin/mxspool").exists());
    assert!(Path::new("/etc/mxspool/mxspool.toml").exists());
    let out = run(Command::new("dpkg").args(["-P", "mxspool"]), 300);
    check_ok("dpkg -P", &out);
    assert!(!Path::new("/etc/mxspool/mxspool.toml").exists());
    assert!(Path::new("/var/spool/mxspool").is_dir());
}
