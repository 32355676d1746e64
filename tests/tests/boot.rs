//! splitvmm boots the stock Debian cloud kernel to its init and ends the way the guest asks:
//! vCPUs and memory as configured, kvmclock as the clocksource with a known TSC frequency,
//! power-off → exit 0, every kind of reset → exit 3. Runs in the lane `SPLITVMM_LANE` (or the
//! host's CPU flags) picks; needs `scripts/guest-images` and `scripts/build-static`.

use std::time::Duration;

use splitvmm_tests::lane::{self, KernelImage, L1Config, LaneError, Outcome, Scenario};

/// What the guest reports about itself.
const GUEST_FACTS: &str = r#"
echo "SPLITVMM-RESULT nproc=$(grep -c ^processor /proc/cpuinfo)"
echo "SPLITVMM-RESULT memtotal_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)"
echo "SPLITVMM-RESULT clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "SPLITVMM-RESULT tsc_khz_known=$(dmesg | grep -c 'tsc: Detected [0-9.]* MHz')"
echo "SPLITVMM-RESULT calibration_failures=$(dmesg | grep -c 'Unable to calibrate')"
echo "SPLITVMM-RESULT tsc_unstable=$(dmesg | grep -c 'Marking TSC unstable')"
echo "SPLITVMM-RESULT tsc_unstable_why=$(dmesg | sed -n 's/.*Marking TSC unstable due to //p' | head -n1 | tr ' ' _)"
echo "SPLITVMM-RESULT ram_above_4g=$(grep -c '^1[0-9a-f]\{8\}-.* : System RAM' /proc/iomem)"
echo "SPLITVMM-RESULT cmdline_seen=$(grep -c splitvmm-cmdline-marker /proc/cmdline)"
"#;

fn check_facts(outcome: &Outcome, vcpus: u32, memory_mib: u64) -> Result<(), LaneError> {
    check_guest_facts(outcome, "", vcpus, memory_mib)
}

/// Checks the facts the guest reported under result keys starting with `prefix`.
fn check_guest_facts(
    outcome: &Outcome,
    prefix: &str,
    vcpus: u32,
    memory_mib: u64,
) -> Result<(), LaneError> {
    outcome.ensure_success()?;
    if outcome.vmm_exit != Some(0) {
        return Err(outcome.failure("splitvmm did not exit 0 after the guest powered off"));
    }
    let key = |name: &str| format!("{prefix}{name}");
    let nproc: u32 = outcome.parsed(&key("nproc"))?;
    if nproc != vcpus {
        return Err(outcome.failure(format!("guest sees {nproc} CPUs, want {vcpus}")));
    }
    let memtotal_kb: u64 = outcome.parsed(&key("memtotal_kb"))?;
    let minimum_kb = memory_mib * 1024 * 85 / 100;
    if memtotal_kb < minimum_kb {
        return Err(outcome.failure(format!(
            "guest MemTotal {memtotal_kb} kB is below 85% of {memory_mib} MiB"
        )));
    }
    let clocksource = outcome.result(&key("clocksource")).unwrap_or("");
    if clocksource != "kvm-clock" {
        return Err(outcome.failure(format!("clocksource is {clocksource:?}, want kvm-clock")));
    }
    if outcome.parsed::<u32>(&key("tsc_khz_known"))? == 0 {
        return Err(outcome.failure("the guest never learned the TSC frequency"));
    }
    if outcome.parsed::<u32>(&key("calibration_failures"))? != 0 {
        return Err(outcome.failure("the guest logged 'Unable to calibrate'"));
    }
    if outcome.parsed::<u32>(&key("cmdline_seen"))? != 1 {
        return Err(outcome.failure("the guest did not get our kernel command line"));
    }
    Ok(())
}

fn boot(name: &str, vcpus: u32, memory_mib: u64, kernel: KernelImage) -> Scenario {
    Scenario::new(name, GUEST_FACTS)
        .kernel(kernel)
        .cmdline(format!("{} splitvmm-cmdline-marker", lane::DEFAULT_CMDLINE))
        .vmm_args([
            "--vcpus".to_string(),
            vcpus.to_string(),
            "--memory".to_string(),
            format!("{memory_mib}M"),
        ])
        .timeout(Duration::from_secs(240))
}

#[test]
fn bzimage_one_vcpu_boots_to_init_and_powers_off() -> Result<(), LaneError> {
    let outcome = lane::run(&boot("boot-1-vcpu", 1, 512, KernelImage::BzImage))?;
    eprintln!("{}", outcome.summary());
    check_facts(&outcome, 1, 512)?;
    // With one vCPU nothing can disagree with kvmclock about the TSC.
    if outcome.parsed::<u32>("tsc_unstable")? != 0 {
        return Err(outcome.failure("the guest marked its TSC unstable"));
    }
    if !outcome
        .console
        .contains("entering the kernel through the 64-bit boot protocol")
    {
        return Err(outcome.failure("splitvmm did not use the 64-bit boot protocol"));
    }
    Ok(())
}

/// Boots the same guest under splitvmm and then under QEMU with KVM in the same lane host, each
/// guest's results prefixed with its VMM's name.
const BESIDE_QEMU_HOST: &str = r#"
( "$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE" --vcpus 2 --memory 512M
  echo $? >"$PAYLOAD/splitvmm.rc" ) 2>&1 | sed 's/^SPLITVMM-RESULT /SPLITVMM-RESULT splitvmm_/'
