//! drover's pure core.
//!
//! *Architecture Invariant*: this crate does no I/O, spawns nothing, reads no
//! clock and has no async. Time is an input (`now`, milliseconds since the
//! Unix epoch). Everything here is deterministic, so the planner can be tested
//! by tables, by properties and by seeded simulation.
//!
//! - [`spec`]: `drover.toml` parsing and validation with `file:line:col` errors.
//! - [`model`]: domain types (releases, instances, nodes, rollouts).
//! - [`planner`]: `(settings, rollout, instances, nodes, now) → actions`.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod dryrun;
pub mod duration;
pub mod model;
pub mod planner;
pub mod share;
pub mod spec;

pub use model::*;
