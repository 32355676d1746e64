//! splitvmm-supervise with the real splitvmm-blk: the socket path stays while the backend is
//! killed and restarted, data written before the kill is served after it, SIGTERM stops both;
//! a backend that keeps dying is restarted with back-off and, with --max-restarts, given up on.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkStatus};
use splitvmm_tests::vhost::blk_daemon::blk_binary;
use splitvmm_tests::vhost::process::{BackendProcess, TempDir};

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(20);

fn supervisor(dir: &Path, socket: &Path, backend: &[&str]) -> BackendProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_splitvmm-supervise"));
    cmd.arg("--socket").arg(socket).arg("--").args(backend);
    BackendProcess::spawn(
        "splitvmm-supervise",
        &mut cmd,
        dir,
        socket.to_owned(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("starting splitvmm-supervise: {e}"))
}

/// The pids the supervisor reported starting, in order.
fn started_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter(|l| l.starts_with("splitvmm-supervise: info: started "))
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect()
}

fn wait_for(what: &str, p: &BackendProcess, mut done: impl FnMut(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let log = p.stderr();
        if done(&log) {
            return log;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no {what} within {DEADLINE:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_backend_comes_back_on_the_same_socket_with_its_data() {
    let dir = TempDir::new("supervise").unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let blk = blk_binary().unwrap();
    let blk = blk.to_str().unwrap();
    let image_arg = image.to_str().unwrap();
    let mut sup = supervisor(dir.path(), &socket, &[blk, "--image", image_arg]);

    for round in 0..3u8 {
        {
            let mut dev = BlkFrontend::connect(&socket, BlkOptions::default())
                .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", sup.stderr()));
            let q = dev.queue(0);
            if round > 0 {
                assert_eq!(q.read(8, 4096).unwrap().1, vec![round - 1; 4096]);
            }
            assert_eq!(q.write(8, &[round; 4096]).unwrap(), BlkStatus::Ok);
            // FLUSH: what the next instance reads must have reached the image.
            assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
        }
        let log = wait_for("backend start", &sup, |l| {
            started_pids(l).len() > round as usize
        });
        let pid = started_pids(&log)[round as usize];
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL the backend");
        assert!(
            socket.exists(),
            "the socket path went away with the backend"
        );
        wait_for("restart", &sup, |l| {
            l.contains(&format!("restart {}", round + 1))
        });
    }

    sup.signal(Signal::SIGTERM);
    let status = sup
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", sup.stderr()));
    assert!(status.success(), "{status:?}\n{}", sup.stderr());
    assert!(!socket.exists(), "the supervisor left its socket behind");
    let last = *started_pids(&sup.stderr()).last().expect("a backend pid");
    assert!(
        kill(Pid::from_raw(last), None).is_err(),
        "the backend outlived its supervisor"
    );
}

#[test]
fn a_backend_that_keeps_dying_is_backed_off_and_given_up_on() {
    let dir = TempDir::new("supervise-crash").unwrap();
    let socket = dir.path().join("crash.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_splitvmm-supervise"));
    cmd.arg("--socket").arg(&socket).args([
        "--restart-delay-ms",
        "20",
        "--max-restarts",
        "4",
        "--",
        "false",
    ]);
    let mut sup = BackendProcess::spawn(
        "crash",
        &mut cmd,
        dir.path(),
        socket,
        Duration::from_secs(10),
    )
    .expect("spawn");
    let status = sup
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("still running:\n{}", sup.stderr()));
    let log = sup.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("giving up"), "{log}");
    let delays: Vec<u64> = log
        .lines()
        .filter_map(|l| {
            l.split("restarting in ")
                .nth(1)?
                .strip_suffix(" ms")?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(delays, [20, 40, 80, 160], "back-off:\n{log}");
}
