//! A fault hook for tests: make a training stage meet a NaN at a chosen step, to show that
//! it stops and keeps its last good checkpoint. Read only in debug builds (what `cargo
//! test` runs); a release build never looks at the environment for it.

/// Whether the stage's loss should be replaced by NaN at `step` (counted from 1): set
/// `CANDOR_FAULT_NAN_STEP=N` (debug builds only).
pub fn nan_at(step: u64) -> bool {
    cfg!(debug_assertions)
        && std::env::var("CANDOR_FAULT_NAN_STEP")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            == Some(step)
}
