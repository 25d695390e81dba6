//! The upstream side: the one subscription to a relay, and the staging tools that stand in
//! for a relay (capture recording, capture replay, synthetic frames).
//!
//! Owns: the websocket connection, its limits, reconnects and resume cursor. Must never:
//! decode frames for meaning (that is `decode`, once, in ingest), or let a bad frame take
//! the process down.

pub mod capture;
pub mod client;
pub mod record;
pub mod replay;
pub mod synth;
