//! What `virtq`'s instruction counts (`examples/cycle.rs`, `examples/cycle_baseline.rs`,
//! `scripts/instructions.sh`) and its criterion bench (`benches/cycle.rs`) share: the round
//! trip they measure, and the baseline pair it is compared with. A crate of its own so that
//! the examples and the bench use one copy without `#[path]` includes, and so that
//! `virtq`'s own dependencies stay free of the baseline's.

pub mod baseline;
pub mod cycle;
