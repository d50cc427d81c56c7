//! Primary-server mode through SMTP, with the results checked where they land: Maildirs on
//! disk, the next hops of `[[route]]` and the smart host (scriptable receivers), and the
//! replies at RCPT. Everything runs on 127.0.30.0/24: mxspool on 127.0.30.1, the "trusted"
//! client of `[relay] networks` on 127.0.30.100, receivers on 127.0.30.5 and 127.0.30.6;
//! other clients connect from 127.0.0.1 (outside every relay network).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

const IP: &str = "127.0.30.1";
const TRUSTED: &str = "127.0.30.100";

/// Waits (at most 20 s) until the Maildir holds `n` messages and returns them.
pub fn wait_maildir(dir: &Path, n: usize) -> Vec<String> {
    let ok = wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
        maildir_messages(dir).len() >= n
    });
    let got = maildir_messages(dir);
    assert!(
        ok,
        "{} holds {} messages, expected {n}: {got:#?}",
        dir.display(),
        got.len()
    );
    got
}

/// A server on 127.0.30.1 with `tail` as its configuration (`{dir}` is its temp dir).
fn server(tail: &str) -> (MxEnv, Server) {
    let port = closed_port_at(IP);
    let mut env = MxEnv::host("mx.inst.test", IP, port, tail);
    let server = env.start();
    (env, server)
}

/// One transaction from `source` (an address of this machine); returns each RCPT's reply
/// and, when some recipient was accepted, the reply to the end of DATA.
fn transaction(
    addr: &str,
    source: &str,
    from: &str,
    rcpts: &[&str],
    message: &str,
) -> (Vec<Reply>, Option<Reply>) {
    let (mut c, banner) = Smtp::connect_from(addr, source).unwrap();
    assert_eq!(banner.code, 220, "{banner}");
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    let r = c.cmd(&format!("MAIL FROM:<{from}>")).unwrap();
    assert_eq!(r.code, 250, "MAIL: {r}");
    let replies: Vec<Reply> = rcpts
        .iter()
        .map(|r| c.cmd(&format!("RCPT TO:<{r}>")).unwrap())
        .collect();
    let end = if replies.iter().any(|r| r.code == 250) {
        Some(
            c.data(message.replace('\n', "\r\n").as_bytes())
                .unwrap()
                .unwrap_or_else(|r| panic!("DATA refused: {r}")),
        )
    } else {
        None
    };
    let _ = c.cmd("QUIT");
    (replies, end)
}

fn local_tail(extra: &str) -> String {
    format!(
        "[queue]\nretry_interval = \"1h\"\n\n\
         [[local]]\ndomain = \"inst.test\"\nmaildir = \"{{dir}}/mail/{{domain}}/{{user}}\"\nusers = \"inst.users\"\n\n{extra}"
    )
}

fn write_users(env: &MxEnv) {
    fs::write(
        env.dir.path().join("inst.users"),
        "# mailboxes of inst.test\nalice\nbob\npostmaster\n",
    )
    .unwrap();
}

/// Like [`server`], with the users file written before the server starts.
fn local_server(extra: &str) -> (MxEnv, Server) {
    let port = closed_port_at(IP);
    let mut env = MxEnv::host("mx.inst.test", IP, port, &local_tail(extra));
    write_users(&env);
    let server = env.start();
    (env, server)
}

fn mailbox(env: &MxEnv, domain: &str, user: &str) -> PathBuf {
    env.dir.path().join("mail").join(domain).join(user)
}

