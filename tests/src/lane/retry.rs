//! Faults of the nested lane itself, and running a scenario again after one.
//!
//! The nested lane is QEMU TCG emulating AMD SVM for L1's KVM, which runs our VMM's L2 guest.
//! Under sustained two-vCPU load that emulation occasionally breaks down:
//! - L1's own kernel dies in one of the VMM's vCPU threads, e.g. "BUG: TASK stack guard page
//!   was hit" in `error_entry` (exceptions recursing in L1's kernel), after which QEMU exits
//!   (`-no-reboot`) while the host script runs. No user-space program, ours included, can make
//!   a correct kernel do that.
//! - L2 triple-faults with no oops (KVM reports a SHUTDOWN exit), at the same moments: bursts
//!   of activity on both vCPUs.
//!
//! Measured with `splitvmm-lane` loops of a fork-heavy 2-vCPU scenario in this lane: such a
//! fault in roughly 1 run in 5 to 10 under splitvmm (with the VMM's TSC-deadline timer on or
//! off, with KVM's paravirtual features masked, with the UART interrupt through KVM_IRQ_LINE
//! instead of an irqfd); QEMU as the L2 VMM on the same scenario went 20 for 20, so the
//! trigger is not understood and is recorded, not hidden: every retry is printed and kept in
//! [`Outcome::lane_faults`]. Only these two shapes are retried, only in the nested lane, and
//! only for scenarios that do not reset their guest on purpose; timeouts and every other
//! failure count at once. On a host with VMX/SVM (the direct lane) nothing is retried.

use super::error::LaneError;
use super::outcome::Outcome;
use super::scenario::Scenario;

/// Runs after the first for a scenario that does not say otherwise.
pub const DEFAULT_NESTED_RETRIES: u32 = 2;

/// What the nested lane did wrong in `result`, if it was one of its own faults.
pub fn nested_fault(result: &Result<Outcome, LaneError>) -> Option<String> {
    match result {
        Err(LaneError::Failed { reason, .. }) if reason.contains("while the host script ran") => {
            Some(format!("L1 died: {reason}"))
        }
        Ok(outcome) if outcome.console.contains("triple-faulted: the guest resets") => {
            Some("the L2 guest triple-faulted".to_owned())
        }
        _ => None,
    }
}

/// Runs `scenario` with `run`, again (up to `scenario.nested_retries` times) after a nested-lane
/// fault; each fault is printed and recorded in the outcome.
pub fn with_retries(
    scenario: &Scenario,
    mut run: impl FnMut(&Scenario) -> Result<Outcome, LaneError>,
) -> Result<Outcome, LaneError> {
    let mut faults = Vec::new();
    loop {
        let result = run(scenario);
        match nested_fault(&result) {
            Some(fault) if (faults.len() as u32) < scenario.nested_retries => {
                eprintln!(
                    "lane: scenario `{}` hit a fault of the nested lane ({fault}); running it \
                     again ({} of {}); see tests/src/lane/retry.rs",
                    scenario.name,
                    faults.len() + 1,
                    scenario.nested_retries
                );
                faults.push(fault);
            }
            _ => {
                return result.map(|mut outcome| {
                    outcome.lane_faults = faults;
                    outcome
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lane::Lane;
    use std::time::Duration;

    fn outcome(console: &str) -> Outcome {
        Outcome::from_console(
            "t",
            Lane::Nested,
            console.into(),
            Vec::new(),
            Duration::ZERO,
        )
    }

    #[test]
    fn retries_only_lane_faults_and_only_as_often_as_allowed() {
        let scenario = Scenario::new("t", "true");
        let mut runs = 0;
        let result = with_retries(&scenario, |_| {
            runs += 1;
            Ok(outcome(if runs < 3 {
                "splitvmm: info: vCPU 1 triple-faulted: the guest resets"
            } else {
                "fine"
            }))
        });
        assert_eq!(runs, 3);
        assert_eq!(result.expect("ok").lane_faults.len(), 2);

        let mut runs = 0;
        let result = with_retries(&scenario, |_| {
            runs += 1;
            Ok(outcome(
                "splitvmm: info: vCPU 0 triple-faulted: the guest resets",
            ))
        });
        assert_eq!(runs, 1 + DEFAULT_NESTED_RETRIES);
        assert!(
            result.is_ok(),
            "the last outcome is returned for the test to judge"
        );

        let mut runs = 0;
        let _ = with_retries(&scenario.clone().no_nested_retries(), |_| {
            runs += 1;
            Ok(outcome(
                "splitvmm: info: vCPU 0 triple-faulted: the guest resets",
            ))
        });
        assert_eq!(runs, 1, "a scenario that resets on purpose is not retried");

        let mut runs = 0;
        let _ = with_retries(&scenario, |_| {
            runs += 1;
            Ok(outcome("Kernel panic - not syncing"))
        });
        assert_eq!(runs, 1, "other failures count at once");
    }
}
