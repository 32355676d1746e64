//! splitvmm as a vhost-user frontend: the stock guest gets its disks over virtio-pci from
//! `splitvmm-blk` processes started beside the VMM in the lane's host. The guest makes a
//! filesystem, writes files, verifies them by checksum after a remount and again after a
//! second boot against the same backend (and a driver unbind and re-probe); a two-queue disk spreads I/O over both queues; a disk
//! marked `readonly=on` reads back what the host put there and refuses writes; a backend that
//! hangs up for good leaves its device reconnecting while the VMM and guest go on (reconnects
//! to a backend that comes back are in `vmm_reconnect.rs`); and qemu-storage-daemon, a backend
//! no one here wrote, serves a disk the same way.
//!
//! Runs in the lane `SPLITVMM_LANE` (or the host's CPU flags) picks; needs `scripts/guest-images`
//! and `scripts/build-static` (which builds `splitvmm-blk` next to `splitvmm`). Filesystems are
//! ext2 made by the L2 initramfs's busybox `mke2fs` (mounted by the kernel's ext4 driver).

use std::time::Duration;

use splitvmm_tests::lane::{self, LaneError, Outcome, Scenario};

/// Shell helpers for the host scripts: start a backend and wait for its socket.
const HOST_HELPERS: &str = r#"
set -u
BIN=$(dirname "$SPLITVMM")
# start_blk NAME IMAGE [splitvmm-blk options]: serves IMAGE on /tmp/NAME.sock in the background.
start_blk() {
    name=$1; image=$2; shift 2
    "$BIN/splitvmm-blk" --socket "/tmp/$name.sock" --image "$image" "$@" &
    echo $! >"/tmp/$name.pid"
    i=0
    while [ ! -S "/tmp/$name.sock" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    [ -S "/tmp/$name.sock" ] || { echo "SPLITVMM-RESULT backend_$name=no-socket"; exit 1; }
}
stop_blk() {
    pid=$(cat "/tmp/$1.pid"); kill "$pid"; wait "$pid"
    echo "SPLITVMM-RESULT backend_$1_exit=$?"
}
"#;

/// What every guest reports: its PCI functions and the disks with their sizes.
const GUEST_FACTS: &str = r#"
set -eu
mkdir -p /mnt
phase=$(sed -n 's/.*splitvmm-phase=\([0-9a-z]*\).*/\1/p' /proc/cmdline)
for d in /sys/bus/pci/devices/*; do
    driver=$(readlink "$d/driver" || true)
    slot=$(basename "$d" | tr ':.' '--')
    echo "SPLITVMM-RESULT ${phase}_pci_${slot}=$(cat "$d/vendor")/$(cat "$d/device")/$(cat "$d/class")/${driver##*/}"
