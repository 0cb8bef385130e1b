//! Stage: critic-free RL with group baselines — GRPO and its relatives (Dr. GRPO, DAPO,
//! GSPO, RLOO, REINFORCE++) on reward models and verifiable judges.

pub mod math;

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;
