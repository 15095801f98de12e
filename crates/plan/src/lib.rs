//! Capacity and energy planning for a Souverain site: what must be built (GPUs, racks,
//! megawatts) to serve a demand within its latency promises, now and as the site grows.
//!
//! Pure computation from data files: model shapes ([`model`]), GPU systems ([`device`]), a
//! step-time and power model fitted to ML.ENERGY's measurements ([`perf`], [`mlenergy`]), a
//! discrete-event simulation of our scheduler's continuous batching ([`sim`]), the search
//! for replica shapes under SLOs and a power envelope ([`search`]), and reports ([`report`]).
//! Our own CPU engine is described by a profile measured with `souverain bench --profile`
//! ([`cpu`]), whose step times drive the same simulation.
//! A site file ([`site`]) says what is on offer and what is asked.
//!
//! ```
//! let data = souverain_plan::mlenergy::dataset();
//! let eff = data.fit(|_| true);
//! assert!(eff.hopper.time.iter().all(|c| *c >= 0.0));
//! ```

#![deny(missing_docs)]

pub mod cpu;
pub mod device;
mod error;
pub mod mlenergy;
pub mod model;
pub mod perf;
pub mod report;
pub mod search;
pub mod sim;
pub mod site;

pub use error::PlanError;
