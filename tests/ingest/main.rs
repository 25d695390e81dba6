//! Ingest, one module per subject: the real relay corpus stamped and encoded in process,
//! the edge cases the corpus does not contain, and the ingest thread end to end over real
//! websockets from a `replay` upstream (`e2e`).

mod corpus;
mod e2e;
mod edge_cases;
