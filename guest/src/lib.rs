//! kiln's guest side: the agent that runs as PID 1 inside every build VM
//! (`src/main.rs`, Linux only) and the host<->guest contract ([`contract`])
//! that the kiln host crate shares.

#![warn(missing_docs)]

pub mod contract;
