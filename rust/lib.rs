//! cellrank's Rust core. Each algorithm is a plain Rust module with its own unit tests; the
//! `python` feature adds the PyO3 bindings (`python.rs`), which only convert arguments and results.

pub mod csr;
pub mod medians;
pub mod rank;
pub mod shard;
pub mod token_column;

#[cfg(feature = "python")]
mod python;
