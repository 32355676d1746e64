//! The command line of `splitvmm-net` and its validation into a [`Config`].
//!
//! Everything that can be checked without opening the tap or the socket is checked here, so bad
//! input is refused with one clear line before anything is created. Numbers, the MAC and the
//! address are taken as text and parsed here (not by clap) so their errors read alike.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use clap::Parser;
use thiserror::Error;

/// Most queue pairs: the backend crate maps queues to threads through 64-bit masks (two queues
/// per pair).
pub const MAX_QUEUE_PAIRS: u16 = 32;
/// Smallest queue size accepted.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Largest split virtqueue the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default upper bound on the queue size a frontend may pick (QEMU asks for 256 by default).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Smallest MTU: IPv4's minimum datagram size.
pub const MIN_MTU: u16 = 68;
/// Largest MTU a tap takes.
pub const MAX_MTU: u16 = 65535;
pub const DEFAULT_MTU: u16 = 1500;
/// Longest interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_TAP_NAME: usize = 15;

#[derive(Debug, Parser)]
#[command(
    name = "splitvmm-net",
    version,
    about = "vhost-user-net backend: serves a tap device to any vhost-user frontend"
)]
pub struct Args {
    /// Unix socket to listen on for the frontend (created with mode 0600). Not needed when
    /// systemd (or splitvmm-supervise) passes a listening socket (LISTEN_FDS).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Tap interface to attach to, created when it does not exist.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "tap_fd",
        required_unless_present = "tap_fd"
    )]
    pub tap: Option<String>,
    /// An open tap file descriptor inherited from the caller (IFF_TAP, IFF_NO_PI, IFF_VNET_HDR).
    #[arg(long, value_name = "FD")]
    pub tap_fd: Option<String>,
    /// The guest's MAC address (config space); default: a random 52:54:00:xx:xx:xx.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,
    /// MTU offered to the guest (VIRTIO_NET_F_MTU) and set on the tap (68 to 65535).
    #[arg(long, value_name = "N", default_value = "1500")]
    pub mtu: String,
    /// Number of RX/TX queue pairs, each served by its own worker thread (1 to 32).
    #[arg(long, value_name = "N", default_value = "1")]
    pub num_queue_pairs: String,
    /// Largest queue size a frontend may set (a power of two from 4 to 32768).
    #[arg(long, value_name = "N", default_value = "1024")]
    pub queue_size: String,
    /// IPv4 address with prefix length (e.g. 10.0.0.1/24) to put on the tap, host side.
    #[arg(long, value_name = "CIDR")]
    pub host_ip: Option<String>,
}

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Attach to (or create) the tap of this name.
    Name(String),
    /// Use this inherited descriptor.
    Fd(RawFd),
}

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIp {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl HostIp {
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }
}

/// A validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// None: the socket comes from systemd (checked when the daemon starts).
    pub socket: Option<PathBuf>,
    pub tap: TapSource,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub num_queue_pairs: u16,
    pub queue_size: u16,
    pub host_ip: Option<HostIp>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--socket must not be empty")]
    EmptySocket,
    #[error("socket folder {0} does not exist or is not a folder")]
    SocketDirMissing(PathBuf),
    #[error("socket path {0} is a folder")]
    SocketIsDir(PathBuf),
    #[error("--tap '{0}' is not an interface name (1 to {MAX_TAP_NAME} bytes, no '/', ':', whitespace or NUL)")]
    TapName(String),
    #[error("--tap-fd '{0}' is not a file descriptor number")]
    TapFd(String),
    #[error("--tap-fd {0} is not an open descriptor")]
    TapFdClosed(RawFd),
    #[error("--tap-fd gives one tap queue; --num-queue-pairs {0} needs --tap NAME")]
    TapFdMultiQueue(u16),
    #[error("--mac '{0}' is not a MAC address like 52:54:00:12:34:56")]
    Mac(String),
    #[error("--mac {0} is a multicast address; a NIC needs a unicast one")]
    MacMulticast(String),
    #[error("--mac {0} is all zeros")]
    MacZero(String),
    #[error("--mtu '{0}' is not a number from {MIN_MTU} to {MAX_MTU}")]
    Mtu(String),
    #[error("--num-queue-pairs '{0}' is not a number from 1 to {MAX_QUEUE_PAIRS}")]
    NumQueuePairs(String),
    #[error("--queue-size '{0}' is not a power of two from {MIN_QUEUE_SIZE} to {MAX_QUEUE_SIZE}")]
    QueueSize(String),
    #[error("--host-ip '{0}' is not an IPv4 address with a prefix length, like 10.0.0.1/24")]
    HostIp(String),
    #[error("cannot make a random MAC address: {0}")]
    RandomMac(String),
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Mac(text.to_owned());
    let parts: Vec<&str> = text.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac == [0; 6] {
        return Err(ConfigError::MacZero(text.to_owned()));
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::MacMulticast(text.to_owned()));
    }
    Ok(mac)
}

