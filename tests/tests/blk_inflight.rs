//! Protocol tests of `splitvmm-blk` without a VM: in-flight tracking (INFLIGHT_SHMFD). A backend
//! SIGKILLed with requests in flight is restarted on the same socket; the frontend reconnects
//! with the same in-flight buffer, and every request completes exactly once, with its data on
//! the disk, for both I/O engines. (qemu-storage-daemon 7.2 cannot serve as a reference here:
//! its vhost-user-blk export does not offer INFLIGHT_SHMFD.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use vhost::vhost_user::message::VhostUserInflight;

use splitvmm_tests::vhost::blk::{BlkCompletion, BlkFrontend, BlkOptions, BlkRequest, BlkStatus};
use splitvmm_tests::vhost::blk_daemon::blk_binary;
use splitvmm_tests::vhost::process::{BackendProcess, TempDir};

const MIB: u64 = 1 << 20;
/// Requests per round, all made available with one kick.
const QD: u64 = 64;
/// Bytes per write.
const LEN: u64 = 64 * 1024;
const ROUNDS: u64 = 30;
/// Kills that must catch a request in flight.
const MIN_CAUGHT: usize = 5;
const MAX_ROUNDS: u64 = 400;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8).wrapping_mul(29).wrapping_add(seed as u8)
                ^ ((i >> 9) as u8)
                ^ ((seed >> 8) as u8)
        })
        .collect()
}

fn spawn(dir: &Path, image: &Path, socket: &Path, engine: &str, generation: u64) -> BackendProcess {
    let mut cmd = Command::new(blk_binary().unwrap());
    cmd.arg("--socket")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .arg("--io-engine")
        .arg(engine)
        .env("SPLITVMM_LOG", "info");
    BackendProcess::spawn(
        &format!("splitvmm-blk-{generation}"),
        &mut cmd,
        dir,
        socket.to_owned(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("starting splitvmm-blk ({engine}): {e}"))
}

/// Entries of queue 0 marked in flight in the buffer (a queue region is a 16-byte header and
/// 16 bytes per descriptor; `inflight` is a descriptor state's first byte).
fn marked_in_flight(file: &File, queue_size: u16) -> usize {
    let mut region = vec![0u8; 16 + 16 * usize::from(queue_size)];
    file.read_exact_at(&mut region, 0).unwrap();
    (0..usize::from(queue_size))
        .filter(|d| region[16 + 16 * d] == 1)
        .count()
}

/// (resubmitted, already completed) from the backend's "resubmitting" log line.
fn recovery_of(log: &str) -> (usize, usize) {
    let Some(line) = log.lines().find(|l| l.contains("resubmitting")) else {
        return (0, 0);
    };
    let number_after = |key: &str| -> Option<usize> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let resubmitted = number_after("resubmitting ").unwrap_or(0);
    let repaired = line
        .find(", ")
        .and_then(|i| line[i + 2..].split(' ').next()?.parse().ok())
        .unwrap_or(0);
    (resubmitted, repaired)
}

/// Waits until every thread of `pid` is stopped (SIGSTOP takes effect asynchronously).
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                        // The state follows the parenthesised command name.
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
                    })
                })
            })
            .unwrap_or(true);
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not stop");
        std::thread::yield_now();
    }
}

