//! A disk that fails and comes back: RocksDB stops every write after a failed log write (a
//! "hard" background error) and would refuse mail until a restart; mxspool reopens its
//! database with back-off and takes mail again once the disk works, without a restart and
//! without losing what it had acknowledged. The failing disk is faultfs's (SIGUSR2: every
//! change fails with EIO until the next SIGUSR2).

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::power_loss::{durable_dir, use_spool, FaultMount};

/// One message on a fresh connection: the reply to its final dot (or why there was none).
fn try_send(addr: &str, n: u32) -> Result<String, String> {
    let (mut c, _) = Smtp::connect(addr).map_err(|e| e.to_string())?;
    c.cmd("EHLO client.test").map_err(|e| e.to_string())?;
    let r = c
        .cmd("MAIL FROM:<a@sender.test>")
        .map_err(|e| e.to_string())?;
    if r.code != 250 {
        return Err(r.to_string());
    }
    c.cmd("RCPT TO:<bob@example.com>")
        .map_err(|e| e.to_string())?;
    let msg = format!("Subject: io {n}\r\n\r\nbody {n}\r\n");
    let r = c.data(msg.as_bytes()).map_err(|e| e.to_string())?;
    let _ = c.cmd("QUIT");
    match r {
        Ok(r) if r.code == 250 => Ok(r.to_string().rsplit(' ').next().unwrap().to_string()),
        Ok(r) | Err(r) => Err(r.to_string()),
    }
}

#[test]
fn mail_is_taken_again_once_a_failing_disk_recovers_without_a_restart() {
    let mut env = MxEnv::new();
    let mut fs = FaultMount::mount(&env.dir.path().join("mnt"));
    let spool = fs.dir.join("spool");
    durable_dir(&spool);
    use_spool(&env, &spool);
    let server = env.start();

    let mut acked = Vec::new();
    for n in 0..5 {
        acked.push(try_send(&env.addr(), n).expect("mail taken before the fault"));
    }

    // The disk fails: mail is refused with a temporary error, never acknowledged.
    fs.failing(true);
    let mut refused = 0;
    for n in 100..110 {
        match try_send(&env.addr(), n) {
            Ok(id) => panic!("acknowledged {id} while every write fails"),
            Err(r) => {
                assert!(r.starts_with("451") || r.starts_with("452"), "{r}");
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(refused, 10);

    // The disk is back: within the back-off, mail is taken again by the same process.
    fs.failing(false);
    let back = Instant::now();
    let mut taken = None;
    for n in 200..400 {
        if let Ok(id) = try_send(&env.addr(), n) {
            taken = Some(id);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let Some(id) = taken else {
        panic!(
            "still refusing mail 100 s after the disk came back:\n{}",
            server.log()
        );
    };
    eprintln!(
        "mail taken again {:.1} s after the disk came back",
        back.elapsed().as_secs_f64()
    );
    acked.push(id);
    let log = server.log();
    for line in log.lines().filter(|l| l.contains("spool")) {
        eprintln!("  {line}");
    }
    assert!(log.contains("database reopened"), "{log}");
    let queued: Vec<String> = env.queue(None).into_iter().map(|e| e.id).collect();
    for id in &acked {
        assert!(
            queued.contains(id),
            "{id} acknowledged but not queued: {queued:?}"
        );
    }
}
