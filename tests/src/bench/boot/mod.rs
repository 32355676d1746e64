//! `bench boot`: time from starting the VMM to the guest's init, and the VMM's own memory
//! overhead, for splitvmm and QEMU `-enable-kvm` side by side in one lane run.
//!
//! One machine (L1 in the nested lane) runs every VMM run, round-robin: per round, per vCPU
//! count, splitvmm, QEMU `-M microvm` (qboot) as it comes and with `rtc=on` (see [`Vmm`]), and
//! QEMU `-M pc` (SeaBIOS), all with the same bzImage, initramfs, kernel command line and RAM. A warm-up round (not counted) first fills
//! the page cache with the kernel, the initramfs and each VMM's binaries and libraries.
//!
//! Each run goes through [`super::probe`], which times the guest's init marker and samples the
//! VMM's `/proc/PID/smaps` at that moment: VMM overhead = total `Rss` minus the `Rss` of the
//! guest RAM memfd mapping (splitvmm's `splitvmm-guest-ram`; QEMU gets
//! `-object memory-backend-memfd` so its RAM is an identifiable memfd too).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::BenchError;

mod report;
use crate::lane::artifacts::{static_bin_dir, Images};
use crate::lane::{self, KernelImage, Lane, Outcome, Scenario, DEFAULT_CMDLINE};
use report::load_average;
pub use report::Results;

/// The L2 `/init`, replacing the lane's (the scenario archive is unpacked over the base
/// initramfs). The init marker is the first line it prints: only mounting devtmpfs (for
/// `/dev/console`) comes before it. Then facts for the host, a second for the host to sample
/// memory in (it does so at the marker), and power-off.
pub const GUEST_INIT: &str = r#"#!/bin/sh
# splitvmm bench boot: the L2 /init (tests/src/bench/boot.rs).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs dev /dev
echo SPLITVMM-BENCH-INIT >/dev/console
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
read -r up _ </proc/uptime
echo "SPLITVMM-BENCH-UPTIME $up"
echo "SPLITVMM-BENCH-NPROC $(grep -c ^processor /proc/cpuinfo)"
sleep 1
echo SPLITVMM-BENCH-POWEROFF
poweroff -f
"#;

/// How long one VMM run may take in the lane's host before the probe kills it.
const RUN_TIMEOUT_S: u64 = 90;
/// splitvmm's log line (stderr, info level) once kernel and initrd are in guest RAM, just before
/// it writes the boot tables and starts the vCPUs: the end of its own set-up.
pub const SPLITVMM_READY_LINE: &str = "entering the kernel";
/// The VMM overhead the issue targets, in MiB.
const TARGET_OVERHEAD_MIB: f64 = 5.0;
/// splitvmm's time to init as a fraction of QEMU microvm's, the issue's target.
const TARGET_INIT_RATIO: f64 = 0.5;

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Vmm {
    Splitvmm,
    /// `-M microvm` as it comes (qboot). With KVM, QEMU leaves out microvm's RTC by default
    /// (`rtc=auto`), yet its ACPI tables do not say so, and Linux's rtc_cmos then spends seconds
    /// polling ports 0x70/0x71 that nothing answers (every access a nested exit here).
    QemuMicrovm,
    /// `-M microvm,rtc=on`: the usual fix for that (virtme-ng does this), microvm at its best.
    QemuMicrovmRtc,
    /// `-M pc` (i440FX, SeaBIOS).
    QemuPc,
}