/// A random MAC in QEMU's locally used 52:54:00 range.
fn random_mac() -> Result<[u8; 6], ConfigError> {
    use std::io::Read;
    let mut tail = [0u8; 3];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut tail))
        .map_err(|e| ConfigError::RandomMac(e.to_string()))?;
    Ok([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mtu(text: &str) -> Result<u16, ConfigError> {
    match text.trim().parse::<u16>() {
        Ok(n) if n >= MIN_MTU => Ok(n),
        _ => Err(ConfigError::Mtu(text.to_owned())),
    }
}

fn parse_pairs(text: &str) -> Result<u16, ConfigError> {
    match text.trim().parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUE_PAIRS).contains(&n) => Ok(n),
        _ => Err(ConfigError::NumQueuePairs(text.to_owned())),
    }
}

fn parse_queue_size(text: &str) -> Result<u16, ConfigError> {
    match text.trim().parse::<u16>() {
        Ok(n) if (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(ConfigError::QueueSize(text.to_owned())),
    }
}

pub fn parse_host_ip(text: &str) -> Result<HostIp, ConfigError> {
    let bad = || ConfigError::HostIp(text.to_owned());
    let (addr, prefix) = text.trim().split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 || addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(bad());
    }
    Ok(HostIp { addr, prefix })
}

fn check_tap_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TAP_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::TapName(name.to_owned()))
    }
}

fn parse_tap_fd(text: &str) -> Result<RawFd, ConfigError> {
    let fd = text
        .trim()
        .parse::<RawFd>()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| ConfigError::TapFd(text.to_owned()))?;
    // SAFETY: F_GETFD only reads the descriptor's flags; no pointers.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ConfigError::TapFdClosed(fd));
    }
    Ok(fd)
}

fn check_socket(socket: &Path) -> Result<(), ConfigError> {
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

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if let Some(socket) = &args.socket {
            check_socket(socket)?;
        }
        let num_queue_pairs = parse_pairs(&args.num_queue_pairs)?;
        let tap = match (args.tap, args.tap_fd) {
            (Some(name), _) => {
                check_tap_name(&name)?;
                TapSource::Name(name)
            }
            (None, Some(fd)) => {
                if num_queue_pairs > 1 {
                    return Err(ConfigError::TapFdMultiQueue(num_queue_pairs));
                }
                TapSource::Fd(parse_tap_fd(&fd)?)
            }
            // clap requires one of the two; an empty name reads as a bad name.
            (None, None) => return Err(ConfigError::TapName(String::new())),
        };
        let mac = match &args.mac {
            Some(text) => parse_mac(text)?,
            None => random_mac()?,
        };
        Ok(Config {
            socket: args.socket,
            tap,
            mac,
            mtu: parse_mtu(&args.mtu)?,
            num_queue_pairs,
            queue_size: parse_queue_size(&args.queue_size)?,
            host_ip: args.host_ip.as_deref().map(parse_host_ip).transpose()?,
        })
    }
}

