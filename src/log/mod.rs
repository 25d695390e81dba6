//! The log: sluice's durable state.
//!
//! Owns what must survive a restart. Must never let a seq be handed out twice, even after
//! `kill -9`. The event store itself arrives with the log issue; today this module holds
//! the [`checkpoint::Checkpoint`] that leases seqs and remembers the upstream cursor.

pub mod checkpoint;
