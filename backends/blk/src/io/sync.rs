//! Synchronous I/O: preadv/pwritev straight between the image and guest memory, fdatasync for
//! flushes, fallocate (or BLKDISCARD) for discard and write-zeroes.
//!
//! With `--direct` (O_DIRECT) the kernel needs aligned buffers; a request whose guest buffers are
//! not aligned goes through an aligned bounce buffer, a bounded chunk at a time.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::IoError;
use crate::disk::{Disk, DiskKind, DIRECT_BLOCK_SIZE};
use crate::request::{GuestRange, Segment};
use crate::GuestMem;

/// At most this many iovecs per syscall (UIO_MAXIOV).
const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;
/// Bounce buffer size for unaligned O_DIRECT requests and zero-filling.
const BOUNCE_BYTES: usize = 1 << 20;
/// `_IO(0x12, 119)` from linux/fs.h: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// iovecs pointing into guest memory, kept between requests only for their capacity.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the vector is filled and used within one call on one thread and cleared before the
// call returns (see `SyncIo::transfer`), so no pointer ever crosses threads through it.
unsafe impl Send for Iovecs {}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is exclusively owned memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new_zeroed(len: usize) -> Self {
        // A non-zero size and a power-of-two alignment: from_size_align cannot fail here.
        let layout = Layout::from_size_align(len, DIRECT_BLOCK_SIZE as usize)
            .unwrap_or_else(|_| unreachable!("constant, valid layout"));
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed at allocation) bytes that this
        // struct owns exclusively; the borrow of self keeps them alive and unaliased.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

/// One worker thread's synchronous I/O engine.
pub struct SyncIo {
    disk: Arc<Disk>,
    iovecs: Iovecs,
    bounce: Option<AlignedBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

impl SyncIo {
    pub fn new(disk: Arc<Disk>) -> Self {
        SyncIo {
            disk,
            iovecs: Iovecs(Vec::new()),
            bounce: None,
        }
    }

    /// Reads `len` bytes at `offset` into the guest buffers `ranges`.
    pub fn read(
        &mut self,
        mem: &GuestMem,
        offset: u64,
        ranges: &[GuestRange],
        len: u32,
    ) -> Result<(), IoError> {
        self.transfer(Dir::Read, mem, offset, ranges, len)
    }

    /// Writes `len` bytes from the guest buffers `ranges` at `offset`.
    pub fn write(
        &mut self,
        mem: &GuestMem,
        offset: u64,
        ranges: &[GuestRange],
        len: u32,
    ) -> Result<(), IoError> {
        self.transfer(Dir::Write, mem, offset, ranges, len)
    }

    pub fn flush(&mut self) -> Result<(), IoError> {
        self.disk.file().sync_data().map_err(IoError::Flush)
    }

