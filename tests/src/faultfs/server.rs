//! The request loop of the fault-injecting FUSE filesystem: one thread reads requests from
//! /dev/fuse and answers them from the shared [`State`] (one regular file held in memory,
//! the armed faults, the operation counters), until the fixture signals it to stop, the
//! kernel sends DESTROY, or the connection goes away.
//!
//! The filesystem is a root directory with one file, [`super::FILE_NAME`]. INIT, LOOKUP,
//! GETATTR, SETATTR (size only), OPEN, READ, WRITE, FLUSH, FSYNC, RELEASE, STATFS and DESTROY
//! are answered; FORGET, BATCH_FORGET and INTERRUPT get no answer (requests are answered in
//! order, so by the time an INTERRUPT is read its request has been answered already);
//! everything else (FALLOCATE, xattrs, directories listing, ...) gets ENOSYS.

use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;

use super::protocol::{self, Attr, InHeader, ProtocolError, ROOT_ID};

/// The file's node id.
pub const FILE_ID: u64 = 2;
/// Largest WRITE payload the kernel may send (it splits bigger I/O).
pub const MAX_WRITE: u32 = 128 << 10;
/// Read buffer: a WRITE of MAX_WRITE plus its headers fits with room to spare.
const BUFFER_LEN: usize = MAX_WRITE as usize + 4096;
/// Attribute and name cache lifetime handed to the kernel, in seconds.
const VALID_SECS: u64 = 1;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("waiting on /dev/fuse: {0}")]
    Poll(Errno),
    #[error("reading /dev/fuse: {0}")]
    Read(std::io::Error),
    #[error("writing a reply to /dev/fuse: {0}")]
    Write(std::io::Error),
    #[error("/dev/fuse took {wrote} bytes of a {len}-byte reply")]
    ShortWrite { wrote: usize, len: usize },
}

/// Faults armed in the filesystem: an operation that touches any listed byte range fails with
/// EIO and changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub read_eio: Vec<Range<u64>>,
    pub write_eio: Vec<Range<u64>>,
    /// Every FSYNC fails with EIO.
    pub fsync_eio: bool,
}

impl Faults {
    fn hits(ranges: &[Range<u64>], offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        ranges.iter().any(|r| offset < r.end && r.start < end)
    }
}

/// Which operation a fault failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Fsync,
}

/// One request failed by an armed fault (offset and length are 0 for FSYNC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultHit {
    pub op: FaultOp,
    pub offset: u64,
    pub len: u64,
}

/// Requests the filesystem saw, by kind (failed ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub init: u64,
    pub lookup: u64,
    pub getattr: u64,
    pub setattr: u64,
    pub open: u64,
    pub read: u64,
    pub write: u64,
    pub flush: u64,
    pub fsync: u64,
    pub release: u64,
    pub statfs: u64,
    pub forget: u64,
    pub interrupt: u64,
    /// Answered with ENOSYS.
    pub unsupported: u64,
    /// Answered with EINVAL: a request the server could not parse.
    pub malformed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Everything the fixture and the server thread share.
#[derive(Debug, Default)]
pub struct State {
    pub data: Vec<u8>,
    pub faults: Faults,
    pub counts: OpCounts,
    pub hits: Vec<FaultHit>,
    /// INIT was answered.
    pub initialized: bool,
    /// How the server thread ended, when it has.
    pub ended: Option<String>,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Default)]
pub struct Shared {
    state: Mutex<State>,
    /// Signalled when `initialized` or `ended` changes.
    pub changed: Condvar,
}

impl Shared {
    pub fn new(data: Vec<u8>, uid: u32, gid: u32) -> Self {
        Shared {
            state: Mutex::new(State {
                data,
                uid,
                gid,
                ..State::default()
            }),
            changed: Condvar::new(),
        }
    }

