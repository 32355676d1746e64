//! The boot benchmark's report: the tables of time to init and memory, and the targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::super::stats::{num, ratio, table, Summary};
use super::*;

/// Every run's sample, and the runs that failed.
#[derive(Debug, Default)]
pub struct Results {
    pub samples: BTreeMap<RunId, Sample>,
    pub failures: Vec<(RunId, String)>,
    /// This machine's 1-minute load average before and after the lane run.
    pub load: [Option<f64>; 2],
}

impl Results {
    pub fn collect(bench: &BootBench, outcome: &Outcome) -> Results {
        let mut results = Results::default();
        for id in bench.plan() {
            let parsed = match outcome.result(&format!("run.{}", id.key())) {
                None => Err("no result: the probe never reported (see the console)".to_owned()),
                Some(value) => Sample::parse(value),
            };
            match parsed {
                Ok(sample) if sample.nproc.is_some_and(|n| n != id.vcpus) => {
                    let seen = sample.nproc.unwrap_or_default();
                    results
                        .failures
                        .push((id, format!("the guest saw {seen} vCPUs, want {}", id.vcpus)));
                }
                Ok(sample) => {
                    results.samples.insert(id, sample);
                }
                Err(why) => results.failures.push((id, why)),
            }
        }
        results
    }

