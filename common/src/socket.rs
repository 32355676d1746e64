//! Listening unix sockets for vhost-user backends (and, later, the VMM's API socket).
//!
//! [`listen`] creates the socket file with mode 0600 (only the owner may connect), replaces a
//! stale socket file that nobody serves any more, and refuses a path that a live process still
//! listens on, or that is not a socket at all. The returned [`SocketGuard`] removes the file again
//! when dropped, but only while the file is still the one this process created.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The mode every socket file made here gets: read/write for the owner only.
pub const SOCKET_MODE: u32 = 0o600;

/// Backlog of pending connections; a vhost-user backend serves one frontend at a time.
const BACKLOG: libc::c_int = 16;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket path {path} is longer than the {max} bytes a unix socket address holds")]
    PathTooLong { path: PathBuf, max: usize },
    #[error("socket path {path} contains a NUL byte")]
    PathHasNul { path: PathBuf },
    #[error("socket path {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("socket {path} is served by a live process; stop it first or choose another path")]
    InUse { path: PathBuf },
    #[error("cannot tell whether socket {path} is still served: {source}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot inspect socket path {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot create a unix socket for {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot create socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot listen on socket {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot set mode {mode:o} on socket {path}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
}

/// What [`probe`] found at a socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketState {
    /// Nothing exists at the path.
    Absent,
    /// A socket file that nobody listens on (connect() is refused).
    Stale,
    /// A socket that a live process listens on.
    Live,
}

/// Removes the socket file on drop if it is still the one [`listen`] created (same device, inode
/// and change time: inode numbers are reused at once on some filesystems), so a newer process
/// that replaced it keeps its socket.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    identity: FileIdentity,
}

/// What tells one socket file from a later one at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

impl SocketGuard {
    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if FileIdentity::of(&meta) == self.identity {
                // Nothing useful can be done about a failure while going away.
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A `sockaddr_un` for `path`, with its length.
fn sockaddr(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t), SocketError> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Err(SocketError::PathHasNul {
            path: path.to_owned(),
        });
    }
    // One byte stays zero: the terminating NUL.
    let max = addr.sun_path.len() - 1;
    if bytes.len() > max || bytes.is_empty() {
        return Err(SocketError::PathTooLong {
            path: path.to_owned(),
            max,
        });
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // The length is at most size_of::<sockaddr_un>() (110), which fits socklen_t.
    Ok((addr, len as libc::socklen_t))
}

/// A new unix stream socket, close-on-exec, optionally non-blocking.
fn new_socket(path: &Path, nonblocking: bool) -> Result<OwnedFd, SocketError> {
    let mut kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        kind |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
    if fd < 0 {
        return Err(SocketError::Create {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Tells whether a process listens on the socket at `path`, without blocking: a non-blocking
/// connect() that is refused means the file is stale; one that succeeds or finds the backlog
/// full (EAGAIN) means a live listener. The probe connection is closed at once; a live backend
/// sees it as a frontend that hung up straight away.
pub fn probe(path: &Path) -> Result<SocketState, SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SocketState::Absent),
        Err(source) => {
            return Err(SocketError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    let (addr, len) = sockaddr(path)?;
    let fd = new_socket(path, true)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc == 0 {
        return Ok(SocketState::Live);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => Ok(SocketState::Stale),
        Some(libc::ENOENT) => Ok(SocketState::Absent),
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(SocketState::Live),
        _ => Err(SocketError::Probe {
            path: path.to_owned(),
            source: err,
        }),
    }
}

/// Creates a listening socket at `path` with mode 0600. A stale socket file there is replaced;
/// a live one, or anything that is not a socket, is refused.
pub fn listen(path: &Path) -> Result<(UnixListener, SocketGuard), SocketError> {
    match probe(path)? {
        SocketState::Live => {
            return Err(SocketError::InUse {
                path: path.to_owned(),
            })
        }
        SocketState::Stale => match std::fs::remove_file(path) {
            Ok(()) => log::info!("replaced stale socket {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SocketError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })
            }
        },
        SocketState::Absent => {}
    }

    let (addr, len) = sockaddr(path)?;
    let fd = new_socket(path, false)?;
    // On Linux the socket file takes its mode from the socket inode (less the umask), so setting
    // 0600 before bind() means the file never exists with a wider mode. Checked again below.
    // SAFETY: fchmod on a descriptor we own; no pointers.
    if unsafe { libc::fchmod(fd.as_raw_fd(), SOCKET_MODE) } != 0 {
        return Err(SocketError::Chmod {
            path: path.to_owned(),
            mode: SOCKET_MODE,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(SocketError::Bind {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    let meta = std::fs::symlink_metadata(path).map_err(|source| SocketError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    // From here on, a failure removes the file again.
    let mut guard = SocketGuard {
        path: path.to_owned(),
        identity: FileIdentity::of(&meta),
    };
    if meta.permissions().mode() & 0o777 != SOCKET_MODE {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
            |source| SocketError::Chmod {
                path: path.to_owned(),
                mode: SOCKET_MODE,
                source,
            },
        )?;
        // chmod changed the ctime.
        let meta = std::fs::symlink_metadata(path).map_err(|source| SocketError::Inspect {
            path: path.to_owned(),
            source,
        })?;
        guard.identity = FileIdentity::of(&meta);
    }
    // SAFETY: listen() on a bound socket we own; no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(SocketError::Listen {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok((UnixListener::from(fd), guard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "splitvmm-socket-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn creates_socket_with_mode_0600_and_removes_it_on_drop() {
        let dir = temp_dir("mode");
        let path = dir.join("s.sock");
        let (listener, guard) = listen(&path).expect("listen");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(probe(&path).expect("probe"), SocketState::Live);
        let _client = UnixStream::connect(&path).expect("connect");
        assert!(listener.accept().is_ok());
        drop(guard);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn replaces_stale_socket() {
        let dir = temp_dir("stale");
        let path = dir.join("s.sock");
        // A listener that is gone leaves its file behind: a stale socket.
        drop(UnixListener::bind(&path).expect("bind"));
        assert_eq!(probe(&path).expect("probe"), SocketState::Stale);
        let (_listener, _guard) = listen(&path).expect("stale socket is replaced");
        assert_eq!(probe(&path).expect("probe"), SocketState::Live);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_live_socket_and_non_socket() {
        let dir = temp_dir("live");
        let path = dir.join("s.sock");
        let _live = UnixListener::bind(&path).expect("bind");
        let err = listen(&path).expect_err("live socket must be refused");
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(path.exists(), "a live socket must not be unlinked");

        let file = dir.join("plain");
        std::fs::write(&file, b"data").expect("write");
        let err = listen(&file).expect_err("a regular file must be refused");
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&file).expect("read"), b"data");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn guard_leaves_a_replaced_socket_alone() {
        let dir = temp_dir("replaced");
        let path = dir.join("s.sock");
        let (listener, guard) = listen(&path).expect("listen");
        drop(listener);
        // Someone else replaced the stale file with their own socket, a little later (the
        // filesystem's clock may be as coarse as a few milliseconds).
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_other, other_guard) = listen(&path).expect("replace");
        drop(guard);
        assert!(path.exists(), "the newer socket must survive the old guard");
        drop(other_guard);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_bad_paths() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(matches!(
            listen(&long),
            Err(SocketError::PathTooLong { .. })
        ));
        let missing = Path::new("/nonexistent-splitvmm-dir/s.sock");
        let err = listen(missing).expect_err("missing folder");
        assert!(matches!(err, SocketError::Bind { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent-splitvmm-dir/s.sock"));
    }
}
