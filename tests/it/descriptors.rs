//! File descriptors: `serve` raises its soft limit to the hard one, and a flood of
//! connections gets `421 4.7.0` (or waits in the listen queue) before it can take the
//! descriptors the spool needs: mail that arrives meanwhile and afterwards is stored, with
//! memtable flushes to new table files, and no restart is needed.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// `mxspool serve` with `RLIMIT_NOFILE` set to `soft`/`hard` before it starts.
fn start_limited(env: &MxEnv, soft: u64, hard: u64) -> Server {
    let log = env.dir.path().join("server.log");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(&env.config)
        .arg("serve")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap());
    // SAFETY: setrlimit(2) is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn mxspool serve");
    let server = Server {
        child,
        log,
        addr: env.addr(),
    };
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            TcpStream::connect(env.addr()).is_ok()
        }),
        "server did not start: {}",
        server.log()
    );
    server
}

fn greeting(s: &TcpStream) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.get(..3)?.parse().ok()
}

#[test]
fn the_soft_limit_is_raised_to_the_hard_one() {
    let env = MxEnv::new();
    let mut server = start_limited(&env, 256, 4096);
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || server
            .log()
            .contains("descriptor limit raised from 256 to 4096")),
        "{}",
        server.log()
    );
    assert!(stop_server(&mut server));
}

#[test]
fn a_connection_flood_never_takes_the_spools_descriptors() {
    // The default max_connections (1000) is far more than 512 descriptors allow.
    let env = MxEnv::new();
    let mut server = start_limited(&env, 512, 512);
    assert!(
        server.log().contains("at most") && server.log().contains("raise LimitNOFILE"),
        "{}",
        server.log()
    );

    // 600 connections held open: some are served, the rest refused or kept waiting.
    let mut held = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..600 {
        let Ok(s) = TcpStream::connect(env.addr()) else {
            continue;
        };
        match greeting(&s) {
            Some(220) => served += 1,
            Some(421) => refused += 1,
            _ => {}
        }
        held.push(s);
    }
    eprintln!("flood: {served} served, {refused} refused (421), the rest waiting");
    assert!(served > 0 && served < 512, "served {served}");
    assert!(refused > 0, "nobody was refused");

    // Meanwhile the server's own descriptors: the spool flushes 1 MiB messages to new
    // table files. Mail is sent as soon as a session frees up: close the served ones.
    held.clear();
    // The server sees the flood's sessions end as it reads their EOFs, which can take a
    // moment on a busy machine: until then the address is still at max_connections_per_ip.
    // Wait until ten sessions at once are greeted with 220 (and end them with QUIT).
    let freed = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let probes: Vec<_> = (0..10)
            .filter_map(|_| Smtp::connect(&env.addr()).ok())
            .collect();
        let all = probes.len() == 10 && probes.iter().all(|(_, b)| b.code == 220);
        for (mut c, _) in probes {
            let _ = c.cmd("QUIT");
        }
        all
    });
    assert!(
        freed,
        "sessions did not free up after the flood ended:\n{}",
        server.log()
    );
    std::thread::sleep(Duration::from_millis(200));
    let line = format!("{}\r\n", "y".repeat(998));
    let big = format!("Subject: big\r\n\r\n{}", line.repeat(1 << 10));
    let mut ids = Vec::new();
    for i in 0..48 {
        ids.push(smtp_send(
            &env.addr(),
            "alice@sender.test",
            &[&format!("u{i}@example.com")],
            big.as_bytes(),
        ));
    }
    let spool = spool_dir(&env);
    let tables = std::fs::read_dir(&spool)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.ends_with(".sst") || n.ends_with(".blob")
        })
        .count();
    assert!(tables > 0, "no flush happened");
    let queued = env.queue(None);
    for id in &ids {
        assert!(queued.iter().any(|e| e.id == *id), "{id} not queued");
    }
    assert!(
        !server.log().contains("Too many open files"),
        "{}",
        server.log()
    );
    assert!(stop_server(&mut server));
}
