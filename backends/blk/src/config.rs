//! The command line of `splitvmm-blk` and its validation into a [`Config`].
//!
//! Everything that can be checked without opening the image or the socket is checked here, so
//! bad input is refused with one clear line before anything is created. Numbers are taken as
//! text and parsed here (not by clap) so their errors read like every other one.

use std::path::PathBuf;

use clap::Parser;
use thiserror::Error;

use crate::io::EngineKind;

/// Most queues (and worker threads) one device may have: the backend crate maps queues to
/// threads through 64-bit masks.
pub const MAX_QUEUES: u16 = 64;
/// Smallest queue size: a request needs at least a header, one data and one status descriptor.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Largest split virtqueue the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default upper bound on the queue size a frontend may pick (QEMU asks for 128 by default).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// The default I/O engine: io_uring, by measurement on the build machine (2 cores shared with
/// other builds, so noisy; kernel 6.18; image: 1 GiB file on ext4). `splitvmm-bench blk` drove
/// two daemons (`--io-engine sync` / `uring`) on the same image, alternating, 2 s per point;
/// 4K requests unless said otherwise; IOPS of two rounds:
///
/// | load                          | sync          | uring          |
/// |-------------------------------|---------------|----------------|
/// | `--direct` randread QD32      | 10.4K / 6.6K  | 29.6K / 27.8K  |
/// | `--direct` randwrite QD32     | 4.4K / 9.2K   | 12.6K / 24.1K  |
/// | `--direct` randread QD1       | 7.8K / 7.2K   | 6.5K / 8.8K    |
/// | page-cache randread QD1       | 65K / 105K    | 78K / 98K      |
/// | page-cache randread QD32      | 245K / 295K   | 300K / 234K    |
/// | page-cache randwrite QD32     | 96K / 59K     | 74K / 75K      |
/// | page-cache seqread 128K QD8   | 49K / 46K     | 52K / 52K      |
///
/// Where I/O waits for the device (O_DIRECT, page-cache misses) the sync engine serialises the
/// queue behind each syscall and io_uring is 2.5–4× faster at depth. From the page cache the two
/// are level within this machine's noise, because the uring engine serves page-cache hits with
/// one RWF_NOWAIT preadv2 (engine-level loop, `io::uring::tests::bench_engines`: sync 0.64M
/// reads/s, RWF_NOWAIT 0.62M, pure ring 0.43M at QD1 and 0.64M at QD32) and does buffered
/// writes in the worker where the filesystem refuses RWF_NOWAIT writes (ext4 does). So nothing
/// is lost by default and real disks gain; `--io-engine sync` stays as the plain fallback.
pub const DEFAULT_IO_ENGINE: EngineKind = EngineKind::Uring;
/// Default busy-polling window of a queue worker, in microseconds. Cloud Hypervisor's
/// vhost-user-block polls its queues for 50 µs for the same reason: a backend that sleeps
/// after each empty pass pays an eventfd write in the frontend and an epoll wakeup per request.
pub const DEFAULT_POLL_US: u32 = 50;
/// Longest polling window accepted: beyond a millisecond it is a busy loop, not a poll.
pub const MAX_POLL_US: u32 = 1000;
/// The GET_ID answer is at most this many bytes (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_BYTES: usize = 20;

#[derive(Debug, Parser)]
#[command(
    name = "splitvmm-blk",
    version,
    about = "vhost-user-blk backend: serves one disk image to any vhost-user frontend"
)]
pub struct Args {
    /// Unix socket to listen on for the frontend (created with mode 0600). Not needed when
    /// systemd passes a listening socket (socket activation, LISTEN_FDS).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve one frontend on this inherited descriptor, a socket already connected to it (the
    /// vhost-user spec's backend convention); exit when it hangs up.
    #[arg(long, value_name = "FDNUM", conflicts_with = "socket")]
    pub fd: Option<i32>,
    /// Disk image: a regular file or a block device.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub readonly: bool,
    /// Number of virtqueues, each served by its own worker thread (1 to 64).
    #[arg(long, value_name = "N", default_value = "1")]
    pub num_queues: String,
    /// Largest queue size a frontend may set (a power of two from 4 to 32768).
    #[arg(long, value_name = "N", default_value = "1024")]
    pub queue_size: String,
    /// Serial number returned to VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STR")]
    pub serial: Option<String>,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// I/O engine; `uring` falls back to `sync` where io_uring is unavailable.
    #[arg(long, value_enum, value_name = "ENGINE", default_value_t = DEFAULT_IO_ENGINE)]
    pub io_engine: EngineKind,
    /// Microseconds a queue worker keeps polling for new requests and completions before it
    /// sleeps on the kick (0 to 1000; 0 turns polling off).
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US.to_string())]
    pub poll_us: String,
}