    /// Discards the segments. Discard is a hint: where the image cannot deallocate, it is a no-op.
    pub fn discard(&mut self, segments: &[Segment]) -> Result<(), IoError> {
        for segment in segments.iter().filter(|s| !s.is_empty()) {
            let result = match self.disk.kind() {
                DiskKind::BlockDevice => self.blkdiscard(segment),
                DiskKind::File => self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    segment,
                ),
            };
            match result {
                Ok(()) => {}
                Err(e) if unsupported(&e) => {}
                Err(source) => {
                    return Err(IoError::Io {
                        op: "discard",
                        offset: segment.offset(),
                        len: segment.len(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Makes the segments read back as zeroes: deallocating where unmap is allowed, zeroing in
    /// place otherwise, writing zero buffers where the image supports neither.
    pub fn write_zeroes(&mut self, segments: &[Segment]) -> Result<(), IoError> {
        for segment in segments.iter().filter(|s| !s.is_empty()) {
            let mode = if segment.unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            let result = self.fallocate(mode, segment).or_else(|e| {
                if unsupported(&e) {
                    self.write_zero_buffers(segment)
                } else {
                    Err(e)
                }
            });
            result.map_err(|source| IoError::Io {
                op: "write-zeroes",
                offset: segment.offset(),
                len: segment.len(),
                source,
            })?;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, segment: &Segment) -> io::Result<()> {
        // Offsets and lengths were checked against the capacity, so they fit off_t.
        // SAFETY: fallocate on a descriptor we own; no pointers.
        let rc = unsafe {
            libc::fallocate(
                self.disk.file().as_raw_fd(),
                mode,
                segment.offset() as libc::off_t,
                segment.len() as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn blkdiscard(&self, segment: &Segment) -> io::Result<()> {
        let range: [u64; 2] = [segment.offset(), segment.len()];
        // SAFETY: BLKDISCARD reads two u64s (start, length) from the pointer, which points to
        // `range` for the duration of the call.
        let rc = unsafe {
            libc::ioctl(
                self.disk.file().as_raw_fd(),
                BLKDISCARD as _,
                range.as_ptr(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_buffers(&mut self, segment: &Segment) -> io::Result<()> {
        let zeroes = self
            .bounce
            .get_or_insert_with(|| AlignedBuf::new_zeroed(BOUNCE_BYTES));
        let buf = zeroes.as_mut_slice();
        buf.fill(0);
        let mut done = 0u64;
        while done < segment.len() {
            let n = (segment.len() - done).min(buf.len() as u64) as usize;
            pwrite_all(self.disk.file(), &buf[..n], segment.offset() + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn transfer(
        &mut self,
        dir: Dir,
        mem: &GuestMem,
        offset: u64,
        ranges: &[GuestRange],
        len: u32,
    ) -> Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        let iovecs = &mut self.iovecs.0;
        iovecs.clear();
        let built = build_iovecs(mem, ranges, iovecs);
        let result = match built {
            Err(e) => Err(e),
            Ok(()) if self.disk.direct() && !aligned(iovecs) => {
                iovecs.clear();
                self.bounce_transfer(dir, mem, offset, ranges, len)
            }
            Ok(()) => vectored(self.disk.file(), dir, iovecs, offset, u64::from(len)),
        };
        // No guest pointer outlives the request (see the Send impl of Iovecs).
        self.iovecs.0.clear();
        result
    }

    /// O_DIRECT with unaligned guest buffers: through the aligned bounce buffer.
    fn bounce_transfer(
        &mut self,
        dir: Dir,
        mem: &GuestMem,
        offset: u64,
        ranges: &[GuestRange],
        len: u32,
    ) -> Result<(), IoError> {
        let bounce = self
            .bounce
            .get_or_insert_with(|| AlignedBuf::new_zeroed(BOUNCE_BYTES));
        let buf = bounce.as_mut_slice();
        let total = u64::from(len);
        let mut done = 0u64;
        let mut cursor = GuestCursor::new(ranges);
        while done < total {
            let n = (total - done).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            let at = offset + done;
            let io_err = |source| IoError::Io {
                op: dir.name(),
                offset: at,
                len: n as u64,
                source,
            };
            match dir {
                Dir::Read => {
                    pread_all(self.disk.file(), chunk, at).map_err(io_err)?;
                    cursor.copy(mem, chunk, Dir::Read)?;
                }
                Dir::Write => {
                    cursor.copy(mem, chunk, Dir::Write)?;
                    pwrite_all(self.disk.file(), chunk, at).map_err(io_err)?;
                }
            }
            done += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
    )
}

pub(super) fn aligned(iovecs: &[libc::iovec]) -> bool {
    let align = DIRECT_BLOCK_SIZE as usize;
    iovecs
        .iter()
        .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
}

/// Host iovecs for guest ranges, split where a range crosses guest memory regions.
pub(super) fn build_iovecs(
    mem: &GuestMem,
    ranges: &[GuestRange],
    iovecs: &mut Vec<libc::iovec>,
) -> Result<(), IoError> {
    for range in ranges {
        let bad = || IoError::GuestMemory {
            addr: range.addr.0,
            len: range.len,
        };
        for slice in GuestMemoryBackend::get_slices(mem, range.addr, range.len as usize) {
            let slice = slice.map_err(|_| bad())?;
            iovecs.push(libc::iovec {
                // The pointer stays valid while `mem` (which holds the mapping) is borrowed,
                // i.e. for the whole request.
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// preadv/pwritev until `len` bytes moved, at most MAX_IOVECS per call, retrying on EINTR.
fn vectored(
    file: &std::fs::File,
    dir: Dir,
    iovecs: &mut [libc::iovec],
    offset: u64,
    len: u64,
) -> Result<(), IoError> {
    let fd = file.as_raw_fd();
    let mut start = 0;
    let mut done = 0u64;
    while start < iovecs.len() {
        if iovecs[start].iov_len == 0 {
            start += 1;
            continue;
        }
        let count = (iovecs.len() - start).min(MAX_IOVECS);
        let at = offset + done;
        let iov = iovecs[start..].as_ptr();
        // Offsets were checked against the capacity, so they fit off_t; count <= 1024.
        // SAFETY: `iov` points to `count` iovecs describing guest memory that is mapped for the
        // whole request (the caller holds the memory snapshot). The guest may change that memory
        // concurrently; the kernel copies bytes, no Rust reference to it exists.
        let n = unsafe {
            match dir {
                Dir::Read => libc::preadv(fd, iov, count as libc::c_int, at as libc::off_t),
                Dir::Write => libc::pwritev(fd, iov, count as libc::c_int, at as libc::off_t),
            }
        };
        if n < 0 {
            let source = io::Error::last_os_error();
            if source.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(IoError::Io {
                op: dir.name(),
                offset: at,
                len: len - done,
                source,
            });
        }
        if n == 0 {
            return Err(IoError::Short {
                op: dir.name(),
                offset,
                len,
                done,
            });
        }
        // n > 0 and at most the bytes described by the iovecs.
        let mut left = n as usize;
        done += left as u64;
        while left > 0 && start < iovecs.len() {
            let v = &mut iovecs[start];
            if left >= v.iov_len {
                left -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: left < iov_len, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left).cast() };
                v.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

fn pread_all(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

fn pwrite_all(file: &std::fs::File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

/// A position in a list of guest ranges, for copying through the bounce buffer.
struct GuestCursor<'a> {
    ranges: &'a [GuestRange],
    index: usize,
    within: u32,
}

impl<'a> GuestCursor<'a> {
    fn new(ranges: &'a [GuestRange]) -> Self {
        GuestCursor {
            ranges,
            index: 0,
            within: 0,
        }
    }

    /// Copies `buf.len()` bytes between the buffer and the guest at the cursor (Read: buffer to
    /// guest; Write: guest to buffer) and advances.
    fn copy(&mut self, mem: &GuestMem, buf: &mut [u8], dir: Dir) -> Result<(), IoError> {
        let mut pos = 0;
        while pos < buf.len() {
            let Some(range) = self.ranges.get(self.index) else {
                // The ranges describe exactly the request length; running out is a bug guard.
                return Err(IoError::GuestMemory { addr: 0, len: 0 });
            };
            let avail = (range.len - self.within) as usize;
            let n = avail.min(buf.len() - pos);
            let addr = GuestAddress(range.addr.0 + u64::from(self.within));
            let piece = &mut buf[pos..pos + n];
            let ok = match dir {
                Dir::Read => mem.write_slice(piece, addr).is_ok(),
                Dir::Write => mem.read_slice(piece, addr).is_ok(),
            };
            if !ok {
                return Err(IoError::GuestMemory {
                    addr: addr.0,
                    len: n as u32,
                });
            }
            pos += n;
            // n <= avail <= range.len, so this fits u32.
            self.within += n as u32;
            if self.within == range.len {
                self.index += 1;
                self.within = 0;
            }
        }
        Ok(())
    }
}
