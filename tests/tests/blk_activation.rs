//! splitvmm-blk under systemd socket activation: started by systemd's own
//! `systemd-socket-activate` (the tool that runs a `.socket` unit's protocol from the command
//! line), it serves the listening socket it inherits (LISTEN_FDS), takes one frontend after
//! another on it, and on SIGTERM exits 0 leaving the socket path alone: the path belongs to
//! systemd, which keeps it across backend restarts.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkStatus};
use splitvmm_tests::vhost::blk_daemon::blk_binary;
use splitvmm_tests::vhost::process::{BackendProcess, TempDir};

const MIB: u64 = 1 << 20;

#[test]
fn serves_the_socket_systemd_passes_and_leaves_its_path_alone() {
    let dir = TempDir::new("blk-activation").unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let socket = dir.path().join("activated.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("--listen")
        .arg(&socket)
        .arg(blk_binary().unwrap())
        .arg("--image")
        .arg(&image);
    // The activator binds the path at once and execs the backend on the first connection, so
    // "the socket exists" is the readiness condition here too.
    let mut backend = BackendProcess::spawn(
        "systemd-socket-activate",
        &mut cmd,
        dir.path(),
        socket.clone(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("starting systemd-socket-activate: {e}"));

    for round in 0..3u8 {
        let mut dev = BlkFrontend::connect(&socket, BlkOptions::default())
            .unwrap_or_else(|e| panic!("frontend {round}: {e}\n{}", backend.stderr()));
        assert_eq!(dev.config().capacity_bytes(), 16 * MIB);
        let q = dev.queue(0);
        assert_eq!(q.write(8, &[round; 4096]).unwrap(), BlkStatus::Ok);
        assert_eq!(q.read(8, 4096).unwrap().1, vec![round; 4096]);
    }
    let log = backend.stderr();
    assert!(
        log.contains("on the socket from systemd"),
        "splitvmm-blk did not serve the inherited socket:\n{log}"
    );
    assert!(!log.contains("replaced stale socket"), "{log}");

    backend.signal(Signal::SIGTERM);
    let status = backend
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", backend.stderr()));
    assert!(status.success(), "exit {status:?}:\n{}", backend.stderr());
    assert!(
        socket.exists(),
        "splitvmm-blk removed the socket path that systemd owns"
    );
}
