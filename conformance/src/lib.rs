//! The shared safety suite for fencelock stores.
//!
//! - [`harness`]: real servers started from `PATH` on free loopback ports, owned by pid.
//! - [`proxy`]: a loopback TCP fault proxy switched at runtime.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod harness;
pub mod proxy;
