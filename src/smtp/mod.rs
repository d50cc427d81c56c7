//! Mail comes in: the inbound SMTP protocol ([`session`], sans-IO, with the DATA decoder in
//! [`data`]) and its tokio driver ([`server`]), with Postfix's command counts for the log ([`counts`]).

pub mod counts;
pub mod data;
pub mod path;
pub mod server;
pub mod session;

#[cfg(test)]
mod tests;