/// A validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// None: the socket comes from systemd or `fd` (checked when the daemon starts).
    pub socket: Option<PathBuf>,
    pub fd: Option<i32>,
    pub image: PathBuf,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Vec<u8>,
    pub direct: bool,
    pub io_engine: EngineKind,
    pub poll_us: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--socket must not be empty")]
    EmptySocket,
    #[error("socket folder {0} does not exist or is not a folder")]
    SocketDirMissing(PathBuf),
    #[error("socket path {0} is a folder")]
    SocketIsDir(PathBuf),
    #[error("cannot open image {path}: {reason}")]
    ImageUnreadable { path: PathBuf, reason: String },
    #[error("image {0} is neither a regular file nor a block device")]
    ImageNotAFileOrDevice(PathBuf),
    #[error("--num-queues '{0}' is not a number from 1 to {MAX_QUEUES}")]
    NumQueues(String),
    #[error("--queue-size '{0}' is not a power of two from {MIN_QUEUE_SIZE} to {MAX_QUEUE_SIZE}")]
    QueueSize(String),
    #[error("--serial is {0} bytes long; at most {MAX_SERIAL_BYTES} fit the GET_ID answer")]
    SerialTooLong(usize),
    #[error("--serial must not contain NUL bytes")]
    SerialHasNul,
    #[error("--poll-us '{0}' is not a number of microseconds from 0 to {MAX_POLL_US}")]
    PollUs(String),
}

fn parse_poll_us(text: &str) -> Result<u32, ConfigError> {
    match text.trim().parse::<u32>() {
        Ok(n) if n <= MAX_POLL_US => Ok(n),
        _ => Err(ConfigError::PollUs(text.to_owned())),
    }
}

fn parse_num_queues(text: &str) -> Result<u16, ConfigError> {
    match text.trim().parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => Err(ConfigError::NumQueues(text.to_owned())),
    }
}

fn parse_queue_size(text: &str) -> Result<u16, ConfigError> {
    match text.trim().parse::<u16>() {
        Ok(n) if (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(ConfigError::QueueSize(text.to_owned())),
    }
}

fn check_serial(serial: Option<String>) -> Result<Vec<u8>, ConfigError> {
    let bytes = serial.map(String::into_bytes).unwrap_or_default();
    if bytes.len() > MAX_SERIAL_BYTES {
        return Err(ConfigError::SerialTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(ConfigError::SerialHasNul);
    }
    Ok(bytes)
}

fn check_socket(socket: &std::path::Path) -> Result<(), ConfigError> {
    if socket.as_os_str().is_empty() {
        return Err(ConfigError::EmptySocket);
    }
    if socket.is_dir() {
        return Err(ConfigError::SocketIsDir(socket.to_owned()));
    }
    // A bare file name lives in the current folder.
    let parent = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(ConfigError::SocketDirMissing(parent));
    }
    Ok(())
}

fn check_image(image: &std::path::Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(image).map_err(|e| ConfigError::ImageUnreadable {
        path: image.to_owned(),
        reason: e.to_string(),
    })?;
    let kind = meta.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(ConfigError::ImageNotAFileOrDevice(image.to_owned()));
    }
    Ok(())
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if let Some(socket) = &args.socket {
            check_socket(socket)?;
        }
        check_image(&args.image)?;
        Ok(Config {
            num_queues: parse_num_queues(&args.num_queues)?,
            queue_size: parse_queue_size(&args.queue_size)?,
            serial: check_serial(args.serial)?,
            poll_us: parse_poll_us(&args.poll_us)?,
            socket: args.socket,
            fd: args.fd,
            image: args.image,
            readonly: args.readonly,
            direct: args.direct,
            io_engine: args.io_engine,
        })
    }
}

