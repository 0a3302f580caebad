//! Routing: which backend (primary or which replica) runs a transaction.
//!
//! Decided once, at the first message of a transaction, from the statement
//! class (`classify`), hints, the client's recent writes (read-your-writes)
//! and each replica's health (`crate::health`). When in doubt, the primary.

pub mod classify;
pub mod functions;
pub mod hints;
pub mod measure;
pub mod opening;
pub mod policy;

pub use classify::{Class, Classifier, Verdict};
pub use functions::Functions;
