//! The command line of `splitvmm` and its validation into a [`VmConfig`].
//!
//! Everything that can be checked without touching KVM is checked here, so bad input is
//! refused with one clear line before any VM exists. Limits that depend on the host's KVM
//! (its maximum vCPU count) are checked again when the VM is built.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Parser;
use splitvmm_common::size::{parse_size, SizeError};
use thiserror::Error;

/// Smallest guest RAM we accept: the Debian cloud kernel with an initramfs needs about this much.
pub const MIN_MEMORY: u64 = 128 << 20;
/// Upper bound on vCPUs regardless of KVM: APIC IDs 0..=253 fit the xAPIC MADT entries we build
/// and 255 is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;
/// Used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, Parser)]
#[command(
    name = "splitvmm",
    version,
    about = "A split-process VMM: CPU and memory through KVM, every device a vhost-user backend"
)]
pub struct Args {
    /// Guest kernel: a bzImage, or an ELF vmlinux (booted through its PVH entry when it has one).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest RAM, e.g. 512M or 2G (from 128M up to the host's MemTotal).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs (1 to the smaller of KVM's limit and 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u16,
    /// A virtio-blk disk served by a vhost-user backend listening on PATH (repeatable).
    #[arg(
        long,
        value_name = "socket=PATH[,num_queues=N,queue_size=N,readonly=on,wait=on,reconnect_ms=N]"
    )]
    pub disk: Vec<String>,
    /// A virtio-net NIC served by a vhost-user backend listening on PATH (repeatable).
    #[arg(
        long,
        value_name = "socket=PATH[,mac=MAC,num_queue_pairs=N,queue_size=N,wait=on,reconnect_ms=N]"
    )]
    pub net: Vec<String>,
}

/// Most NICs one VM may have.
pub const MAX_NICS: usize = 8;
/// Queue pairs per NIC (the backend's limit too).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub socket: PathBuf,
    /// The guest's MAC; `None`: what the backend's config space says.
    pub mac: Option<[u8; 6]>,
    pub num_queue_pairs: u16,
    pub queue_size: u16,
    pub link: LinkOptions,
}

/// How a device treats its backend's socket, for `--disk` and `--net` alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkOptions {
    /// `wait=on`: at start, wait for the backend to appear instead of exiting.
    pub wait: bool,
    /// `reconnect_ms=N`: how long to keep reconnecting to a backend that hung up before the
    /// device fails (0: fail at once); `None`: keep trying for as long as the VM runs.
    pub reconnect_ms: Option<u64>,
}

impl LinkOptions {
    /// Takes `key=value` if it is one of the link options; `Ok(false)` when it is not.
    fn parse_option(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "wait" => self.wait = parse_on_off(key, value)?,
            "reconnect_ms" => {
                self.reconnect_ms = Some(value.parse().map_err(|_| {
                    format!("reconnect_ms={value}: milliseconds (0: do not reconnect)")
                })?)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn parse_on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{key}={value}: on or off")),
    }
}

impl NetConfig {
    /// Parses `socket=PATH[,mac=MAC,num_queue_pairs=N,queue_size=N,wait=on,reconnect_ms=N]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = |problem: String| ConfigError::Net {
            value: text.to_owned(),
            problem,
        };
        let mut socket = None;
        let mut mac = None;
        let mut num_queue_pairs = 1u16;
        let mut queue_size = DEFAULT_QUEUE_SIZE;
        let mut link = LinkOptions::default();
        for (key, value) in key_values(text).map_err(bad)? {
            if link.parse_option(key, value).map_err(bad)? {
                continue;
            }
            match key {
                "socket" => socket = Some(PathBuf::from(value)),
                "mac" => {
                    mac = Some(parse_mac(value).ok_or_else(|| {
                        bad(format!(
                            "mac={value}: not a unicast MAC like 52:54:00:12:34:56"
                        ))
                    })?)
                }
                "num_queue_pairs" => {
                    num_queue_pairs = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                        .ok_or_else(|| {
                            bad(format!("num_queue_pairs={value}: 1 to {MAX_QUEUE_PAIRS}"))
                        })?
                }
                "queue_size" => queue_size = parse_queue_size(value).map_err(bad)?,
                _ => return Err(bad(format!("unknown option {key:?}"))),
            }
        }
        let socket = socket.ok_or_else(|| bad("socket=PATH is missing".into()))?;
        Ok(NetConfig {
            socket,
            mac,
            num_queue_pairs,
            queue_size,
            link,
        })
    }
}