/// Turns a clap error (several lines with usage and hints) into the one line `splitvmm-net`
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

    fn args(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["splitvmm-net", "--socket", "/tmp/net-config-test.sock"];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| one_line_clap_error(&e))?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_a_good_command_line() {
        let c = args(&[
            "--tap",
            "tap0",
            "--mac",
            "52:54:00:AB:cd:01",
            "--mtu",
            "9000",
            "--num-queue-pairs",
            "4",
            "--queue-size",
            "256",
            "--host-ip",
            "10.1.2.1/24",
        ])
        .expect("valid");
        assert_eq!(c.tap, TapSource::Name("tap0".into()));
        assert_eq!(c.mac, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!((c.mtu, c.num_queue_pairs, c.queue_size), (9000, 4, 256));
        let ip = c.host_ip.expect("host ip");
        assert_eq!(ip.addr, Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(ip.netmask(), Ipv4Addr::new(255, 255, 255, 0));
    }

    #[test]
    fn defaults_and_random_mac() {
        let c = args(&["--tap", "t"]).expect("valid");
        assert_eq!((c.mtu, c.num_queue_pairs, c.queue_size), (1500, 1, 1024));
        assert_eq!(&c.mac[..3], &[0x52, 0x54, 0]);
        assert_eq!(c.host_ip, None);
    }

    #[test]
    fn socket_path_alias() {
        let a = Args::try_parse_from(["splitvmm-net", "--socket-path", "/tmp/x", "--tap", "t"])
            .expect("clap");
        assert_eq!(a.socket, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn tap_and_tap_fd_exclude_each_other_and_one_is_needed() {
        let e = args(&[]).expect_err("no tap");
        assert!(e.contains("--tap"), "{e}");
        let e = args(&["--tap", "t", "--tap-fd", "0"]).expect_err("both");
        assert!(e.contains("cannot be used with"), "{e}");
        let e = args(&["--tap-fd", "0", "--num-queue-pairs", "2"]).expect_err("mq fd");
        assert!(e.contains("--num-queue-pairs 2"), "{e}");
        let e = args(&["--tap-fd", "987654"]).expect_err("closed fd");
        assert!(e.contains("not an open descriptor"), "{e}");
        let e = args(&["--tap-fd=-3"]).expect_err("negative fd");
        assert!(e.contains("not a file descriptor"), "{e}");
    }

    #[test]
    fn rejects_bad_values() {
        for (flag, value, needle) in [
            ("--mac", "52:54:00:12:34", "not a MAC"),
            ("--mac", "52:54:00:12:34:zz", "not a MAC"),
            ("--mac", "01:00:5e:00:00:01", "multicast"),
            ("--mac", "00:00:00:00:00:00", "all zeros"),
            ("--mtu", "67", "--mtu"),
            ("--mtu", "65536", "--mtu"),
            ("--num-queue-pairs", "0", "--num-queue-pairs"),
            ("--num-queue-pairs", "33", "--num-queue-pairs"),
            ("--queue-size", "100", "--queue-size"),
            ("--queue-size", "2", "--queue-size"),
            ("--host-ip", "10.0.0.1", "--host-ip"),
            ("--host-ip", "10.0.0.1/33", "--host-ip"),
            ("--host-ip", "300.0.0.1/24", "--host-ip"),
        ] {
            let e = args(&["--tap", "t", flag, value]).expect_err(value);
            assert!(e.contains(needle), "{flag} {value}: {e}");
        }
        for name in ["", "a/b", "a b", "sixteen-chars-xx", "x:1"] {
            let e = args(&["--tap", name]).expect_err(name);
            assert!(e.contains("--tap"), "{name}: {e}");
        }
    }

    #[test]
    fn rejects_a_missing_socket_folder() {
        let a = Args::try_parse_from([
            "splitvmm-net",
            "--socket",
            "/nonexistent-splitvmm/x.sock",
            "--tap",
            "t",
        ])
        .expect("clap");
        assert!(matches!(
            Config::try_from(a),
            Err(ConfigError::SocketDirMissing(_))
        ));
    }

    #[test]
    fn clap_errors_become_one_line() {
        let err = Args::try_parse_from(["splitvmm-net", "--socket", "/tmp/s"]).expect_err("no tap");
        let line = one_line_clap_error(&err);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("--tap"), "{line}");
    }
}
