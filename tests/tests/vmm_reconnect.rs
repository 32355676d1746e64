//! splitvmm reconnecting to a restarted vhost-user backend while the guest runs: the backend
//! is SIGKILLed in the middle of guest I/O, `splitvmm-supervise` (which holds the socket)
//! starts it again, the VMM reconnects and re-hands it the rings (with splitvmm-blk's
//! in-flight buffer, so requests it had fetched are resubmitted), and the guest sees only a
//! pause: every byte it wrote reads back with the right checksum, no I/O error in its kernel
//! log, and it powers off normally (VMM exit 0).
//!
//! Runs in the lane `SPLITVMM_LANE` (or the host's CPU flags) picks; needs `scripts/guest-images`
//! and `scripts/build-static` (which builds `splitvmm-blk`, `splitvmm-net` and
//! `splitvmm-supervise` next to `splitvmm`).

use std::time::Duration;

use splitvmm_tests::lane::{self, LaneError, Outcome, Scenario};

/// Host side: the backend under splitvmm-supervise, the VMM in the background with its
/// console in /tmp/console.log, and `kill_backends NAME COUNT`: COUNT SIGKILLs of the
/// backend process NAME, each once the VMM has reconnected after the previous one, about a
/// second apart, while the guest has not yet said `io_done`.
const HOST_HELPERS: &str = r#"
set -u
BIN=$(dirname "$SPLITVMM")
# wait_for LINE_PATTERN COUNT TENTHS: until console.log has COUNT lines matching.
wait_for() {
    i=0
    while [ "$(grep -c "$1" /tmp/console.log)" -lt "$2" ] && [ $i -lt "$3" ]; do
        sleep 0.1; i=$((i + 1))
    done
    [ "$(grep -c "$1" /tmp/console.log)" -ge "$2" ]
}
kill_backends() {
    name=$1; count=$2; killed=0; during_io=0
    for k in $(seq 1 "$count"); do
        sleep 1
        pid=$(pidof "$name" | cut -d' ' -f1)
        [ -n "$pid" ] || { echo "SPLITVMM-RESULT no_backend_at_kill_$k=yes"; break; }
        grep -q "SPLITVMM-RESULT io_done=" /tmp/console.log || during_io=$((during_io + 1))
        kill -9 "$pid"
        killed=$((killed + 1))
        wait_for "reconnected to" "$killed" 600 || { echo "SPLITVMM-RESULT reconnect_$k=timeout"; break; }
    done
    echo "SPLITVMM-RESULT kills=$killed"
    echo "SPLITVMM-RESULT kills_during_io=$during_io"
}
"#;

/// The guest writes 4 MiB slots of the raw disk with `conv=fsync` for SECONDS, alternating
/// two versions of each slot's content (prepared beforehand in tmpfs, so the loop is nearly all
/// disk I/O, and each slot-version unique: a header names it), so a lost write leaves the
/// other version behind; then it drops its caches and reads every slot back, comparing
/// SHA-256 with the version it wrote last there.
const DISK_GUEST: &str = r#"
set -u
SECONDS_OF_IO=$(sed -n 's/.*splitvmm-io-seconds=\([0-9]*\).*/\1/p' /proc/cmdline)
disk=
for b in /sys/block/vd*; do [ "$(cat "$b/size")" = 262144 ] && disk=$(basename "$b"); done
[ -n "$disk" ] || { echo "SPLITVMM-RESULT disk=missing"; exit 1; }
SLOTS=12
mkdir -p /tmp/w
dd if=/dev/urandom of=/tmp/w/base0 bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/tmp/w/base1 bs=1M count=4 2>/dev/null
for slot in $(seq 0 $((SLOTS - 1))); do
    for v in 0 1; do
        { echo "slot $slot version $v"; cat /tmp/w/base$v; } | head -c 4194304 >/tmp/w/s$slot.$v
        sha256sum </tmp/w/s$slot.$v | cut -d' ' -f1 >/tmp/w/sum$slot.$v
    done
done
rounds=0; errors=0
echo "SPLITVMM-RESULT writing=yes"
end=$(( $(date +%s) + SECONDS_OF_IO ))
while [ "$(date +%s)" -lt "$end" ]; do
    slot=$((rounds % SLOTS)); v=$(( (rounds / SLOTS) % 2 ))
    dd if=/tmp/w/s$slot.$v of="/dev/$disk" bs=1M seek=$((slot * 4)) conv=fsync 2>/tmp/dd.err || {
        errors=$((errors + 1)); cat /tmp/dd.err; }
    echo "$v" >/tmp/w/last$slot
    rounds=$((rounds + 1))
