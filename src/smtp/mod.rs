//! Mail comes in: the inbound SMTP protocol ([`session`], sans-IO, with the DATA decoder in
//! [`data`]) and its tokio driver ([`server`]).

pub mod data;
pub mod path;
pub mod server;
pub mod session;

#[cfg(test)]
mod tests;
