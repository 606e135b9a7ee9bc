//! The node's pure parsers, compiled from their source files so that fuzzing does not build
//! Raft, tonic and the rest of the node. Each file depends on `std` and `thiserror`, and h1wire.rs also on `bytes`, `http` and
//! `httparse`.

#![forbid(unsafe_code)]

#[path = "../../src/edge/clienthello.rs"]
pub mod clienthello;
#[path = "../../src/edge/h1wire.rs"]
pub mod h1wire;
#[path = "../../src/edge/grammar.rs"]
pub mod grammar;
#[path = "../../src/edge/proxy_protocol.rs"]
pub mod proxy_protocol;