done
echo "SPLITVMM-RESULT io_done=yes"
echo "SPLITVMM-RESULT rounds=$rounds"
echo "SPLITVMM-RESULT write_errors=$errors"
echo 3 >/proc/sys/vm/drop_caches
bad=0; checked=0
for slot in $(seq 0 $((SLOTS - 1))); do
    [ -f "/tmp/w/last$slot" ] || continue
    v=$(cat "/tmp/w/last$slot")
    got=$(dd if="/dev/$disk" bs=1M skip=$((slot * 4)) count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
    checked=$((checked + 1))
    [ "$got" = "$(cat "/tmp/w/sum$slot.$v")" ] || { bad=$((bad + 1)); echo "slot $slot differs"; }
done
echo "SPLITVMM-RESULT slots_checked=$checked"
echo "SPLITVMM-RESULT slots_bad=$bad"
echo "SPLITVMM-RESULT dmesg_io_errors=$(dmesg | grep -ci 'I/O error')"
dmesg | grep -i 'I/O error' | head -5
"#;

const DISK_HOST: &str = r#"
dd if=/dev/zero of=/tmp/rc.img bs=1M count=0 seek=128 2>/dev/null
"$BIN/splitvmm-supervise" --socket /tmp/rc.sock --restart-delay-ms 20 -- \
    "$BIN/splitvmm-blk" --image /tmp/rc.img &
SUP=$!
i=0
while [ ! -S /tmp/rc.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
: >/tmp/console.log
( "$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --memory 1024M \
    --cmdline "$CMDLINE splitvmm-io-seconds=$IO_SECONDS" --disk socket=/tmp/rc.sock
  echo "SPLITVMM-RESULT vmm_exit=$?" ) 2>&1 | tee -a /tmp/console.log &
wait_for "SPLITVMM-RESULT writing=yes" 1 3000 || echo "SPLITVMM-RESULT writing=never"
kill_backends splitvmm-blk "$KILLS"
wait_for "SPLITVMM-RESULT vmm_exit=" 1 6000
echo "SPLITVMM-RESULT reconnects=$(grep -c 'reconnected to' /tmp/console.log)"
kill "$SUP"; wait "$SUP"
wait
"#;

fn expect(outcome: &Outcome, key: &str, want: &str) -> Result<(), LaneError> {
    match outcome.result(key) {
        Some(got) if got == want => Ok(()),
        got => Err(outcome.failure(format!("{key} is {got:?}, want {want:?}"))),
    }
}

/// `kills` SIGKILLs of splitvmm-blk while the guest writes for `io_seconds`.
fn disk_scenario(name: &str, kills: u32, io_seconds: u32) -> Scenario {
    let host = format!("KILLS={kills}\nIO_SECONDS={io_seconds}\n{HOST_HELPERS}{DISK_HOST}");
    Scenario::new(name, DISK_GUEST)
        .host_script(host)
        .timeout(Duration::from_secs(600))
}

#[test]
fn disk_survives_backend_sigkill_during_writes() -> Result<(), LaneError> {
    const KILLS: u32 = 5;
    let outcome = lane::run(&disk_scenario("vmm-reconnect-disk", KILLS, 40))?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    expect(&outcome, "kills", &KILLS.to_string())?;
    expect(&outcome, "reconnects", &KILLS.to_string())?;
    expect(&outcome, "write_errors", "0")?;
    expect(&outcome, "slots_bad", "0")?;
    expect(&outcome, "dmesg_io_errors", "0")?;
    expect(&outcome, "vmm_exit", "0")?;
    let during: u32 = outcome.parsed("kills_during_io")?;
    if during < 3 {
        return Err(outcome.failure(format!(
            "only {during} of {KILLS} kills landed while the guest was writing"
        )));
    }
    let checked: u32 = outcome.parsed("slots_checked")?;
    if checked == 0 {
        return Err(outcome.failure("the guest verified no slot"));
    }
    // How many restarts found requests in flight and resubmitted them (splitvmm-blk's log):
    // timing decides, so it is reported, not required.
    let resubmitted: Vec<&str> = outcome
        .console
        .lines()
        .filter_map(|line| line.split("resubmitting ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    eprintln!("in-flight requests resubmitted per restart: {resubmitted:?}");
    Ok(())
}

/// The guest pings the host end of the tap, then uploads MIB random bytes over TCP while the
/// host kills splitvmm-net; then pings again. TCP retransmits what a restart dropped.
const NET_GUEST: &str = r#"
set -u
r() { echo "SPLITVMM-RESULT $*"; }
mib=$(sed -n 's/.*splitvmm-mib=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -gt 200 ] && { r "eth0=missing"; exit 1; }; usleep 50000
done
ip link set lo up
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
# splitvmm-net re-creates its tap on each start, with a new MAC: re-check the host's MAC
# within seconds instead of the default half minute or more.
echo 2000 >/proc/sys/net/ipv4/neigh/eth0/base_reachable_time_ms
echo 1 >/proc/sys/net/ipv4/neigh/eth0/delay_first_probe_time
ping -c 3 -W 10 10.77.0.1 >/dev/null 2>&1 && r ping_before=ok
dd if=/dev/urandom of=/tmp/up bs=1M count="$mib" 2>/dev/null
r "up_sha=$(sha256sum /tmp/up | cut -d' ' -f1)"
r "uploading=yes"
start=$(date +%s)
if nc 10.77.0.1 5001 </tmp/up; then r upload=done; else r upload=failed; fi
r "upload_seconds=$(( $(date +%s) - start ))"
r "io_done=yes"
# Until the last restart has settled: at most 60 s.
i=0
until ping -c 1 -W 2 10.77.0.1 >/dev/null 2>&1 || [ $i -gt 30 ]; do i=$((i + 1)); done
ping -c 3 -W 10 10.77.0.1 >/dev/null 2>&1 && r ping_after=ok
"#;

const NET_HOST: &str = r#"
"$BIN/splitvmm-supervise" --socket /tmp/net.sock --restart-delay-ms 20 -- \
    "$BIN/splitvmm-net" --tap svtap0 --host-ip 10.77.0.1/24 &
SUP=$!
i=0
while [ ! -S /tmp/net.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
mkfifo /tmp/hold
sleep 3600 >/tmp/hold &
HOLD=$!
nc -l -p 5001 </tmp/hold >/tmp/up &
UP=$!
: >/tmp/console.log
( "$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" \
    --cmdline "$CMDLINE splitvmm-mib=$MIB" --net socket=/tmp/net.sock,mac=52:54:00:5a:17:02
  echo "SPLITVMM-RESULT vmm_exit=$?" ) 2>&1 | tee -a /tmp/console.log &
wait_for "SPLITVMM-RESULT uploading=yes" 1 3000 || echo "SPLITVMM-RESULT uploading=never"
kill_backends splitvmm-net "$KILLS"
wait_for "SPLITVMM-RESULT vmm_exit=" 1 6000
echo "SPLITVMM-RESULT reconnects=$(grep -c 'reconnected to' /tmp/console.log)"
kill $UP 2>/dev/null
wait $UP
echo "SPLITVMM-RESULT host_up_sha=$(sha256sum /tmp/up | cut -d' ' -f1)"
kill $HOLD "$SUP"
wait
"#;

#[test]
fn nic_survives_backend_sigkill_during_a_tcp_upload() -> Result<(), LaneError> {
    const KILLS: u32 = 3;
    const MIB: u32 = 64;
    let host = format!("KILLS={KILLS}\nMIB={MIB}\n{HOST_HELPERS}{NET_HOST}");
    let scenario = Scenario::new("vmm-reconnect-nic", NET_GUEST)
        .host_script(host)
        .timeout(Duration::from_secs(420));
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    expect(&outcome, "ping_before", "ok")?;
    expect(&outcome, "kills", &KILLS.to_string())?;
    expect(&outcome, "reconnects", &KILLS.to_string())?;
    expect(&outcome, "upload", "done")?;
    let up = outcome.result("up_sha").unwrap_or("guest");
    expect(&outcome, "host_up_sha", up)?;
    expect(&outcome, "ping_after", "ok")?;
    expect(&outcome, "vmm_exit", "0")?;
    Ok(())
}

const LATE_GUEST: &str = r#"
set -u
disk=
for b in /sys/block/vd*; do [ "$(cat "$b/size")" = 65536 ] && disk=$(basename "$b"); done
[ -n "$disk" ] || { echo "SPLITVMM-RESULT disk=missing"; exit 1; }
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
dd if=/tmp/data of="/dev/$disk" bs=1M conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
a=$(sha256sum </tmp/data | cut -d' ' -f1)
b=$(dd if="/dev/$disk" bs=1M count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$a" = "$b" ] && echo "SPLITVMM-RESULT late_disk=works"
"#;

/// The VMM starts first with `wait=on`; the backend appears 3 s later.
const LATE_HOST: &str = r#"
dd if=/dev/zero of=/tmp/late.img bs=1M count=0 seek=32 2>/dev/null
: >/tmp/console.log
( "$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE" \
    --disk socket=/tmp/late.sock,wait=on
  echo "SPLITVMM-RESULT vmm_exit=$?" ) 2>&1 | tee -a /tmp/console.log &
sleep 3
grep -q "SPLITVMM-RESULT vmm_exit=" /tmp/console.log && echo "SPLITVMM-RESULT vmm_waited=no"
"$BIN/splitvmm-blk" --socket /tmp/late.sock --image /tmp/late.img &
BLK=$!
wait_for "SPLITVMM-RESULT vmm_exit=" 1 6000
kill $BLK; wait $BLK
wait
"#;

#[test]
fn wait_on_lets_the_backend_start_after_the_vmm() -> Result<(), LaneError> {
    let host = format!("{HOST_HELPERS}{LATE_HOST}");
    let scenario = Scenario::new("vmm-reconnect-wait", LATE_GUEST)
        .host_script(host)
        .timeout(Duration::from_secs(420));
    let outcome = lane::run(&scenario)?;
    eprintln!("{}", outcome.summary());
    outcome.ensure_success()?;
    if outcome.result("vmm_waited").is_some() {
        return Err(outcome.failure("splitvmm exited before its backend started"));
    }
    if !outcome.console.contains("waiting for a vhost-user backend") {
        return Err(outcome.failure("splitvmm did not say it was waiting"));
    }
    expect(&outcome, "late_disk", "works")?;
    expect(&outcome, "vmm_exit", "0")?;
    Ok(())
}