#[test]
fn local_domains_deliver_to_maildir_and_refuse_unknown_users_at_rcpt() {
    let (env, server) = local_server("");
    let msg = "From: Sender <s@outside.test>\nTo: alice@inst.test\nSubject: hello maildir\n\nline one\n.dot line\nlast line\n";
    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "s@outside.test",
        &[
            "alice@inst.test",
            "Bob+news@INST.test",
            "carol@inst.test",
            "a/b@inst.test",
        ],
        msg,
    );
    assert_eq!(replies[0].code, 250, "{}", replies[0]);
    assert_eq!(replies[1].code, 250, "{}", replies[1]);
    assert_eq!(replies[2].code, 550, "{}", replies[2]);
    assert!(replies[2].to_string().contains("5.1.1"), "{}", replies[2]);
    assert_eq!(replies[3].code, 553, "{}", replies[3]);
    assert_eq!(end.unwrap().code, 250);

    let alice = wait_maildir(&mailbox(&env, "inst.test", "alice"), 1);
    let bob = wait_maildir(&mailbox(&env, "inst.test", "bob"), 1);
    let a = &alice[0];
    assert!(
        a.starts_with("Return-Path: <s@outside.test>\nDelivered-To: alice@inst.test\nReceived: from client.test ([127.0.0.1])"),
        "{a}"
    );
    assert!(!a.contains('\r'), "Maildir files have LF line ends: {a:?}");
    assert!(
        a.ends_with("Subject: hello maildir\n\nline one\n.dot line\nlast line\n"),
        "{a}"
    );
    assert!(
        bob[0].contains("Delivered-To: Bob+news@INST.test\n"),
        "{}",
        bob[0]
    );
    // Maildir's layout: tmp/ is empty again, cur/ exists.
    let alice_dir = mailbox(&env, "inst.test", "alice");
    assert_eq!(fs::read_dir(alice_dir.join("tmp")).unwrap().count(), 0);
    assert!(alice_dir.join("cur").is_dir());
    assert!(!mailbox(&env, "inst.test", "carol").exists());

    // <postmaster> without a domain is the first local domain's postmaster.
    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "s@outside.test",
        &["postmaster"],
        "Subject: to postmaster\n\nhi\n",
    );
    assert_eq!(replies[0].code, 250, "{}", replies[0]);
    assert_eq!(end.unwrap().code, 250);
    wait_maildir(&mailbox(&env, "inst.test", "postmaster"), 1);

    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(50), || env
            .queue(None)
            .is_empty()),
        "queue not empty: {:?}",
        env.queue(None)
    );
    let log = server.log();
    assert!(log.contains("relay=local"), "{log}");
    assert!(
        log.contains("status=sent (250 2.0.0 delivered to maildir"),
        "{log}"
    );
}

#[test]
fn the_virtual_table_rewrites_at_rcpt_and_refuses_error_targets() {
    let port = closed_port_at(IP);
    let routed = Receiver::start(
        format!("127.0.30.5:{port}").parse().unwrap(),
        Behaviour::Accept,
    );
    let mut env = MxEnv::host(
        "mx.inst.test",
        IP,
        port,
        &local_tail(&format!(
            "[virtual]\nfile = \"virtusertable\"\n\n\
             [[route]]\ndomain = \"routed.test\"\nto = [\"127.0.30.5:{port}\"]\n"
        )),
    );
    write_users(&env);
    fs::write(
        env.dir.path().join("virtusertable"),
        "# sendmail virtusertable\n\
         info@inst.test\talice\n\
         sales@inst.test bob@inst.test\n\
         @virt.test %1@inst.test\n\
         @fwd.test %1@routed.test\n\
         gone@inst.test error:nouser\n\
         spam@inst.test error:5.7.0:550 Go away\n",
    )
    .unwrap();
    let _server = env.start();

    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "s@outside.test",
        &[
            "info@inst.test",
            "bob@virt.test",
            "someone@fwd.test",
            "gone@inst.test",
            "spam@inst.test",
            "nobody@virt.test",
        ],
        "Subject: virtual\n\nbody\n",
    );
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    // nobody@virt.test becomes nobody@inst.test, not in the users list.
    assert_eq!(codes, vec![250, 250, 250, 550, 550, 550], "{replies:?}");
    assert!(replies[3].to_string().contains("5.1.1"), "{}", replies[3]);
    assert!(
        replies[4].to_string().contains("5.7.0") && replies[4].to_string().contains("Go away"),
        "{}",
        replies[4]
    );
    assert!(replies[5].to_string().contains("5.1.1"), "{}", replies[5]);
    assert_eq!(end.unwrap().code, 250);

    let alice = wait_maildir(&mailbox(&env, "inst.test", "alice"), 1);
    assert!(
        alice[0].contains("Delivered-To: alice@inst.test\n"),
        "{}",
        alice[0]
    );
    let bob = wait_maildir(&mailbox(&env, "inst.test", "bob"), 1);
    assert!(
        bob[0].contains("Delivered-To: bob@inst.test\n"),
        "{}",
        bob[0]
    );
    assert!(routed.wait_for(1, Duration::from_secs(20)));
    let m = &routed.messages()[0];
    assert_eq!(m.recipients, vec!["someone@routed.test".to_string()]);
    // The address the client gave travels as ORCPT.
    assert!(
        m.rcpt_params[0].contains("ORCPT=rfc822;someone@fwd.test"),
        "{:?}",
        m.rcpt_params
    );
}

