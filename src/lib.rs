//! sluice: a firehose fan-out relay for the AT Protocol.
//!
//! Data flows one way: [`upstream`] reads frames from a relay, [`decode`] turns each
//! frame into typed messages exactly once, [`ingest`] stamps them into [`event::Event`]s
//! and encodes each wire format once ([`wire`]), and downstream stages only ever share
//! those pre-encoded bytes.

pub mod clock;
pub mod cluster;
pub mod config;
pub mod consumer;
pub mod daemon;
pub mod decode;
pub mod event;
pub mod fanout;
pub mod http;
pub mod ingest;
pub mod log;
pub mod logging;
pub mod priority;
pub mod rate;
pub mod sink;
pub mod systemd;
#[cfg(test)]
mod test_rounds;
pub mod upstream;
pub mod wire;