fn kill_during_writes(engine: &str) {
    let dir = TempDir::new("inflight").unwrap();
    let image: PathBuf = dir.path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = spawn(dir.path(), &image, &socket, engine, 0);
    let opts = BlkOptions::default().with_inflight();
    let queue_size = opts.queue_size;
    let mut dev = BlkFrontend::connect(&socket, opts).unwrap();
    assert!(
        dev.inflight().is_some(),
        "INFLIGHT_SHMFD not negotiated: {:?}",
        dev.negotiated()
    );
    let mem = dev.memory().clone();
    let bufs: Vec<_> = (0..QD)
        .map(|_| mem.alloc_owned(LEN, 4096).unwrap())
        .collect();
    let mut found_in_flight = 0;
    let mut total_resubmitted = 0;
    let mut rounds_with_in_flight = 0;
    let mut round = 0;
    loop {
        let q = dev.queue(0);
        for (i, buf) in bufs.iter().enumerate() {
            let i = i as u64;
            buf.write(0, &pattern(LEN as usize, round * QD + i))
                .unwrap();
            q.enqueue(&BlkRequest::write(i * (LEN / 512), &[buf.buf()]).with_tag(i))
                .unwrap();
        }
        q.vring_mut().publish().unwrap();
        q.vring_mut().kick().unwrap();
        // Freeze the backend (SIGSTOP) until it is caught with a request fetched and not
        // completed, or with everything done; then SIGKILL it.
        let marked = loop {
            backend.signal(Signal::SIGSTOP);
            wait_stopped(backend.pid());
            let marked = marked_in_flight(dev.inflight_file().unwrap(), queue_size);
            let q = dev.queue(0);
            let all_done = q.vring().used_idx().unwrap() == q.vring().avail_idx().unwrap();
            if marked > 0 || all_done {
                break marked;
            }
            backend.signal(Signal::SIGCONT);
            std::thread::sleep(Duration::from_micros(20 + 10 * (round % 7)));
        };
        backend.kill();
        found_in_flight += marked;
        rounds_with_in_flight += usize::from(marked > 0);
        backend = spawn(dir.path(), &image, &socket, engine, round + 1);
        dev.reconnect()
            .unwrap_or_else(|e| panic!("round {round}: reconnect: {e}\n{}", backend.stderr()));
        let q = dev.queue(0);
        let mut done: Vec<BlkCompletion> = Vec::new();
        q.wait(QD as usize, &mut done)
            .unwrap_or_else(|e| panic!("round {round} ({engine}): {e}\n{}", backend.stderr()));
        assert_eq!(done.len() as u64, QD, "round {round}: completions");
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            (0..QD).collect::<Vec<_>>(),
            "round {round}: each request once"
        );
        assert!(
            done.iter().all(|c| c.status == BlkStatus::Ok),
            "round {round}: {done:?}"
        );
        assert_eq!(q.in_flight(), 0);
        // The new backend found in the buffer what the old one left marked.
        let (resubmitted, repaired) = recovery_of(&backend.stderr());
        assert_eq!(
            resubmitted + repaired,
            marked,
            "round {round}: {marked} marked in flight, {resubmitted} resubmitted, {repaired} \
             repaired\n{}",
            backend.stderr()
        );
        total_resubmitted += resubmitted;
        // Nothing more arrives (a request completed twice would show as a bogus used id).
        let mut extra = Vec::new();
        std::thread::sleep(Duration::from_millis(5));
        q.poll(&mut extra).unwrap();
        assert!(
            extra.is_empty(),
            "round {round}: extra completions {extra:?}"
        );
        for i in 0..QD {
            let (status, back) = q.read(i * (LEN / 512), LEN).unwrap();
            assert_eq!(status, BlkStatus::Ok);
            assert!(
                back == pattern(LEN as usize, round * QD + i),
                "round {round} ({engine}): data of request {i}"
            );
        }
        // At least ROUNDS kills, and on until MIN_CAUGHT of them caught requests in flight
        // (the sync engine has at most one in flight, so it is caught less often).
        if round + 1 >= ROUNDS && rounds_with_in_flight >= MIN_CAUGHT {
            break;
        }
        assert!(
            round < MAX_ROUNDS,
            "{engine}: only {rounds_with_in_flight} of {round} kills caught a request in flight"
        );
        round += 1;
    }
    let log = backend.stderr();
    eprintln!(
        "{engine}: {} kills, {found_in_flight} requests marked in flight at the kills \
         ({rounds_with_in_flight} rounds had some), {total_resubmitted} resubmitted",
        round + 1
    );
    // The file on disk has the last round's data too (read by the test, not the backend).
    let f = File::open(&image).unwrap();
    let mut back = vec![0u8; LEN as usize];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(
        back == pattern(LEN as usize, round * QD),
        "image content\n{log}"
    );
}

