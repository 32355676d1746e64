//! What a finished run reports.

use std::collections::BTreeMap;
use std::time::Duration;

use super::error::{ConsoleTail, Kept, LaneError, TAIL_LINES};
use super::markers::Marker;
use super::Lane;

/// The record of a run whose lane protocol completed (the host script ran to its end). Whether
/// the VMM and the guest did what the test wanted is for the test to check, e.g. with
/// [`Outcome::ensure_success`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub scenario: String,
    pub lane: Lane,
    /// From `SPLITVMM-VMM-EXIT rc=N` (the default host script prints it). The VMM's contract:
    /// guest power-off 0, guest reset 3, VMM error 1, usage error 2.
    pub vmm_exit: Option<i32>,
    /// The exit status of `/scenario.sh` in L2 (`SPLITVMM-GUEST-DONE rc=N`); `None` when the
    /// guest never got that far.
    pub guest_rc: Option<i32>,
    /// The exit status of the host script.
    pub host_rc: Option<i32>,
    /// Every `SPLITVMM-RESULT key=value` (the last one wins for a repeated key).
    pub results: BTreeMap<String, String>,
    /// Everything the machine printed (in the nested lane: L1's console, which carries L2's).
    pub console: String,
    /// Nested lane: whether L1 got a `/dev/kvm`. `None` in the direct lane.
    pub l1_kvm: Option<bool>,
    /// From starting the machine (QEMU for L1, or the host script) to its end.
    pub elapsed: Duration,
    /// Each marker with the time it was read, from the same start as `elapsed`.
    pub timeline: Vec<(Duration, Marker)>,
    /// Runs before this one that ended in a fault of the nested lane itself (see
    /// [`super::retry`]), each with what happened.
    pub lane_faults: Vec<String>,
}

impl Outcome {
    pub(crate) fn from_console(
        scenario: &str,
        lane: Lane,
        console: String,
        timeline: Vec<(Duration, Marker)>,
        elapsed: Duration,
    ) -> Self {
        let mut outcome = Outcome {
            scenario: scenario.to_owned(),
            lane,
            vmm_exit: None,
            guest_rc: None,
            host_rc: None,
            results: BTreeMap::new(),
            console,
            l1_kvm: None,
            elapsed,
            timeline,
            lane_faults: Vec::new(),
        };
        for (_, marker) in &outcome.timeline {
            match marker {
                Marker::VmmExit { rc } => outcome.vmm_exit = Some(*rc),
                Marker::GuestDone { rc } => outcome.guest_rc = Some(*rc),
                Marker::HostDone { rc } => outcome.host_rc = Some(*rc),
                Marker::L1Kvm(ok) => outcome.l1_kvm = Some(*ok),
                Marker::Result { key, value } => {
                    outcome.results.insert(key.clone(), value.clone());
                }
                _ => {}
            }
        }
        if outcome.host_rc.is_none() {
            // L1's init reports run.sh's status too (should run.sh die before its last line).
            outcome.host_rc = outcome.timeline.iter().find_map(|(_, m)| match m {
                Marker::L1Done { rc } => Some(*rc),
                _ => None,
            });
        }
        outcome
    }

    /// A `SPLITVMM-RESULT` value.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// A `SPLITVMM-RESULT` value parsed; an error (with the console) when missing or unparsable.
    pub fn parsed<T: std::str::FromStr>(&self, key: &str) -> Result<T, LaneError> {
        let value = self
            .result(key)
            .ok_or_else(|| self.failure(format!("no result `{key}`")))?;
        value
            .parse()
            .map_err(|_| self.failure(format!("result `{key}={value}` does not parse")))
    }

    /// When the first marker matching `pred` was read.
    pub fn time_of(&self, pred: impl Fn(&Marker) -> bool) -> Option<Duration> {
        self.timeline.iter().find(|(_, m)| pred(m)).map(|(t, _)| *t)
    }

