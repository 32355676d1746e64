//! `--disk` backends that are missing, refuse, hang up or lack what the device needs: one clear
//! line on stderr naming the socket (and the feature), exit status 1, before any guest runs.
//! The backends here are a few lines of the vhost-user protocol, so no VM ever starts; the
//! tests need an openable /dev/kvm (the VM is created before the disks connect) and say so
//! when there is none.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SPLITVMM: &str = env!("CARGO_BIN_EXE_splitvmm");

const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_USER_PROTOCOL_F_MQ and REPLY_ACK, but not CONFIG.
const PROTOCOL_WITHOUT_CONFIG: u64 = 1 | (1 << 3);

/// A folder for one test's kernel and sockets, removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

fn scratch_dir(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("splitvmm-disk-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    Scratch(dir)
}

/// A file that passes the bzImage magic check (the disks connect before the kernel loads).
fn fake_bzimage(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("bzImage");
    let mut image = vec![0u8; 0x400];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&path, image).unwrap();
    path
}

fn run_with_disk(dir: &std::path::Path, disk: &str) -> Output {
    let kernel = fake_bzimage(dir);
    Command::new(SPLITVMM)
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "128M"])
        .args(["--disk", disk])
        .output()
        .unwrap()
}

/// Checks for exit 1 with one stderr line holding every needle; `false` (skip) when this host's
/// /dev/kvm cannot run the VMM at all.
fn assert_one_line_error(output: &Output, needles: &[&str]) -> bool {
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("/dev/kvm") || stderr.contains("KVM on this host lacks") {
        eprintln!("skipped: no usable /dev/kvm here ({})", stderr.trim());
        return false;
    }
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    }
    true
}

/// The first connection to `listener`, or `None` after 20 s (the VMM never came).
fn accept(listener: &UnixListener) -> Option<UnixStream> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((stream, _)) = listener.accept() {
            stream.set_nonblocking(false).unwrap();
            return Some(stream);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A backend that answers GET_FEATURES and GET_PROTOCOL_FEATURES with these and hangs up at
/// any other request that wants an answer.
fn fake_backend(listener: UnixListener, features: u64, protocol: u64) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut stream) = accept(&listener) else {
            return;
        };
        loop {
            let mut header = [0u8; 12];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
            let (request, size) = (word(0), word(8) as usize);
            let mut payload = vec![0u8; size];
            if stream.read_exact(&mut payload).is_err() {
                return;
            }
            let value = match request {
                GET_FEATURES => features,
                GET_PROTOCOL_FEATURES => protocol,
                SET_OWNER | SET_PROTOCOL_FEATURES => continue,
                _ => return,
            };
            let mut reply = Vec::new();
            reply.extend_from_slice(&request.to_le_bytes());
            // Version 1, reply.
            reply.extend_from_slice(&0x5u32.to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&value.to_le_bytes());
            if stream.write_all(&reply).is_err() {
                return;
            }
        }
    })
}

#[test]
fn missing_socket_is_named() {
    let dir = scratch_dir("missing");
    let socket = dir.join("nobody-here.sock");
    let output = run_with_disk(&dir, &format!("socket={}", socket.display()));
    assert_one_line_error(
        &output,
        &[
            "cannot connect to the vhost-user socket",
            socket.to_str().unwrap(),
        ],
    );
}

#[test]
fn refused_socket_is_named() {
    let dir = scratch_dir("refused");
    let socket = dir.join("closed.sock");
    // Bound once, then closed: the file stays, nothing listens.
    drop(UnixListener::bind(&socket).unwrap());
    let output = run_with_disk(&dir, &format!("socket={}", socket.display()));
    assert_one_line_error(&output, &["Connection refused", socket.to_str().unwrap()]);
}

#[test]
fn backend_that_hangs_up_at_once() {
    let dir = scratch_dir("hangup");
    let socket = dir.join("hangup.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let backend = std::thread::spawn(move || {
        drop(accept(&listener));
    });
    let output = run_with_disk(&dir, &format!("socket={}", socket.display()));
    assert_one_line_error(&output, &[socket.to_str().unwrap(), "failed"]);
    backend.join().unwrap();
}

#[test]
fn backend_without_virtio_1_is_refused_naming_the_feature() {
    let dir = scratch_dir("no-version-1");
    let socket = dir.join("old.sock");
    let backend = fake_backend(UnixListener::bind(&socket).unwrap(), PROTOCOL_FEATURES, 0);
    let output = run_with_disk(&dir, &format!("socket={}", socket.display()));
    assert_one_line_error(&output, &["lacks feature VIRTIO_F_VERSION_1", "old.sock"]);
    backend.join().unwrap();
}

#[test]
fn backend_without_config_messages_is_refused_naming_the_feature() {
    let dir = scratch_dir("no-config");
    let socket = dir.join("noconfig.sock");
    let features = VERSION_1 | PROTOCOL_FEATURES;
    let backend = fake_backend(
        UnixListener::bind(&socket).unwrap(),
        features,
        PROTOCOL_WITHOUT_CONFIG,
    );
    let output = run_with_disk(&dir, &format!("socket={}", socket.display()));
    assert_one_line_error(
        &output,
        &[
            "lacks feature VHOST_USER_PROTOCOL_F_CONFIG",
            "noconfig.sock",
        ],
    );
    backend.join().unwrap();
}

#[test]
fn two_queues_need_the_backends_mq() {
    let dir = scratch_dir("no-mq");
    let socket = dir.join("nomq.sock");
    // CONFIG only.
    let backend = fake_backend(
        UnixListener::bind(&socket).unwrap(),
        VERSION_1 | PROTOCOL_FEATURES,
        1 << 9,
    );
    let output = run_with_disk(&dir, &format!("socket={},num_queues=2", socket.display()));
    assert_one_line_error(
        &output,
        &["lacks feature VHOST_USER_PROTOCOL_F_MQ", "nomq.sock"],
    );
    backend.join().unwrap();
}
