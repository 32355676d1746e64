//! The stack benchmark's report: throughput each way with the ratio, and CPU time per phase.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::super::stats::{num, ratio, table, Summary};
use super::{StackBench, StackRun, StackVmm};
use crate::lane::Outcome;

/// USER_HZ: `/proc/PID/stat` counts CPU time in these ticks per second (100 on x86 Linux).
const TICKS_PER_S: f64 = 100.0;
/// Numbers per CPU sample from the host script.
const SAMPLE: usize = 5;

/// CPU time over one window, in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuWindow {
    /// The VMM process: utime (which includes the guest time).
    pub vmm_utime: f64,
    /// The VMM process: stime (mostly KVM on the vCPU threads: exits, halt-polling).
    pub vmm_stime: f64,
    /// Of utime, what its vCPU threads spent in guest mode (`guest_time`).
    pub vmm_guest: f64,
    /// The VMM's threads other than the vCPUs: utime + stime.
    pub vmm_other: f64,
    /// splitvmm-blk: utime + stime.
    pub blk: f64,
}

impl CpuWindow {
    pub fn vmm_total(&self) -> f64 {
        self.vmm_utime + self.vmm_stime
    }

    /// The VMM's own time: total less guest mode. An estimate: utime and stime are scaled
    /// from the exact runtime, the guest time is counted in ticks (so utime − guest alone is
    /// too rough to show user space apart).
    pub fn vmm_own(&self) -> f64 {
        (self.vmm_total() - self.vmm_guest).max(0.0)
    }

    fn add(&self, other: &CpuWindow) -> CpuWindow {
        CpuWindow {
            vmm_utime: self.vmm_utime + other.vmm_utime,
            vmm_stime: self.vmm_stime + other.vmm_stime,
            vmm_guest: self.vmm_guest + other.vmm_guest,
            vmm_other: self.vmm_other + other.vmm_other,
            blk: self.blk + other.blk,
        }
    }
}

/// One boot's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSample {
    pub write_ms: f64,
    pub read_ms: f64,
    pub nproc: Option<u32>,
    pub write_cpu: CpuWindow,
    pub read_cpu: CpuWindow,
}

impl RunSample {
    /// Parses `ok write_ms=… read_ms=… nproc=… cpu=15 numbers` (three samples of the VMM's
    /// utime, stime, guest time, non-vCPU threads' time and the backend's time, in ticks);
    /// `Err` carries a failed run's reason.
    pub fn parse(value: &str) -> Result<RunSample, String> {
        let Some(fields) = value.strip_prefix("ok ") else {
            return Err(value
                .strip_prefix("failed ")
                .unwrap_or(value)
                .trim()
                .to_owned());
        };
        let map: BTreeMap<&str, &str> = fields
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |k: &str| -> Result<f64, String> {
            map.get(k)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("the result lacks {k}: {value}"))
        };
        let ticks: Vec<f64> = map
            .get("cpu")
            .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
            .unwrap_or_default();
        if ticks.len() != 3 * SAMPLE {
            return Err(format!("want 3 CPU samples of {SAMPLE} numbers: {value}"));
        }
        let window = |from: usize| {
            let d = |i: usize| (ticks[from + SAMPLE + i] - ticks[from + i]) * 1000.0 / TICKS_PER_S;
            CpuWindow {
                vmm_utime: d(0),
                vmm_stime: d(1),
                vmm_guest: d(2),
                vmm_other: d(3),
                blk: d(4),
            }
        };
        Ok(RunSample {
            write_ms: get("write_ms")?,
            read_ms: get("read_ms")?,
            nproc: map.get("nproc").and_then(|v| v.parse().ok()),
            write_cpu: window(0),
            read_cpu: window(SAMPLE),
        })
    }
}

/// Every boot's sample, and the boots that failed.
#[derive(Debug, Default)]
pub struct Results {
    pub samples: BTreeMap<StackRun, RunSample>,
    pub failures: Vec<(StackRun, String)>,
}

/// MiB/s for `mib` MiB in `ms`.
fn rate(mib: u32, ms: f64) -> Option<f64> {
    (ms > 0.0).then(|| f64::from(mib) * 1000.0 / ms)
}

impl Results {
    pub fn collect(bench: &StackBench, outcome: &Outcome) -> Results {
        let mut results = Results::default();
        for run in bench.plan() {
            let parsed = match outcome.result(&format!("run.{}", run.key())) {
                None => Err("no result: the host script never reported it".to_owned()),
                Some(value) => RunSample::parse(value),
            };
            match parsed {
                Ok(s) if s.nproc.is_some_and(|n| n != bench.vcpus) => {
                    let why = format!("the guest saw {:?} vCPUs, want {}", s.nproc, bench.vcpus);
                    results.failures.push((run, why));
                }
                Ok(s) => {
                    results.samples.insert(run, s);
                }
                Err(why) => results.failures.push((run, why)),
            }
        }
        results
    }