    /// The host script exited 0, the guest scenario exited 0, and the VMM (if the host script
    /// reported it) exited 0. The error names what differed and shows the console tail.
    pub fn ensure_success(&self) -> Result<&Self, LaneError> {
        let mut wrong = Vec::new();
        if self.host_rc != Some(0) {
            wrong.push(format!("host script rc {}", show(self.host_rc)));
        }
        if self.guest_rc != Some(0) {
            wrong.push(format!("guest scenario rc {}", show(self.guest_rc)));
        }
        if self.vmm_exit.is_some_and(|rc| rc != 0) {
            wrong.push(format!("VMM exit {}", show(self.vmm_exit)));
        }
        if wrong.is_empty() {
            Ok(self)
        } else {
            Err(self.failure(format!("{} (want all 0)", wrong.join(", "))))
        }
    }

    /// The last `lines` console lines.
    pub fn console_tail(&self, lines: usize) -> String {
        ConsoleTail::of(&self.console, lines).0
    }

    /// An error about this outcome, carrying its console tail: for a test's own checks.
    pub fn failure(&self, reason: impl Into<String>) -> LaneError {
        LaneError::Failed {
            scenario: self.scenario.clone(),
            lane: self.lane,
            reason: reason.into(),
            kept: Kept(None),
            tail: ConsoleTail::of(&self.console, TAIL_LINES),
        }
    }

    /// One line: lane, exit codes, time, results.
    pub fn summary(&self) -> String {
        format!(
            "{} [{}]: host rc {}, vmm exit {}, guest rc {}, l1 kvm {:?}, {:.1} s, results {:?}{}",
            self.scenario,
            self.lane,
            show(self.host_rc),
            show(self.vmm_exit),
            show(self.guest_rc),
            self.l1_kvm,
            self.elapsed.as_secs_f64(),
            self.results,
            if self.lane_faults.is_empty() {
                String::new()
            } else {
                format!(
                    ", after nested-lane faults: {}",
                    self.lane_faults.join("; ")
                )
            }
        )
    }
}

fn show(rc: Option<i32>) -> String {
    rc.map_or_else(|| "none".to_owned(), |rc| rc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(lines: &[&str]) -> Outcome {
        let timeline = lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Marker::parse(l).map(|m| (Duration::from_secs(i as u64), m)))
            .collect();
        Outcome::from_console(
            "t",
            Lane::Nested,
            lines.join("\n"),
            timeline,
            Duration::from_secs(9),
        )
    }

    #[test]
    fn collects_markers() {
        let o = outcome(&[
            "SPLITVMM-L1-KVM ok",
            "SPLITVMM-GUEST-BEGIN",
            "SPLITVMM-RESULT nproc=1",
            "SPLITVMM-RESULT nproc=2",
            "SPLITVMM-GUEST-DONE rc=0",
            "SPLITVMM-VMM-EXIT rc=0",
            "SPLITVMM-HOST-DONE rc=0",
        ]);
        assert_eq!(o.l1_kvm, Some(true));
        assert_eq!(o.guest_rc, Some(0));
        assert_eq!(o.vmm_exit, Some(0));
        assert_eq!(o.host_rc, Some(0));
        assert_eq!(o.result("nproc"), Some("2"));
        assert_eq!(o.parsed::<u32>("nproc").ok(), Some(2));
        assert!(o.parsed::<u32>("missing").is_err());
        assert_eq!(
            o.time_of(|m| *m == Marker::GuestBegin),
            Some(Duration::from_secs(1))
        );
        assert!(o.ensure_success().is_ok());
    }

    #[test]
    fn success_needs_every_exit_code() {
        let reset = outcome(&["SPLITVMM-VMM-EXIT rc=3", "SPLITVMM-HOST-DONE rc=0"]);
        let text = format!("{:?}", reset.ensure_success().err());
        assert!(text.contains("guest scenario rc none"), "{text}");
        assert!(text.contains("VMM exit 3"), "{text}");
        let guest_failed = outcome(&["SPLITVMM-GUEST-DONE rc=1", "SPLITVMM-HOST-DONE rc=0"]);
        assert!(guest_failed.ensure_success().is_err());
    }
}
