//! The repository: a store plus the keys to read or write it.
//!
//! PLACEHOLDER (rewritten below in this change).

pub mod lock;
pub mod snapshots;
pub mod trust;
