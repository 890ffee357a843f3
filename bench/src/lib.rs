//! Benchmarks of orderflow, kept apart from the product: the whole saga as
//! its clients drive it and its ceiling on the same broker and database
//! (`orderflow bench`), and the saga coordinator's durable timers
//! (`cargo bench -p orderflow-bench --bench timers`). What each measures and
//! the figures: BENCHMARKS.md.

pub mod baseline;
pub mod machine;
pub mod saga;
pub mod scratch;
pub mod stats;
pub mod timers;

pub use saga::BenchArgs;
