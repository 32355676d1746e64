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
        log.contains("on the inherited socket (LISTEN_FDS)"),
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

/// Starts splitvmm-blk the way systemd (or a supervisor holding the socket) does: `listener` as
/// descriptor 3, LISTEN_PID = the backend's own pid, LISTEN_FDS=1. The shell passes the socket
/// on from its stdin and execs, so `$$` is the backend's pid.
fn spawn_activated(
    dir: &std::path::Path,
    image: &std::path::Path,
    socket: &std::path::Path,
    listener: &std::os::unix::net::UnixListener,
) -> BackendProcess {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" --image "$1" 3<&0 0</dev/null"#)
        .arg(blk_binary().unwrap())
        .arg(image);
    let stdin = std::process::Stdio::from(std::os::fd::OwnedFd::from(
        listener.try_clone().expect("dup the listener"),
    ));
    BackendProcess::spawn_with_stdin(
        "splitvmm-blk",
        &mut cmd,
        stdin,
        dir,
        socket.to_owned(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("starting splitvmm-blk on an inherited socket: {e}"))
}

/// What a supervisor does to restart a backend without the path ever disappearing: it keeps
/// the listening socket and hands it to each new instance. SIGTERM of one instance must leave
/// the socket usable for the next (no shutdown() of a socket that is not ours).
#[test]
fn a_held_socket_serves_instance_after_instance() {
    let dir = TempDir::new("blk-held-socket").unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let socket = dir.path().join("held.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    for instance in 0..3u8 {
        let mut backend = spawn_activated(dir.path(), &image, &socket, &listener);
        {
            let mut dev = BlkFrontend::connect(&socket, BlkOptions::default())
                .unwrap_or_else(|e| panic!("instance {instance}: {e}\n{}", backend.stderr()));
            let q = dev.queue(0);
            if instance > 0 {
                // What the previous instance wrote is there.
                assert_eq!(q.read(8, 4096).unwrap().1, vec![instance - 1; 4096]);
            }
            assert_eq!(q.write(8, &[instance; 4096]).unwrap(), BlkStatus::Ok);
            assert_eq!(q.read(8, 4096).unwrap().1, vec![instance; 4096]);
        }
        backend.signal(Signal::SIGTERM);
        let status = backend
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("instance {instance}: no exit after SIGTERM"));
        assert!(
            status.success(),
            "instance {instance}: {status:?}\n{}",
            backend.stderr()
        );
        assert!(
            socket.exists(),
            "instance {instance} removed the socket path"
        );
    }
}

/// `--fd`: a socket inherited already connected to the frontend; the backend serves that one
/// frontend and exits 0 when it hangs up.
#[test]
fn fd_serves_one_connected_frontend_and_exits_when_it_leaves() {
    let dir = TempDir::new("blk-fd").unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec "$0" --fd 3 --image "$1" 3<&0 0</dev/null"#)
        .arg(blk_binary().unwrap())
        .arg(&image)
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            theirs,
        )));
    let mut child = splitvmm_tests::owned_child::OwnedChild::spawn(&mut cmd, false)
        .expect("spawn splitvmm-blk --fd");
    // The Command still holds our copy of the backend's end: close it, so that a backend that
    // died shows as a hang-up instead of a silent peer.
    drop(cmd);
    {
        let mut dev = BlkFrontend::over_stream(ours, "socketpair", BlkOptions::default())
            .expect("handshake over the inherited socket");
        assert_eq!(dev.config().capacity_bytes(), 16 * MIB);
        let q = dev.queue(0);
        assert_eq!(q.write(0, &[0x3c; 4096]).unwrap(), BlkStatus::Ok);
        assert_eq!(q.read(0, 4096).unwrap().1, vec![0x3c; 4096]);
    }
    let status = child
        .wait_timeout(Duration::from_secs(10))
        .expect("splitvmm-blk --fd did not exit after its frontend left");
    assert!(status.success(), "{status:?}");
}
