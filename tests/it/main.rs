//! Integration tests: mxspool as a real server, driven by real SMTP peers (Python's smtplib,
//! swaks, a private Postfix instance, a private Dovecot as the LMTP server; Exim, OpenSMTPD
//! and aiosmtpd as primaries with their own limits) and killed mid-stream; the seed's
//! deployments booted as several servers with their own DNS. One test binary, `it`.
//!
//! Needs python3 (with its ssl module), swaks (with IO::Socket::SSL for `--tls`), Postfix (`postfix`, `sendmail`), Dovecot (`dovecot-lmtpd`), nsd, unbound and ldnsutils (the DANE
//! tests' DNSSEC chain) and what
//! `.ci/peers` installs (python3-aiosmtpd; Exim and OpenSMTPD unpacked under
//! /opt/mxspool-peers), and root for Postfix, Exim, OpenSMTPD and the tmpfs mounts; a missing
//! tool fails its test. The package test needs cargo-deb, binutils and man-db, and under CI
//! installs the package for real. The power-loss tests (`power_loss`) mount faultfs (the
//! workspace member `faultfs/`, built on demand with `workspace_bin`: an in-memory FUSE
//! filesystem that drops every write not yet fsynced when sent SIGUSR1) and need root and
//! /dev/fuse, no libfuse or fusermount3. All traffic stays on loopback addresses
//! (127.0.0.0/8).

mod harness;

mod callout;
mod crash;
mod damage;
mod dane;
mod defences;
mod delivery;
mod delivery_crash;
mod delivery_postfix;
mod descriptors;
mod disk_full;
mod dns;
mod doctor;
mod drain;
mod io_errors;
mod large;
mod mta_sts;
mod package;
mod postfix;
mod power_loss;
mod quotas;
mod receiver;
mod smtplib;
mod swaks;
mod tls;

mod archive;
mod etrn;
mod metrics;
mod queue_ops;
mod safe_admin;
mod systemd;

mod cases;
mod dovecot;
mod lmtp;
mod peers;
mod pop3;
mod primary;