    /// The counted samples of one VMM at one vCPU count.
    fn counted(&self, vmm: Vmm, vcpus: u32) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|(id, _)| id.round > 0 && id.vmm == vmm && id.vcpus == vcpus)
            .map(|(_, s)| s)
            .collect()
    }

    fn summary(&self, vmm: Vmm, vcpus: u32, f: impl Fn(&Sample) -> Option<f64>) -> Option<Summary> {
        let values: Vec<f64> = self.counted(vmm, vcpus).into_iter().filter_map(f).collect();
        Summary::of(&values)
    }

    fn median(&self, vmm: Vmm, vcpus: u32, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        self.summary(vmm, vcpus, f).map(|s| s.median)
    }

    /// The report: setting, a time table, a memory table, the targets.
    pub fn render(&self, bench: &BootBench, outcome: &Outcome) -> String {
        let mut out = String::new();
        let kernel = std::fs::read_to_string(Images::locate().dir.join("kernel-version"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned());
        let host = |k: &str| outcome.result(k).unwrap_or("?").to_owned();
        let _ = writeln!(
            out,
            "splitvmm bench boot — {} lane, lane host kernel {} ({} CPUs, clocksource {}, \
             CLOCK_MONOTONIC resolution {} ns)",
            outcome.lane,
            host("host.kernel"),
            host("host.cpus"),
            host("host.clocksource"),
            host("host.clock_res_ns"),
        );
        let _ = writeln!(
            out,
            "guest: {} {kernel}, base initramfs + bench /init, {} MiB, cmdline {:?}",
            match bench.kernel {
                KernelImage::BzImage => "bzImage",
                KernelImage::ElfVmlinux => "ELF vmlinux (PVH entry)",
            },
            bench.memory_mib,
            bench.cmdline
        );
        let _ = writeln!(
            out,
            "peer: {} (-enable-kvm -cpu host -nodefaults, RAM as memory-backend-memfd)",
            host("host.qemu")
        );
        let _ = writeln!(
            out,
            "{} counted round(s){}, run round-robin; lane run {:.0} s in all",
            bench.rounds,
            if bench.warmup {
                " after 1 warm-up round"
            } else {
                ""
            },
            outcome.elapsed.as_secs_f64()
        );
        if let [Some(before), Some(after)] = self.load {
            let _ = writeln!(
                out,
                "this machine's load average: {before:.2} before, {after:.2} after the lane run \
                 (anything else running competes with the lane's emulation: compare VMMs within \
                 one run, and rerun when the spread is wide)"
            );
        }

        let baselines: Vec<Vmm> = bench
            .vmms
            .iter()
            .copied()
            .filter(|v| *v != Vmm::Splitvmm)
            .collect();
        let vs: Vec<String> = baselines
            .iter()
            .map(|b| format!("vs {}", b.short()))
            .collect();
        let header = |first: &[&'static str], last: &[&'static str]| -> Vec<String> {
            let mut h: Vec<String> = first.iter().map(|s| (*s).to_owned()).collect();
            h.extend(vs.iter().cloned());
            h.extend(last.iter().map(|s| (*s).to_owned()));
            h
        };

        out.push_str(
            "\nTime to init: from spawning the VMM to the first line of the guest's /init, ms \
             (median and range over the counted rounds; spread = (max − min) / median)\n",
        );
        let mut rows = Vec::new();
        for &vcpus in &bench.vcpus {
            let init = |vmm| self.summary(vmm, vcpus, |s| Some(s.init_ms));
            for &vmm in &bench.vmms {
                let summary = init(vmm);
                let median = summary.map(|s| s.median);
                let mut row = vec![
                    vmm.name().to_owned(),
                    vcpus.to_string(),
                    num(median, 1),
                    range(summary, 1),
                    summary.map_or_else(
                        || "-".to_owned(),
                        |s| format!("{:.0}%", 100.0 * (s.max - s.min) / s.median),
                    ),
                ];
                row.extend(
                    baselines
                        .iter()
                        .map(|&b| ratio(median, init(b).map(|s| s.median))),
                );
                rows.push(row);
            }
        }
        out.push_str(&table(
            &header(&["VMM", "vCPUs", "median", "min–max", "spread"], &[]),
            &rows,
        ));

        out.push_str("\nWhere the time goes (medians, ms)\n");
        let mut rows = Vec::new();
        for &vcpus in &bench.vcpus {
            for &vmm in &bench.vmms {
                let median = |f: &dyn Fn(&Sample) -> Option<f64>| self.median(vmm, vcpus, f);
                let rounds: Vec<String> = self
                    .counted(vmm, vcpus)
                    .iter()
                    .map(|s| format!("{:.0}", s.init_ms))
                    .collect();
                let warm = self
                    .samples
                    .get(&RunId {
                        round: 0,
                        vcpus,
                        vmm,
                    })
                    .map(|s| s.init_ms);
                rows.push(vec![
                    vmm.name().to_owned(),
                    vcpus.to_string(),
                    num(median(&|s| s.ready_ms), 1),
                    num(median(&|s| s.guest_clock_start_ms), 0),
                    num(median(&Sample::kernel_to_init_ms), 0),
                    num(median(&|s| s.poweroff_ms), 0),
                    num(median(&|s| Some(s.exit_ms)), 0),
                    format!("{} (warm-up {})", rounds.join(" "), num(warm, 0)),
                ]);
            }
        }
        out.push_str(&table(
            &[
                "VMM",
                "vCPUs",
                "VMM ready",
                "pre-kernel",
                "kernel→init",
                "power-off",
                "spawn→exit",
                "time to init per round",
            ],
            &rows,
        ));
        out.push_str(
            "VMM ready: splitvmm's log line once kernel and initrd are in guest RAM (its own \
             set-up; QEMU prints no such line).\n\
             pre-kernel: until the guest's clock starts, from the guest's /proc/uptime (10 ms \
             steps): VMM set-up, firmware, kernel decompression,\n\
             early boot. kernel→init: the rest of time to init. power-off: from the guest's last \
             line to the VMM's exit. spawn→exit includes the guest's 1 s pause.\n",
        );

        out.push_str(
            "\nMemory at the init marker (MiB, median over the counted rounds; /proc/PID/smaps)\n",
        );
        let mut rows = Vec::new();
        for &vcpus in &bench.vcpus {
            let over = |vmm| self.summary(vmm, vcpus, |s| Some(s.overhead_mib()));
            for &vmm in &bench.vmms {
                let median = |f: &dyn Fn(&Sample) -> f64| self.median(vmm, vcpus, |s| Some(f(s)));
                let overhead = over(vmm);
                let mut row = vec![
                    vmm.name().to_owned(),
                    vcpus.to_string(),
                    num(overhead.map(|s| s.median), 2),
                    range(overhead, 2),
                ];
                row.extend(
                    baselines
                        .iter()
                        .map(|&b| ratio(overhead.map(|s| s.median), over(b).map(|s| s.median))),
                );
                row.extend([
                    num(median(&|s| s.anon_mib), 2),
                    num(median(&|s| s.rss_mib), 1),
                    num(median(&|s| s.ram_mib), 1),
                    num(median(&|s| s.hwm_mib), 1),
                    num(median(&|s| f64::from(s.procs)), 0),
                ]);
                rows.push(row);
            }
        }
        out.push_str(&table(
            &header(
                &["VMM", "vCPUs", "overhead", "min–max"],
                &["anon", "total RSS", "guest RAM", "peak RSS", "procs"],
            ),
            &rows,
        ));
        out.push_str(
            "overhead = total RSS − RSS of the guest RAM memfd mapping(s); anon: its private \
             anonymous part (the rest is file-backed: binary, libraries).\n\
             guest RAM: resident guest pages. peak RSS: VmHWM, guest RAM included. procs: the \
             VMM process and its descendants.\n",
        );

        out.push_str("\nTargets (reported, not enforced):\n");
        for &vcpus in &bench.vcpus {
            let ours = self.median(Vmm::Splitvmm, vcpus, |s| Some(s.init_ms));
            for base in [Vmm::QemuMicrovm, Vmm::QemuMicrovmRtc] {
                let theirs = self.median(base, vcpus, |s| Some(s.init_ms));
                let verdict = match (ours, theirs) {
                    (Some(a), Some(b)) if b > 0.0 => format!(
                        "{:.2}× ({a:.0} vs {b:.0} ms) — {}",
                        a / b,
                        met(a / b <= TARGET_INIT_RATIO)
                    ),
                    _ => "not measured".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "  {vcpus} vCPU: splitvmm time to init ≤ {TARGET_INIT_RATIO}× {}'s: {verdict}",
                    base.name()
                );
            }
            let overhead = self.summary(Vmm::Splitvmm, vcpus, |s| Some(s.overhead_mib()));
            let verdict = overhead.map_or_else(
                || "not measured".to_owned(),
                |s| {
                    format!(
                        "{:.2} MiB (max {:.2}) — {}",
                        s.median,
                        s.max,
                        met(s.median <= TARGET_OVERHEAD_MIB)
                    )
                },
            );
            let _ = writeln!(
                out,
                "  {vcpus} vCPU: splitvmm VMM overhead ≤ {TARGET_OVERHEAD_MIB} MiB: {verdict}"
            );
        }
        out
    }
}

/// The 1-minute load average of this machine.
pub(super) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `min–max`, or `-`.
fn range(summary: Option<Summary>, decimals: usize) -> String {
    summary.map_or_else(
        || "-".to_owned(),
        |s| format!("{:.decimals$}–{:.decimals$}", s.min, s.max),
    )
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}
