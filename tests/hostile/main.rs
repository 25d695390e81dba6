//! Hostile clients against a real `sluice serve`, one module per kind of hostility:
//! fairness between addresses, the handshake and pending-connection limits, client-held
//! memory, protocol violations, and limits changed by SIGHUP. Tests that bound a time or
//! a resource run alone (`exclusive`).

mod common;
#[path = "../exclusive/mod.rs"]
mod exclusive;
// The protocol cases use a few of the wire tests' helpers.
#[allow(dead_code, unused_imports)]
#[path = "../wire_common/mod.rs"]
mod wire_common;

mod fairness;
mod handshake;
mod memory;
mod protocol;
mod refusals;
mod reload;
