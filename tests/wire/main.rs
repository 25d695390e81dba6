//! The wires and fan-out end to end, one module per subject: a daemon in process fed by a
//! `replay` upstream on 127.0.0.1 (Jetstream v1, v2, raw, compression, admission, slow
//! consumers, keepalive), the hub's routing and budgets on a real log, the admin
//! endpoints, the `sluice tail` consumer, and a third-party Jetstream client. Tests that
//! bound a time run alone (`exclusive`). The reconnect storm of 2,000 clients is a binary
//! of its own (`tests/wire_storm.rs`): it needs the whole machine.

#[path = "../exclusive/mod.rs"]
mod exclusive;
#[path = "../log_common/mod.rs"]
mod log_common;
#[path = "../wire_common/mod.rs"]
mod wire_common;

mod admin;
mod admission;
mod atproto_client;
mod catchup_pool;
mod compressed;
mod direct;
mod index_budget;
mod keepalive;
mod live_start;
mod raw;
mod raw_once;
mod raw_retention;
mod slow;
mod tail;
mod v1;
mod v2;
