//! `bench stack`: the same guest moving data through the whole stack — guest virtio-blk driver,
//! virtio-pci, vhost-user, `splitvmm-blk`, an image on tmpfs — under splitvmm (`--disk`) and under
//! QEMU `-enable-kvm` (`vhost-user-blk-pci`), both served by one `splitvmm-blk` process, side by
//! side in one lane run.
//!
//! In the lane's host (L1 in the nested lane) the host script starts `splitvmm-blk` once on a
//! tmpfs image and then boots the guest [`StackBench::rounds`] times with each VMM, alternating.
//! The guest writes [`StackBench::mib`] MiB to `/dev/vda` with `dd oflag=direct`, then reads them
//! back with `dd iflag=direct` (busybox `dd` has both; O_DIRECT keeps the guest's page cache
//! out of it), timing each phase with its own clock. Before and after each phase the guest
//! prints a mark and waits for a line on its console: the host script samples the CPU time of
//! the VMM and of the backend (`/proc/PID/stat` utime+stime, guest time, and the VMM's
//! threads other than the vCPUs from `/proc/PID/task/*/stat`; QEMU runs with `debug-threads=on`
//! so that its vCPU threads have names) and then writes that line to the
//! VMM's stdin (the guest's serial port), so each window holds one phase and little else.
//!
//! The VMM's CPU time includes its vCPU threads running the guest (guest mode, `guest_time`),
//! which is the guest's work; what is the VMM's own is the rest: its user space (utime − guest
//! time: the VMM's code on any thread) and its kernel time (stime: mostly KVM handling exits and
//! halt-polling on the vCPU threads). The report shows each, and the non-vCPU threads apart.

use std::time::Duration;

use super::BenchError;
use crate::lane::{self, Lane, Outcome, Scenario, DEFAULT_CMDLINE};

#[path = "stack_report.rs"]
mod report;
pub use report::{Results, RunSample};

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StackVmm {
    /// `splitvmm --disk socket=…`.
    Splitvmm,
    /// QEMU `-enable-kvm -cpu host` with `vhost-user-blk-pci` (RAM in a shared memfd).
    Qemu,
}

impl StackVmm {
    pub const ALL: [StackVmm; 2] = [StackVmm::Splitvmm, StackVmm::Qemu];

    pub fn name(self) -> &'static str {
        match self {
            StackVmm::Splitvmm => "splitvmm",
            StackVmm::Qemu => "qemu",
        }
    }

    /// The host-script command that boots the guest with the disk at `/tmp/stack.sock`.
    fn command(self, bench: &StackBench) -> String {
        let (mem, vcpus, mib) = (bench.memory_mib, bench.vcpus, bench.mib);
        match self {
            StackVmm::Splitvmm => format!(
                "\"$SPLITVMM\" --kernel \"$KERNEL\" --initrd \"$INITRD\" --memory {mem}M \
                 --vcpus {vcpus} --cmdline \"$CMDLINE splitvmm-stack-mib={mib}\" \
                 --disk socket=/tmp/stack.sock"
            ),
            StackVmm::Qemu => format!(
                "$IN_SYSROOT qemu-system-x86_64 -enable-kvm -cpu host -M pc -m {mem}M \
                 -smp {vcpus} -object memory-backend-memfd,id=mem,size={mem}M,share=on \
                 -numa node,memdev=mem -nodefaults -no-user-config -no-reboot -nographic \
                 -serial stdio -chardev socket,id=c0,path=/tmp/stack.sock \
                 -device vhost-user-blk-pci,chardev=c0 -name stack,debug-threads=on -kernel \"$KERNEL\" \
                 -initrd \"$INITRD\" -append \"$CMDLINE splitvmm-stack-mib={mib}\""
            ),
        }
    }
}

/// One guest boot: `(round, vmm)`; the key the host script reports it under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StackRun {
    pub round: u32,
    pub vmm: StackVmm,
}

