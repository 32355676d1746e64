//! The daemon from the outside, without a VM: bad command lines (one clear line, exit 2 or 1),
//! the socket rules (mode 0600, stale socket replaced, live socket refused), SIGTERM, the
//! vhost-user handshake (features, protocol features, config space), and sessions that come and
//! go without leaking descriptors, threads or mappings.

mod common;

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::{assert_one_line_error, run_blk_expecting_exit, Backend, Scratch};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const MIB: u64 = 1 << 20;
// virtio feature bits (virtio 1.2, 5.2.3 and 6).
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;

fn args(socket: &std::path::Path, image: &std::path::Path, extra: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "--socket".into(),
        socket.into(),
        "--image".into(),
        image.into(),
    ];
    v.extend(extra.iter().map(OsString::from));
    v
}

#[test]
fn missing_image_is_named() {
    let s = Scratch::new("missing-image");
    let image = s.path("nope.img");
    let (status, stderr) = run_blk_expecting_exit(&args(&s.path("b.sock"), &image, &[]), None);
    assert_one_line_error(status, &stderr, 2, &["cannot open image", "nope.img"]);
}

#[test]
fn no_socket_and_no_socket_from_systemd_is_a_usage_error() {
    let s = Scratch::new("no-socket");
    let image = s.sparse_image("d.img", MIB);
    let (status, stderr) = run_blk_expecting_exit(&[OsString::from("--image"), image.into()], None);
    assert_one_line_error(status, &stderr, 2, &["no socket", "--socket"]);
}

#[test]
fn bad_numbers_and_serials_are_refused() {
    let s = Scratch::new("bad-numbers");
    let image = s.sparse_image("d.img", MIB);
    let socket = s.path("b.sock");
    let cases: [(&[&str], &str); 6] = [
        (&["--num-queues", "0"], "--num-queues '0'"),
        (&["--num-queues", "65"], "--num-queues '65'"),
        (&["--num-queues", "two"], "--num-queues 'two'"),
        (&["--queue-size", "100"], "--queue-size '100'"),
        (&["--queue-size", "65536"], "--queue-size '65536'"),
        (&["--serial", "012345678901234567890"], "21 bytes"),
    ];
    for (extra, needle) in cases {
        let (status, stderr) = run_blk_expecting_exit(&args(&socket, &image, extra), None);
        assert_one_line_error(status, &stderr, 2, &[needle]);
    }
    // clap's own errors (missing option, unknown flag) are one line too.
    let (status, stderr) = run_blk_expecting_exit(&["--socket", "/tmp/x.sock"], None);
    assert_one_line_error(status, &stderr, 2, &["--image"]);
    let (status, stderr) = run_blk_expecting_exit(&args(&socket, &image, &["--frobnicate"]), None);
    assert_one_line_error(status, &stderr, 2, &["--frobnicate"]);
    // An image smaller than a sector is refused when opened (exit 1).
    let tiny = s.path("tiny.img");
    std::fs::write(&tiny, [0u8; 100]).expect("tiny image");
    let (status, stderr) = run_blk_expecting_exit(&args(&socket, &tiny, &[]), None);
    assert_one_line_error(status, &stderr, 1, &["smaller than one 512-byte sector"]);
    assert!(!socket.exists());
}

#[test]
fn unusable_socket_locations_are_refused() {
    let s = Scratch::new("socket-location");
    let image = s.sparse_image("d.img", MIB);
    // A folder that does not exist.
    let missing = s.path("no-such-folder").join("b.sock");
    let (status, stderr) = run_blk_expecting_exit(&args(&missing, &image, &[]), None);
    assert_one_line_error(status, &stderr, 2, &["no-such-folder", "does not exist"]);
    // A path too long for a unix socket address.
    let long = s.path(&"x".repeat(120));
    let (status, stderr) = run_blk_expecting_exit(&args(&long, &image, &[]), None);
    assert_one_line_error(status, &stderr, 1, &["longer than"]);
    // A folder the backend may not write to. Root writes anywhere, so as root the backend runs
    // as nobody (65534) against a root-owned 0755 folder; otherwise the folder is made 0555.
    let locked = s.path("locked");
    std::fs::create_dir(&locked).expect("locked folder");
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // SAFETY: geteuid() has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let uid = if root {
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Some(65534)
    } else {
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        None
    };
    let socket = locked.join("b.sock");
    let (status, stderr) = run_blk_expecting_exit(&args(&socket, &image, &["--readonly"]), uid);
    assert_one_line_error(
        status,
        &stderr,
        1,
        &["cannot create socket", "locked/b.sock", "Permission denied"],
    );
}

#[test]
fn socket_is_0600_and_a_stale_one_is_replaced() {
    let s = Scratch::new("stale");
    let image = s.sparse_image("d.img", MIB);
    let socket = s.path("blk.sock");
    // A backend that died leaves its socket file behind: nobody listens on it any more.
    drop(UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let backend = Backend::start(&s, "blk", &image, &[]);
    assert_eq!(backend.socket, socket);
    let mode = std::fs::metadata(&socket)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    assert!(backend.log().contains("replaced stale socket"));
    handshake(&socket, 1, false);
}

#[test]
fn a_live_socket_or_a_non_socket_is_refused() {
    let s = Scratch::new("live");
    let image = s.sparse_image("d.img", MIB);
    let first = Backend::start(&s, "blk", &image, &[]);
    let (status, stderr) = run_blk_expecting_exit(&args(&first.socket, &image, &[]), None);
    assert_one_line_error(
        status,
        &stderr,
        1,
        &["served by a live process", "blk.sock"],
    );
    // The first backend still owns its socket and serves.
    assert!(first.socket.exists());
    handshake(&first.socket, 1, false);

    let file = s.path("notes.txt");
    std::fs::write(&file, "not a socket").expect("file");
    let (status, stderr) = run_blk_expecting_exit(&args(&file, &image, &[]), None);
    assert_one_line_error(status, &stderr, 1, &["is not a socket"]);
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "not a socket"
    );
}

