//! The staging stand-ins for a relay, one module each: synthetic frames, the replay
//! server, and recording a capture from it.

mod record;
mod replay;
mod synth;
