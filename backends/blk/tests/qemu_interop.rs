//! Interop with a frontend no one here wrote: QEMU (TCG, memfd guest RAM shared with the
//! backend, `vhost-user-blk-pci`) boots the Debian cloud kernel; the guest's virtio-blk driver
//! talks to splitvmm-blk.
//!
//! - `guest_makes_ext4_checks_data_trims_and_the_next_frontend_sees_it`: a read-write disk with
//!   two queues and a serial, and a read-only disk. The guest makes ext4 (the host's mke2fs),
//!   writes files from both CPUs, syncs, remounts with cold caches and verifies, fstrims; reads
//!   the read-only disk whole and fails to write it. A second QEMU on the same backends (a new
//!   session) finds the files. The host checks the filesystem with e2fsck and the files with
//!   debugfs, and that the trim gave space back to the image.
//! - `frontend_killed_during_writes_then_next_frontend_is_served`: QEMU is SIGKILLed while its
//!   guest writes; the backend drops the session and serves the next QEMU; then SIGTERM while a
//!   third guest writes ends the backend with status 0, promptly.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::{qemu_lock, sha256_file, Disk, GuestFiles, Qemu};
use common::{Backend, Scratch};

const MIB: u64 = 1 << 20;
/// Boot plus scenario under TCG on a loaded two-core host; a healthy run takes well under this.
const GUEST_DEADLINE: Duration = Duration::from_secs(240);

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn host_tool(name: &str) -> std::path::PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} not found (Debian package e2fsprogs)");
}

/// Runs the guest to power-off and checks it finished its scenario with rc=0.
fn run_guest(qemu: &mut Qemu, what: &str) -> Duration {
    let start = Instant::now();
    let status = qemu.wait_exit(GUEST_DEADLINE);
    assert!(
        status.is_some(),
        "{what}: QEMU still running after {GUEST_DEADLINE:?}; console tail:\n{}",
        qemu.tail(60)
    );
    assert!(
        qemu.console().contains("SPLITVMM-GUEST-DONE rc=0"),
        "{what}: scenario failed ({status:?}); console tail:\n{}",
        qemu.tail(60)
    );
    start.elapsed()
}