/// `key=value` pairs separated by commas; an empty value is refused.
fn key_values(text: &str) -> Result<Vec<(&str, &str)>, String> {
    text.split(',')
        .map(|option| match option.split_once('=') {
            Some((key, "")) => Err(format!("{key}= needs a value")),
            Some(pair) => Ok(pair),
            None => Err(format!("{option:?} is not key=value")),
        })
        .collect()
}

fn parse_queue_size(value: &str) -> Result<u16, String> {
    value
        .parse()
        .ok()
        .filter(|n: &u16| n.is_power_of_two() && *n <= MAX_QUEUE_SIZE)
        .ok_or_else(|| format!("queue_size={value}: a power of two up to {MAX_QUEUE_SIZE}"))
}

/// Six hex bytes separated by colons; multicast addresses (bit 0 of the first byte) refused.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// Most disks one VM may have (PCI slots are shared with the host bridge and NICs).
pub const MAX_DISKS: usize = 16;
/// Most queues per disk (the backend's limit too).
pub const MAX_DISK_QUEUES: u16 = 64;
/// Largest virtqueue size (virtio 1.2, 2.7: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Queue size when `queue_size` is not given (what QEMU uses for virtio-blk).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    pub link: LinkOptions,
}

impl DiskConfig {
    /// Parses `socket=PATH[,num_queues=N,queue_size=N,readonly=on|off,wait=on,reconnect_ms=N]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = |problem: String| ConfigError::Disk {
            value: text.to_owned(),
            problem,
        };
        let mut socket = None;
        let mut num_queues = 1u16;
        let mut queue_size = DEFAULT_QUEUE_SIZE;
        let mut readonly = false;
        let mut link = LinkOptions::default();
        for (key, value) in key_values(text).map_err(bad)? {
            if link.parse_option(key, value).map_err(bad)? {
                continue;
            }
            match key {
                "socket" => socket = Some(PathBuf::from(value)),
                "num_queues" => {
                    num_queues = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_DISK_QUEUES).contains(n))
                        .ok_or_else(|| bad(format!("num_queues={value}: 1 to {MAX_DISK_QUEUES}")))?
                }
                "queue_size" => queue_size = parse_queue_size(value).map_err(bad)?,
                "readonly" => readonly = parse_on_off(key, value).map_err(bad)?,
                _ => return Err(bad(format!("unknown option {key:?}"))),
            }
        }
        let socket = socket.ok_or_else(|| bad("socket=PATH is missing".into()))?;
        Ok(DiskConfig {
            socket,
            num_queues,
            queue_size,
            readonly,
            link,
        })
    }
}