/// Turns a clap error (several lines with usage and hints) into the one line `splitvmm-blk`
/// prints for every usage error.
pub fn one_line_clap_error(error: &clap::Error) -> String {
    let text = error.to_string();
    let body = text
        .split("\n\nUsage:")
        .next()
        .unwrap_or(&text)
        .split("\n\nFor more information")
        .next()
        .unwrap_or(&text);
    let joined = body.split_whitespace().collect::<Vec<_>>().join(" ");
    joined.strip_prefix("error: ").unwrap_or(&joined).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder, removed on drop.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("splitvmm-blk-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn args(dir: &std::path::Path) -> Args {
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; 4096]).expect("image");
        Args {
            socket: Some(dir.join("blk.sock")),
            fd: None,
            image,
            readonly: false,
            num_queues: "1".into(),
            queue_size: "1024".into(),
            serial: None,
            direct: false,
            io_engine: DEFAULT_IO_ENGINE,
            poll_us: DEFAULT_POLL_US.to_string(),
        }
    }

    #[test]
    fn accepts_a_good_command_line() {
        let dir = scratch("good");
        let mut a = args(&dir);
        a.num_queues = "4".into();
        a.queue_size = "256".into();
        a.serial = Some("disk-serial-0001".into());
        a.readonly = true;
        let config = Config::try_from(a).expect("valid");
        assert_eq!(config.num_queues, 4);
        assert_eq!(config.queue_size, 256);
        assert_eq!(config.poll_us, DEFAULT_POLL_US);
        assert_eq!(config.serial, b"disk-serial-0001");
        assert!(config.readonly);
    }

    #[test]
    fn parses_with_clap_including_the_spec_alias() {
        let config = Args::try_parse_from([
            "splitvmm-blk",
            "--socket-path",
            "/tmp/x.sock",
            "--image",
            "/tmp/x.img",
            "--num-queues",
            "2",
        ])
        .expect("clap");
        assert_eq!(config.socket, Some(PathBuf::from("/tmp/x.sock")));
        assert_eq!(config.num_queues, "2");
        assert_eq!(config.queue_size, DEFAULT_QUEUE_SIZE.to_string());
    }

    #[test]
    fn rejects_bad_numbers() {
        for bad in ["0", "65", "-1", "x", ""] {
            assert_eq!(
                parse_num_queues(bad),
                Err(ConfigError::NumQueues(bad.into()))
            );
        }
        for bad in ["0", "2", "100", "65536", "x"] {
            assert_eq!(
                parse_queue_size(bad),
                Err(ConfigError::QueueSize(bad.into()))
            );
        }
        assert_eq!(parse_queue_size("4"), Ok(4));
        assert_eq!(parse_queue_size("32768"), Ok(32768));
        assert_eq!(parse_num_queues("64"), Ok(64));
        for bad in ["1001", "-1", "x", ""] {
            assert_eq!(parse_poll_us(bad), Err(ConfigError::PollUs(bad.into())));
        }
        assert_eq!(parse_poll_us("0"), Ok(0));
        assert_eq!(parse_poll_us("1000"), Ok(1000));
    }

    #[test]
    fn rejects_bad_serials() {
        assert_eq!(
            check_serial(Some("x".repeat(21))),
            Err(ConfigError::SerialTooLong(21))
        );
        assert_eq!(
            check_serial(Some("a\0b".into())),
            Err(ConfigError::SerialHasNul)
        );
        assert_eq!(check_serial(Some("x".repeat(20))), Ok(vec![b'x'; 20]));
        assert_eq!(check_serial(None), Ok(Vec::new()));
    }

    #[test]
    fn rejects_missing_image_and_socket_folder() {
        let dir = scratch("missing");
        let mut a = args(&dir);
        a.image = dir.join("nope.img");
        let err = Config::try_from(a).expect_err("missing image");
        assert!(matches!(err, ConfigError::ImageUnreadable { .. }));
        assert!(err.to_string().contains("nope.img"));

        let mut a = args(&dir);
        a.image = dir.to_path_buf();
        assert!(matches!(
            Config::try_from(a),
            Err(ConfigError::ImageNotAFileOrDevice(_))
        ));

        let mut a = args(&dir);
        a.socket = Some(dir.join("no-such-folder").join("blk.sock"));
        assert!(matches!(
            Config::try_from(a),
            Err(ConfigError::SocketDirMissing(_))
        ));

        let mut a = args(&dir);
        a.socket = Some(dir.to_path_buf());
        assert!(matches!(
            Config::try_from(a),
            Err(ConfigError::SocketIsDir(_))
        ));
    }

    #[test]
    fn clap_errors_become_one_line() {
        let err = Args::try_parse_from(["splitvmm-blk", "--socket", "/tmp/s"])
            .expect_err("missing --image");
        let line = one_line_clap_error(&err);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("--image"), "{line}");
    }
}