    /// The state; a panic elsewhere while holding it does not make it unusable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn file_attr(&self) -> Attr {
        Attr {
            ino: FILE_ID,
            size: self.data.len() as u64,
            mode: libc::S_IFREG | 0o644,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            blksize: 4096,
        }
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_ID,
            size: 0,
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            blksize: 4096,
        }
    }

    fn attr_of(&self, node: u64) -> Option<Attr> {
        match node {
            ROOT_ID => Some(self.root_attr()),
            FILE_ID => Some(self.file_attr()),
            _ => None,
        }
    }
}

/// What to send back for one request.
enum Answer {
    /// No reply (FORGET, BATCH_FORGET, INTERRUPT).
    None,
    Ok(Vec<u8>),
    Err(i32),
}

/// Serves `dev` until `stop` becomes readable (the fixture dropped its end), DESTROY, or the
/// connection is gone (ENODEV). Records how it ended in the state.
pub fn run(dev: File, stop: UnixStream, shared: Arc<Shared>) -> Result<(), ServerError> {
    let result = serve(&dev, &stop, &shared);
    let mut st = shared.lock();
    st.ended = Some(match &result {
        Ok(()) => "stopped".to_owned(),
        Err(e) => e.to_string(),
    });
    shared.changed.notify_all();
    result
}

fn serve(dev: &File, stop: &UnixStream, shared: &Shared) -> Result<(), ServerError> {
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let mut fds = [
            PollFd::new(dev.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ServerError::Poll(e)),
        }
        if fds[1].any().unwrap_or(false) {
            return Ok(());
        }
        let n = match (&*dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error().map(Errno::from_raw) {
                // Nothing queued yet, a signal, or a request the kernel withdrew.
                Some(Errno::EAGAIN | Errno::EINTR | Errno::ENOENT) => continue,
                // Unmounted / aborted.
                Some(Errno::ENODEV) => return Ok(()),
                _ => return Err(ServerError::Read(e)),
            },
        };
        let (opcode, unique, answer) = match InHeader::parse(&buf[..n]) {
            Ok((h, body)) => (h.opcode, h.unique, handle(shared, &h, body)),
            Err(_) => {
                shared.lock().counts.malformed += 1;
                let unique = buf
                    .get(8..16)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_le_bytes);
                (0, unique, Answer::Err(libc::EINVAL))
            }
        };
        let bytes = match answer {
            Answer::None => continue,
            Answer::Ok(payload) => protocol::reply(unique, 0, &payload),
            Answer::Err(errno) => protocol::reply(unique, -errno, &[]),
        };
        match (&*dev).write(&bytes) {
            Ok(wrote) if wrote == bytes.len() => {}
            Ok(wrote) => {
                return Err(ServerError::ShortWrite {
                    wrote,
                    len: bytes.len(),
                })
            }
            Err(e) => match e.raw_os_error().map(Errno::from_raw) {
                // The request was interrupted and is gone.
                Some(Errno::ENOENT) => {}
                Some(Errno::ENODEV) => return Ok(()),
                _ => return Err(ServerError::Write(e)),
            },
        }
        if opcode == protocol::FUSE_DESTROY {
            return Ok(());
        }
    }
}

/// Answers one request.
fn handle(shared: &Shared, h: &InHeader, body: &[u8]) -> Answer {
    match answer(shared, h, body) {
        Ok(a) => a,
        Err(_) => {
            shared.lock().counts.malformed += 1;
            Answer::Err(libc::EINVAL)
        }
    }
}

