//! Redis-backed parts against a real `redis-server` each test starts on a free loopback
//! port: the cluster (failover under SIGKILL, faults, the Lua functions) and the Redis
//! sink. Failover timing runs alone (`exclusive`).

mod common;
#[path = "../exclusive/mod.rs"]
mod exclusive;
#[path = "../redis_common/mod.rs"]
mod redis_common;
#[path = "../serve_common/mod.rs"]
mod serve_common;
// The sink's cluster case reads a node's v2 wire with the wire tests' helpers.
#[allow(dead_code, unused_imports)]
#[path = "../wire_common/mod.rs"]
mod wire_common;

mod failover;
mod faults;
mod functions;
mod redis_sink;
