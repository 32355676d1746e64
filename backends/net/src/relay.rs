//! A message relay between the frontend's connection and the backend crate's, that holds back
//! SET_VRING_ENABLE while VHOST_USER_F_PROTOCOL_FEATURES has not been acked yet, and replays it
//! right after SET_FEATURES.
//!
//! Why: QEMU's vhost-user-net (7.2 here) sends SET_VRING_ENABLE before SET_FEATURES: whenever
//! the guest changes the number of queue pairs, and in `vhost_net_start`, where it "restores"
//! each pair's enable state before starting the device, and never again after. The `vhost`
//! crate's request handler treats SET_VRING_ENABLE without PROTOCOL_FEATURES acked as an error
//! and ends the connection (QEMU then loses its NIC); DPDK and libvhost-user take it. So the
//! relay keeps the last state asked for each ring (acking when asked to) and hands them to the
//! crate once SET_FEATURES has gone through; everything else passes unchanged, descriptors
//! included.
//!
//! The same QEMU sends one ADD_MEM_REG per region for every queue pair (each pair is its own
//! `vhost_dev` on the one connection), and one REM_MEM_REG per pair when they stop. The crate
//! refuses a region that overlaps one it has and would unmap a region at the first removal
//! while other pairs still use it. So the relay counts identical regions: only the first
//! ADD_MEM_REG and the last REM_MEM_REG of a region reach the crate; the others are acked here
//! (DPDK ignores duplicate regions the same way).
//!
//! The relay runs two threads per session (one per direction); either side hanging up shuts
//! both sockets down, so the other thread and the crate's session end too.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size (all u32, little-endian).
const HDR: usize = 12;
/// Most descriptors one message carries (SET_MEM_TABLE: 8 regions; ADD_MEM_REG: 1).
const MAX_FDS: usize = 32;
/// Longest payload accepted (the vhost crate's own limit is 4 KiB for every message).
const MAX_PAYLOAD: usize = 64 * 1024;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ENABLE: u32 = 18;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One message: header, payload, and the descriptors that came with it.
struct Message {
    hdr: [u8; HDR],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }
}

/// Reads one message; `None` at a clean end of stream.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HDR {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: hdr[got..].as_mut_ptr().cast(),
            iov_len: HDR - got,
        }];
        // SAFETY: the iovec points into `hdr` past what was read, with the length left; the
        // kernel writes at most that many bytes there.
        let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        for fd in &raw[..nfds] {
            // SAFETY: recvmsg just installed these descriptors in our table; nothing else
            // owns them.
            fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {size}-byte vhost-user payload"),
        ));
    }
    let mut payload = vec![0u8; size];
    (&*sock).read_exact(&mut payload)?;
    Ok(Some(Message { hdr, payload, fds }))
}

fn write_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = m.fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let whole = [&m.hdr[..], &m.payload[..]].concat();
    let sent = sock
        .send_with_fds(&[&whole[..]], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // A stream socket may take part of a large message; the descriptors went with the first
    // byte.
    (&*sock).write_all(&whole[sent..])
}

/// The ack QEMU waits for when it set NEED_REPLY: u64 0 = success.
fn ack(m: &Message) -> Message {
    let mut hdr = [0u8; HDR];
    hdr[..4].copy_from_slice(&m.request().to_le_bytes());
    hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
    Message {
        hdr,
        payload: 0u64.to_le_bytes().to_vec(),
        fds: Vec::new(),
    }
}