/// The image formats the loader accepts, recognised from their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub kernel_format: KernelFormat,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NetConfig>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read kernel {path}: {source}")]
    KernelUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is neither a bzImage nor an ELF vmlinux")]
    NotAKernel(PathBuf),
    #[error("cannot read initrd {path}: {source}")]
    InitrdUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--memory: {0}")]
    MemorySyntax(#[from] SizeError),
    #[error("--memory {requested} is below the minimum of {minimum} MiB")]
    MemoryTooSmall { requested: String, minimum: u64 },
    #[error("--memory {requested} is more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { requested: String, host_mib: u64 },
    #[error("--memory {0} is not a multiple of 4 KiB")]
    MemoryUnaligned(String),
    #[error("cannot read the host's MemTotal from /proc/meminfo")]
    HostMemoryUnknown,
    #[error("--vcpus {requested} is out of range: 1 to {maximum}")]
    VcpusOutOfRange { requested: u16, maximum: u8 },
    #[error("--cmdline must not contain a NUL byte")]
    CmdlineHasNul,
    #[error("--disk {value}: {problem}")]
    Disk { value: String, problem: String },
    #[error("{0} --disk options: at most {MAX_DISKS}")]
    TooManyDisks(usize),
    #[error("--net {value}: {problem}")]
    Net { value: String, problem: String },
    #[error("{0} --net options: at most {MAX_NICS}")]
    TooManyNics(usize),
}

impl TryFrom<Args> for VmConfig {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        Self::validate(args, host_memory_bytes()?)
    }
}

impl VmConfig {
    /// Validates `args` against a host with `host_memory` bytes of RAM.
    pub fn validate(args: Args, host_memory: u64) -> Result<Self, ConfigError> {
        let kernel_format = detect_kernel_format(&args.kernel)?;
        if let Some(initrd) = &args.initrd {
            File::open(initrd)
                .and_then(|file| file.metadata())
                .and_then(|meta| {
                    if meta.is_file() {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                })
                .map_err(|source| ConfigError::InitrdUnreadable {
                    path: initrd.clone(),
                    source,
                })?;
        }
        let memory_bytes = parse_size(&args.memory)?;
        if memory_bytes < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                requested: args.memory,
                minimum: MIN_MEMORY >> 20,
            });
        }
        if memory_bytes > host_memory {
            return Err(ConfigError::MemoryTooLarge {
                requested: args.memory,
                host_mib: host_memory >> 20,
            });
        }
        if memory_bytes % 4096 != 0 {
            return Err(ConfigError::MemoryUnaligned(args.memory));
        }
        let vcpus = u8::try_from(args.vcpus)
            .ok()
            .filter(|count| (1..=MAX_VCPUS).contains(count))
            .ok_or(ConfigError::VcpusOutOfRange {
                requested: args.vcpus,
                maximum: MAX_VCPUS,
            })?;
        if args.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineHasNul);
        }
        if args.disk.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(args.disk.len()));
        }
        let disks = args
            .disk
            .iter()
            .map(|text| DiskConfig::parse(text))
            .collect::<Result<Vec<_>, _>>()?;
        if args.net.len() > MAX_NICS {
            return Err(ConfigError::TooManyNics(args.net.len()));
        }
        let nics = args
            .net
            .iter()
            .map(|text| NetConfig::parse(text))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmConfig {
            kernel: args.kernel,
            kernel_format,
            initrd: args.initrd,
            cmdline: args.cmdline,
            memory_bytes,
            vcpus,
            disks,
            nics,
        })
    }
}

/// Recognises a bzImage by its setup header magic ("HdrS" at 0x202) and an ELF by `\x7fELF`.
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let unreadable = |source| ConfigError::KernelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    let mut head = [0u8; 0x206];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(unreadable)? {
            0 => break,
            count => filled += count,
        }
    }
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if filled == head.len() && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(ConfigError::NotAKernel(path.to_path_buf()))
    }
}

