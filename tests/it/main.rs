//! Integration tests: mxspool as a real server, driven by real SMTP peers (Python's smtplib,
//! swaks, a private Postfix instance) and killed mid-stream. One test binary, `it`.
//!
//! Needs python3, swaks and Postfix (`postfix`, `sendmail`), and root for Postfix; a missing
//! tool fails its test. All traffic stays on 127.0.0.1.

mod harness;

mod crash;
mod delivery;
mod delivery_crash;
mod delivery_postfix;
mod dns;
mod doctor;
mod postfix;
mod receiver;
mod smtplib;
mod swaks;

mod archive;
mod etrn;
mod queue_ops;

mod cases;
mod dovecot;
mod lmtp;
mod primary;