impl Vmm {
    pub const ALL: [Vmm; 4] = [
        Vmm::Splitvmm,
        Vmm::QemuMicrovm,
        Vmm::QemuMicrovmRtc,
        Vmm::QemuPc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Vmm::Splitvmm => "splitvmm",
            Vmm::QemuMicrovm => "qemu-microvm",
            Vmm::QemuMicrovmRtc => "qemu-microvm-rtc",
            Vmm::QemuPc => "qemu-pc",
        }
    }

    /// The name without `qemu-`, for ratio columns.
    fn short(self) -> &'static str {
        let name = self.name();
        name.strip_prefix("qemu-").unwrap_or(name)
    }

    pub fn parse(name: &str) -> Option<Vmm> {
        Vmm::ALL.into_iter().find(|v| v.name() == name)
    }

    /// QEMU's `-M` value, for the QEMU rows.
    fn qemu_machine(self) -> Option<&'static str> {
        match self {
            Vmm::Splitvmm => None,
            Vmm::QemuMicrovm => Some("microvm"),
            Vmm::QemuMicrovmRtc => Some("microvm,rtc=on"),
            Vmm::QemuPc => Some("pc"),
        }
    }

    /// What the guest RAM mapping's smaps path contains.
    pub fn ram_mapping(self) -> &'static str {
        match self.qemu_machine() {
            None => "memfd:splitvmm-guest-ram",
            // QEMU names the memfd after the backend's type.
            Some(_) => "memfd:memory-backend-memfd",
        }
    }

    /// The host-script line that runs this VMM once under the probe.
    fn probe_line(self, key: &str, memory_mib: u32, vcpus: u32) -> String {
        let probe = format!(
            "\"$probe\" probe --key {key} --ram-mapping {} --timeout {RUN_TIMEOUT_S}",
            self.ram_mapping()
        );
        let vmm = match self.qemu_machine() {
            None => format!(
                "--stamp '{SPLITVMM_READY_LINE}' -- \"$SPLITVMM\" --kernel \"$KERNEL\" \
                 --initrd \"$INITRD\" --cmdline \"$CMDLINE\" --memory {memory_mib}M --vcpus {vcpus}"
            ),
            Some(machine) => format!(
                "--chroot \"$SYSROOT\" -- /usr/bin/qemu-system-x86_64 -enable-kvm -cpu host \
                 -M {machine},memory-backend=ram -m {memory_mib}M -smp {vcpus} \
                 -object memory-backend-memfd,id=ram,size={memory_mib}M \
                 -nodefaults -no-user-config -no-reboot -nographic -serial stdio \
                 -kernel \"$KERNEL\" -initrd \"$INITRD\" -append \"$CMDLINE\""
            ),
        };
        format!("{probe} {vmm} || failed=$((failed + 1))\n")
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootBench {
    /// Counted rounds.
    pub rounds: u32,
    /// Whether a round 0 runs first, not counted.
    pub warmup: bool,
    pub vcpus: Vec<u32>,
    pub memory_mib: u32,
    pub vmms: Vec<Vmm>,
    /// The bzImage (default), or the ELF vmlinux every VMM boots through its PVH entry.
    pub kernel: KernelImage,
    pub cmdline: String,
    pub lane: Option<Lane>,
    /// Echo the lane's console live to stderr.
    pub echo: bool,
}

impl Default for BootBench {
    fn default() -> Self {
        BootBench {
            rounds: 3,
            warmup: true,
            vcpus: vec![1],
            memory_mib: 512,
            vmms: Vmm::ALL.to_vec(),
            kernel: KernelImage::BzImage,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            lane: None,
            echo: false,
        }
    }
}

pub const USAGE: &str = "\
usage: scripts/bench boot [OPTIONS]   (splitvmm-bench-boot [OPTIONS])

Time from starting the VMM to the guest's init, and the VMM's memory overhead, for splitvmm,
QEMU -M microvm (as it comes, and with rtc=on) and QEMU -M pc, all -enable-kvm, side by side
in one lane run, same kernel, initramfs, command line, RAM and vCPUs.

  --rounds N       counted rounds (default 3); each runs every VMM once per vCPU count
  --no-warmup      skip the uncounted warm-up round
  --vcpus LIST     vCPU counts, comma-separated (default 1; e.g. 1,2)
  --memory MIB     guest RAM in MiB (default 512)
  --vmm LIST       VMMs to run, comma-separated (default: all of splitvmm, qemu-microvm,
                   qemu-microvm-rtc, qemu-pc)
  --kernel K       bzimage (default) or elf: the ELF vmlinux, booted through its PVH entry
                   (no decompression in the guest; QEMU -M pc loads it with pvh.bin)
  --cmdline STR    guest kernel command line (default: the lane's, with quiet)
  --lane L         nested or direct (default: SPLITVMM_LANE or the CPU's flags)
  --echo           echo the lane's console to stderr while it runs

Exit status: 0 when every run booted (targets are reported, never enforced), 1 when a run
failed, 2 on usage errors, 3 when the lane itself failed.";

impl BootBench {
    pub fn parse(args: &[String]) -> Result<Self, BenchError> {
        let usage = |msg: String| BenchError::Usage(format!("{msg}\n\n{USAGE}"));
        let mut bench = BootBench::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| usage(format!("{name} needs a value")))
            };
            let number = |name: &str, v: &str| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| usage(format!("{name} {v}: want a positive number")))
            };
            match arg.as_str() {
                "--rounds" => bench.rounds = number("--rounds", &value("--rounds")?)?,
                "--no-warmup" => bench.warmup = false,
                "--vcpus" => {
                    let list = value("--vcpus")?;
                    bench.vcpus = list
                        .split(',')
                        .map(|v| number("--vcpus", v.trim()))
                        .collect::<Result<_, _>>()?;
                }
                "--memory" => bench.memory_mib = number("--memory", &value("--memory")?)?,
                "--vmm" => {
                    let list = value("--vmm")?;
                    bench.vmms = list
                        .split(',')
                        .map(|v| {
                            Vmm::parse(v.trim()).ok_or_else(|| usage(format!("--vmm: unknown {v}")))
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--kernel" => {
                    bench.kernel = match value("--kernel")?.as_str() {
                        "bzimage" => KernelImage::BzImage,
                        "elf" => KernelImage::ElfVmlinux,
                        other => {
                            return Err(usage(format!("--kernel {other}: want bzimage or elf")))
                        }
                    }
                }
                "--cmdline" => bench.cmdline = value("--cmdline")?,
                "--lane" => {
                    let name = value("--lane")?;
                    bench.lane =
                        Some(Lane::parse(&name).ok_or_else(|| {
                            usage(format!("--lane {name}: want nested or direct"))
                        })?);
                }
                "--echo" => bench.echo = true,
                "-h" | "--help" => return Err(BenchError::Help(USAGE.to_owned())),
                other => return Err(usage(format!("unknown argument {other:?}"))),
            }
        }
        Ok(bench)
    }

    /// Every run in order: (round, vcpus, vmm); round 0 is the warm-up.
    pub fn plan(&self) -> Vec<RunId> {
        let first = if self.warmup { 0 } else { 1 };
        let mut runs = Vec::new();
        for round in first..=self.rounds {
            for &vcpus in &self.vcpus {
                for &vmm in &self.vmms {
                    runs.push(RunId { round, vcpus, vmm });
                }
            }
        }
        runs
    }

    /// The host script: facts about the lane's host, then every run under the probe.
    pub fn host_script(&self) -> String {
        let mut script = String::from(
            "# splitvmm bench boot: the host script (tests/src/bench/boot.rs)\n\
             if [ ! -c /dev/kvm ]; then echo \"bench: no /dev/kvm in the lane's host\"; exit 1; fi\n\
             probe=\"$SPLITVMM_BIN_DIR/splitvmm-bench-boot\"\n\
             echo \"SPLITVMM-RESULT host.kernel=$(uname -r)\"\n\
             echo \"SPLITVMM-RESULT host.cpus=$(grep -c ^processor /proc/cpuinfo)\"\n\
             echo \"SPLITVMM-RESULT host.clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)\"\n\
             echo \"SPLITVMM-RESULT host.qemu=$($IN_SYSROOT qemu-system-x86_64 --version | head -n 1)\"\n\
             \"$probe\" clock\n\
             failed=0\n",
        );
        for run in self.plan() {
            script.push_str(&run.vmm.probe_line(&run.key(), self.memory_mib, run.vcpus));
        }
        script.push_str("echo \"SPLITVMM-RESULT failed_runs=$failed\"\n");
        script
    }

    pub fn scenario(&self) -> Scenario {
        let runs = self.plan().len() as u64;
        Scenario::new(
            "bench-boot",
            "# unused: the bench's /init replaces the lane's\n",
        )
        .guest_file("/init", GUEST_INIT, 0o755)
        .kernel(self.kernel)
        .cmdline(self.cmdline.clone())
        .host_script(self.host_script())
        .timeout(Duration::from_secs(180 + runs * 45))
        .keep_failed(true)
    }

    /// Runs the benchmark and renders its report. A run that failed makes it an error (after
    /// the report of what did run).
    pub fn run(&self) -> Result<String, BenchError> {
        let probe = static_bin_dir().join("splitvmm-bench-boot");
        if !probe.is_file() {
            return Err(BenchError::Setup(format!(
                "{} is missing: run scripts/build-static (scripts/bench does)",
                probe.display()
            )));
        }
        if self.echo {
            std::env::set_var("SPLITVMM_LANE_ECHO", "1");
        }
        let scenario = self.scenario();
        eprintln!(
            "bench boot: {} VMM runs in one lane run (a nested run takes ~12 s each, plus L1's \
             boot){}",
            self.plan().len(),
            if self.echo {
                ""
            } else {
                "; --echo shows the lane's console as it goes"
            }
        );
        let load_before = load_average();
        let outcome = match self.lane {
            Some(lane) => lane::run_in(lane, &scenario)?,
            None => lane::run(&scenario)?,
        };
        let load_after = load_average();
        if outcome.host_rc != Some(0) {
            return Err(outcome
                .failure(format!(
                    "the bench's host script ended with {:?}",
                    outcome.host_rc
                ))
                .into());
        }
        let mut results = Results::collect(self, &outcome);
        results.load = [load_before, load_after];
        let report = results.render(self, &outcome);
        if results.failures.is_empty() {
            Ok(report)
        } else {
            let mut text = report;
            text.push_str("\nFAILED runs:\n");
            for (id, why) in &results.failures {
                let _ = writeln!(text, "  {}: {why}", id.label());
            }
            text.push_str(
                "\nThe lane's console, last 80 lines (a failed run prints its VMM's last console \
                 and stderr lines, as `bench: KEY: ...`):\n",
            );
            text.push_str(&outcome.console_tail(80));
            text.push('\n');
            Err(BenchError::RunsFailed(text))
        }
    }
}