/// Requests per queue from the backend's "session N: frontend disconnected; queue 0: ..." line.
fn queue_requests(log: &str, session: u64) -> Vec<u64> {
    let prefix = format!("session {session}: frontend disconnected;");
    let line = log
        .lines()
        .find(|l| l.contains(&prefix))
        .unwrap_or_else(|| panic!("no end of session {session} in:\n{log}"));
    line.split("queue ")
        .skip(1)
        .filter_map(|part| part.split_once(": ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

const WRITE_SCENARIO: &str = r#"
r() { echo "SPLITVMM-RESULT $*"; }
die() { r "error=$*"; exit 1; }
sha() { sha256sum "$@" | cut -d' ' -f1; }
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    i=$((i + 1)); [ "$i" -gt 200 ] && die "disks did not appear"; usleep 50000
done
r "vda_serial=$(cat /sys/block/vda/serial)"
r "vda_queues=$(ls /sys/block/vda/mq | wc -l)"
r "vda_sectors=$(cat /sys/block/vda/size)"
r "vda_ro=$(cat /sys/block/vda/ro)"
r "vda_discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)"
r "vda_write_zeroes_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
r "vdb_ro=$(cat /sys/block/vdb/ro)"
r "vdb_sha=$(sha /dev/vdb)"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 2>/dev/null; then r vdb_write=allowed; else r vdb_write=refused; fi
/opt/e2fsprogs/mke2fs -q -F -t ext4 -L splitvmm /dev/vda || die "mke2fs failed"
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || die "mount failed"
# One writer per CPU: blk-mq maps CPU 0 to queue 0 and CPU 1 to queue 1.
taskset 1 dd if=/dev/urandom of=/mnt/a bs=64k count=96 conv=fsync 2>/dev/null &
taskset 2 dd if=/dev/urandom of=/mnt/b bs=64k count=96 conv=fsync 2>/dev/null &
wait
r "sha_a=$(sha /mnt/a)"
r "sha_b=$(sha /mnt/b)"
dd if=/dev/urandom of=/mnt/junk bs=1M count=16 2>/dev/null
sync
umount /mnt || die "umount failed"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || die "remount failed"
r "sha_a_again=$(taskset 1 sha256sum /mnt/a | cut -d' ' -f1)"
r "sha_b_again=$(taskset 2 sha256sum /mnt/b | cut -d' ' -f1)"
rm /mnt/junk
sync
r "fstrim=$(fstrim -v /mnt 2>&1)"
umount /mnt || die "final umount failed"
r done=1
"#;

const READ_BACK_SCENARIO: &str = r#"
r() { echo "SPLITVMM-RESULT $*"; }
die() { r "error=$*"; exit 1; }
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ "$i" -gt 200 ] && die "disk did not appear"; usleep 50000
done
mkdir -p /mnt
mount -t ext4 -o ro /dev/vda /mnt || die "mount failed"
r "sha_a=$(sha256sum /mnt/a | cut -d' ' -f1)"
r "sha_b=$(sha256sum /mnt/b | cut -d' ' -f1)"
if [ -e /mnt/junk ]; then r junk=present; else r junk=gone; fi
umount /mnt
r done=1
"#;

#[test]
fn guest_makes_ext4_checks_data_trims_and_the_next_frontend_sees_it() {
    let s = Scratch::new("qemu-ext4");
    let rw_image = s.sparse_image("rw.img", 64 * MIB);
    let ro_image = s.path("ro.img");
    std::fs::write(&ro_image, pattern(4 * MIB as usize, 0x5eed)).expect("ro image");
    let ro_sha = sha256_file(&ro_image);

    let mut rw = Backend::start(
        &s,
        "rw",
        &rw_image,
        &["--num-queues", "2", "--serial", "splitvmm-disk-0001"],
    );
    let mut ro = Backend::start(&s, "ro", &ro_image, &["--readonly"]);

    let mut files = GuestFiles::new(WRITE_SCENARIO);
    files.add_host_program(&host_tool("mke2fs"), "/opt/e2fsprogs/mke2fs");
    if let Ok(conf) = std::fs::read("/etc/mke2fs.conf") {
        files.add("/etc/mke2fs.conf", 0o644, conf);
    }
    let initrd = s.path("write-initrd.cpio.gz");
    files.build_initrd(&initrd);

    let _serial = qemu_lock();
    let disks = [
        Disk {
            socket: &rw.socket,
            num_queues: 2,
        },
        Disk {
            socket: &ro.socket,
            num_queues: 1,
        },
    ];
    let mut qemu = Qemu::start(&initrd, &disks, 2);
    let took = run_guest(&mut qemu, "write run");
    eprintln!("write run: QEMU start to exit {took:.1?}");

    assert_eq!(qemu.result("vda_serial"), "splitvmm-disk-0001");
    assert_eq!(qemu.result("vda_queues"), "2");
    assert_eq!(qemu.result("vda_sectors"), (64 * MIB / 512).to_string());
    assert_eq!(qemu.result("vda_ro"), "0");
    assert_ne!(
        qemu.result("vda_discard_max"),
        "0",
        "DISCARD not negotiated"
    );
    assert_ne!(
        qemu.result("vda_write_zeroes_max"),
        "0",
        "WRITE_ZEROES not negotiated"
    );
    assert_eq!(qemu.result("vdb_ro"), "1");
    assert_eq!(qemu.result("vdb_sha"), ro_sha);
    assert_eq!(qemu.result("vdb_write"), "refused");
    let sha_a = qemu.result("sha_a");
    let sha_b = qemu.result("sha_b");
    assert_eq!(qemu.result("sha_a_again"), sha_a);
    assert_eq!(qemu.result("sha_b_again"), sha_b);
    assert!(qemu.result("fstrim").contains("bytes trimmed"));
    assert_eq!(qemu.result("done"), "1");

    // The session ended; both queues carried requests.
    assert!(rw.wait_log("session 1: frontend disconnected", Duration::from_secs(10)));
    let per_queue = queue_requests(&rw.log(), 1);
    assert_eq!(per_queue.len(), 2, "{}", rw.log());
    assert!(
        per_queue.iter().all(|n| *n > 0),
        "requests per queue: {per_queue:?}"
    );
    assert!(!rw.log().contains("fails with"), "{}", rw.log());
    assert_eq!(
        std::fs::read(&ro_image).expect("ro image"),
        pattern(4 * MIB as usize, 0x5eed),
        "the read-only image changed"
    );

    // A second frontend on the same backend processes: a new session sees the files.
    let mut files = GuestFiles::new(READ_BACK_SCENARIO);
    files.add("/etc/marker", 0o644, b"second run".to_vec());
    let initrd2 = s.path("read-initrd.cpio.gz");
    files.build_initrd(&initrd2);
    let disks = [Disk {
        socket: &rw.socket,
        num_queues: 2,
    }];
    let mut qemu2 = Qemu::start(&initrd2, &disks, 1);
    run_guest(&mut qemu2, "read-back run");
    assert_eq!(qemu2.result("sha_a"), sha_a);
    assert_eq!(qemu2.result("sha_b"), sha_b);
    assert_eq!(qemu2.result("junk"), "gone");
    assert!(rw.wait_log("session 2: frontend disconnected", Duration::from_secs(10)));

    // The host's own tools agree: a clean filesystem, the same file contents.
    let fsck = Command::new(host_tool("e2fsck"))
        .args(["-f", "-n"])
        .arg(&rw_image)
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    for (name, sha) in [("a", &sha_a), ("b", &sha_b)] {
        let out = s.path(&format!("dumped-{name}"));
        let dump = Command::new(host_tool("debugfs"))
            .arg("-R")
            .arg(format!("dump /{name} {}", out.display()))
            .arg(&rw_image)
            .output()
            .expect("run debugfs");
        assert!(dump.status.success(), "debugfs dump /{name}");
        assert_eq!(&sha256_file(&out), sha, "file {name} as the host reads it");
    }
    // The 16 MiB junk file was written, synced, removed and trimmed: its blocks went back.
    // Kept: a and b (12 MiB), the journal (4 MiB) and metadata.
    let allocated = std::fs::metadata(&rw_image).expect("stat").blocks() * 512;
    eprintln!(
        "rw image: {} KiB allocated after the trim",
        allocated / 1024
    );
    assert!(
        allocated < 24 * MIB,
        "image has {allocated} bytes allocated: the trim did not deallocate"
    );

    for backend in [&mut rw, &mut ro] {
        let (status, took) = backend.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{}", backend.log());
        assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
    }
}

const WRITE_LOOP_SCENARIO: &str = r#"
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ "$i" -gt 200 ] && exit 1; usleep 50000
done
n=0
while true; do
    n=$((n + 1))
    dd if=/dev/urandom of=/dev/vda bs=64k count=64 seek=$((n % 8 * 64)) conv=fsync 2>/dev/null
    echo "SPLITVMM-RESULT round=$n"
done
"#;

const SMALL_RW_SCENARIO: &str = r#"
r() { echo "SPLITVMM-RESULT $*"; }
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ "$i" -gt 200 ] && exit 1; usleep 50000
done
dd if=/dev/urandom of=/tmp/x bs=64k count=16 2>/dev/null
dd if=/tmp/x of=/dev/vda bs=64k seek=100 conv=fsync 2>/dev/null || exit 1
echo 3 > /proc/sys/vm/drop_caches
r "written=$(sha256sum /tmp/x | cut -d' ' -f1)"
r "read=$(dd if=/dev/vda bs=64k skip=100 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#;

