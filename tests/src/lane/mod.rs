//! Lanes: one way to run an end-to-end scenario, wherever KVM really is.
//!
//! - **nested** — `/dev/kvm` here is PVM, on which a stock kernel cannot run. QEMU TCG
//!   (`-cpu max`, AMD SVM) boots L1, the Debian cloud kernel with kvm-amd; inside L1 the host
//!   script (by default `splitvmm`, statically linked) boots the same kernel as L2.
//! - **direct** — on a host with vmx or svm, the same host script runs right on the host.
//!
//! `SPLITVMM_LANE=nested|direct` chooses; by default direct when `/proc/cpuinfo` shows vmx or
//! svm, else nested. A test describes a [`Scenario`] and calls [`run`]; it gets an [`Outcome`]
//! (exit codes, `SPLITVMM-RESULT` values, the console) or a [`LaneError`] that shows the last
//! console lines. Needs `scripts/guest-images` (both lanes) and `scripts/build-static` (for the
//! default host script). Runs take a machine-wide lock, one at a time.
//!
//! ```no_run
//! use splitvmm_tests::lane::{self, Scenario};
//! let outcome = lane::run(
//!     &Scenario::new("two-cpus", "echo SPLITVMM-RESULT nproc=$(nproc)").vmm_args(["--vcpus", "2"]),
//! )?;
//! outcome.ensure_success()?;
//! assert_eq!(outcome.result("nproc"), Some("2"));
//! # Ok::<(), splitvmm_tests::lane::LaneError>(())
//! ```
//!
//! Debugging: `SPLITVMM_LANE_ECHO=1` echoes the console live to stderr, `SPLITVMM_LANE_KEEP=1`
//! keeps each run's folder (failed runs keep theirs anyway), `SPLITVMM_L1_APPEND` adds to L1's
//! kernel command line.

pub mod artifacts;
mod console;
mod direct;
pub mod error;
pub mod host_script;
pub mod initrd;
mod lock;
pub mod markers;
mod nested;
pub mod outcome;
mod process;
mod pump;
pub mod retry;
pub mod scenario;
mod workdir;

use std::fmt;

pub use error::LaneError;
pub use markers::Marker;
pub use outcome::Outcome;
pub use scenario::{GuestFile, KernelImage, L1Config, Scenario, DEFAULT_CMDLINE};

/// Where a scenario's host script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// In L1, a QEMU TCG guest with kvm-amd.
    Nested,
    /// On this host.
    Direct,
}

impl Lane {
    /// `SPLITVMM_LANE`, else direct when the CPU has vmx or svm, else nested.
    pub fn from_env() -> Result<Lane, LaneError> {
        match std::env::var("SPLITVMM_LANE") {
            Ok(value) => Lane::parse(&value).ok_or(LaneError::BadLane(value)),
            Err(_) => Ok(if host_has_hw_virt() {
                Lane::Direct
            } else {
                Lane::Nested
            }),
        }
    }

    pub fn parse(value: &str) -> Option<Lane> {
        match value.trim() {
            "nested" => Some(Lane::Nested),
            "direct" => Some(Lane::Direct),
            _ => None,
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lane::Nested => "nested",
            Lane::Direct => "direct",
        })
    }
}

/// Whether `/proc/cpuinfo` lists the vmx or svm flag.
pub fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| cpuinfo_has_hw_virt(&info))
}

fn cpuinfo_has_hw_virt(info: &str) -> bool {
    info.lines().filter(|l| l.starts_with("flags")).any(|l| {
        l.split_whitespace()
            .any(|flag| flag == "vmx" || flag == "svm")
    })
}

/// Runs `scenario` in the lane [`Lane::from_env`] picks.
pub fn run(scenario: &Scenario) -> Result<Outcome, LaneError> {
    run_in(Lane::from_env()?, scenario)
}

/// Runs `scenario` in `lane`.
pub fn run_in(lane: Lane, scenario: &Scenario) -> Result<Outcome, LaneError> {
    match lane {
        Lane::Nested => retry::with_retries(scenario, nested::run),
        Lane::Direct => direct::run(scenario),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_names() {
        assert_eq!(Lane::parse("nested"), Some(Lane::Nested));
        assert_eq!(Lane::parse(" direct\n"), Some(Lane::Direct));
        assert_eq!(Lane::parse("kvm"), None);
        assert_eq!(Lane::Nested.to_string(), "nested");
    }

    #[test]
    fn hw_virt_flag_is_a_whole_word() {
        assert!(cpuinfo_has_hw_virt(
            "processor\t: 0\nflags\t\t: fpu vme svm lm\n"
        ));
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu vmx\n"));
        assert!(!cpuinfo_has_hw_virt(
            "flags\t\t: fpu vmxe svm_lock\nvmx flags\t: ept\n"
        ));
    }
}
