//! What a fan-out phase measures: the wire of sluice's subscribers, the subscriber mix,
//! and the target (sluice on a wire, or a raw-wire baseline).

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Wire {
    Raw,
    V1,
    V2,
    /// v1 with `compress=true` (Jetstream's v1 zstd dictionary).
    V1z,
    /// v2 with `zstdDictionary=<id>` (Jetstream's v2 zstd dictionary).
    V2z,
}

impl Wire {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Wire::Raw => "raw",
            Wire::V1 => "v1",
            Wire::V2 => "v2",
            Wire::V1z => "v1z",
            Wire::V2z => "v2z",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mix {
    Realistic,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BaselineArg {
    Websocat,
    /// `redis-server` PUBLISHing straight to plain RESP subscribers (SUBSCRIBE on their
    /// own connections): what a pub/sub consumer script gets.
    RedisPubsub,
    /// A websocket relay process (`redis-relay`) in front of Redis pub/sub: a home-made
    /// rebroadcaster. `redis` is the old name of this one.
    #[value(alias = "redis")]
    RedisRelay,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Sluice(Wire),
    Websocat,
    /// `redis-server` to plain RESP subscribers.
    RedisPubsub,
    /// `redis-server` plus the `redis-relay` websocket rebroadcaster.
    RedisRelay,
}

impl Target {
    pub(crate) fn name(self) -> String {
        match self {
            Target::Sluice(w) => format!("sluice/{}", w.name()),
            Target::Websocat => "websocat/raw".into(),
            Target::RedisPubsub => "redis-pubsub/raw".into(),
            Target::RedisRelay => "redis-relay/raw".into(),
        }
    }
    pub(crate) fn wire(self) -> Wire {
        match self {
            Target::Sluice(w) => w,
            _ => Wire::Raw,
        }
    }
}
