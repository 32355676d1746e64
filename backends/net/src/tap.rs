//! The tap device through its ioctls: create or attach queues (IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, IFF_MULTI_QUEUE for more than one), check an inherited descriptor, set the
//! virtio-net header size and the offloads, attach/detach queues, and the host side's MTU,
//! address and link state.
//!
//! Every tap descriptor here is non-blocking: the workers read and write it from their epoll
//! loops and must never sleep in a read.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

use crate::config::HostIp;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, Error)]
pub enum TapError {
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    #[error("cannot create or attach tap {name}: {source}{hint}")]
    SetIff {
        name: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("--tap-fd {fd} is not a tap descriptor: {source}")]
    NotATap { fd: RawFd, source: io::Error },
    #[error("--tap-fd {fd} (tap {name}) lacks {missing}; open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    WrongFlags {
        fd: RawFd,
        name: String,
        missing: &'static str,
    },
    #[error("cannot configure the host side of tap {name}: {what}: {source}")]
    Host {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An `ifreq` with `name` filled in (names were checked to fit by the config).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn ioctl_ptr<T>(fd: RawFd, request: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is a pointer to a `T` of the size the
    // kernel expects (ifreq or unsigned int), valid for the duration of the call.
    if unsafe { libc::ioctl(fd, request, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, request: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the requests used with this helper (TUNSETOFFLOAD) take their argument by value.
    if unsafe { libc::ioctl(fd, request, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens one queue of tap `name`, creating the tap if it does not exist.
pub fn open_queue(name: &str, multi_queue: bool) -> Result<File, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    let mut req = ifreq(name);
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req).map_err(|source| {
        let hint = match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                " (needs CAP_NET_ADMIN, or a persistent tap owned by this user)"
            }
            Some(libc::EINVAL) => {
                " (an existing interface of that name that is not a tap, or whose multi-queue \
                 setting differs)"
            }
            Some(libc::EBUSY) => " (a single-queue tap already in use by another process)",
            _ => "",
        };
        TapError::SetIff {
            name: name.to_owned(),
            source,
            hint,
        }
    })?;
    Ok(file)
}

/// Opens `n` queues of tap `name` (multi-queue when `n > 1`).
pub fn open_queues(name: &str, n: u16) -> Result<Vec<File>, TapError> {
    (0..n).map(|_| open_queue(name, n > 1)).collect()
}

/// Takes an inherited tap descriptor: checks it is a tap with the flags the backend needs,
/// makes it non-blocking and close-on-exec, and returns it with the tap's name.
pub fn adopt_fd(fd: RawFd) -> Result<(String, File), TapError> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    ioctl_ptr(fd, libc::TUNGETIFF, &mut req).map_err(|source| TapError::NotATap { fd, source })?;
    let name = name_of(&req);
    // SAFETY: TUNGETIFF fills ifru_flags.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    for (bit, what) in [
        (libc::IFF_TAP, "IFF_TAP"),
        (libc::IFF_NO_PI, "IFF_NO_PI"),
        (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
    ] {
        if flags & bit == 0 {
            return Err(TapError::WrongFlags {
                fd,
                name,
                missing: what,
            });
        }
    }
    // SAFETY: the caller hands this descriptor over (the command line said it is ours), and
    // from here on only the returned File owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let set_fl = |what, cmd_get, cmd_set, bit: libc::c_int| -> Result<(), TapError> {
        // SAFETY: fcntl on a descriptor we own; no pointers.
        let old = unsafe { libc::fcntl(file.as_raw_fd(), cmd_get) };
        // SAFETY: as above.
        if old < 0 || unsafe { libc::fcntl(file.as_raw_fd(), cmd_set, old | bit) } < 0 {
            return Err(TapError::Ioctl {
                name: name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    set_fl("O_NONBLOCK", libc::F_GETFL, libc::F_SETFL, libc::O_NONBLOCK)?;
    set_fl("FD_CLOEXEC", libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC)?;
    Ok((name, file))
}

/// TUNSETVNETHDRSZ: how long the virtio-net header in front of every frame is.
pub fn set_vnet_hdr_len(file: &File, name: &str, len: usize) -> Result<(), TapError> {
    let mut len = len as libc::c_int;
    ioctl_ptr(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut len).map_err(|source| TapError::Ioctl {
        name: name.to_owned(),
        what: "TUNSETVNETHDRSZ",
        source,
    })
}

/// TUNSETOFFLOAD: which offloads the tap may leave to the guest on RX (device-wide).
pub fn set_offloads(file: &File, name: &str, flags: u32) -> Result<(), TapError> {
    ioctl_val(
        file.as_raw_fd(),
        libc::TUNSETOFFLOAD,
        libc::c_ulong::from(flags),
    )
    .map_err(|source| TapError::Ioctl {
        name: name.to_owned(),
        what: "TUNSETOFFLOAD",
        source,
    })
}

/// TUNSETQUEUE: attach or detach one queue of a multi-queue tap. A detached queue gets no
/// frames from the host, so the kernel does not steer flows to a pair the guest does not use.
pub fn set_queue_attached(file: &File, name: &str, attached: bool) -> Result<(), TapError> {
    let mut req = ifreq("");
    let flags = if attached {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    };
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    ioctl_ptr(file.as_raw_fd(), libc::TUNSETQUEUE, &mut req).map_err(|source| TapError::Ioctl {
        name: name.to_owned(),
        what: "TUNSETQUEUE",
        source,
    })
}

/// Whether the tap behind `file` was deleted (TUNGETIFF fails with EBADFD once the interface is
/// gone; a detached queue of a live tap answers EINVAL, which is not "gone").
pub fn is_deleted(file: &File) -> bool {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    match ioctl_ptr(file.as_raw_fd(), libc::TUNGETIFF, &mut req) {
        Ok(()) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBADFD),
    }
}

/// Whether an interface called `name` exists (in this network namespace).
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and both are plain data;
    // this is how the SIOCSIF* ioctls take an IPv4 address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The host-side MAC address this backend gives tap `name`: locally administered, unicast, and
/// the same every time for the same name. The kernel would pick a random one for each new tap,
/// so after a backend restart the guest's ARP entry for the host would point at the old tap's
/// address and traffic would stall until ARP gave up on it.
pub fn stable_host_mac(name: &str) -> [u8; 6] {
    // FNV-1a: small, fixed, and good enough to tell tap names apart.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = hash.to_be_bytes();
    [0x0a, b[3], b[4], b[5], b[6], b[7]]
}

/// Sets the host side of tap `name`: a stable MAC address (best effort: a tap that is already
/// up may refuse it), its MTU, optionally an IPv4 address, and the link up.
pub fn configure_host(name: &str, mtu: u16, ip: Option<HostIp>) -> Result<(), TapError> {
    let host = |what, source| TapError::Host {
        name: name.to_owned(),
        what,
        source,
    };
    // SAFETY: socket() takes no pointers; the result is checked and owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(host("socket", io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();
    let mut req = ifreq(name);
    let mac = stable_host_mac(name);
    let mut hwaddr = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (slot, byte) in hwaddr.sa_data.iter_mut().zip(mac) {
        *slot = byte as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hwaddr;
    if let Err(e) = ioctl_ptr(fd, libc::SIOCSIFHWADDR, &mut req) {
        log::debug!("tap {name}: keeps its MAC address (SIOCSIFHWADDR: {e})");
    }
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    ioctl_ptr(fd, libc::SIOCSIFMTU, &mut req).map_err(|e| host("SIOCSIFMTU", e))?;
    if let Some(ip) = ip {
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_addr = sockaddr_in(ip.addr);
        ioctl_ptr(fd, libc::SIOCSIFADDR, &mut req).map_err(|e| host("SIOCSIFADDR", e))?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_netmask = sockaddr_in(ip.netmask());
        ioctl_ptr(fd, libc::SIOCSIFNETMASK, &mut req).map_err(|e| host("SIOCSIFNETMASK", e))?;
    }
    let mut req = ifreq(name);
    ioctl_ptr(fd, libc::SIOCGIFFLAGS, &mut req).map_err(|e| host("SIOCGIFFLAGS", e))?;
    // SAFETY: SIOCGIFFLAGS filled ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl_ptr(fd, libc::SIOCSIFFLAGS, &mut req).map_err(|e| host("SIOCSIFFLAGS", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mac_is_stable_unicast_and_local() {
        let a = stable_host_mac("svtap0");
        assert_eq!(a, stable_host_mac("svtap0"));
        assert_ne!(a, stable_host_mac("svtap1"));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }
}