/// One VMM run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunId {
    pub round: u32,
    pub vcpus: u32,
    pub vmm: Vmm,
}

impl RunId {
    /// `ROUND.VMM.VCPUS`; the probe reports `SPLITVMM-RESULT run.<key>=…`.
    pub fn key(&self) -> String {
        format!("{}.{}.{}", self.round, self.vmm.name(), self.vcpus)
    }

    fn label(&self) -> String {
        let round = if self.round == 0 {
            "warm-up".to_owned()
        } else {
            format!("round {}", self.round)
        };
        format!("{} {} vCPU, {round}", self.vmm.name(), self.vcpus)
    }
}

/// What one run measured (from its `SPLITVMM-RESULT run.KEY=ok …` line), in ms and MiB.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When the VMM said it had loaded the guest (splitvmm only, [`SPLITVMM_READY_LINE`]).
    pub ready_ms: Option<f64>,
    pub init_ms: f64,
    pub exit_ms: f64,
    /// From the power-off line to the VMM's exit.
    pub poweroff_ms: Option<f64>,
    /// When the guest's clock started, on the host's clock (from the uptime line): everything
    /// before it is the VMM, its firmware and the kernel's early boot (decompression included).
    pub guest_clock_start_ms: Option<f64>,
    pub nproc: Option<u32>,
    pub rss_mib: f64,
    pub ram_mib: f64,
    pub anon_mib: f64,
    pub hwm_mib: f64,
    pub procs: u32,
}

