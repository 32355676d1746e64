//! The lane itself works: its host has a working `/dev/kvm` that boots the Debian kernel as L2
//! (with QEMU from the sysroot as the VMM), results and exit codes come back, and a run that
//! overstays its deadline is killed. Needs `scripts/guest-images`; runs in the lane
//! `SPLITVMM_LANE` (or the host's CPU flags) picks.

use std::time::Duration;

use splitvmm_tests::lane::{self, Lane, LaneError, Scenario};

/// Reports what L2 sees.
const GUEST_FACTS: &str = r#"
echo "SPLITVMM-RESULT nproc=$(nproc)"
echo "SPLITVMM-RESULT memtotal_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)"
echo "SPLITVMM-RESULT l2_uptime_s=$(cut -d' ' -f1 /proc/uptime)"
echo "SPLITVMM-RESULT modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
"#;

/// Boots the scenario's L2 with QEMU + KVM in the lane's host (the sysroot's QEMU in L1).
const QEMU_PEER: &str = r#"
if [ ! -c /dev/kvm ]; then
    echo "no /dev/kvm in the lane's host"
    exit 1
fi
t0=$(cut -d' ' -f1 /proc/uptime)
$IN_SYSROOT qemu-system-x86_64 -enable-kvm -cpu host -M pc -m 512M -smp 2 \
    -nodefaults -no-reboot -nographic -serial stdio \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE"
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo "SPLITVMM-RESULT peer_qemu_rc=$rc"
echo "SPLITVMM-RESULT l2_wall_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
exit $rc
"#;

/// Reports on the lane's host without booting L2; the sysroot's other programs run.
const HOST_STATUS: &str = r#"
echo "SPLITVMM-RESULT lane=$LANE"
test -s "$INITRD" && echo "SPLITVMM-RESULT initrd_ok=yes"
$IN_SYSROOT qemu-storage-daemon --version >/dev/null && echo "SPLITVMM-RESULT storage_daemon_ok=yes"
$IN_SYSROOT ip -V >/dev/null && echo "SPLITVMM-RESULT ip_ok=yes"
exit 5
"#;

fn seconds(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.2}", d.as_secs_f64()))
}

#[test]
fn lane_host_kvm_boots_l2_with_qemu() -> Result<(), LaneError> {
    let scenario = Scenario::new("qemu-peer-boots-l2", GUEST_FACTS)
        .host_script(QEMU_PEER)
        .timeout(Duration::from_secs(240));
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    eprintln!(
        "timeline (s): L1 init {}, L1 ready {}, guest begin {}, guest done {}, host done {}; \
         L2 in the lane's host: {} s wall (guest uptime at its scenario {} s)",
        seconds(outcome.time_of(|m| *m == lane::Marker::L1Begin)),
        seconds(outcome.time_of(|m| *m == lane::Marker::L1Ready)),
        seconds(outcome.time_of(|m| *m == lane::Marker::GuestBegin)),
        seconds(outcome.time_of(|m| matches!(m, lane::Marker::GuestDone { .. }))),
        seconds(outcome.time_of(|m| matches!(m, lane::Marker::HostDone { .. }))),
        outcome.result("l2_wall_s").unwrap_or("-"),
        outcome.result("l2_uptime_s").unwrap_or("-"),
    );
    outcome.ensure_success()?;
    if outcome.lane == Lane::Nested && outcome.l1_kvm != Some(true) {
        return Err(outcome.failure("L1 has no /dev/kvm"));
    }
    if outcome.parsed::<u32>("nproc")? != 2 {
        return Err(outcome.failure("L2 should see the 2 vCPUs QEMU gave it"));
    }
    let modules = outcome.result("modules").unwrap_or_default();
    for module in ["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net"] {
        if !modules.split_whitespace().any(|m| m == module) {
            return Err(outcome.failure(format!("the L2 init did not load {module}")));
        }
    }
    let mem = outcome.parsed::<u64>("memtotal_kb")?;
    if !(400_000..=524_288).contains(&mem) {
        return Err(outcome.failure(format!("L2 MemTotal {mem} kB is not about 512 MiB")));
    }
    Ok(())
}

#[test]
fn host_script_status_and_results_come_back() -> Result<(), LaneError> {
    // No L2 at all: only the lane's host and its protocol.
    let scenario = Scenario::new("host-status", "exit 0")
        .host_script(HOST_STATUS)
        .timeout(Duration::from_secs(120));
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    let want_lane = outcome.lane.to_string();
    if outcome.host_rc != Some(5)
        || outcome.guest_rc.is_some()
        || outcome.vmm_exit.is_some()
        || outcome.result("lane") != Some(want_lane.as_str())
        || outcome.result("initrd_ok") != Some("yes")
        || outcome.result("storage_daemon_ok") != Some("yes")
        || outcome.result("ip_ok") != Some("yes")
    {
        return Err(outcome.failure("want host rc 5, no guest/VMM status, and every result"));
    }
    if outcome.ensure_success().is_ok() {
        return Err(outcome.failure("a host script exiting 5 is not a success"));
    }
    Ok(())
}

#[test]
fn deadline_kills_the_machine() {
    let scenario = Scenario::new("deadline", "exit 0")
        .host_script("sleep 600")
        .timeout(Duration::from_secs(3))
        .keep_failed(false);
    // The fixture kills the machine before it returns the timeout.
    match lane::run(&scenario) {
        Err(LaneError::Timeout { after, .. }) => assert_eq!(after, Duration::from_secs(3)),
        other => panic!("want a timeout, got {other:?}"),
    }
}