#[test]
fn relay_networks_may_relay_through_the_smart_host_and_others_may_not() {
    let port = closed_port_at(IP);
    let routed = Receiver::start(
        format!("127.0.30.5:{port}").parse().unwrap(),
        Behaviour::Accept,
    );
    let smart = Receiver::start(
        format!("127.0.30.6:{port}").parse().unwrap(),
        Behaviour::Accept,
    );
    let (env, server) = server(&format!(
        "[queue]\nretry_interval = \"1h\"\n\n\
         [[route]]\ndomain = \"routed.test\"\nto = [\"127.0.30.5:{port}\"]\n\n\
         [relay]\nnetworks = [\"{TRUSTED}/32\", \"2001:db8::/32\"]\nsmart_host = \"[127.0.30.6]:{port}\"\n"
    ));

    // Outside: only our own (routed) domains.
    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "s@outside.test",
        &[
            "x@elsewhere.test",
            "x@routed.test",
            "u%elsewhere.test@routed.test",
        ],
        "Subject: from outside\n\nbody\n",
    );
    assert_eq!(replies[0].code, 550, "{}", replies[0]);
    assert!(replies[0].to_string().contains("5.7.1"), "{}", replies[0]);
    assert_eq!(replies[1].code, 250, "{}", replies[1]);
    assert_eq!(replies[2].code, 550, "routing through us: {}", replies[2]);
    assert_eq!(end.unwrap().code, 250);
    assert!(routed.wait_for(1, Duration::from_secs(20)));
    assert_eq!(routed.messages()[0].recipients, vec!["x@routed.test"]);
    // The refusal is logged the way Postfix logs it.
    let log = server.log();
    assert!(
        log.contains("NOQUEUE: reject: RCPT from [127.0.0.1]: 550 5.7.1 <x@elsewhere.test>: Relay access denied; from=<s@outside.test> to=<x@elsewhere.test> helo=<client.test>"),
        "{log}"
    );

    // Inside: anywhere, through the smart host; routed domains still by their route.
    let (replies, end) = transaction(
        &env.addr(),
        TRUSTED,
        "me@inst.test",
        &["x@elsewhere.test", "y@routed.test"],
        "Subject: from inside\n\nbody\n",
    );
    assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
    assert_eq!(end.unwrap().code, 250);
    assert!(smart.wait_for(1, Duration::from_secs(20)));
    assert!(routed.wait_for(2, Duration::from_secs(20)));
    let m = &smart.messages()[0];
    assert_eq!(m.recipients, vec!["x@elsewhere.test"]);
    assert_eq!(m.sender, "me@inst.test");
    assert_eq!(routed.messages()[1].recipients, vec!["y@routed.test"]);
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || env.queue(None).is_empty()
    ));
}

