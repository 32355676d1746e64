//! The daemon from the outside: bad command lines (one clear line, exit 2), what cannot be set
//! up (no permission for the tap, a descriptor that is no tap, a live socket: one line, exit
//! 1), the socket's mode, and SIGTERM (exit 0, socket removed).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use splitvmm_tests::vhost::net::netns::NetNs;
use splitvmm_tests::vhost::process::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_splitvmm-net");

fn run_in(ns: Option<&NetNs>, args: &[&str]) -> Output {
    let mut cmd = match ns {
        Some(ns) => ns.command(BIN),
        None => Command::new(BIN),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running splitvmm-net")
}

fn assert_one_line(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(": info: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
    assert!(lines[0].starts_with("splitvmm-net: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "missing {n:?} in {stderr}");
    }
}

#[test]
fn bad_command_lines_exit_2_with_one_line() {
    let dir = TempDir::new("net-cli").unwrap();
    let sock = dir.path().join("n.sock");
    let sock = sock.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--tap", "t0", "--mac", "52:54:00:zz:00:01"], "--mac"),
        (&["--tap", "t0", "--mac", "03:00:00:00:00:01"], "multicast"),
        (&["--tap", "t0", "--mtu", "20"], "--mtu '20'"),
        (
            &["--tap", "t0", "--queue-size", "1000"],
            "--queue-size '1000'",
        ),
        (
            &["--tap", "t0", "--num-queue-pairs", "0"],
            "--num-queue-pairs '0'",
        ),
        (&["--tap", "t0", "--host-ip", "10.0.0.1"], "--host-ip"),
        (&["--tap", "this-name-is-too-long"], "--tap"),
        (&["--tap-fd", "5000"], "--tap-fd 5000"),
        (&[], "--tap"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["--socket", sock];
        args.extend_from_slice(extra);
        let out = run_in(None, &args);
        assert_one_line(&out, 2, &[needle]);
    }
    let out = run_in(None, &["--tap", "t0"]);
    assert_one_line(&out, 2, &["--socket"]);
}

#[test]
fn a_descriptor_that_is_not_a_tap_exits_1() {
    let dir = TempDir::new("net-cli").unwrap();
    let sock = dir.path().join("n.sock");
    // Descriptor 0 is /dev/null here.
    let out = run_in(None, &["--socket", sock.to_str().unwrap(), "--tap-fd", "0"]);
    assert_one_line(&out, 1, &["--tap-fd 0 is not a tap"]);
    assert!(!sock.exists());
}

#[test]
fn no_permission_for_the_tap_exits_1() {
    let ns = NetNs::new("cli").unwrap();
    let dir = TempDir::new("net-cli").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.path().join("n.sock");
    // As nobody (only the daemon: `ip netns exec` itself needs root): no CAP_NET_ADMIN.
    let out = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["--socket", sock.to_str().unwrap(), "--tap", "t0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // Where /dev/net/tun is 0666 (Debian's default) the open works and TUNSETIFF is refused.
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if stderr.contains("/dev/net/tun") {
        assert_one_line(&out, 1, &["cannot open /dev/net/tun", "ermission denied"]);
    } else {
        assert_one_line(&out, 1, &["tap t0", "not permitted", "CAP_NET_ADMIN"]);
    }
    assert!(!sock.exists());
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn socket_mode_live_socket_refused_and_sigterm() {
    let ns = NetNs::new("cli").unwrap();
    let dir = TempDir::new("net-cli").unwrap();
    let sock = dir.path().join("n.sock");
    let s = sock.to_str().unwrap();
    let mut first = ns
        .command(BIN)
        .args(["--socket", s, "--tap", "t0"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(Instant::now() < end, "no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second daemon on the same socket (another tap) is refused.
    let out = run_in(Some(&ns), &["--socket", s, "--tap", "t1"]);
    assert_one_line(&out, 1, &["served by a live process", s]);
    assert!(sock.exists(), "the live socket must survive");

    kill(Pid::from_raw(first.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut first, Duration::from_secs(5)).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?} {:?}", status.signal());
    assert!(!sock.exists(), "socket removed on exit");
    // A non-persistent tap goes with the daemon.
    assert!(ns.ip(&["link", "show", "dev", "t0"]).is_err());
}

/// Without CAP_NET_ADMIN, a persistent tap owned by the daemon's user is attached (the host
/// side is left to its owner, with one warning) and served.
#[test]
fn an_unprivileged_daemon_serves_a_tap_its_user_owns() {
    let ns = NetNs::new("cli").unwrap();
    ns.ip(&[
        "tuntap", "add", "dev", "ut0", "mode", "tap", "user", "65534", "vnet_hdr",
    ])
    .unwrap();
    let dir = TempDir::new("net-cli").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.path().join("n.sock");
    let mut child = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["--socket", sock.to_str().unwrap(), "--tap", "ut0"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
            panic!("exited {status:?}: {err}");
        }
        assert!(Instant::now() < end, "no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(5)).expect("exit after SIGTERM");
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("leaving the host side"), "{err}");
    // A persistent tap stays.
    assert!(ns.ip(&["link", "show", "dev", "ut0"]).is_ok());
}
