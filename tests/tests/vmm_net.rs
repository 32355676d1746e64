//! splitvmm as a vhost-user frontend for a NIC: the stock guest gets a virtio-net device over
//! virtio-pci whose rings `splitvmm-net`, started beside the VMM in the lane's host, serves
//! onto a tap. The guest brings the link up, pings the host end of the tap and moves data over
//! TCP each way (busybox nc on both sides); checksums must match. Once with one queue pair, once
//! with two, where the driver enables the second pair through the control queue the VMM serves.
//!
//! Runs in the lane `SPLITVMM_LANE` (or the host's CPU flags) picks; needs `scripts/guest-images`
//! and `scripts/build-static` (which builds `splitvmm-net` next to `splitvmm`).

use std::time::Duration;

use splitvmm_tests::lane::{self, LaneError, Outcome, Scenario};

/// MiB moved each way.
const MIB: u32 = 64;

const GUEST: &str = r#"
set -eu
r() { echo "SPLITVMM-RESULT $*"; }
die() { r "error=$*"; exit 1; }
want_down=$(sed -n 's/.*splitvmm-down-sha=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
mib=$(sed -n 's/.*splitvmm-mib=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -gt 200 ] && die "eth0 did not appear"; usleep 50000
done
r "mac=$(cat /sys/class/net/eth0/address)"
r "queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
r "driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)")"
ip link set lo up
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
if ping -c 3 -W 10 10.77.0.1 >/tmp/ping 2>&1; then r ping=ok; else cat /tmp/ping; die "ping failed"; fi
dd if=/dev/urandom of=/tmp/up bs=1M count="$mib" 2>/dev/null
r "up_sha=$(sha256sum /tmp/up | cut -d' ' -f1)"
# On the last CPU: with two pairs, the second pair's transmit queue carries it.
taskset "$(( 1 << ($(nproc) - 1) ))" nc 10.77.0.1 5001 </tmp/up || die "upload failed"
rm -f /tmp/up
# The host connects (and retries) until this listens.
nc -l -p 5002 >/tmp/down || die "download failed"
got=$(sha256sum /tmp/down | cut -d' ' -f1)
[ "$got" = "$want_down" ] && r down=matches
r "down_bytes=$(wc -c </tmp/down)"
irq=$(basename "$(readlink /sys/class/net/eth0/device)")
r "rx_irqs=$(awk -v n="$irq-input.0" '$NF == n { s = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print s }' /proc/interrupts)"
"#;

const HOST: &str = r#"
set -u
BIN=$(dirname "$SPLITVMM")
"$BIN/splitvmm-net" --socket /tmp/net.sock --tap svtap0 --host-ip 10.77.0.1/24 \
    --num-queue-pairs PAIRS &
NET=$!
i=0
while [ ! -S /tmp/net.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
# The receiver's stdin must stay open: busybox nc closes the connection at its stdin's EOF, and
# the host script's stdin is /dev/null.
mkfifo /tmp/hold
sleep 3600 >/tmp/hold &
HOLD=$!
nc -l -p 5001 </tmp/hold >/tmp/up &
UP=$!
dd if=/dev/urandom of=/tmp/down bs=1M count=MIB 2>/dev/null
down_sha=$(sha256sum /tmp/down | cut -d' ' -f1)
# Sends the download once the guest listens.
( until nc 10.77.0.2 5002 </tmp/down 2>/dev/null; do sleep 0.5; done ) &
DOWN=$!
"$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --vcpus PAIRS \
    --cmdline "$CMDLINE splitvmm-down-sha=$down_sha splitvmm-mib=MIB" \
    --net socket=/tmp/net.sock,mac=52:54:00:5a:17:01,num_queue_pairs=PAIRS
echo "SPLITVMM-RESULT vmm_exit=$?"
# Done by now unless the guest never uploaded; then the checksum below tells.
kill $UP 2>/dev/null
wait $UP
echo "SPLITVMM-RESULT host_up_sha=$(sha256sum /tmp/up | cut -d' ' -f1)"
echo "SPLITVMM-RESULT host_up_bytes=$(wc -c </tmp/up)"
kill $DOWN $HOLD 2>/dev/null
kill $NET; wait $NET
echo "SPLITVMM-RESULT backend_exit=$?"
"#;

fn expect(outcome: &Outcome, key: &str, want: &str) -> Result<(), LaneError> {
    match outcome.result(key) {
        Some(got) if got == want => Ok(()),
        got => Err(outcome.failure(format!("{key} is {got:?}, want {want:?}"))),
    }
}

/// Boots a guest with one NIC of `pairs` queue pairs (and as many vCPUs) and checks the traffic.
fn nic(pairs: u32) -> Result<Outcome, LaneError> {
    let host = HOST
        .replace("MIB", &MIB.to_string())
        .replace("PAIRS", &pairs.to_string());
    let scenario = Scenario::new(format!("vmm-net-{pairs}-pairs"), GUEST)
        .host_script(host)
        .timeout(Duration::from_secs(480));
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    expect(&outcome, "vmm_exit", "0")?;
    expect(&outcome, "driver", "virtio_net")?;
    expect(&outcome, "mac", "52:54:00:5a:17:01")?;
    expect(&outcome, "queues", &pairs.to_string())?;
    expect(&outcome, "ping", "ok")?;
    expect(&outcome, "host_up_bytes", &(MIB << 20).to_string())?;
    let up = outcome.result("up_sha").unwrap_or("guest");
    expect(&outcome, "host_up_sha", up)?;
    expect(&outcome, "down", "matches")?;
    expect(&outcome, "down_bytes", &(MIB << 20).to_string())?;
    let rx_irqs: u64 = outcome.parsed("rx_irqs")?;
    if rx_irqs == 0 {
        return Err(outcome.failure("no interrupts on the receive queue's MSI-X vector"));
    }
    expect(&outcome, "backend_exit", "0")?;
    Ok(outcome)
}

#[test]
fn nic_from_splitvmm_net_pings_and_moves_data_both_ways() -> Result<(), LaneError> {
    nic(1).map(|_| ())
}

#[test]
fn two_pair_nic_enables_its_second_pair_through_the_control_queue() -> Result<(), LaneError> {
    let outcome = nic(2)?;
    if !outcome.console.contains("2 of 2 queue pairs enabled") {
        return Err(outcome.failure("splitvmm never enabled the second queue pair"));
    }
    Ok(())
}