impl Sample {
    /// Parses `ok k=v k=v …`; `Err` carries the probe's reason for a failed run.
    pub fn parse(value: &str) -> Result<Sample, String> {
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
                .ok_or_else(|| format!("the probe's result lacks {k}: {value}"))
        };
        let opt = |k: &str| map.get(k).and_then(|v| v.parse::<f64>().ok());
        let mib = |k: &str| get(k).map(|kib| kib / 1024.0);
        let clock_start = match (opt("uptime_line_us"), opt("guest_uptime_s")) {
            (Some(line_us), Some(up_s)) => Some(line_us / 1e3 - up_s * 1e3),
            _ => None,
        };
        Ok(Sample {
            ready_ms: opt("stamp_us").map(|us| us / 1e3),
            init_ms: get("init_us")? / 1e3,
            exit_ms: get("exit_us")? / 1e3,
            poweroff_ms: opt("poweroff_us").map(|off| (get("exit_us").unwrap_or(off) - off) / 1e3),
            guest_clock_start_ms: clock_start,
            nproc: map.get("nproc").and_then(|v| v.parse().ok()),
            rss_mib: mib("rss_kib")?,
            ram_mib: mib("ram_kib")?,
            anon_mib: mib("anon_kib")?,
            hwm_mib: mib("hwm_kib")?,
            procs: map.get("procs").and_then(|v| v.parse().ok()).unwrap_or(1),
        })
    }

    pub fn overhead_mib(&self) -> f64 {
        self.rss_mib - self.ram_mib
    }

    /// From the guest's clock starting to its init marker.
    pub fn kernel_to_init_ms(&self) -> Option<f64> {
        self.guest_clock_start_ms.map(|start| self.init_ms - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_round_robin_with_warmup() {
        let bench = BootBench {
            rounds: 2,
            vcpus: vec![1, 2],
            ..BootBench::default()
        };
        let keys: Vec<String> = bench.plan().iter().map(RunId::key).collect();
        assert_eq!(keys.len(), 3 * 2 * 4);
        assert_eq!(
            keys[..5],
            [
                "0.splitvmm.1",
                "0.qemu-microvm.1",
                "0.qemu-microvm-rtc.1",
                "0.qemu-pc.1",
                "0.splitvmm.2"
            ]
        );
        assert_eq!(keys.last().map(String::as_str), Some("2.qemu-pc.2"));
        let cold = BootBench {
            warmup: false,
            ..BootBench::default()
        };
        assert_eq!(cold.plan().len(), 3 * 4);
    }

    /// A console as the host script would print it: every run of a 1-round bench, one failed.
    fn fake_outcome(bench: &BootBench, failed: Option<&str>) -> Outcome {
        let mut lines = vec!["SPLITVMM-RESULT host.kernel=6.1".to_owned()];
        for (i, id) in bench.plan().iter().enumerate() {
            let key = id.key();
            if Some(key.as_str()) == failed {
                lines.push(format!(
                    "SPLITVMM-RESULT run.{key}=failed the VMM ended with exit status 1"
                ));
                continue;
            }
            let init = 1_000_000 * (i as u64 % 4 + 1);
            lines.push(format!(
                "SPLITVMM-RESULT run.{key}=ok init_us={init} exit_us={} uptime_line_us={} \
                 guest_uptime_s=0.5 nproc={} rss_kib={} ram_kib=102400 anon_kib=100 \
                 hwm_kib=110000 ram_mappings=1 procs=1",
                init + 1_500_000,
                init + 10_000,
                id.vcpus,
                102_400 + 1024 * (i as u64 % 4 + 1),
            ));
        }
        lines.push("SPLITVMM-HOST-DONE rc=0".to_owned());
        let timeline = lines
            .iter()
            .filter_map(|l| crate::lane::Marker::parse(l).map(|m| (Duration::ZERO, m)))
            .collect();
        Outcome::from_console(
            "bench-boot",
            Lane::Nested,
            lines.join("\n"),
            timeline,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn report_has_ratios_and_targets() {
        let bench = BootBench {
            rounds: 1,
            warmup: false,
            ..BootBench::default()
        };
        let outcome = fake_outcome(&bench, None);
        let results = Results::collect(&bench, &outcome);
        assert!(results.failures.is_empty(), "{:?}", results.failures);
        let report = results.render(&bench, &outcome);
        // splitvmm 1 s, microvm 2 s, microvm-rtc 3 s, pc 4 s; overheads 1..4 MiB.
        assert!(
            report.contains("spread  vs microvm  vs microvm-rtc  vs pc"),
            "{report}"
        );
        assert!(report.contains("0.50×"), "{report}");
        assert!(
            report.contains(
                "splitvmm time to init ≤ 0.5× qemu-microvm's: 0.50× (1000 vs 2000 ms) — met"
            ),
            "{report}"
        );
        assert!(report.contains("qemu-microvm-rtc's: 0.33×"), "{report}");
        assert!(
            report.contains("VMM overhead ≤ 5 MiB: 1.00 MiB (max 1.00) — met"),
            "{report}"
        );
    }

    #[test]
    fn failed_and_missing_runs_are_failures() {
        let bench = BootBench {
            rounds: 1,
            warmup: false,
            ..BootBench::default()
        };
        let outcome = fake_outcome(&bench, Some("1.qemu-pc.1"));
        let results = Results::collect(&bench, &outcome);
        assert_eq!(results.failures.len(), 1);
        assert_eq!(results.failures[0].1, "the VMM ended with exit status 1");
        let two = BootBench {
            vcpus: vec![2],
            ..bench
        };
        // The fake guest of the 1-vCPU plan saw 1 vCPU; none of the 2-vCPU runs reported.
        let results = Results::collect(&two, &outcome);
        assert_eq!(results.failures.len(), 4);
        assert!(results.failures[0].1.contains("no result"));
    }

    #[test]
    fn arguments() {
        let args: Vec<String> = [
            "--rounds",
            "5",
            "--vcpus",
            "1,2",
            "--vmm",
            "splitvmm,qemu-pc",
            "--kernel",
            "elf",
        ]
        .map(String::from)
        .to_vec();
        let bench = BootBench::parse(&args).expect("parses");
        assert_eq!(bench.rounds, 5);
        assert_eq!(bench.vcpus, [1, 2]);
        assert_eq!(bench.vmms, [Vmm::Splitvmm, Vmm::QemuPc]);
        assert_eq!(bench.scenario().kernel, KernelImage::ElfVmlinux);
        for bad in [
            &["--rounds", "0"][..],
            &["--vcpus", "1,x"],
            &["--vmm", "xen"],
            &["--what"],
        ] {
            let bad: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(BootBench::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_script_runs_each_vmm_under_the_probe() {
        let script = BootBench::default().host_script();
        assert!(script.contains(
            "\"$probe\" probe --key 1.splitvmm.1 --ram-mapping memfd:splitvmm-guest-ram"
        ));
        assert!(
            script.contains("--stamp 'entering the kernel' -- \"$SPLITVMM\" --kernel \"$KERNEL\"")
        );
        assert!(script.contains("--memory 512M --vcpus 1 || failed="));
        assert!(script.contains("--chroot \"$SYSROOT\" -- /usr/bin/qemu-system-x86_64"));
        assert!(script.contains("-M microvm,memory-backend=ram -m 512M -smp 1"));
        assert!(script.contains("-M pc,memory-backend=ram"));
        assert!(script.contains("memory-backend-memfd,id=ram,size=512M"));
    }

    #[test]
    fn samples_parse() {
        let s = Sample::parse(
            "ok init_us=812345 exit_us=2000000 poweroff_us=1900000 uptime_line_us=820000 \
             guest_uptime_s=0.62 nproc=1 rss_kib=104448 ram_kib=102400 anon_kib=1024 \
             hwm_kib=110000 ram_mappings=1 procs=1 stamp_us=1500",
        )
        .expect("parses");
        assert!((s.init_ms - 812.345).abs() < 1e-9);
        assert_eq!(s.poweroff_ms, Some(100.0));
        assert!((s.overhead_mib() - 2.0).abs() < 1e-9);
        assert!((s.guest_clock_start_ms.unwrap_or_default() - 200.0).abs() < 1e-6);
        assert!((s.kernel_to_init_ms().unwrap_or_default() - 612.345).abs() < 1e-6);
        assert_eq!(s.nproc, Some(1));
        assert_eq!(s.ready_ms, Some(1.5));
        assert_eq!(
            Sample::parse("failed the VMM ended with exit status 1"),
            Err("the VMM ended with exit status 1".to_owned())
        );
        assert!(Sample::parse("ok init_us=1").is_err());
    }

    #[test]
    fn guest_init_prints_the_marker_first() {
        let first_echo = GUEST_INIT
            .lines()
            .find(|l| l.starts_with("echo"))
            .unwrap_or_default();
        assert!(first_echo.contains(super::super::probe::INIT_MARKER));
    }
}
