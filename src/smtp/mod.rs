//! Mail comes in: the inbound SMTP protocol ([`session`], sans-IO, with the DATA decoder in
//! [`data`]) and its tokio driver ([`server`]), with Postfix's command counts for the log ([`counts`]) and the defences around the
//! session: rate limits and DNS blocklists ([`screen`]).

pub mod counts;
pub mod data;
pub mod path;
pub mod screen;
pub mod server;
pub mod session;

#[cfg(test)]
mod tests;