impl StackRun {
    pub fn key(&self) -> String {
        format!("{}.{}", self.round, self.vmm.name())
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackBench {
    /// Boots per VMM; the first VMM of a round alternates.
    pub rounds: u32,
    /// MiB written, then read, per boot.
    pub mib: u32,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Extra `splitvmm-blk` options (e.g. `--io-engine sync`).
    pub blk_args: Vec<String>,
    pub lane: Option<Lane>,
    pub echo: bool,
}

impl Default for StackBench {
    fn default() -> Self {
        StackBench {
            rounds: 3,
            mib: 128,
            memory_mib: 512,
            vcpus: 1,
            blk_args: Vec::new(),
            lane: None,
            echo: false,
        }
    }
}

pub const USAGE: &str = "\
usage: scripts/bench stack [OPTIONS]   (splitvmm-bench-stack [OPTIONS])

The same guest writes, then reads, a disk through the whole stack (virtio-pci, vhost-user,
splitvmm-blk on a tmpfs image) under splitvmm --disk and under QEMU -enable-kvm with
vhost-user-blk-pci, both served by the same splitvmm-blk process, alternating in one lane run.
Reports MiB/s each way (guest dd with O_DIRECT), the ratio splitvmm/QEMU, and the CPU time of
each VMM and of the backend during each phase.

  --rounds N       boots per VMM (default 3)
  --mib N          MiB written then read per boot (default 128)
  --memory MIB     guest RAM in MiB (default 512)
  --vcpus N        guest vCPUs (default 1)
  --blk-arg ARG    an extra splitvmm-blk argument (repeatable), e.g. --blk-arg=--io-engine=sync
  --lane L         nested or direct (default: SPLITVMM_LANE or the CPU's flags)
  --echo           echo the lane's console to stderr while it runs

Exit status: 0 when every boot ran its workload, 1 when one failed, 2 on usage errors, 3 when
the lane itself failed.";

/// The guest's side: marks, waits for the host's line, one timed phase each way.
pub const GUEST: &str = r#"
set -eu
mib=$(sed -n 's/.*splitvmm-stack-mib=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ "$i" -le 200 ] || { echo "STACK-ERROR no /dev/vda"; exit 1; }; usleep 50000
done
# mark N: tell the host, then wait for its line (it samples CPU times in between).
mark() { echo "STACK-MARK $1"; read -r _go; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
mark 0
read -r t0 _ </proc/uptime
dd if=/dev/zero of=/dev/vda bs=1M count="$mib" oflag=direct 2>/dev/null
read -r t1 _ </proc/uptime
mark 1
read -r t2 _ </proc/uptime
dd if=/dev/vda of=/dev/null bs=1M count="$mib" iflag=direct 2>/dev/null
read -r t3 _ </proc/uptime
echo "STACK-RESULT write_ms=$(ms "$t0" "$t1") read_ms=$(ms "$t2" "$t3") nproc=$(nproc)"
mark 2
"#;

/// Shell functions for the host script.
const HOST_HELPERS: &str = r#"# splitvmm bench stack: the host script (tests/src/bench/stack.rs)
set -u
# A VMM that dies with the console's pipe open must not take the script with it.
trap '' PIPE
if [ ! -c /dev/kvm ]; then echo "bench: no /dev/kvm in the lane's host"; exit 1; fi
BIN=$(dirname "$SPLITVMM")
# cpu PID: utime, stime, guest time (part of utime), utime+stime of the threads that are not
# vCPUs (splitvmm's vcpuN, QEMU's "CPU N/KVM" with debug-threads=on), in ticks. A name may hold
# spaces: fields count from its ")".
cpu() {
    awk '{ s = substr($0, index($0, ") ") + 2); split(s, f, " "); print f[12], f[13], f[41] }' "/proc/$1/stat"
    cat /proc/"$1"/task/*/stat 2>/dev/null | awk '{
        j = 0; for (k = length($0); k > 0; k--) if (substr($0, k, 1) == ")") { j = k; break }
        i = index($0, "("); comm = substr($0, i + 1, j - i - 1)
        split(substr($0, j + 2), f, " ")
        if (comm !~ /^vcpu[0-9]+$/ && comm !~ /^CPU [0-9]+\/KVM$/) o += f[12] + f[13]
    } END { print o + 0 }'
}
# sample VMMPID: "vmm_utime vmm_stime vmm_guest vmm_other blk_total" in ticks.
sample() { echo "$(cpu "$1" | tr '\n' ' ')$(cpu "$BLK" | head -n 1 | awk '{ print $1 + $2 }')"; }
# run KEY COMMAND: boots the guest with COMMAND, drives its marks, reports run.KEY.
run() {
    key=$1; cmd=$2
    rm -f /tmp/in /tmp/run.log; mkfifo /tmp/in; : >/tmp/run.log
    sh -c "exec $cmd" </tmp/in >/tmp/run.log 2>&1 &
    vmm=$!
    exec 3>/tmp/in
    samples=""; why=""
    for n in 0 1 2; do
        i=0
        while ! grep -q "^STACK-MARK $n" /tmp/run.log; do
            if ! kill -0 "$vmm" 2>/dev/null; then why="the VMM exited before mark $n"; break; fi
            i=$((i + 1)); if [ $i -ge 6000 ]; then why="no mark $n within 10 minutes"; break; fi
            sleep 0.05
        done
        [ -z "$why" ] || break
        samples="$samples $(sample "$vmm")"
        echo go >&3
    done
    i=0
    while kill -0 "$vmm" 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
    kill -0 "$vmm" 2>/dev/null && { why="${why:-the guest did not power off}"; kill -9 "$vmm"; }
    wait "$vmm"; rc=$?
    exec 3>&-
    result=$(sed -n 's/^STACK-RESULT //p' /tmp/run.log | tr -d '\r')
    [ -n "$why" ] || [ "$rc" = 0 ] || why="the VMM exited with status $rc"
    [ -n "$why" ] || [ -n "$result" ] || why="the guest reported no result"
    if [ -z "$why" ]; then
        echo "SPLITVMM-RESULT run.$key=ok $result cpu=$(echo $samples | tr ' ' ',')"
    else
        echo "SPLITVMM-RESULT run.$key=failed $why"
        echo "bench: $key: the VMM's last lines:"
        tail -n 25 /tmp/run.log | sed 's/SPLITVMM-/splitvmm:/g; s/^/bench: $key: /'
        failed=$((failed + 1))
    fi
}
"#;

impl StackBench {
    pub fn parse(args: &[String]) -> Result<Self, BenchError> {
        let usage = |msg: String| BenchError::Usage(format!("{msg}\n\n{USAGE}"));
        let mut bench = StackBench::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            // --name=value and --name value both work.
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| usage(format!("{name} needs a value")))
            };
            let number = |name: &str, v: &str| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| usage(format!("{name} {v}: want a positive number")))
            };
            match name {
                "--rounds" => bench.rounds = number(name, &value(name)?)?,
                "--mib" => bench.mib = number(name, &value(name)?)?,
                "--memory" => bench.memory_mib = number(name, &value(name)?)?,
                "--vcpus" => bench.vcpus = number(name, &value(name)?)?,
                "--blk-arg" => {
                    let v = value(name)?;
                    // `--blk-arg=--io-engine=sync` is one splitvmm-blk option with its value.
                    match v.split_once('=') {
                        Some((opt, val)) if opt.starts_with("--") => {
                            bench.blk_args.extend([opt.to_owned(), val.to_owned()]);
                        }
                        _ => bench.blk_args.push(v),
                    }
                }
                "--lane" => {
                    let v = value(name)?;
                    bench.lane = Some(
                        Lane::parse(&v)
                            .ok_or_else(|| usage(format!("--lane {v}: want nested or direct")))?,
                    );
                }
                "--echo" => bench.echo = true,
                "-h" | "--help" => return Err(BenchError::Help(USAGE.to_owned())),
                other => return Err(usage(format!("unknown argument {other:?}"))),
            }
        }
        // The image lives in the lane host's tmpfs, beside the guest's RAM (L1 has 2 GiB).
        if bench.mib > 512 || bench.memory_mib > 1024 {
            return Err(usage(format!(
                "--mib {} / --memory {}: at most 512 / 1024 (the lane's host has 2 GiB)",
                bench.mib, bench.memory_mib
            )));
        }
        Ok(bench)
    }

    /// Every boot in order; rounds alternate which VMM goes first.
    pub fn plan(&self) -> Vec<StackRun> {
        let mut runs = Vec::new();
        for round in 1..=self.rounds {
            let mut order = StackVmm::ALL;
            if round % 2 == 0 {
                order.reverse();
            }
            runs.extend(order.into_iter().map(|vmm| StackRun { round, vmm }));
        }
        runs
    }

    pub fn host_script(&self) -> String {
        let mut script = String::from(HOST_HELPERS);
        let blk_args: String = self
            .blk_args
            .iter()
            .map(|a| format!(" {}", crate::lane::host_script::sh_quote(a)))
            .collect();
        script.push_str(&format!(
            "echo \"SPLITVMM-RESULT host.kernel=$(uname -r)\"\n\
             echo \"SPLITVMM-RESULT host.cpus=$(grep -c ^processor /proc/cpuinfo)\"\n\
             echo \"SPLITVMM-RESULT host.qemu=$($IN_SYSROOT qemu-system-x86_64 --version | head -n 1)\"\n\
             dd if=/dev/zero of=/tmp/stack.img bs=1M count={} 2>/dev/null\n\
             \"$BIN/splitvmm-blk\" --socket /tmp/stack.sock --image /tmp/stack.img{blk_args} &\n\
             BLK=$!\n\
             i=0\n\
             while [ ! -S /tmp/stack.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done\n\
             [ -S /tmp/stack.sock ] || {{ echo \"bench: splitvmm-blk made no socket\"; exit 1; }}\n\
             failed=0\n",
            self.mib
        ));
        for run in self.plan() {
            let cmd = run.vmm.command(self);
            script.push_str(&format!(
                "run {} {}\n",
                run.key(),
                crate::lane::host_script::sh_quote(&cmd)
            ));
        }
        script.push_str(
            "kill $BLK; wait $BLK\n\
             echo \"SPLITVMM-RESULT blk_exit=$?\"\n\
             echo \"SPLITVMM-RESULT failed_runs=$failed\"\n",
        );
        script
    }

    pub fn scenario(&self) -> Scenario {
        let runs = self.plan().len() as u64;
        let per_run = 60 + u64::from(self.mib) / 2;
        Scenario::new("bench-stack", GUEST)
            .cmdline(DEFAULT_CMDLINE)
            .host_script(self.host_script())
            .timeout(Duration::from_secs(240 + runs * per_run))
            .keep_failed(true)
    }

    /// Runs the benchmark and renders its report; a failed boot makes it an error after the
    /// report of what did run.
    pub fn run(&self) -> Result<String, BenchError> {
        if self.echo {
            std::env::set_var("SPLITVMM_LANE_ECHO", "1");
        }
        eprintln!(
            "bench stack: {} guest boots ({} MiB each way) in one lane run{}",
            self.plan().len(),
            self.mib,
            if self.echo {
                ""
            } else {
                "; --echo shows the lane's console as it goes"
            }
        );
        let scenario = self.scenario();
        let outcome = match self.lane {
            Some(lane) => lane::run_in(lane, &scenario)?,
            None => lane::run(&scenario)?,
        };
        if outcome.host_rc != Some(0) && outcome.result("failed_runs").is_none() {
            return Err(outcome
                .failure(format!(
                    "the bench's host script ended with {:?}",
                    outcome.host_rc
                ))
                .into());
        }
        let results = Results::collect(self, &outcome);
        let report = results.render(self, &outcome);
        if results.failures.is_empty() {
            return Ok(report);
        }
        Err(BenchError::RunsFailed(failed_report(
            report, &results, &outcome,
        )))
    }
}

fn failed_report(mut text: String, results: &Results, outcome: &Outcome) -> String {
    text.push_str("\nFAILED boots:\n");
    for (run, why) in &results.failures {
        text.push_str(&format!("  {}: {why}\n", run.key()));
    }
    text.push_str("\nThe lane's console, last 60 lines:\n");
    text.push_str(&outcome.console_tail(60));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_alternates_and_script_runs_both_vmms() {
        let bench =
            StackBench::parse(&["--rounds".into(), "2".into(), "--mib=64".into()]).expect("parses");
        let keys: Vec<String> = bench.plan().iter().map(StackRun::key).collect();
        assert_eq!(keys, ["1.splitvmm", "1.qemu", "2.qemu", "2.splitvmm"]);
        let script = bench.host_script();
        assert!(script.contains("--disk socket=/tmp/stack.sock"), "{script}");
        assert!(script.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(script.contains("-device vhost-user-blk-pci,chardev=c0"));
        assert!(script.contains("splitvmm-stack-mib=64"));
        assert!(script.contains("bs=1M count=64 "));
    }

    #[test]
    fn bad_arguments() {
        for bad in [
            &["--rounds", "0"][..],
            &["--mib", "4096"],
            &["--what"],
            &["--mib"],
        ] {
            let bad: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(StackBench::parse(&bad).is_err(), "{bad:?}");
        }
        let blk = StackBench::parse(&["--blk-arg=--io-engine=sync".into()]).expect("parses");
        assert_eq!(blk.blk_args, ["--io-engine", "sync"]);
    }
}
