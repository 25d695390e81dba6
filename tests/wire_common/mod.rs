//! Shared helpers for the end-to-end wire tests: a `replay` upstream and a whole daemon on
//! 127.0.0.1, websocket clients, a tiny HTTP/1.1 GET, CBOR frame reading, and the log as
//! the ground truth of what each wire should carry. Every wait is bounded.

mod client;
mod env;
mod follow;
mod frames;
mod http;

pub use client::*;
pub use env::*;
pub use follow::*;
pub use frames::*;
pub use http::*;

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single wait in these tests may take.
pub const LIMIT: Duration = Duration::from_secs(20);
/// How long "nothing more arrives" is watched for.
pub const QUIET: Duration = Duration::from_millis(400);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const V2_PATH: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";
pub const RAW_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";