#[test]
fn mail_from_relay_networks_is_masqueraded() {
    let port = closed_port_at(IP);
    let smart = Receiver::start(
        format!("127.0.30.6:{port}").parse().unwrap(),
        Behaviour::Accept,
    );
    let (env, _server) = local_server(&format!(
        "[relay]\nnetworks = [\"{TRUSTED}/32\"]\nsmart_host = \"127.0.30.6:{port}\"\n\n\
         [masquerade]\nas = \"inst.test\"\ndomains = [\"inst.test\"]\nenvelope = true\n"
    ));
    let msg = "From: Joe Bloggs <joe@ws1.lab.inst.test>\n\
               Sender: \"joe@ws1.inst.test\" <joe@ws1.inst.test>\n\
               Reply-To: joe@ws1.lab.inst.test\n\
               To: friend@elsewhere.test,\n alice@inst.test\n\
               Subject: masquerade\n\n\
               From: joe@ws1.inst.test in the body stays\n";
    let (replies, end) = transaction(
        &env.addr(),
        TRUSTED,
        "joe@ws1.lab.inst.test",
        &["friend@elsewhere.test", "alice@inst.test"],
        msg,
    );
    assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
    assert_eq!(end.unwrap().code, 250);
    assert!(smart.wait_for(1, Duration::from_secs(20)));
    let m = &smart.messages()[0];
    assert_eq!(m.sender, "joe@inst.test");
    let data = String::from_utf8_lossy(&m.data).into_owned();
    let sent = msg.replace('\n', "\r\n");
    let expect = sent
        .replace(
            "From: Joe Bloggs <joe@ws1.lab.inst.test>",
            "From: Joe Bloggs <joe@inst.test>",
        )
        .replace(
            "Sender: \"joe@ws1.inst.test\" <joe@ws1.inst.test>",
            "Sender: \"joe@ws1.inst.test\" <joe@inst.test>",
        );
    assert!(
        data.ends_with(&expect),
        "got:\n{data}\nexpected to end with:\n{expect}"
    );
    // The local copy is masqueraded the same way.
    let alice = wait_maildir(&mailbox(&env, "inst.test", "alice"), 1);
    assert!(
        alice[0].starts_with("Return-Path: <joe@inst.test>\n"),
        "{}",
        alice[0]
    );
    assert!(
        alice[0].contains("From: Joe Bloggs <joe@inst.test>\n"),
        "{}",
        alice[0]
    );

    // From outside, nothing is rewritten.
    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "joe@ws1.inst.test",
        &["alice@inst.test"],
        "From: joe@ws1.inst.test\nSubject: outside\n\nbody\n",
    );
    assert_eq!(replies[0].code, 250);
    assert_eq!(end.unwrap().code, 250);
    let alice = wait_maildir(&mailbox(&env, "inst.test", "alice"), 2);
    let outside = alice
        .iter()
        .find(|m| m.contains("Subject: outside"))
        .unwrap();
    assert!(
        outside.starts_with("Return-Path: <joe@ws1.inst.test>\n"),
        "{outside}"
    );
    assert!(outside.contains("From: joe@ws1.inst.test\n"), "{outside}");
}