fn host_memory_bytes() -> Result<u64, ConfigError> {
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|_| ConfigError::HostMemoryUnknown)?;
    parse_mem_total(&meminfo).ok_or(ConfigError::HostMemoryUnknown)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HOST: u64 = 8 << 30;

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("splitvmm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(contents)
            .unwrap();
        path
    }

    /// Each test gets its own file: tests run in parallel and a shared file could be read
    /// while another test rewrites it.
    fn bzimage(test: &str) -> PathBuf {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        temp_file(&format!("bzImage-{test}"), &image)
    }

    fn args(kernel: PathBuf) -> Args {
        Args::try_parse_from(["splitvmm", "--kernel", kernel.to_str().unwrap()]).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let config = VmConfig::validate(args(bzimage("defaults_are_valid")), HOST).unwrap();
        assert_eq!(config.kernel_format, KernelFormat::BzImage);
        assert_eq!(config.memory_bytes, 512 << 20);
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn recognises_elf() {
        let elf = temp_file("vmlinux", b"\x7fELF\x02\x01\x01rest-of-header");
        let config = VmConfig::validate(args(elf), HOST).unwrap();
        assert_eq!(config.kernel_format, KernelFormat::Elf);
    }

    #[test]
    fn refuses_non_kernel_and_missing_files() {
        let text = temp_file("notes.txt", b"hello, this is not a kernel");
        assert!(matches!(
            VmConfig::validate(args(text), HOST),
            Err(ConfigError::NotAKernel(_))
        ));
        let missing = PathBuf::from("/nonexistent/vmlinuz");
        let err = VmConfig::validate(args(missing), HOST).unwrap_err();
        assert!(matches!(err, ConfigError::KernelUnreadable { .. }));
        assert!(err.to_string().contains("/nonexistent/vmlinuz"));
        let directory = std::env::temp_dir();
        assert!(matches!(
            VmConfig::validate(args(directory), HOST),
            Err(ConfigError::KernelUnreadable { .. })
        ));
    }

    #[test]
    fn memory_bounds() {
        let kernel = bzimage("memory_bounds");
        let with_memory = |memory: &str| {
            let mut a = args(kernel.clone());
            a.memory = memory.to_string();
            VmConfig::validate(a, HOST)
        };
        assert_eq!(with_memory("128M").unwrap().memory_bytes, 128 << 20);
        assert_eq!(with_memory("8G").unwrap().memory_bytes, 8 << 30);
        assert!(matches!(
            with_memory("127M"),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let err = with_memory("9G").unwrap_err();
        assert!(matches!(err, ConfigError::MemoryTooLarge { .. }));
        assert!(err.to_string().contains("8192 MiB"));
        assert!(matches!(
            with_memory("lots"),
            Err(ConfigError::MemorySyntax(_))
        ));
        assert!(matches!(
            with_memory("134217729"),
            Err(ConfigError::MemoryUnaligned(_))
        ));
    }

    #[test]
    fn vcpu_bounds() {
        let kernel = bzimage("vcpu_bounds");
        let with_vcpus = |vcpus: u16| {
            let mut a = args(kernel.clone());
            a.vcpus = vcpus;
            VmConfig::validate(a, HOST)
        };
        assert_eq!(with_vcpus(1).unwrap().vcpus, 1);
        assert_eq!(with_vcpus(254).unwrap().vcpus, 254);
        for bad in [0, 255, 256, 1000] {
            assert!(matches!(
                with_vcpus(bad),
                Err(ConfigError::VcpusOutOfRange { .. })
            ));
        }
    }

    #[test]
    fn missing_initrd_is_named() {
        let mut a = args(bzimage("missing_initrd_is_named"));
        a.initrd = Some(PathBuf::from("/nonexistent/initrd.gz"));
        let err = VmConfig::validate(a, HOST).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/initrd.gz"));
    }

    #[test]
    fn disk_options() {
        let disk = DiskConfig::parse("socket=/run/a.sock").unwrap();
        assert_eq!(
            disk,
            DiskConfig {
                socket: PathBuf::from("/run/a.sock"),
                num_queues: 1,
                queue_size: DEFAULT_QUEUE_SIZE,
                readonly: false,
                link: LinkOptions::default(),
            }
        );
        let disk = DiskConfig::parse("socket=/a,wait=on,reconnect_ms=2500").unwrap();
        assert_eq!(
            disk.link,
            LinkOptions {
                wait: true,
                reconnect_ms: Some(2500)
            }
        );
        let nic = NetConfig::parse("socket=/n,reconnect_ms=0,wait=off").unwrap();
        assert_eq!(nic.link.reconnect_ms, Some(0));
        assert!(!nic.link.wait);
        assert!(DiskConfig::parse("socket=/a,wait=maybe").is_err());
        assert!(NetConfig::parse("socket=/a,reconnect_ms=-1").is_err());
        let disk = DiskConfig::parse("num_queues=4,socket=/b,queue_size=1024,readonly=on").unwrap();
        assert_eq!(
            (disk.num_queues, disk.queue_size, disk.readonly),
            (4, 1024, true)
        );
        for (bad, says) in [
            ("num_queues=2", "socket=PATH is missing"),
            ("socket=", "socket= needs a value"),
            ("socket=/a,num_queues=0", "num_queues=0"),
            ("socket=/a,num_queues=65", "num_queues=65"),
            ("socket=/a,queue_size=100", "power of two"),
            ("socket=/a,queue_size=65536", "queue_size=65536"),
            ("socket=/a,readonly=yes", "on or off"),
            ("socket=/a,cache=none", "unknown option \"cache\""),
            ("socket=/a,readonly", "not key=value"),
        ] {
            let error = DiskConfig::parse(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
            assert!(error.starts_with(&format!("--disk {bad}:")), "{error}");
        }
    }

    #[test]
    fn net_options() {
        let nic = NetConfig::parse("socket=/run/n.sock,mac=52:54:00:ab:CD:01").unwrap();
        assert_eq!(nic.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 1]));
        assert_eq!(
            (nic.num_queue_pairs, nic.queue_size),
            (1, DEFAULT_QUEUE_SIZE)
        );
        let nic = NetConfig::parse("queue_size=512,socket=/n").unwrap();
        assert_eq!((nic.mac, nic.queue_size), (None, 512));
        for (bad, says) in [
            ("mac=52:54:00:00:00:01", "socket=PATH is missing"),
            ("socket=/n,mac=01:00:5e:00:00:01", "not a unicast MAC"),
            ("socket=/n,mac=52:54:00:00:00", "not a unicast MAC"),
            ("socket=/n,mac=52:54:00:00:00:01:02", "not a unicast MAC"),
            ("socket=/n,num_queue_pairs=17", "1 to 16"),
            ("socket=/n,num_queue_pairs=0", "1 to 16"),
            ("socket=/n,queue_size=3", "power of two"),
            ("socket=/n,readonly=on", "unknown option"),
        ] {
            let error = NetConfig::parse(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
            assert!(error.starts_with(&format!("--net {bad}:")), "{error}");
        }
    }

    #[test]
    fn disks_are_repeatable_and_validated() {
        let kernel = bzimage("disks_are_repeatable");
        let path = kernel.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["splitvmm", "--kernel", path];
            argv.extend_from_slice(extra);
            VmConfig::validate(Args::try_parse_from(argv).unwrap(), HOST)
        };
        let config = parse(&["--disk", "socket=/a", "--disk", "socket=/b,readonly=on"]).unwrap();
        assert_eq!(config.disks.len(), 2);
        assert!(config.disks[1].readonly);
        assert!(parse(&[]).unwrap().disks.is_empty());
        let err = parse(&["--disk", "socket=/a", "--disk", "path=/b"]).unwrap_err();
        assert!(err.to_string().contains("--disk path=/b"));
        let many: Vec<&str> = ["--disk", "socket=/x"].repeat(MAX_DISKS + 1);
        assert!(matches!(parse(&many), Err(ConfigError::TooManyDisks(17))));
    }

    #[test]
    fn meminfo_parsing() {
        let sample = "MemTotal:       24579116 kB\nMemFree:        1000 kB\n";
        assert_eq!(parse_mem_total(sample), Some(24579116 * 1024));
        assert_eq!(parse_mem_total("nothing here"), None);
    }
}
