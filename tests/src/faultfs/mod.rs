//! A fault-injecting FUSE filesystem as a test fixture: real EIO from a real filesystem on a
//! host without device-mapper, scsi_debug or nbd.
//!
//! [`FaultFs::mount`] opens /dev/fuse, mounts it with `mount(2)` on a fresh folder (no
//! fusermount, no libfuse: it needs CAP_SYS_ADMIN) and serves one regular file,
//! [`FILE_NAME`], whose contents live in memory, from a thread of the test process
//! ([`server`], speaking the [`protocol`]). Files are opened with `FOPEN_DIRECT_IO`, so every
//! read and write reaches the server, never the page cache, and the faults armed with
//! [`FaultFs::set_faults`] are seen reliably: reads or writes touching a byte range fail with
//! EIO (changing nothing), FSYNC fails with EIO. The fixture counts the requests it saw and
//! records each failed one. Dropping it unmounts (lazily, so a process still holding the file
//! cannot keep the mount), stops the thread and joins it; closing /dev/fuse then aborts the
//! connection, so such a process gets ENOTCONN rather than hanging.
//!
//! ```no_run
//! use splitvmm_tests::faultfs::{FaultFs, Faults};
//! let fs = FaultFs::mount(vec![0u8; 1 << 20]).unwrap();
//! fs.set_faults(Faults { read_eio: vec![4096..8192], ..Faults::default() });
//! let err = std::fs::read(fs.image()).unwrap_err();
//! assert_eq!(err.raw_os_error(), Some(libc::EIO));
//! ```

pub mod protocol;
pub mod server;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::vhost::process::{ProcessError, TempDir};
pub use server::{FaultHit, FaultOp, Faults, OpCounts};
use server::{ServerError, Shared};

/// The one file the filesystem serves.
pub const FILE_NAME: &str = "disk.img";
/// How long the kernel may take to send INIT after the mount.
const INIT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum FaultFsError {
    #[error("cannot open /dev/fuse: {0}")]
    OpenDevice(std::io::Error),
    #[error(transparent)]
    Folder(#[from] ProcessError),
    #[error("cannot mount a FUSE filesystem on {path} (options {options}): {source}")]
    Mount {
        path: PathBuf,
        options: String,
        source: std::io::Error,
    },
    #[error("cannot create the stop channel of the server thread: {0}")]
    StopChannel(std::io::Error),
    #[error("cannot start the FUSE server thread: {0}")]
    Thread(std::io::Error),
    #[error("the kernel sent no FUSE INIT within {0:?} of the mount")]
    NoInit(Duration),
    #[error("the FUSE server thread ended before INIT: {0}")]
    ServerEnded(String),
}

/// A mounted fault-injecting FUSE filesystem serving [`FILE_NAME`].
#[derive(Debug)]
pub struct FaultFs {
    shared: Arc<Shared>,
    /// Dropping it wakes the server thread, which then exits.
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    // Last: the folder is removed after the unmount in `drop`.
    mountpoint: TempDir,
}

impl FaultFs {
    /// Mounts a filesystem whose file holds `contents` (its size is the file's size).
    pub fn mount(contents: Vec<u8>) -> Result<Self, FaultFsError> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            // Close-on-exec (std's default) matters: a child holding a copy of this descriptor
            // would keep the connection alive after the fixture closes its own.
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/fuse")
            .map_err(FaultFsError::OpenDevice)?;
        remove_stale_mounts();
        let mountpoint = TempDir::new("faultfs")?;
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let options = format!(
            "fd={},rootmode=40000,user_id={uid},group_id={gid},allow_other",
            dev.as_raw_fd()
        );
        mount_fuse(mountpoint.path(), &options).map_err(|source| FaultFsError::Mount {
            path: mountpoint.path().to_owned(),
            options: options.clone(),
            source,
        })?;
        let shared = Arc::new(Shared::new(contents, uid, gid));
        let (stop, stop_rx) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                unmount(mountpoint.path());
                return Err(FaultFsError::StopChannel(e));
            }
        };
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("faultfs".into())
                .spawn(move || server::run(dev, stop_rx, shared))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                unmount(mountpoint.path());
                return Err(FaultFsError::Thread(e));
            }
        };
        // From here on, dropping `fs` cleans everything up.
        let fs = FaultFs {
            shared,
            stop: Some(stop),
            thread: Some(thread),
            mountpoint,
        };
        fs.wait_init(Instant::now() + INIT_TIMEOUT)?;
        Ok(fs)
    }

    fn wait_init(&self, deadline: Instant) -> Result<(), FaultFsError> {
        let mut st = self.shared.lock();
        loop {
            if st.initialized {
                return Ok(());
            }
            if let Some(how) = &st.ended {
                return Err(FaultFsError::ServerEnded(how.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FaultFsError::NoInit(INIT_TIMEOUT));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// The served file's path.
    pub fn image(&self) -> PathBuf {
        self.path().join(FILE_NAME)
    }

    /// Arms `faults` (replacing those armed before); requests already answered are not affected.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    pub fn clear_faults(&self) {
        self.set_faults(Faults::default());
    }

    /// The requests seen so far.
    pub fn counts(&self) -> OpCounts {
        self.shared.lock().counts
    }

    /// The requests failed by armed faults so far, in order.
    pub fn hits(&self) -> Vec<FaultHit> {
        self.shared.lock().hits.clone()
    }

    /// The file's contents as the filesystem holds them now (not through the kernel).
    pub fn contents(&self) -> Vec<u8> {
        self.shared.lock().data.clone()
    }

    /// Overwrites part of the file's contents directly (not through the kernel; the file does
    /// not grow: bytes past its end are dropped).
    pub fn write_contents(&self, offset: usize, bytes: &[u8]) {
        let mut st = self.shared.lock();
        let size = st.data.len();
        let start = offset.min(size);
        let end = offset.saturating_add(bytes.len()).min(size);
        st.data[start..end].copy_from_slice(&bytes[..end - start]);
    }

    /// How the server thread ended, if it has (`None` while it serves).
    pub fn ended(&self) -> Option<String> {
        self.shared.lock().ended.clone()
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        unmount(self.mountpoint.path());
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("faultfs: the server thread failed: {e}"),
                Err(_) => eprintln!("faultfs: the server thread panicked"),
            }
        }
    }
}

fn cstring(s: &[u8]) -> std::io::Result<CString> {
    CString::new(s).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// `mount("faultfs", path, "fuse", MS_NOSUID | MS_NODEV, options)`.
fn mount_fuse(path: &Path, options: &str) -> std::io::Result<()> {
    let source = cstring(b"faultfs")?;
    let target = cstring(path.as_os_str().as_bytes())?;
    let fstype = cstring(b"fuse")?;
    let data = cstring(options.as_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; the kernel only
    // reads them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts and removes the mounts of fixtures whose test process died without dropping them
/// (killed by a timeout, say): their mount points name the process.
fn remove_stale_mounts() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let prefix = std::env::temp_dir().join("splitvmm-vhost-faultfs-");
    let prefix = prefix.to_string_lossy();
    for line in mounts.lines() {
        let mut fields = line.split(' ');
        let (Some("faultfs"), Some(path)) = (fields.next(), fields.next()) else {
            continue;
        };
        let owner = path
            .strip_prefix(&*prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                unmount(Path::new(path));
                let _ = std::fs::remove_dir(path);
            }
        }
    }
}

/// Lazy unmount; errors (not mounted) are ignored.
fn unmount(path: &Path) {
    let Ok(target) = cstring(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path that outlives the call; no other memory is involved.
    let _ = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
}