#[test]
fn sigterm_exits_zero_promptly_and_removes_the_socket() {
    let s = Scratch::new("sigterm");
    let image = s.sparse_image("d.img", MIB);
    // Idle: waiting for a frontend.
    let mut idle = Backend::start(&s, "idle", &image, &[]);
    let (status, took) = idle.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", idle.log());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(!idle.socket.exists());

    // With a frontend connected and its session set up.
    let mut busy = Backend::start(&s, "busy", &image, &["--num-queues", "2"]);
    let frontend = handshake(&busy.socket, 2, false);
    assert!(busy.wait_log("session 1: frontend connected", Duration::from_secs(5)));
    let (status, took) = busy.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", busy.log());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(!busy.socket.exists());
    drop(frontend);

    // SIGINT too.
    let mut int = Backend::start(&s, "int", &image, &[]);
    let (status, _) = int.signal_and_wait(libc::SIGINT, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", int.log());
}

/// Connects, claims the device and checks the features, protocol features, queue count and
/// config space; returns the connection (the session lasts while it is open).
fn handshake(socket: &std::path::Path, queues: u64, readonly: bool) -> Frontend {
    let mut frontend = Frontend::connect(socket, queues).expect("connect");
    frontend.set_owner().expect("SET_OWNER");
    let features = frontend.get_features().expect("GET_FEATURES");
    let always = F_VERSION_1
        | F_EVENT_IDX
        | F_INDIRECT_DESC
        | F_SEG_MAX
        | F_BLK_SIZE
        | F_FLUSH
        | F_MQ
        | F_PROTOCOL_FEATURES;
    assert_eq!(features & always, always, "features {features:#x}");
    if readonly {
        assert_eq!(features & (F_RO | F_DISCARD | F_WRITE_ZEROES), F_RO);
    } else {
        assert_eq!(
            features & (F_RO | F_DISCARD | F_WRITE_ZEROES),
            F_DISCARD | F_WRITE_ZEROES
        );
    }
    let protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    assert_eq!(protocol, wanted, "protocol features");
    frontend
        .set_protocol_features(protocol)
        .expect("SET_PROTOCOL_FEATURES");
    assert_eq!(frontend.get_queue_num().expect("GET_QUEUE_NUM"), queues);
    let (_, config) = frontend
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("GET_CONFIG");
    let u16_at = |at: usize| u16::from_le_bytes([config[at], config[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().expect("4 bytes"));
    let capacity = u64::from_le_bytes(config[0..8].try_into().expect("8 bytes"));
    assert_eq!(capacity, MIB / 512);
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u64::from(u16_at(34)), queues, "num_queues");
    assert!(u32_at(12) >= 2, "seg_max");
    frontend.set_features(features).expect("SET_FEATURES");
    frontend
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: a NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"splitvmm-blk-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    file.set_len(size).expect("size memfd");
    OwnedFd::from(file)
}

/// Mappings of the test's guest-RAM memfd in the backend (other mapping counts move with
/// glibc's per-thread malloc arenas, so they say little about leaks).
fn guest_ram_mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| {
            m.lines()
                .filter(|l| l.contains("memfd:splitvmm-blk-test"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn sessions_come_and_go_without_leaks() {
    use std::os::fd::AsRawFd;
    let s = Scratch::new("cycles");
    let image = s.sparse_image("d.img", MIB);
    let backend = Backend::start(&s, "blk", &image, &["--num-queues", "4"]);
    let guest_ram = memfd(64 * MIB);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 64 * MIB,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: guest_ram.as_raw_fd(),
    };
    let cycle = |n: usize| {
        let frontend = handshake(&backend.socket, 4, false);
        frontend.set_mem_table(&[region]).expect("SET_MEM_TABLE");
        // SET_MEM_TABLE waits for no reply without REPLY_ACK: wait until the backend mapped it.
        assert!(
            common::wait_until(Duration::from_secs(10), || guest_ram_mappings(
                backend.pid()
            ) == 1),
            "guest RAM not mapped in session {n}"
        );
        drop(frontend);
        assert!(
            backend.wait_log(
                &format!("session {n}: frontend disconnected"),
                Duration::from_secs(10)
            ),
            "session {n} did not end"
        );
    };
    // Warm up (first-use allocations), then measure.
    cycle(1);
    cycle(2);
    let (fds, threads) = (backend.fd_count(), backend.thread_count());
    let rss = backend.rss_kib();
    for n in 3..=52 {
        cycle(n);
    }
    assert_eq!(backend.fd_count(), fds, "descriptors leaked");
    assert_eq!(backend.thread_count(), threads, "threads leaked");
    assert_eq!(
        guest_ram_mappings(backend.pid()),
        0,
        "guest RAM still mapped"
    );
    let grown = backend.rss_kib().saturating_sub(rss);
    assert!(grown < 2048, "RSS grew by {grown} KiB over 50 sessions");
    // Idle between sessions: main thread and signal thread only.
    assert_eq!(threads, 2, "threads while idle");
}