fn answer(shared: &Shared, h: &InHeader, body: &[u8]) -> Result<Answer, ProtocolError> {
    use protocol::*;
    let mut st = shared.lock();
    let node = h.nodeid;
    Ok(match h.opcode {
        FUSE_INIT => {
            let init = InitIn::parse(body)?;
            st.counts.init += 1;
            st.initialized = true;
            shared.changed.notify_all();
            if init.major != KERNEL_MAJOR {
                return Ok(Answer::Err(libc::EPROTO));
            }
            Answer::Ok(init_out(init.max_readahead, MAX_WRITE))
        }
        FUSE_LOOKUP => {
            st.counts.lookup += 1;
            if node == ROOT_ID && lookup_name(body) == super::FILE_NAME.as_bytes() {
                Answer::Ok(entry_out(&st.file_attr(), VALID_SECS))
            } else {
                Answer::Err(libc::ENOENT)
            }
        }
        FUSE_GETATTR => {
            st.counts.getattr += 1;
            match st.attr_of(node) {
                Some(a) => Answer::Ok(attr_out(&a, VALID_SECS)),
                None => Answer::Err(libc::ENOENT),
            }
        }
        FUSE_SETATTR => {
            let set = SetattrIn::parse(body)?;
            st.counts.setattr += 1;
            if node == FILE_ID && set.valid & FATTR_SIZE != 0 {
                match usize::try_from(set.size) {
                    Ok(size) => st.data.resize(size, 0),
                    Err(_) => return Ok(Answer::Err(libc::EFBIG)),
                }
            }
            match st.attr_of(node) {
                Some(a) => Answer::Ok(attr_out(&a, VALID_SECS)),
                None => Answer::Err(libc::ENOENT),
            }
        }
        FUSE_OPEN => {
            st.counts.open += 1;
            match node {
                FILE_ID => Answer::Ok(open_out(0, FOPEN_DIRECT_IO)),
                ROOT_ID => Answer::Err(libc::EISDIR),
                _ => Answer::Err(libc::ENOENT),
            }
        }
        FUSE_READ => {
            let r = ReadIn::parse(body)?;
            st.counts.read += 1;
            let len = u64::from(r.size);
            if Faults::hits(&st.faults.read_eio, r.offset, len) {
                st.hits.push(FaultHit {
                    op: FaultOp::Read,
                    offset: r.offset,
                    len,
                });
                return Ok(Answer::Err(libc::EIO));
            }
            let size = st.data.len();
            let start = usize::try_from(r.offset).map_or(size, |o| o.min(size));
            let end = start.saturating_add(r.size as usize).min(size);
            st.counts.bytes_read += (end - start) as u64;
            Answer::Ok(st.data[start..end].to_vec())
        }
        FUSE_WRITE => {
            let w = WriteIn::parse(body)?;
            st.counts.write += 1;
            let len = w.data.len() as u64;
            if Faults::hits(&st.faults.write_eio, w.offset, len) {
                st.hits.push(FaultHit {
                    op: FaultOp::Write,
                    offset: w.offset,
                    len,
                });
                return Ok(Answer::Err(libc::EIO));
            }
            let Some(end) = usize::try_from(w.offset)
                .ok()
                .and_then(|o| o.checked_add(w.data.len()))
            else {
                return Ok(Answer::Err(libc::EFBIG));
            };
            if end > st.data.len() {
                st.data.resize(end, 0);
            }
            st.data[end - w.data.len()..end].copy_from_slice(w.data);
            st.counts.bytes_written += len;
            // At most MAX_WRITE bytes: fits a u32.
            Answer::Ok(write_out(w.data.len() as u32))
        }
        FUSE_FSYNC => {
            let _sync = FsyncIn::parse(body)?;
            st.counts.fsync += 1;
            if st.faults.fsync_eio {
                st.hits.push(FaultHit {
                    op: FaultOp::Fsync,
                    offset: 0,
                    len: 0,
                });
                return Ok(Answer::Err(libc::EIO));
            }
            Answer::Ok(Vec::new())
        }
        FUSE_FLUSH => {
            st.counts.flush += 1;
            Answer::Ok(Vec::new())
        }
        FUSE_RELEASE => {
            st.counts.release += 1;
            Answer::Ok(Vec::new())
        }
        FUSE_STATFS => {
            st.counts.statfs += 1;
            Answer::Ok(statfs_out((st.data.len() as u64).div_ceil(4096)))
        }
        FUSE_FORGET | FUSE_BATCH_FORGET => {
            st.counts.forget += 1;
            Answer::None
        }
        FUSE_INTERRUPT => {
            st.counts.interrupt += 1;
            Answer::None
        }
        FUSE_DESTROY => Answer::Ok(Vec::new()),
        _ => {
            st.counts.unsupported += 1;
            Answer::Err(libc::ENOSYS)
        }
    })
}
