//! Ingest: stamping of decoded messages into events.
