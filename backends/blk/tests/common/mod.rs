//! Fixtures shared by the integration tests: scratch folders, the backend process (killed on
//! drop, its stderr kept in a log file), deadlines instead of sleeps, /proc counters.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod qemu;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_splitvmm-blk");

/// Polls `check` every 10 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh folder for one test, removed on drop unless the test failed (kept for inspection).
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("splitvmm-blk-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A sparse image of `size` bytes.
    pub fn sparse_image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `splitvmm-blk`. Killed (SIGKILL) on drop if still running.
pub struct Backend {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Backend {
    /// Starts the backend on `scratch/<name>.sock` and waits until it listens.
    pub fn start(scratch: &Scratch, name: &str, image: &Path, extra: &[&str]) -> Backend {
        let socket = scratch.path(&format!("{name}.sock"));
        let log = scratch.path(&format!("{name}.log"));
        let stderr = File::create(&log).expect("backend log");
        let child = Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .env("SPLITVMM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn splitvmm-blk");
        let mut backend = Backend {
            child,
            socket,
            log,
            status: None,
        };
        let ready = wait_until(Duration::from_secs(20), || {
            backend.log().contains("info: serving") || !backend.is_running()
        });
        assert!(
            ready && backend.is_running(),
            "splitvmm-blk did not start listening:\n{}",
            backend.log()
        );
        backend
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the backend logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.status = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log().contains(needle))
    }

    /// Sends `signal` and waits for the exit; returns the status and how long it took.
    pub fn signal_and_wait(&mut self, signal: i32, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        // SAFETY: kill() on our own child's pid; no pointers.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let exited = wait_until(limit, || !self.is_running());
        assert!(
            exited,
            "splitvmm-blk did not exit within {limit:?} of signal {signal}:\n{}",
            self.log()
        );
        let status = self.status.expect("exit status recorded by is_running");
        (status, start.elapsed())
    }

    pub fn fd_count(&self) -> usize {
        proc_entries(self.pid(), "fd")
    }

    pub fn thread_count(&self) -> usize {
        proc_entries(self.pid(), "task")
    }

    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- splitvmm-blk log ---\n{}", self.log());
        }
    }
}

fn proc_entries(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs `splitvmm-blk` (as `uid` if given) and expects it to exit within 20 s, as it must for a
/// bad command line; returns its status and stderr.
pub fn run_blk_expecting_exit<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    uid: Option<u32>,
) -> (ExitStatus, String) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let mut child = command.spawn().expect("spawn splitvmm-blk");
    let mut status = None;
    let exited = wait_until(Duration::from_secs(20), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "splitvmm-blk {:?} kept running",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>()
        );
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status.expect("status set when exited"), stderr)
}

/// Asserts a failed run with `code`, exactly one stderr line containing every needle, no panic.
pub fn assert_one_line_error(status: ExitStatus, stderr: &str, code: i32, needles: &[&str]) {
    assert_eq!(status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr}");
    assert!(stderr.starts_with("splitvmm-blk: "), "stderr: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    }
}
