//! qemu-storage-daemon as a vhost-user-blk backend no one here wrote: the reference the test
//! frontend is proven against, and the peer `splitvmm-bench blk` measures beside.
//!
//! `SPLITVMM_QSD` names the binary (default `qemu-storage-daemon` from PATH).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{BackendProcess, ProcessError, TempDir};

#[derive(Debug, thiserror::Error)]
pub enum QsdError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot create the image {path} ({size} bytes): {source}")]
    Image {
        path: PathBuf,
        size: u64,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QsdOptions {
    pub num_queues: u16,
    pub writable: bool,
    /// `logical-block-size` of the export (qsd's default is 512).
    pub logical_block_size: Option<u32>,
    /// `cache.direct=on` on the file node (O_DIRECT).
    pub direct: bool,
    /// How long qsd may take to create its socket.
    pub start_timeout: Duration,
}

impl Default for QsdOptions {
    fn default() -> Self {
        QsdOptions {
            num_queues: 1,
            writable: true,
            logical_block_size: None,
            direct: false,
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// The qsd binary to run.
pub fn qsd_binary() -> OsString {
    std::env::var_os("SPLITVMM_QSD").unwrap_or_else(|| "qemu-storage-daemon".into())
}

/// QEMU option values escape commas by doubling them.
fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// A running qemu-storage-daemon exporting one image over vhost-user-blk.
#[derive(Debug)]
pub struct Qsd {
    // Field order: the process dies before its folder (socket, image, logs) goes.
    process: BackendProcess,
    image: PathBuf,
    dir: TempDir,
}

impl Qsd {
    /// Exports `image` on a socket in a fresh temporary folder.
    pub fn start(image: &Path, opts: &QsdOptions) -> Result<Self, QsdError> {
        let dir = TempDir::new("qsd")?;
        Self::start_in(dir, image.to_owned(), opts)
    }

    /// Creates a sparse image of `size` bytes in a fresh temporary folder and exports it.
    pub fn with_new_image(size: u64, opts: &QsdOptions) -> Result<Self, QsdError> {
        let dir = TempDir::new("qsd")?;
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|source| QsdError::Image {
                path: image.clone(),
                size,
                source,
            })?;
        Self::start_in(dir, image, opts)
    }

    fn start_in(dir: TempDir, image: PathBuf, opts: &QsdOptions) -> Result<Self, QsdError> {
        let socket = dir.path().join("vhost-user-blk.sock");
        let mut blockdev = format!("driver=file,filename={},node-name=f0", qemu_escape(&image));
        if opts.direct {
            blockdev.push_str(",cache.direct=on");
        }
        let mut export = format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={},num-queues={}",
            qemu_escape(&socket),
            if opts.writable { "on" } else { "off" },
            opts.num_queues
        );
        if let Some(lbs) = opts.logical_block_size {
            export.push_str(&format!(",logical-block-size={lbs}"));
        }
        let mut cmd = Command::new(qsd_binary());
        cmd.arg("--blockdev")
            .arg(blockdev)
            .arg("--export")
            .arg(export);
        let process = BackendProcess::spawn(
            "qemu-storage-daemon",
            &mut cmd,
            dir.path(),
            socket,
            opts.start_timeout,
        )?;
        Ok(Qsd {
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

    pub fn process_ref(&self) -> &BackendProcess {
        &self.process
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
}