    fn summary(&self, vmm: StackVmm, f: impl Fn(&RunSample) -> Option<f64>) -> Option<Summary> {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|(run, _)| run.vmm == vmm)
            .filter_map(|(_, s)| f(s))
            .collect();
        Summary::of(&values)
    }

    fn median(&self, vmm: StackVmm, f: impl Fn(&RunSample) -> Option<f64>) -> Option<f64> {
        self.summary(vmm, f).map(|s| s.median)
    }

    pub fn render(&self, bench: &StackBench, outcome: &Outcome) -> String {
        let mut out = String::new();
        let host = |k: &str| outcome.result(k).unwrap_or("?").to_owned();
        let _ = writeln!(
            out,
            "splitvmm bench stack — {} lane, lane host kernel {} ({} CPUs), {}",
            outcome.lane,
            host("host.kernel"),
            host("host.cpus"),
            host("host.qemu"),
        );
        let blk = if bench.blk_args.is_empty() {
            "defaults".to_owned()
        } else {
            bench.blk_args.join(" ")
        };
        let _ = writeln!(
            out,
            "guest: {} vCPU, {} MiB; dd bs=1M with O_DIRECT, {} MiB written then read on \
             /dev/vda; one splitvmm-blk ({blk}) on a tmpfs image serves every boot; medians of {} \
             boots per VMM [min–max]\n",
            bench.vcpus, bench.memory_mib, bench.mib, bench.rounds,
        );
        let mib = bench.mib;
        let cell = |vmm: StackVmm, f: &dyn Fn(&RunSample) -> Option<f64>| {
            self.summary(vmm, f).map_or_else(
                || "-".to_owned(),
                |s| format!("{:.1} [{:.1}–{:.1}]", s.median, s.min, s.max),
            )
        };
        let write = |s: &RunSample| rate(mib, s.write_ms);
        let read = |s: &RunSample| rate(mib, s.read_ms);
        let mut rows: Vec<Vec<String>> = StackVmm::ALL
            .iter()
            .map(|&vmm| vec![vmm.name().to_owned(), cell(vmm, &write), cell(vmm, &read)])
            .collect();
        let (s, q) = (StackVmm::Splitvmm, StackVmm::Qemu);
        rows.push(vec![
            "splitvmm/qemu".to_owned(),
            ratio(self.median(s, write), self.median(q, write)),
            ratio(self.median(s, read), self.median(q, read)),
        ]);
        out.push_str(&table(&["vmm", "write MiB/s", "read MiB/s"], &rows));
        out.push_str(
            "\nCPU time during the workload (write + read windows), ms, medians. The VMM's total \
             includes its vCPU threads running the guest (guest mode); the rest is its own \
             (an estimate: utime/stime are scaled, guest time is counted in ticks). Its kernel \
             time (stime) is mostly KVM handling exits and halt-polling on the vCPU threads:\n",
        );
        let both = |s: &RunSample| s.write_cpu.add(&s.read_cpu);
        let rows: Vec<Vec<String>> = StackVmm::ALL
            .iter()
            .map(|&vmm| {
                let m = |f: &dyn Fn(&CpuWindow) -> f64| self.median(vmm, |s| Some(f(&both(s))));
                vec![
                    vmm.name().to_owned(),
                    num(m(&CpuWindow::vmm_total), 0),
                    num(m(&|c| c.vmm_guest), 0),
                    num(m(&CpuWindow::vmm_own), 0),
                    num(m(&|c| c.vmm_stime), 0),
                    num(m(&|c| c.vmm_other), 0),
                    num(m(&|c| c.blk), 0),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "vmm",
                "VMM total",
                "guest mode",
                "VMM own",
                "VMM kernel",
                "non-vCPU threads",
                "splitvmm-blk",
            ],
            &rows,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lane::{Lane, Marker};
    use std::time::Duration;

    #[test]
    fn samples_parse() {
        let s = RunSample::parse(
            "ok write_ms=2000 read_ms=1000 nproc=1 \
             cpu=100,10,50,1,10,300,30,200,2,110,400,40,250,2,160",
        )
        .expect("parses");
        assert_eq!(s.write_ms, 2000.0);
        assert_eq!(s.nproc, Some(1));
        assert_eq!(s.write_cpu.vmm_total(), 2200.0);
        assert_eq!(s.write_cpu.vmm_guest, 1500.0);
        assert_eq!(s.write_cpu.vmm_own(), 700.0);
        assert_eq!(s.write_cpu.vmm_stime, 200.0);
        assert_eq!(s.write_cpu.vmm_other, 10.0);
        assert_eq!(s.write_cpu.blk, 1000.0);
        assert_eq!(s.read_cpu.blk, 500.0);
        assert_eq!(
            RunSample::parse("failed the VMM exited with status 1"),
            Err("the VMM exited with status 1".to_owned())
        );
        assert!(RunSample::parse("ok write_ms=1 read_ms=1 cpu=1,2").is_err());
    }

    #[test]
    fn report_has_rates_and_ratio() {
        let bench = StackBench {
            rounds: 1,
            ..StackBench::default()
        };
        let lines = [
            "SPLITVMM-RESULT run.1.splitvmm=ok write_ms=1000 read_ms=500 nproc=1 \
             cpu=0,0,0,0,0,150,50,50,0,80,250,150,100,0,160",
            "SPLITVMM-RESULT run.1.qemu=ok write_ms=2000 read_ms=1000 nproc=1 \
             cpu=0,0,0,0,0,150,50,50,0,80,250,150,100,0,160",
        ];
        let timeline = lines
            .iter()
            .filter_map(|l| Marker::parse(l).map(|m| (Duration::ZERO, m)))
            .collect();
        let outcome = Outcome::from_console(
            "bench-stack",
            Lane::Nested,
            lines.join("\n"),
            timeline,
            Duration::from_secs(1),
        );
        let results = Results::collect(&bench, &outcome);
        assert!(results.failures.is_empty(), "{:?}", results.failures);
        let report = results.render(&bench, &outcome);
        assert!(report.contains("128.0 [128.0–128.0]"), "{report}");
        assert!(report.contains("256.0 [256.0–256.0]"), "{report}");
        assert!(report.contains("2.00×"), "{report}");
        // 400 ticks total over both windows = 4000 ms, 1000 in guest mode, blk 1600.
        assert!(report.contains("4000"), "{report}");
        assert!(report.contains("1600"), "{report}");
    }
}