echo "SPLITVMM-VMM-EXIT rc=$(cat "$PAYLOAD/splitvmm.rc")"
$IN_SYSROOT qemu-system-x86_64 -enable-kvm -cpu host -M pc -m 512M -smp 2 \
    -nodefaults -no-reboot -nographic -serial stdio \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" 2>&1 \
    | sed 's/^SPLITVMM-RESULT /SPLITVMM-RESULT qemu_/'
"#;

/// Both vCPUs come up. In the nested lane a 2-vCPU L2 may log "Marking TSC unstable due to TSCs
/// unsynchronized" whichever VMM runs it (QEMU's guest does too: the TSC is emulated by TCG two
/// levels down), so the TSC is judged against QEMU's guest in the same L1: never worse.
#[test]
fn bzimage_two_vcpus_both_come_up() -> Result<(), LaneError> {
    let scenario = boot("boot-2-vcpus", 2, 512, KernelImage::BzImage)
        .host_script(BESIDE_QEMU_HOST)
        .timeout(Duration::from_secs(300));
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    check_guest_facts(&outcome, "splitvmm_", 2, 512)?;
    let ours: u32 = outcome.parsed("splitvmm_tsc_unstable")?;
    let qemus: u32 = outcome.parsed("qemu_tsc_unstable")?;
    if outcome.result("qemu_nproc") != Some("2") {
        return Err(outcome.failure("the QEMU peer's guest did not report 2 CPUs"));
    }
    if ours > qemus {
        return Err(outcome.failure(format!(
            "splitvmm's guest marked its TSC unstable ({:?}); QEMU's guest in the same lane did not",
            outcome.result("splitvmm_tsc_unstable_why")
        )));
    }
    Ok(())
}

#[test]
fn elf_vmlinux_boots_through_pvh() -> Result<(), LaneError> {
    let outcome = lane::run(&boot("boot-pvh", 2, 512, KernelImage::ElfVmlinux))?;
    eprintln!("{}", outcome.summary());
    check_facts(&outcome, 2, 512)?;
    if !outcome.console.contains("entering the kernel through PVH") {
        return Err(outcome.failure("splitvmm did not take the vmlinux's PVH entry"));
    }
    Ok(())
}

#[test]
fn memory_above_the_pci_hole_is_usable() -> Result<(), LaneError> {
    // 4 GiB of guest RAM: 3 GiB below the 32-bit hole, 1 GiB above 4 GiB. L1 needs the room.
    let scenario = boot("boot-4g", 1, 4096, KernelImage::BzImage).l1(L1Config {
        memory_mib: 5120,
        ..L1Config::default()
    });
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    check_facts(&outcome, 1, 4096)?;
    if outcome.parsed::<u32>("ram_above_4g")? == 0 {
        return Err(outcome.failure("no System RAM above 4 GiB in the guest's /proc/iomem"));
    }
    Ok(())
}

/// Boots the guest once per reboot method; the guest reboots (or panics) at once.
const RESET_HOST: &str = r#"
for method in k a t panic; do
    if [ "$method" = panic ]; then
        cmdline="$CMDLINE panic=1 splitvmm-panic"
    else
        cmdline="$CMDLINE reboot=$method"
    fi
    "$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$cmdline" --memory 256M \
        2>"$PAYLOAD/stderr.$method"
    echo "SPLITVMM-RESULT exit_$method=$?"
    cat "$PAYLOAD/stderr.$method"
    cause=$(grep -E 'i8042|ACPI reset|triple' "$PAYLOAD/stderr.$method" | head -n1 | sed 's/.*info: //' | tr ' ' _)
    echo "SPLITVMM-RESULT cause_$method=$cause"
done
"#;

const RESET_GUEST: &str = r#"
if grep -q splitvmm-panic /proc/cmdline; then
    echo c > /proc/sysrq-trigger
fi
reboot -f
"#;

#[test]
fn every_reset_path_exits_3() -> Result<(), LaneError> {
    // Triple faults are provoked here: never taken for faults of the nested lane.
    let scenario = Scenario::new("reset-paths", RESET_GUEST)
        .host_script(RESET_HOST)
        .timeout(Duration::from_secs(300))
        .no_nested_retries();
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    // The reboot method, what splitvmm must log as the cause, and what it is.
    for (method, cause, what) in [
        ("k", "i8042", "i8042 reset line"),
        ("a", "ACPI_reset_register", "ACPI reset register"),
        ("t", "triple-faulted", "triple fault"),
        ("panic", "i8042", "panic=1 after a kernel panic (reboot=k)"),
    ] {
        let code: i32 = outcome.parsed(&format!("exit_{method}"))?;
        if code != 3 {
            return Err(outcome.failure(format!("{what}: splitvmm exited {code}, want 3")));
        }
        let logged = outcome.result(&format!("cause_{method}")).unwrap_or("");
        if !logged.contains(cause) {
            return Err(outcome.failure(format!(
                "{what}: splitvmm logged the cause {logged:?}, want one naming {cause}"
            )));
        }
    }
    Ok(())
}