#[test]
fn local_delivery_failures_are_retried_and_bounce_when_they_expire() {
    let port = closed_port_at(IP);
    let mut env = MxEnv::host(
        "mx.inst.test",
        IP,
        port,
        "[queue]\nretry_interval = \"1s\"\nmax_lifetime = \"1h\"\n\n\
         [[local]]\ndomain = \"inst.test\"\nmaildir = \"{dir}/mail/{domain}/{user}\"\n\n\
         [[local]]\ndomain = \"broken.test\"\nmaildir = \"{dir}/blocker/{user}\"\n",
    );
    // A file where a directory should be: every delivery to broken.test fails (even as root).
    let blocker = env.dir.path().join("blocker");
    fs::write(&blocker, "not a directory").unwrap();
    let mut server = env.start();
    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "alice@inst.test",
        &["x@broken.test"],
        "Subject: to a broken mailbox\n\nbody\n",
    );
    assert_eq!(replies[0].code, 250);
    assert_eq!(end.unwrap().code, 250);
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
            env.queue(None).first().is_some_and(|e| e.attempts >= 2)
        }),
        "no retries: {:?}\n{}",
        env.queue(None),
        server.log()
    );
    let q = env.queue(None);
    let err = q[0].last_error.clone().unwrap_or_default();
    assert!(err.contains("blocker"), "{q:?}");
    assert!(server.log().contains("status=deferred"), "{}", server.log());

    // Repaired: the next try delivers.
    fs::remove_file(&blocker).unwrap();
    wait_maildir(&env.dir.path().join("blocker/x"), 1);
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || env.queue(None).is_empty()
    ));

    // Broken for longer than max_lifetime: a bounce to the (local) sender.
    stop_server(&mut server);
    fs::remove_dir_all(&blocker).unwrap();
    fs::write(&blocker, "not a directory").unwrap();
    let cfg = fs::read_to_string(&env.config)
        .unwrap()
        .replace("max_lifetime = \"1h\"", "max_lifetime = \"3s\"");
    fs::write(&env.config, cfg).unwrap();
    let server = env.start();
    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "alice@inst.test",
        &["y@broken.test"],
        "Subject: never arrives\n\nbody\n",
    );
    assert_eq!(replies[0].code, 250);
    assert_eq!(end.unwrap().code, 250);
    let dsn = wait_maildir(&mailbox(&env, "inst.test", "alice"), 1);
    let d = &dsn[0];
    assert!(d.contains("Return-Path: <>\n"), "{d}");
    assert!(d.contains("Final-Recipient: rfc822; y@broken.test"), "{d}");
    assert!(d.contains("Action: failed"), "{d}");
    assert!(d.contains("Subject: never arrives"), "{d}");
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(50), || env
            .queue(None)
            .is_empty()),
        "{}",
        server.log()
    );
}

#[test]
fn a_local_domain_over_lmtp_gets_per_recipient_results_from_dovecot() {
    let dovecot = crate::dovecot::Dovecot::start();
    let socket = dovecot.lmtp_socket();
    let (env, server) = local_server(&format!(
        "[[local]]\ndomain = \"example.org\"\nlmtp = \"{}\"\n",
        socket.display()
    ));
    let big = format!(
        "Subject: over lmtp\n\n{}\n",
        "quota filler line\n".repeat(200)
    );
    let (replies, end) = transaction(
        &env.addr(),
        "127.0.0.1",
        "alice@inst.test",
        &[
            "carl@example.org",
            crate::dovecot::UNKNOWN_USER,
            crate::dovecot::FULL_USER,
        ],
        &big,
    );
    assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
    assert_eq!(end.unwrap().code, 250);
    // Carl's copy is in Dovecot's Maildir; the two refusals bounce to the (local) sender.
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
            !dovecot.messages("example.org", "carl").is_empty()
        }),
        "nothing for carl:\n{}\n{}",
        server.log(),
        dovecot.log()
    );
    let carl = String::from_utf8_lossy(&dovecot.messages("example.org", "carl")[0]).into_owned();
    assert!(carl.contains("Subject: over lmtp"), "{carl}");
    assert!(carl.contains("by mx.inst.test (mxspool)"), "{carl}");
    let dsn = wait_maildir(&mailbox(&env, "inst.test", "alice"), 1);
    let d = &dsn[0];
    assert!(
        d.contains("Final-Recipient: rfc822; nosuchuser@example.org"),
        "{d}"
    );
    assert!(
        d.contains("Final-Recipient: rfc822; full@example.org"),
        "{d}"
    );
    assert!(
        d.contains("Status: 5.1.1") && d.contains("Status: 5.2.2"),
        "{d}"
    );
    assert!(
        !d.contains("Final-Recipient: rfc822; carl@example.org"),
        "{d}"
    );
    let log = server.log();
    assert!(
        log.contains(&format!("relay={}", socket.display())),
        "{log}"
    );
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || env.queue(None).is_empty()
    ));
}