/// The identity of the region an ADD_MEM_REG / REM_MEM_REG carries (8 bytes of padding, then
/// guest address, size, user address, mmap offset).
fn region_key(m: &Message) -> Option<(u64, u64, u64)> {
    if m.request() != ADD_MEM_REG && m.request() != REM_MEM_REG {
        return None;
    }
    let word = |at: usize| -> Option<u64> {
        let b = m.payload.get(at..at + 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    };
    Some((word(8)?, word(16)?, word(24)?))
}

/// SET_VRING_ENABLE for ring `index` (no reply asked for).
fn enable(index: u32, num: u32) -> Message {
    let mut hdr = [0u8; HDR];
    hdr[..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
    hdr[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
    hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
    Message {
        hdr,
        payload: [index.to_le_bytes(), num.to_le_bytes()].concat(),
        fds: Vec::new(),
    }
}

fn hang_up(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(std::net::Shutdown::Both);
    let _ = b.shutdown(std::net::Shutdown::Both);
}

/// Relays between `frontend` and `backend` (the crate's end) on two threads until either
/// side hangs up.
pub fn start(frontend: UnixStream, backend: UnixStream) -> io::Result<()> {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
    let writer = Arc::clone(&to_frontend);
    std::thread::Builder::new()
        .name("relay-in".into())
        .spawn(move || relay_in(&frontend, &backend, &writer))?;
    std::thread::Builder::new()
        .name("relay-out".into())
        .spawn(move || relay_out(&f2, &b2, &to_frontend))?;
    Ok(())
}

/// Frontend → backend, holding back what the crate cannot take (see the module docs).
fn relay_in(frontend: &UnixStream, backend: &UnixStream, writer: &Mutex<UnixStream>) {
    let mut protocol_acked = false;
    // Ring index → enable state asked for before SET_FEATURES.
    let mut held: BTreeMap<u32, u32> = BTreeMap::new();
    // (guest address, size, user address) → how many pairs added the region.
    let mut regions: BTreeMap<(u64, u64, u64), u32> = BTreeMap::new();
    loop {
        let m = match read_message(frontend) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                log::debug!("frontend connection: {e}");
                break;
            }
        };
        log::trace!(
            "frontend request {} flags {:#x}, {} bytes, {} fds",
            m.request(),
            m.flags(),
            m.payload.len(),
            m.fds.len()
        );
        if m.request() == SET_MEM_TABLE {
            regions.clear();
        }
        let duplicate = region_key(&m).is_some_and(|key| {
            let count = regions.entry(key).or_insert(0);
            if m.request() == ADD_MEM_REG {
                *count += 1;
                *count > 1
            } else {
                *count = count.saturating_sub(1);
                let still_used = *count > 0;
                if !still_used {
                    regions.remove(&key);
                }
                still_used
            }
        });
        let result = if duplicate {
            log::debug!("answering a repeated ADD/REM_MEM_REG of a region in use");
            let w = writer.lock().unwrap_or_else(PoisonError::into_inner);
            if m.flags() & FLAG_NEED_REPLY != 0 {
                write_message(&w, &ack(&m))
            } else {
                Ok(())
            }
        } else if m.request() == SET_VRING_ENABLE && !protocol_acked && m.payload.len() >= 8 {
            let word = |at: usize| {
                u32::from_le_bytes([
                    m.payload[at],
                    m.payload[at + 1],
                    m.payload[at + 2],
                    m.payload[at + 3],
                ])
            };
            held.insert(word(0), word(4));
            if m.flags() & FLAG_NEED_REPLY != 0 {
                let w = writer.lock().unwrap_or_else(PoisonError::into_inner);
                write_message(&w, &ack(&m))
            } else {
                Ok(())
            }
        } else {
            let mut r = write_message(backend, &m);
            if m.request() == SET_FEATURES && m.payload.len() >= 8 {
                let mut f = [0u8; 8];
                f.copy_from_slice(&m.payload[..8]);
                protocol_acked = u64::from_le_bytes(f) & PROTOCOL_FEATURES_BIT != 0;
                if protocol_acked {
                    for (index, num) in std::mem::take(&mut held) {
                        log::debug!("replaying SET_VRING_ENABLE {index} {num}");
                        r = r.and_then(|()| write_message(backend, &enable(index, num)));
                    }
                }
            }
            r
        };
        if let Err(e) = result {
            log::debug!("relaying a frontend message: {e}");
            break;
        }
    }
    hang_up(frontend, backend);
}

/// Backend → frontend: replies, passed through.
fn relay_out(frontend: &UnixStream, backend: &UnixStream, writer: &Mutex<UnixStream>) {
    loop {
        let m = match read_message(backend) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                log::debug!("backend connection: {e}");
                break;
            }
        };
        let w = writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = write_message(&w, &m) {
            log::debug!("relaying a backend message: {e}");
            break;
        }
    }
    hang_up(frontend, backend);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Message {
        let mut hdr = [0u8; HDR];
        hdr[..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            hdr,
            payload: payload.to_vec(),
            fds: Vec::new(),
        }
    }

    fn region(gpa: u64) -> Vec<u8> {
        [0u64, gpa, 1 << 20, 0x7f00_0000_0000, 0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    fn pipes() -> (UnixStream, UnixStream) {
        let (front, front_relay) = UnixStream::pair().unwrap();
        let (back_relay, back) = UnixStream::pair().unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        start(front_relay, back_relay).unwrap();
        (front, back)
    }

    fn next(sock: &UnixStream) -> Message {
        read_message(sock).unwrap().expect("a message")
    }

    #[test]
    fn early_ring_enables_are_held_and_replayed_after_set_features() {
        let (front, back) = pipes();
        let state = |i: u32, n: u32| [i.to_le_bytes(), n.to_le_bytes()].concat();
        write_message(&front, &msg(SET_VRING_ENABLE, 1, &state(0, 1))).unwrap();
        write_message(&front, &msg(SET_VRING_ENABLE, 1, &state(1, 0))).unwrap();
        write_message(&front, &msg(SET_VRING_ENABLE, 1, &state(1, 1))).unwrap();
        // Asked for an ack: answered by the relay.
        write_message(&front, &msg(SET_VRING_ENABLE, 9, &state(2, 0))).unwrap();
        let reply = next(&front);
        assert_eq!(reply.request(), SET_VRING_ENABLE);
        assert_eq!(reply.flags(), FLAG_VERSION | FLAG_REPLY);
        assert_eq!(reply.payload, 0u64.to_le_bytes());
        let features = (PROTOCOL_FEATURES_BIT | 1 << 32).to_le_bytes();
        write_message(&front, &msg(SET_FEATURES, 1, &features)).unwrap();
        assert_eq!(next(&back).request(), SET_FEATURES);
        for (i, n) in [(0, 1), (1, 1), (2, 0)] {
            let m = next(&back);
            assert_eq!((m.request(), m.payload), (SET_VRING_ENABLE, state(i, n)));
        }
        // From now on they pass through.
        write_message(&front, &msg(SET_VRING_ENABLE, 1, &state(3, 1))).unwrap();
        assert_eq!(next(&back).payload, state(3, 1));
    }

    #[test]
    fn repeated_regions_reach_the_backend_once_and_descriptors_pass() {
        let (front, back) = pipes();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut add = msg(ADD_MEM_REG, 9, &region(0x1000_0000));
        add.fds.push(file.try_clone().unwrap().into());
        write_message(&front, &add).unwrap();
        let got = next(&back);
        assert_eq!(got.request(), ADD_MEM_REG);
        assert_eq!(got.fds.len(), 1);
        assert!(got.fds[0].as_raw_fd() >= 0);
        // The second pair adds the same region: acked here.
        let mut again = msg(ADD_MEM_REG, 9, &region(0x1000_0000));
        again.fds.push(file.into());
        write_message(&front, &again).unwrap();
        assert_eq!(next(&front).flags(), FLAG_VERSION | FLAG_REPLY);
        // First removal acked here, the last one goes through.
        write_message(&front, &msg(REM_MEM_REG, 9, &region(0x1000_0000))).unwrap();
        assert_eq!(next(&front).request(), REM_MEM_REG);
        write_message(&front, &msg(REM_MEM_REG, 9, &region(0x1000_0000))).unwrap();
        assert_eq!(next(&back).request(), REM_MEM_REG);
        // Replies from the backend reach the frontend; a hang-up ends both sides.
        write_message(&back, &msg(REM_MEM_REG, 5, &0u64.to_le_bytes())).unwrap();
        assert_eq!(next(&front).flags(), 5);
        drop(back);
        assert!(read_message(&front).unwrap().is_none());
    }
}