done
# disk_by_size SECTORS: the vd* disk of that size.
disk_by_size() {
    for b in /sys/block/vd*; do
        if [ "$(cat "$b/size")" = "$1" ]; then basename "$b"; return 0; fi
    done
    echo "SPLITVMM-RESULT ${phase}_missing_disk=$1" >&2
    return 1
}
# irqs NAME: interrupts taken by the MSI-X vector NAME, summed over the CPUs.
irqs() {
    awk -v name="$1" '$NF == name { n = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) n += $i; print n }' /proc/interrupts
}
# fill_and_check DISK: ext2 on /dev/DISK, files written, verified by checksum after a remount.
fill_and_check() {
    mke2fs -F "/dev/$1" >/dev/null
    mount -t ext2 "/dev/$1" /mnt
    dd if=/dev/urandom of=/mnt/big bs=1M count=24 2>/dev/null
    mkdir /mnt/dir
    for i in $(seq 1 40); do echo "file $i on $1" >"/mnt/dir/f$i"; done
    (cd /mnt && sha256sum big dir/* >/tmp/SUMS && cp /tmp/SUMS SUMS)
    umount /mnt
    echo 3 >/proc/sys/vm/drop_caches
    mount -t ext2 "/dev/$1" /mnt
    (cd /mnt && sha256sum -c -s SUMS)
    umount /mnt
}
"#;

const ONE_DISK_GUEST: &str = r#"
disk=$(disk_by_size 262144)
echo "SPLITVMM-RESULT ${phase}_disk=$disk"
if [ "$phase" = first ]; then
    fill_and_check "$disk"
    echo "SPLITVMM-RESULT first_verified=yes"
else
    # Driver unbind and re-probe: a device reset (the backend stops the ring) and a second
    # start on the same connection.
    echo 0000:00:01.0 >/sys/bus/pci/drivers/virtio-pci/unbind
    [ ! -e "/sys/block/$disk" ] && echo "SPLITVMM-RESULT second_unbound=yes"
    echo 0000:00:01.0 >/sys/bus/pci/drivers/virtio-pci/bind
    i=0
    while ! disk=$(disk_by_size 262144 2>/dev/null) && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    echo "SPLITVMM-RESULT second_reprobed=$disk"
    # The second boot finds what the first one wrote.
    mount -t ext2 "/dev/$disk" /mnt
    (cd /mnt && sha256sum -c -s SUMS)
    echo "written by the second boot" >/mnt/again
    umount /mnt
    mount -t ext2 "/dev/$disk" /mnt
    grep -q "second boot" /mnt/again
    umount /mnt
    echo "SPLITVMM-RESULT second_verified=yes"
fi
echo "SPLITVMM-RESULT ${phase}_irqs=$(irqs "$(basename "$(readlink "/sys/block/$disk/device")")-req.0")"
"#;

const ONE_DISK_HOST: &str = r#"
dd if=/dev/zero of=/tmp/disk0.img bs=1M count=0 seek=128 2>/dev/null
start_blk disk0 /tmp/disk0.img
for phase in first second; do
    "$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE splitvmm-phase=$phase" \
        --disk socket=/tmp/disk0.sock
    echo "SPLITVMM-RESULT vmm_exit_$phase=$?"
done
stop_blk disk0
"#;

fn expect(outcome: &Outcome, key: &str, want: &str) -> Result<(), LaneError> {
    match outcome.result(key) {
        Some(got) if got == want => Ok(()),
        got => Err(outcome.failure(format!("{key} is {got:?}, want {want:?}"))),
    }
}

fn positive(outcome: &Outcome, key: &str) -> Result<u64, LaneError> {
    let value: u64 = outcome.parsed(key)?;
    if value == 0 {
        return Err(outcome.failure(format!("{key} is 0")));
    }
    Ok(value)
}

fn scenario(name: &str, guest: &str, host: &str) -> Scenario {
    Scenario::new(name, format!("{GUEST_FACTS}{guest}"))
        .host_script(format!("{HOST_HELPERS}{host}"))
        .timeout(Duration::from_secs(420))
}

#[test]
fn disk_from_splitvmm_blk_keeps_files_across_remount_and_reboot() -> Result<(), LaneError> {
    let outcome = lane::run(&scenario("vmm-disk-one", ONE_DISK_GUEST, ONE_DISK_HOST))?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    for phase in ["first", "second"] {
        expect(&outcome, &format!("vmm_exit_{phase}"), "0")?;
        // Slot 0 the host bridge, slot 1 the disk bound to virtio-pci (class mass storage).
        expect(
            &outcome,
            &format!("{phase}_pci_0000-00-00-0"),
            "0x1b36/0x0008/0x060000/",
        )?;
        expect(
            &outcome,
            &format!("{phase}_pci_0000-00-01-0"),
            "0x1af4/0x1042/0x018000/virtio-pci",
        )?;
        expect(&outcome, &format!("{phase}_disk"), "vda")?;
        // Completions reach the guest through the queue's MSI-X vector (the backend's irqfd).
        positive(&outcome, &format!("{phase}_irqs"))?;
    }
    expect(&outcome, "second_unbound", "yes")?;
    expect(&outcome, "second_reprobed", "vda")?;
    expect(&outcome, "first_verified", "yes")?;
    expect(&outcome, "second_verified", "yes")?;
    expect(&outcome, "backend_disk0_exit", "0")?;
    if !outcome
        .console
        .contains("disk 0 (/tmp/disk0.sock): running (1 queues)")
    {
        return Err(outcome.failure("splitvmm never logged the disk running"));
    }
    Ok(())
}

const MQ_RO_GUEST: &str = r#"
mq=$(disk_by_size 131072)
ro=$(disk_by_size 32768)
echo "SPLITVMM-RESULT mq_hw_queues=$(ls /sys/block/$mq/mq | wc -l)"
# I/O from each vCPU, so both request queues carry some.
fill_and_check "$mq"
mount -t ext2 "/dev/$mq" /mnt
taskset 1 dd if=/dev/urandom of=/mnt/cpu0 bs=64k count=128 conv=fsync 2>/dev/null &
taskset 2 dd if=/dev/urandom of=/mnt/cpu1 bs=64k count=128 conv=fsync 2>/dev/null &
wait
umount /mnt
echo "SPLITVMM-RESULT mq_verified=yes"
mq_index=$(basename "$(readlink "/sys/block/$mq/device")")
echo "SPLITVMM-RESULT mq_irqs_0=$(irqs "$mq_index-req.0")"
echo "SPLITVMM-RESULT mq_irqs_1=$(irqs "$mq_index-req.1")"

echo "SPLITVMM-RESULT ro_flag=$(cat /sys/block/$ro/ro)"
want=$(sed -n 's/.*splitvmm-ro-sum=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
got=$(dd if="/dev/$ro" bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] && echo "SPLITVMM-RESULT ro_read=matches"
if dd if=/dev/zero of="/dev/$ro" bs=4k count=1 conv=fsync 2>/dev/null; then
    echo "SPLITVMM-RESULT ro_write=succeeded"
else
    echo "SPLITVMM-RESULT ro_write=refused"
fi
"#;

const MQ_RO_HOST: &str = r#"
dd if=/dev/zero of=/tmp/mq.img bs=1M count=0 seek=64 2>/dev/null
dd if=/dev/urandom of=/tmp/ro.img bs=1M count=16 2>/dev/null
sum=$(sha256sum /tmp/ro.img | cut -d' ' -f1)
start_blk mq /tmp/mq.img --num-queues 2
# A writable backend: readonly=on in the VMM alone must keep the guest from writing.
start_blk ro /tmp/ro.img
"$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --vcpus 2 \
    --cmdline "$CMDLINE splitvmm-phase=mqro splitvmm-ro-sum=$sum" \
    --disk socket=/tmp/mq.sock,num_queues=2,queue_size=128 --disk socket=/tmp/ro.sock,readonly=on
echo "SPLITVMM-RESULT vmm_exit=$?"
[ "$(sha256sum /tmp/ro.img | cut -d' ' -f1)" = "$sum" ] && echo "SPLITVMM-RESULT ro_image=unchanged"
stop_blk mq
stop_blk ro
"#;

#[test]
fn two_queue_disk_and_read_only_disk() -> Result<(), LaneError> {
    let outcome = lane::run(&scenario("vmm-disk-mq-ro", MQ_RO_GUEST, MQ_RO_HOST))?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    expect(&outcome, "vmm_exit", "0")?;
    expect(
        &outcome,
        "mqro_pci_0000-00-02-0",
        "0x1af4/0x1042/0x018000/virtio-pci",
    )?;
    expect(&outcome, "mq_hw_queues", "2")?;
    expect(&outcome, "mq_verified", "yes")?;
    positive(&outcome, "mq_irqs_0")?;
    positive(&outcome, "mq_irqs_1")?;
    expect(&outcome, "ro_flag", "1")?;
    expect(&outcome, "ro_read", "matches")?;
    expect(&outcome, "ro_write", "refused")?;
    expect(&outcome, "ro_image", "unchanged")?;
    expect(&outcome, "backend_mq_exit", "0")?;
    expect(&outcome, "backend_ro_exit", "0")?;
    Ok(())
}

const HANGUP_GUEST: &str = r#"
disk=$(disk_by_size 65536)
dd if=/dev/urandom of="/dev/$disk" bs=64k count=16 conv=fsync 2>/dev/null
echo "SPLITVMM-RESULT io_done=yes"
# The host now stops the backend; the guest leaves the disk alone and keeps running.
sleep 10
echo "SPLITVMM-RESULT alive_after_hangup=yes"
"#;

const HANGUP_HOST: &str = r#"
dd if=/dev/zero of=/tmp/gone.img bs=1M count=0 seek=32 2>/dev/null
start_blk gone /tmp/gone.img
( "$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE splitvmm-phase=hangup" \
    --disk socket=/tmp/gone.sock; echo "SPLITVMM-RESULT vmm_exit=$?" ) 2>&1 | tee /tmp/console.log &
i=0
while ! grep -q "SPLITVMM-RESULT io_done=yes" /tmp/console.log && [ $i -lt 2400 ]; do
    sleep 0.1; i=$((i + 1))
done
stop_blk gone
wait
"#;

/// The backend goes away for good (SIGTERM, no supervisor): the device stays "reconnecting"
/// (not failed: nothing the guest sees changes), the VMM retries with back-off and logs that at
/// most once per interval, and the guest, which leaves the disk alone, runs on and powers off.
#[test]
fn backend_that_never_returns_leaves_the_device_reconnecting_and_the_vm_running(
) -> Result<(), LaneError> {
    let outcome = lane::run(&scenario("vmm-disk-hangup", HANGUP_GUEST, HANGUP_HOST))?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    expect(&outcome, "io_done", "yes")?;
    expect(&outcome, "alive_after_hangup", "yes")?;
    expect(&outcome, "vmm_exit", "0")?;
    let console = &outcome.console;
    if !console.contains("disk 0 (/tmp/gone.sock): the vhost-user backend hung up; reconnecting") {
        return Err(outcome.failure("splitvmm did not log the backend's hang-up and reconnect"));
    }
    if console.contains("marked failed") {
        return Err(outcome.failure("the device was failed instead of left reconnecting"));
    }
    // About 10 s of retries at up to one attempt a second: a handful of progress lines, not
    // one per attempt.
    let progress = console.matches("still reconnecting").count();
    if progress > 4 {
        return Err(outcome.failure(format!("{progress} progress lines in ~10 s")));
    }
    Ok(())
}

const QSD_GUEST: &str = r#"
disk=$(disk_by_size 196608)
fill_and_check "$disk"
echo "SPLITVMM-RESULT qsd_verified=yes"
"#;

/// qemu-storage-daemon (from the sysroot) exports the image; the VMM is its frontend.
const QSD_HOST: &str = r#"
dd if=/dev/zero of=/tmp/qsd.img bs=1M count=0 seek=96 2>/dev/null
$IN_SYSROOT qemu-storage-daemon \
    --blockdev driver=file,filename=/tmp/qsd.img,node-name=f0 \
    --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/tmp/qsd.sock,writable=on,num-queues=2 &
QSD=$!
i=0
while [ ! -S /tmp/qsd.sock ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
"$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --vcpus 2 \
    --cmdline "$CMDLINE splitvmm-phase=qsd" --disk socket=/tmp/qsd.sock,num_queues=2
echo "SPLITVMM-RESULT vmm_exit=$?"
kill $QSD; wait $QSD
"#;

#[test]
fn qemu_storage_daemon_serves_the_disk() -> Result<(), LaneError> {
    let outcome = lane::run(&scenario("vmm-disk-qsd", QSD_GUEST, QSD_HOST))?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    expect(&outcome, "vmm_exit", "0")?;
    expect(&outcome, "qsd_verified", "yes")?;
    Ok(())
}