#[test]
fn frontend_killed_during_writes_then_next_frontend_is_served() {
    let s = Scratch::new("qemu-kill");
    let image = s.sparse_image("disk.img", 32 * MIB);
    let mut backend = Backend::start(&s, "blk", &image, &["--num-queues", "1"]);
    let initrd = s.path("loop-initrd.cpio.gz");
    GuestFiles::new(WRITE_LOOP_SCENARIO).build_initrd(&initrd);
    let initrd2 = s.path("small-initrd.cpio.gz");
    GuestFiles::new(SMALL_RW_SCENARIO).build_initrd(&initrd2);
    let socket = backend.socket.clone();
    let disks = [Disk {
        socket: &socket,
        num_queues: 1,
    }];

    let _serial = qemu_lock();
    let mut qemu = Qemu::start(&initrd, &disks, 1);
    assert!(
        qemu.wait_console("SPLITVMM-RESULT round=3", GUEST_DEADLINE),
        "guest did not start writing; console tail:\n{}",
        qemu.tail(40)
    );
    qemu.kill();
    assert!(
        backend.wait_log("session 1: ", Duration::from_secs(10))
            && backend.wait_log("session 1: frontend disconnected", Duration::from_secs(10)),
        "backend did not drop the session:\n{}",
        backend.log()
    );
    assert!(backend.is_running(), "backend died with its frontend");

    let mut qemu2 = Qemu::start(&initrd2, &disks, 1);
    qemu2.wait_exit(GUEST_DEADLINE);
    let written = qemu2.result("written");
    assert_eq!(qemu2.result("read"), written);
    assert!(backend.wait_log("session 2: frontend disconnected", Duration::from_secs(10)));

    // SIGTERM while a guest writes: the backend finishes what it is doing and exits 0.
    let mut qemu3 = Qemu::start(&initrd, &disks, 1);
    assert!(
        qemu3.wait_console("SPLITVMM-RESULT round=2", GUEST_DEADLINE),
        "guest did not start writing; console tail:\n{}",
        qemu3.tail(40)
    );
    let (status, took) = backend.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", backend.log());
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM under I/O took {took:?}"
    );
    eprintln!("SIGTERM during guest writes: exit 0 after {took:?}");
    qemu3.kill();
}
