//! splitvmm-supervise: keeps one vhost-user backend running behind a socket that never goes
//! away. It creates the listening socket, hands it to the backend as systemd socket activation
//! does (descriptor 3, `LISTEN_FDS=1`, `LISTEN_PID`), and when the backend dies starts it again
//! on the same socket: a frontend that reconnects meanwhile waits in the socket's backlog
//! instead of finding the path gone. It is the supervisor for tests, the demo and hosts without
//! systemd (with systemd, `scripts/systemd/` does the same job).
//!
//! - `config`: the command line, validated.
//! - this module: the socket, the restart loop with its back-off, SIGTERM/SIGINT.

pub mod config;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use thiserror::Error;

use config::{Config, MAX_RESTART_DELAY};
use splitvmm_common::socket::{self, SocketError};

/// Exit status for a bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the supervisor cannot run or gave up.
pub const EXIT_RUN_ERROR: i32 = 1;

/// A backend that ran at least this long was healthy: the next restart starts from the
/// configured delay again instead of the backed-off one.
const HEALTHY_RUN: Duration = Duration::from_secs(1);
/// How long a backend may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Hands the socket on the way systemd does. The shell is what makes `LISTEN_PID` the
/// backend's own pid (`exec` keeps the shell's pid, `$$`) without code between fork and exec;
/// the socket arrives as its stdin and moves to descriptor 3, stdin becomes /dev/null.
const ACTIVATE: &str = r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@" 3<&0 0</dev/null"#;

#[derive(Debug, Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot block SIGTERM/SIGINT/SIGCHLD: {0}")]
    SignalMask(nix::Error),
    #[error("cannot duplicate the listening socket for the backend: {0}")]
    DupListener(io::Error),
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("cannot wait for {program} (pid {pid}): {source}")]
    Wait {
        program: String,
        pid: u32,
        source: io::Error,
    },
    #[error("{program} died {restarts} times; giving up (--max-restarts)")]
    GaveUp { program: String, restarts: u64 },
}

impl SuperviseError {
    pub fn exit_code(&self) -> i32 {
        EXIT_RUN_ERROR
    }
}

/// What ended a wait.
enum Wake {
    Signal(Signal),
    Timeout,
}

/// Waits up to `timeout` (forever when None) for one of the blocked signals in `mask`.
fn wait_signal(mask: &SigSet, timeout: Option<Duration>) -> Wake {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    loop {
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `mask` is a valid sigset for the call, the info pointer may be null, and
        // `ts_ptr` is null or points to a timespec that outlives the call.
        let rc = unsafe { libc::sigtimedwait(mask.as_ref(), std::ptr::null_mut(), ts_ptr) };
        if rc >= 0 {
            if let Ok(signal) = Signal::try_from(rc) {
                return Wake::Signal(signal);
            }
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => return Wake::Timeout,
            // EINTR: a signal outside the mask; wait again (the timeout restarts, which only
            // lengthens a restart delay).
            _ => continue,
        }
    }
}

fn spawn(config: &Config, listener: &UnixListener) -> Result<Child, SuperviseError> {
    let socket = OwnedFd::from(listener.try_clone().map_err(SuperviseError::DupListener)?);
    Command::new("/bin/sh")
        .arg("-c")
        .arg(ACTIVATE)
        .arg(&config.program)
        .args(&config.args)
        .stdin(Stdio::from(socket))
        .spawn()
        .map_err(|source| SuperviseError::Spawn {
            program: config.program.clone(),
            source,
        })
}

/// Asks the backend to stop (SIGTERM), and kills it if it has not after [`STOP_GRACE`].
fn stop(child: &mut Child, mask: &SigSet, program: &str) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                log::info!("{program} stopped ({status})");
                return;
            }
            Ok(None) => {}
            Err(_) => return,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log::warn!("{program} did not stop within {STOP_GRACE:?} of SIGTERM; killing it");
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        // SIGCHLD (or a second SIGTERM) ends the wait early.
        let _ = wait_signal(mask, Some(left));
    }
}

/// Supervises `config.program` until SIGTERM/SIGINT (Ok) or `--max-restarts` is exceeded.
pub fn run(config: Config) -> Result<(), SuperviseError> {
    let mut mask = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(signal);
    }
    // Blocked so that sigtimedwait receives them; the backend starts with an empty mask
    // (std::process::Command resets it in the child).
    mask.thread_block().map_err(SuperviseError::SignalMask)?;
    let (listener, _socket_guard) = socket::listen(&config.socket)?;
    let program = config.program.as_str();
    let mut restarts: u64 = 0;
    let mut delay = config.restart_delay;
    loop {
        let mut child = spawn(&config, &listener)?;
        let pid = child.id();
        let started = Instant::now();
        log::info!(
            "started {program} (pid {pid}) on {}{}",
            config.socket.display(),
            if restarts > 0 {
                format!(", restart {restarts}")
            } else {
                String::new()
            }
        );
        let status: ExitStatus = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(source) => {
                    return Err(SuperviseError::Wait {
                        program: program.to_owned(),
                        pid,
                        source,
                    })
                }
            }
            if let Wake::Signal(Signal::SIGTERM | Signal::SIGINT) = wait_signal(&mask, None) {
                log::info!("stopping {program} (pid {pid})");
                stop(&mut child, &mask, program);
                return Ok(());
            }
        };
        let ran = started.elapsed();
        restarts += 1;
        if config.max_restarts.is_some_and(|max| restarts > max) {
            return Err(SuperviseError::GaveUp {
                program: program.to_owned(),
                restarts: restarts - 1,
            });
        }
        delay = if ran >= HEALTHY_RUN || restarts == 1 {
            config.restart_delay
        } else {
            (delay * 2).min(MAX_RESTART_DELAY.max(config.restart_delay))
        };
        log::warn!(
            "{program} (pid {pid}) exited ({status}) after {:.1} s; restarting in {} ms",
            ran.as_secs_f64(),
            delay.as_millis()
        );
        let until = Instant::now() + delay;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Wake::Signal(Signal::SIGTERM | Signal::SIGINT) = wait_signal(&mask, Some(left)) {
                log::info!("stopping: {program} is not running");
                return Ok(());
            }
        }
    }
}