#[test]
fn sigkill_with_requests_in_flight_sync() {
    kill_during_writes("sync");
}

#[test]
fn sigkill_with_requests_in_flight_uring() {
    kill_during_writes("uring");
}

/// Clean stops (GET_VRING_BASE) and reconnects with the same buffer: the backend finds nothing
/// in flight and the rings go on; nothing is left marked. (A fresh buffer taking the ring's used
/// index, and a published-but-uncleared last batch, are unit tests of `inflight.rs`.)
#[test]
fn clean_reconnect_with_the_same_buffer() {
    let dir = TempDir::new("inflight-clean").unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let _backend = spawn(dir.path(), &image, &socket, "uring", 0);
    let mut dev = BlkFrontend::connect(&socket, BlkOptions::default().with_inflight()).unwrap();
    for round in 0..5u64 {
        for i in 0..8u64 {
            assert_eq!(
                dev.queue(0)
                    .write(i * 8, &pattern(4096, round * 8 + i))
                    .unwrap(),
                BlkStatus::Ok
            );
        }
        dev.stop().unwrap();
        dev.reconnect().unwrap();
        for i in 0..8u64 {
            let (s, back) = dev.queue(0).read(i * 8, 4096).unwrap();
            assert_eq!(s, BlkStatus::Ok);
            assert!(back == pattern(4096, round * 8 + i));
        }
    }
    assert_eq!(
        marked_in_flight(dev.inflight_file().unwrap(), 256),
        0,
        "nothing left marked in flight"
    );
}

/// In-flight messages with sizes that do not fit, or a buffer not sealed against shrinking, are
/// refused (the session ends, as for any
/// failed message) and the daemon serves the next frontend.
#[test]
fn bad_inflight_messages_are_refused() {
    let dir = TempDir::new("inflight-bad").unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = spawn(dir.path(), &image, &socket, "sync", 0);
    let small = dir.path().join("small");
    let small = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(small)
        .unwrap();
    small.set_len(4096).unwrap();
    let bad = [
        // Larger than the file.
        (1 << 30, 0, 1, 256),
        // Smaller than 256 descriptors need.
        (64, 0, 1, 256),
        // Offset past the file.
        (4096, 1 << 40, 1, 1),
        // More queues than the device has.
        (4096, 0, 9, 1),
        // No descriptors.
        (4096, 0, 1, 0),
        // Big enough, but a plain file that the frontend could shrink under the mapping.
        (4096, 0, 1, 1),
    ];
    for (mmap_size, mmap_offset, num_queues, queue_size) in bad {
        let mut dev = BlkFrontend::connect(&socket, BlkOptions::default().with_inflight()).unwrap();
        let msg = VhostUserInflight {
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        };
        assert!(
            dev.connection()
                .unwrap()
                .set_inflight_fd(&msg, &small)
                .is_err(),
            "in-flight buffer ({mmap_size}, {mmap_offset}, {num_queues}, {queue_size}) accepted"
        );
    }
    for (num_queues, queue_size) in [(0, 256), (2, 256), (1, 0)] {
        let mut dev = BlkFrontend::connect(&socket, BlkOptions::default().with_inflight()).unwrap();
        assert!(
            dev.connection()
                .unwrap()
                .get_inflight_fd(num_queues, queue_size)
                .is_err(),
            "GET_INFLIGHT_FD for {num_queues} queues of {queue_size} accepted"
        );
    }
    assert!(backend.is_running(), "{}", backend.stderr());
    assert!(
        backend.stderr().contains("not sealed against shrinking"),
        "the unsealed buffer was not refused for its missing seal:\n{}",
        backend.stderr()
    );
    let mut dev = BlkFrontend::connect(&socket, BlkOptions::default().with_inflight()).unwrap();
    assert_eq!(dev.queue(0).write(0, &[7; 4096]).unwrap(), BlkStatus::Ok);
}
