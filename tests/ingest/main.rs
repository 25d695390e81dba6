//! Ingest in process, without a daemon: the real relay corpus stamped and encoded, and
//! the edge cases the corpus does not contain.

mod corpus;
mod edge_cases;
