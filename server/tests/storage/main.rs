//! Storage engine tests (one binary: basic behaviour, crash consistency, the model test).

mod basic;
mod crash;
mod idempotent;
mod model;
mod raft;
mod support;
