//! `splitvmm-blk` as a process a test owns: started on an image (a fresh sparse one in a
//! temporary folder, or one the test made elsewhere), killed when dropped (its stderr printed
//! when the test is failing), its socket awaited with a deadline; plus what leak tests read
//! from /proc, and a small tmpfs for running out of space.
//!
//! The binary is `SPLITVMM_BLK` when set, else `splitvmm-blk` in the cargo target folder the
//! running test binary lives in (`target/<profile>/deps/<test>` → `target/<profile>/splitvmm-blk`).
//! `cargo test --workspace` builds it; `cargo test -p splitvmm-tests` alone does not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{workspace_binary, BackendProcess, ProcessError, TempDir};

#[derive(Debug, thiserror::Error)]
pub enum BlkDaemonError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(
        "splitvmm-blk binary not found at {0} (build it: `cargo build -p splitvmm-blk`, or set \
         SPLITVMM_BLK)"
    )]
    NoBinary(PathBuf),
    #[error("cannot find the running test binary: {0}")]
    CurrentExe(std::io::Error),
    #[error("cannot create the image {path} ({size} bytes): {source}")]
    Image {
        path: PathBuf,
        size: u64,
        source: std::io::Error,
    },
    #[error("cannot {what} a tmpfs at {path}: {detail}")]
    Tmpfs {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkDaemonOptions {
    pub num_queues: u16,
    /// `--queue-size` (the daemon's default when `None`).
    pub queue_size: Option<u16>,
    pub serial: Option<String>,
    pub readonly: bool,
    pub direct: bool,
    /// `SPLITVMM_LOG` for the daemon.
    pub log_level: &'static str,
    /// `SPLITVMM_LOG_BURST` for the daemon (warnings per call site per second; 0: no limit);
    /// the daemon's default when `None`. Tests that count log lines one by one set 0.
    pub log_burst: Option<u32>,
    /// How long the daemon may take to create its socket.
    pub start_timeout: Duration,
    /// More command-line arguments, appended as given.
    pub extra_args: Vec<String>,
}

impl Default for BlkDaemonOptions {
    fn default() -> Self {
        BlkDaemonOptions {
            num_queues: 1,
            queue_size: None,
            serial: None,
            readonly: false,
            direct: false,
            log_level: "info",
            log_burst: None,
            start_timeout: Duration::from_secs(10),
            extra_args: Vec::new(),
        }
    }
}

/// The `splitvmm-blk` binary the tests run.
pub fn blk_binary() -> Result<PathBuf, BlkDaemonError> {
    let path =
        workspace_binary("splitvmm-blk", "SPLITVMM_BLK").map_err(BlkDaemonError::CurrentExe)?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(BlkDaemonError::NoBinary(path))
    }
}

/// A running `splitvmm-blk` serving one image.
#[derive(Debug)]
pub struct BlkDaemon {
    // Field order: the process dies before its folder (socket, logs, maybe the image) goes.
    process: BackendProcess,
    image: PathBuf,
    dir: TempDir,
}

impl BlkDaemon {
    /// Creates a sparse image of `size` bytes in a fresh temporary folder and serves it.
    pub fn with_new_image(size: u64, opts: &BlkDaemonOptions) -> Result<Self, BlkDaemonError> {
        let dir = TempDir::new("blk")?;
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|source| BlkDaemonError::Image {
                path: image.clone(),
                size,
                source,
            })?;
        Self::start_in(dir, image, opts)
    }

    /// Serves an existing `image` (socket and logs in a fresh temporary folder).
    pub fn start(image: &Path, opts: &BlkDaemonOptions) -> Result<Self, BlkDaemonError> {
        let dir = TempDir::new("blk")?;
        Self::start_in(dir, image.to_owned(), opts)
    }

    fn start_in(
        dir: TempDir,
        image: PathBuf,
        opts: &BlkDaemonOptions,
    ) -> Result<Self, BlkDaemonError> {
        let socket = dir.path().join("blk.sock");
        let mut cmd = Command::new(blk_binary()?);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(&image)
            .arg("--num-queues")
            .arg(opts.num_queues.to_string())
            .env("SPLITVMM_LOG", opts.log_level);
        if let Some(burst) = opts.log_burst {
            cmd.env("SPLITVMM_LOG_BURST", burst.to_string());
        }
        if let Some(n) = opts.queue_size {
            cmd.arg("--queue-size").arg(n.to_string());
        }
        if let Some(s) = &opts.serial {
            cmd.arg("--serial").arg(s);
        }
        if opts.readonly {
            cmd.arg("--readonly");
        }
        if opts.direct {
            cmd.arg("--direct");
        }
        cmd.args(&opts.extra_args);
        let process = BackendProcess::spawn(
            "splitvmm-blk",
            &mut cmd,
            dir.path(),
            socket,
            opts.start_timeout,
        )?;
        Ok(BlkDaemon {
            process,
            image,
            dir,
        })
    }

    pub fn socket(&self) -> &Path {
        self.process.socket()
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn process(&mut self) -> &mut BackendProcess {
        &mut self.process
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// What the daemon's resources look like now (from /proc).
    pub fn usage(&self) -> Option<ProcUsage> {
        ProcUsage::of(self.pid())
    }
}

/// A process's open descriptors, threads, mappings and memory, from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcUsage {
    pub fds: usize,
    pub threads: usize,
    /// Lines of /proc/PID/maps.
    pub mappings: usize,
    pub vm_size_kib: u64,
    pub rss_kib: u64,
}

impl ProcUsage {
    pub fn of(pid: u32) -> Option<Self> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        let mappings = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .ok()?
            .lines()
            .count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line[name.len()..].split_whitespace().next()?.parse().ok()
        };
        Some(ProcUsage {
            fds,
            threads: usize::try_from(field("Threads:")?).ok()?,
            mappings,
            vm_size_kib: field("VmSize:")?,
            rss_kib: field("VmRSS:")?,
        })
    }
}

/// A tmpfs of a fixed size mounted on a fresh folder (needs CAP_SYS_ADMIN); unmounted and
/// removed on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    pub fn mount(size_bytes: u64) -> Result<Self, BlkDaemonError> {
        let dir = TempDir::new("tmpfs")?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=0700"))
            .arg("splitvmm-test")
            .arg(dir.path())
            .output()
            .map_err(|e| BlkDaemonError::Tmpfs {
                what: "mount",
                path: dir.path().to_owned(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(BlkDaemonError::Tmpfs {
                what: "mount",
                path: dir.path().to_owned(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy, so a process still holding a file open cannot keep the mount (and the folder).
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
