//! A backend daemon a test owns: started with its output in files, killed when dropped (with
//! its process group, and by the kernel if the test thread dies first), and its stderr printed
//! when the test is failing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::owned_child::OwnedChild;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot create the folder {path}: {source}")]
    TempDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    OutputFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {name} ({command}): {source}")]
    Spawn {
        name: String,
        command: String,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before its socket {socket} appeared; stderr:\n{stderr}")]
    EarlyExit {
        name: String,
        status: ExitStatus,
        socket: PathBuf,
        stderr: String,
    },
    #[error("{name} did not create its socket {socket} within {waited:?}; stderr:\n{stderr}")]
    NoSocket {
        name: String,
        socket: PathBuf,
        waited: Duration,
        stderr: String,
    },
}

/// A folder removed on drop (kept when `SPLITVMM_VHOST_KEEP=1`).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Result<Self, ProcessError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "splitvmm-vhost-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover of an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|source| ProcessError::TempDir {
            path: path.clone(),
            source,
        })?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let keep = matches!(std::env::var_os("SPLITVMM_VHOST_KEEP"), Some(v) if v != "0");
        if !keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[derive(Debug)]
pub struct BackendProcess {
    name: String,
    child: OwnedChild,
    socket: PathBuf,
    stderr_path: PathBuf,
}

/// Where a workspace binary the tests run lives: `$env_var` when set, else `name` in the cargo
/// target folder the running test binary lives in (`target/<profile>/deps/<test>` →
/// `target/<profile>/<name>`). Whether it exists is the caller's to check.
pub fn workspace_binary(name: &str, env_var: &str) -> std::io::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let deps = exe.parent().unwrap_or(Path::new("."));
    let profile = if deps.ends_with("deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    Ok(profile.join(name))
}

impl BackendProcess {
    /// Starts `cmd` (stdin /dev/null, stdout and stderr into `{name}.out` / `{name}.err` in
    /// `dir`) and waits until `socket` exists, failing early if the process exits.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        dir: &Path,
        socket: PathBuf,
        within: Duration,
    ) -> Result<Self, ProcessError> {
        Self::spawn_with_stdin(name, cmd, Stdio::null(), dir, socket, within)
    }

    /// Like [`Self::spawn`] with `stdin` as the process's standard input (e.g. a socket it
    /// is to inherit, which a shell can move to another descriptor).
    pub fn spawn_with_stdin(
        name: &str,
        cmd: &mut Command,
        stdin: Stdio,
        dir: &Path,
        socket: PathBuf,
        within: Duration,
    ) -> Result<Self, ProcessError> {
        let file = |ext: &str| {
            let path = dir.join(format!("{name}.{ext}"));
            File::create(&path)
                .map(|f| (f, path.clone()))
                .map_err(|source| ProcessError::OutputFile { path, source })
        };
        let (out, _) = file("out")?;
        let (err, stderr_path) = file("err")?;
        cmd.stdin(stdin)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = OwnedChild::spawn(cmd, true).map_err(|source| ProcessError::Spawn {
            name: name.to_owned(),
            command: format!("{cmd:?}"),
            source,
        })?;
        let mut p = BackendProcess {
            name: name.to_owned(),
            child,
            socket,
            stderr_path,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = p.try_wait() {
                return Err(ProcessError::EarlyExit {
                    name: p.name.clone(),
                    status,
                    socket: p.socket.clone(),
                    stderr: p.stderr(),
                });
            }
            if p.socket.exists() {
                return Ok(p);
            }
            if start.elapsed() >= within {
                return Err(ProcessError::NoSocket {
                    name: p.name.clone(),
                    socket: p.socket.clone(),
                    waited: within,
                    stderr: p.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.stderr_path.display()))
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// User + system CPU time the process has used so far (from /proc, in clock ticks).
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the parenthesised command name (which may hold spaces): state is
        // field 3, utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
        let ticks = utime + stime;
        Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(within)
    }

    /// SIGKILLs the process group and reaps the process.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.child.kill()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let status = self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} (pid {}, {}) stderr ----\n{}---- end of {} stderr ----",
                self.name,
                self.child.id(),
                status.map_or("exit unknown".to_owned(), |s| s.to_string()),
                self.stderr(),
                self.name
            );
        }
    }
}
