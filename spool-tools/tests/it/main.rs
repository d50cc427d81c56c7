//! Integration tests of spool-tools: one test binary.
//!
//! Needs the system `tar` and `python3` (tests fail, never skip, when they are missing).

mod archive;
mod cli;
mod support;
