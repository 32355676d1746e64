//! systemd socket activation (`sd_listen_fds(3)`): a backend started by a `.socket` unit inherits
//! an already-listening socket as descriptor 3, with `LISTEN_PID` (its own pid) and
//! `LISTEN_FDS` (how many) in its environment. systemd keeps the socket open and its path in
//! place across backend restarts, so a frontend never finds the path missing.
//!
//! This module takes that descriptor once, checks that it is a listening unix stream socket,
//! and clears the variables so that child processes do not take it for theirs. It also takes
//! the other socket a backend may inherit: one already connected to its frontend (the
//! vhost-user spec's `--fd FDNUM`).

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Whether the descriptor has been taken; it may be owned only once.
static TAKEN: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors")]
    BadCount(String),
    #[error("systemd passed {0} sockets; a backend serves exactly one (one ListenStream= line)")]
    WrongCount(u32),
    #[error("descriptor {fd} from systemd is not a listening unix stream socket: {reason}")]
    NotAListeningUnixSocket { fd: RawFd, reason: String },
    #[error("the socket from systemd was already taken")]
    AlreadyTaken,
    #[error("--fd {fd}: not a connected unix stream socket: {reason}")]
    NotAConnectedUnixSocket { fd: RawFd, reason: String },
}

/// What the environment says about socket activation, without touching any descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Not started by systemd socket activation (or the variables are meant for another pid).
    None,
    /// `count` descriptors from [`LISTEN_FDS_START`] on are ours.
    Fds { count: u32 },
}

/// Reads `LISTEN_PID` / `LISTEN_FDS` as given, for process `pid`.
pub fn parse(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<Activation, ActivationError> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(Activation::None);
    };
    if listen_pid.trim().parse::<u32>().ok() != Some(pid) {
        return Ok(Activation::None);
    }
    let count = listen_fds
        .trim()
        .parse::<u32>()
        .map_err(|_| ActivationError::BadCount(listen_fds.to_owned()))?;
    Ok(Activation::Fds { count })
}

/// The listening socket systemd passed to this process, if it was socket-activated; `None`
/// otherwise. Call it before any thread is started (it clears environment variables).
pub fn systemd_listener() -> Result<Option<UnixListener>, ActivationError> {
    let listen_pid = std::env::var("LISTEN_PID").ok();
    let listen_fds = std::env::var("LISTEN_FDS").ok();
    let activation = parse(
        listen_pid.as_deref(),
        listen_fds.as_deref(),
        std::process::id(),
    )?;
    let Activation::Fds { count } = activation else {
        return Ok(None);
    };
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    if count != 1 {
        return Err(ActivationError::WrongCount(count));
    }
    check_listening_unix_socket(LISTEN_FDS_START)?;
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(ActivationError::AlreadyTaken);
    }
    // systemd passes the descriptor without FD_CLOEXEC; backends must not leak it to children.
    // SAFETY: fcntl on descriptor 3, which the check above found open; no pointers.
    unsafe { libc::fcntl(LISTEN_FDS_START, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: by the sd_listen_fds protocol (LISTEN_PID is this process) descriptor 3 is a
    // socket handed to this process and owned by no other part of it; it was just checked to
    // be an open, listening unix stream socket, and TAKEN makes this the only owner.
    Ok(Some(unsafe { UnixListener::from_raw_fd(LISTEN_FDS_START) }))
}

/// Takes descriptor `fd`, inherited already connected to the frontend (`--fd`), after checking
/// that it is a connected unix stream socket. Call it once per descriptor, before any thread
/// is started.
pub fn connected_socket(fd: RawFd) -> Result<UnixStream, ActivationError> {
    let fail = |reason: String| ActivationError::NotAConnectedUnixSocket { fd, reason };
    if fd <= libc::STDERR_FILENO {
        return Err(fail(
            "descriptors 0 to 2 are stdin, stdout and stderr".into(),
        ));
    }
    check_unix_stream_socket(fd).map_err(|e| match e {
        ActivationError::NotAListeningUnixSocket { reason, .. } => fail(reason),
        other => other,
    })?;
    if socket_option(fd, libc::SO_ACCEPTCONN).map_err(|e| fail(e.to_string()))? != 0 {
        return Err(fail(
            "it is a listening socket (use --socket or systemd activation)".into(),
        ));
    }
    // SAFETY: fcntl on a descriptor the check above found open; no pointers.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the caller hands over a descriptor it inherited for this purpose and takes it only
    // once (documented above); it was just checked to be an open unix stream socket.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are locals that outlive the call and `len` is value's size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn check_unix_stream_socket(fd: RawFd) -> Result<(), ActivationError> {
    let fail = |reason: String| ActivationError::NotAListeningUnixSocket { fd, reason };
    let domain = socket_option(fd, libc::SO_DOMAIN).map_err(|e| fail(e.to_string()))?;
    if domain != libc::AF_UNIX {
        return Err(fail(format!("address family {domain}, not AF_UNIX")));
    }
    let kind = socket_option(fd, libc::SO_TYPE).map_err(|e| fail(e.to_string()))?;
    if kind != libc::SOCK_STREAM {
        return Err(fail(format!("socket type {kind}, not SOCK_STREAM")));
    }
    Ok(())
}

fn check_listening_unix_socket(fd: RawFd) -> Result<(), ActivationError> {
    let fail = |reason: String| ActivationError::NotAListeningUnixSocket { fd, reason };
    check_unix_stream_socket(fd)?;
    if socket_option(fd, libc::SO_ACCEPTCONN).map_err(|e| fail(e.to_string()))? == 0 {
        return Err(fail(
            "it does not listen (use ListenStream=, not Accept=yes)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_variables_for_this_pid_count() {
        assert_eq!(parse(None, None, 7), Ok(Activation::None));
        assert_eq!(parse(Some("7"), None, 7), Ok(Activation::None));
        assert_eq!(parse(Some("8"), Some("1"), 7), Ok(Activation::None));
        assert_eq!(
            parse(Some("7"), Some("1"), 7),
            Ok(Activation::Fds { count: 1 })
        );
        assert_eq!(
            parse(Some("7"), Some("x"), 7),
            Err(ActivationError::BadCount("x".into()))
        );
    }

    #[test]
    fn a_pipe_or_a_connected_socket_is_not_a_listener() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let err = check_listening_unix_socket(std::os::fd::AsRawFd::as_raw_fd(&a))
            .expect_err("a connected socket");
        assert!(err.to_string().contains("does not listen"), "{err}");
        let dir = std::env::temp_dir().join(format!("splitvmm-activation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let listener = UnixListener::bind(dir.join("s")).expect("bind");
        check_listening_unix_socket(std::os::fd::AsRawFd::as_raw_fd(&listener))
            .expect("a listening unix socket");
        let err = connected_socket(std::os::fd::AsRawFd::as_raw_fd(&listener))
            .expect_err("a listening socket is not a connection");
        assert!(err.to_string().contains("listening"), "{err}");
        assert!(connected_socket(1).is_err(), "stdout taken as a socket");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
