//! cellrank's Rust core. This file only binds; each algorithm lives in its own module.
