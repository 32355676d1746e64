//! One machine at a time: L1 is emulated and this kind of host has two cores, so runs serialize
//! on an exclusive `flock` that test threads and separate processes (other `cargo test`
//! invocations, other checkouts) all take.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::error::LaneError;

/// `$SPLITVMM_LANE_LOCK`, else `<tmp>/splitvmm-lane.lock`.
pub fn lock_path() -> PathBuf {
    std::env::var_os("SPLITVMM_LANE_LOCK").map_or_else(
        || std::env::temp_dir().join("splitvmm-lane.lock"),
        PathBuf::from,
    )
}

/// Held while a machine runs; released on drop.
pub struct LaneLock {
    _lock: Flock<File>,
}

impl LaneLock {
    /// Blocks until the lock is free (saying so on stderr when it has to wait).
    pub fn acquire(who: &str) -> Result<Self, LaneError> {
        let path = lock_path();
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| LaneError::io(format!("opening the lane lock {}", path.display()), e))
        };
        match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(LaneLock { _lock: lock }),
            Err((_, Errno::EWOULDBLOCK)) => {
                eprintln!(
                    "lane: `{who}` waits for {} (another run holds it)",
                    path.display()
                );
            }
            Err((_, errno)) => return Err(lock_error(&path, errno)),
        }
        loop {
            match Flock::lock(open()?, FlockArg::LockExclusive) {
                Ok(lock) => return Ok(LaneLock { _lock: lock }),
                Err((_, Errno::EINTR)) => continue,
                Err((_, errno)) => return Err(lock_error(&path, errno)),
            }
        }
    }
}

fn lock_error(path: &std::path::Path, errno: Errno) -> LaneError {
    LaneError::io(
        format!("locking {}", path.display()),
        std::io::Error::from(errno),
    )
}
