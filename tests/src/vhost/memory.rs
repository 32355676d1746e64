//! The frontend's "guest" memory: one memfd mapped `MAP_SHARED` (the backend maps the same file
//! after SET_MEM_TABLE), placed at a guest-physical base, with an allocator for vrings, request
//! areas and I/O buffers.
//!
//! The base is deliberately not 0 (1 GiB by default), so a backend that confuses guest-physical
//! addresses with offsets into the region, or with the frontend's user addresses (what
//! SET_VRING_ADDR carries), reads the wrong bytes and fails loudly.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::alloc::{AllocError, RangeAllocator};

/// Where the memory sits in the guest-physical address space unless told otherwise.
pub const DEFAULT_GUEST_BASE: u64 = 1 << 30;
/// Default size: room for a few queues of 1024 entries and QD32 × 128 KiB of buffers.
pub const DEFAULT_MEMORY_SIZE: u64 = 64 << 20;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("frontend memory size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(u64),
    #[error("frontend memory at {base:#x} + {size:#x} overflows the address space")]
    BadBase { base: u64, size: u64 },
    #[error("cannot create the frontend memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the frontend memfd to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map the frontend memfd ({size} bytes): {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest range [{gpa:#x}, +{len:#x}) is outside the frontend memory")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("guest memory access at {gpa:#x} failed: {source}")]
    Access {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// A range of frontend memory: what [`FrontendMemory::alloc`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuf {
    pub gpa: u64,
    pub len: u64,
}

impl GuestBuf {
    /// The sub-range `[offset, offset + len)` of this buffer (panics when it does not fit: a
    /// caller's programming error).
    pub fn slice(&self, offset: u64, len: u64) -> GuestBuf {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "slice [{offset}, +{len}) of a {}-byte buffer",
            self.len
        );
        GuestBuf {
            gpa: self.gpa + offset,
            len,
        }
    }
}

pub struct FrontendMemory {
    mem: GuestMemoryMmap,
    memfd: File,
    guest_base: u64,
    size: u64,
    user_addr: u64,
    alloc: Mutex<RangeAllocator>,
}

impl std::fmt::Debug for FrontendMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendMemory")
            .field("guest_base", &format_args!("{:#x}", self.guest_base))
            .field("size", &format_args!("{:#x}", self.size))
            .field("user_addr", &format_args!("{:#x}", self.user_addr))
            .finish()
    }
}

impl FrontendMemory {
    /// `size` bytes at [`DEFAULT_GUEST_BASE`].
    pub fn new(size: u64) -> Result<Arc<Self>, MemoryError> {
        Self::with_base(DEFAULT_GUEST_BASE, size)
    }

    pub fn with_base(guest_base: u64, size: u64) -> Result<Arc<Self>, MemoryError> {
        if size == 0 || size & (PAGE - 1) != 0 {
            return Err(MemoryError::BadSize(size));
        }
        if guest_base & (PAGE - 1) != 0 || guest_base.checked_add(size).is_none() {
            return Err(MemoryError::BadBase {
                base: guest_base,
                size,
            });
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let memfd = create_memfd("splitvmm-test-frontend")?;
        memfd
            .set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(guest_base),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|source| MemoryError::Map { size, source })?;
        let user_addr = mem
            .get_host_address(GuestAddress(guest_base))
            .map_err(|source| MemoryError::Access {
                gpa: guest_base,
                source,
            })? as u64;
        Ok(Arc::new(FrontendMemory {
            mem,
            memfd,
            guest_base,
            size,
            user_addr,
            alloc: Mutex::new(RangeAllocator::new(guest_base, size)),
        }))
    }

    pub fn guest_base(&self) -> u64 {
        self.guest_base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The first guest-physical address past the memory.
    pub fn guest_end(&self) -> u64 {
        self.guest_base + self.size
    }

    /// The vm-memory view, for code that wants virtio-queue or vm-memory types.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.guest_base
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.guest_end())
    }

    /// The frontend's (this process's) virtual address of `gpa`: what SET_VRING_ADDR carries
    /// when there is no IOMMU.
    pub fn user_addr(&self, gpa: u64) -> Result<u64, MemoryError> {
        if !self.contains(gpa, 0) {
            return Err(MemoryError::OutOfRange { gpa, len: 0 });
        }
        Ok(self.user_addr + (gpa - self.guest_base))
    }

    /// The one region of SET_MEM_TABLE / ADD_MEM_REG: guest-physical address, size, user
    /// address and offset into the memfd.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.guest_base,
            memory_size: self.size,
            userspace_addr: self.user_addr,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        }
    }

    fn allocator(&self) -> MutexGuard<'_, RangeAllocator> {
        // A panic while holding this lock can only come from a bug in the allocator itself;
        // its state is still consistent (every method mutates after its checks), so go on.
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `len` bytes aligned to `align` (a power of two). The content is whatever was there.
    pub fn alloc(&self, len: u64, align: u64) -> Result<GuestBuf, MemoryError> {
        let gpa = self.allocator().alloc(len, align)?;
        Ok(GuestBuf { gpa, len })
    }

    /// Like [`Self::alloc`], zero-filled.
    pub fn alloc_zeroed(&self, len: u64, align: u64) -> Result<GuestBuf, MemoryError> {
        let buf = self.alloc(len, align)?;
        if let Err(e) = self.fill(buf.gpa, buf.len, 0) {
            let _ = self.free(buf);
            return Err(e);
        }
        Ok(buf)
    }

    /// Like [`Self::alloc`], freed when the returned handle drops.
    pub fn alloc_owned(self: &Arc<Self>, len: u64, align: u64) -> Result<OwnedBuf, MemoryError> {
        let buf = self.alloc(len, align)?;
        Ok(OwnedBuf {
            mem: Arc::clone(self),
            buf,
        })
    }

    pub fn free(&self, buf: GuestBuf) -> Result<(), MemoryError> {
        self.allocator().free(buf.gpa, buf.len)?;
        Ok(())
    }

    /// Bytes currently allocated.
    pub fn allocated(&self) -> u64 {
        self.allocator().allocated()
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), MemoryError> {
        let len = len as u64;
        if self.contains(gpa, len) {
            Ok(())
        } else {
            Err(MemoryError::OutOfRange { gpa, len })
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check(gpa, data.len())?;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })
    }

    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        self.check(gpa, out.len())?;
        self.mem
            .read_slice(out, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })
    }

    pub fn read_vec(&self, buf: GuestBuf) -> Result<Vec<u8>, MemoryError> {
        let len = usize::try_from(buf.len).map_err(|_| MemoryError::OutOfRange {
            gpa: buf.gpa,
            len: buf.len,
        })?;
        let mut out = vec![0; len];
        self.read(buf.gpa, &mut out)?;
        Ok(out)
    }

    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), MemoryError> {
        if !self.contains(gpa, len) {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        let chunk = vec![byte; len.min(1 << 16) as usize];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(chunk.len() as u64);
            self.write(gpa + off, &chunk[..n as usize])?;
            off += n;
        }
        Ok(())
    }

    pub fn write_obj<T: ByteValued>(&self, gpa: u64, val: T) -> Result<(), MemoryError> {
        self.check(gpa, std::mem::size_of::<T>())?;
        self.mem
            .write_obj(val, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })
    }

    pub fn read_obj<T: ByteValued>(&self, gpa: u64) -> Result<T, MemoryError> {
        self.check(gpa, std::mem::size_of::<T>())?;
        self.mem
            .read_obj(GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })
    }

    /// An atomic 16-bit store (ring indices and flags).
    pub fn store_u16(&self, gpa: u64, val: u16, order: Ordering) -> Result<(), MemoryError> {
        self.check(gpa, 2)?;
        self.mem
            .store(val, GuestAddress(gpa), order)
            .map_err(|source| MemoryError::Access { gpa, source })
    }

    /// An atomic 16-bit load (ring indices and flags).
    pub fn load_u16(&self, gpa: u64, order: Ordering) -> Result<u16, MemoryError> {
        self.check(gpa, 2)?;
        self.mem
            .load(GuestAddress(gpa), order)
            .map_err(|source| MemoryError::Access { gpa, source })
    }
}

/// A buffer freed when dropped.
#[derive(Debug)]
pub struct OwnedBuf {
    mem: Arc<FrontendMemory>,
    buf: GuestBuf,
}

impl OwnedBuf {
    pub fn buf(&self) -> GuestBuf {
        self.buf
    }

    pub fn gpa(&self) -> u64 {
        self.buf.gpa
    }

    pub fn len(&self) -> u64 {
        self.buf.len
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let sub = self.checked_sub(offset, data.len() as u64)?;
        self.mem.write(sub.gpa, data)
    }

    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        let sub = self.checked_sub(offset, out.len() as u64)?;
        self.mem.read(sub.gpa, out)
    }

    pub fn to_vec(&self) -> Result<Vec<u8>, MemoryError> {
        self.mem.read_vec(self.buf)
    }

    fn checked_sub(&self, offset: u64, len: u64) -> Result<GuestBuf, MemoryError> {
        if offset
            .checked_add(len)
            .is_some_and(|end| end <= self.buf.len)
        {
            Ok(self.buf.slice(offset, len))
        } else {
            Err(MemoryError::OutOfRange {
                gpa: self.buf.gpa.wrapping_add(offset),
                len,
            })
        }
    }
}

impl Drop for OwnedBuf {
    fn drop(&mut self) {
        // Freeing a range this handle allocated cannot fail unless someone freed it behind
        // the handle's back; nothing useful can be done about that in a destructor.
        let _ = self.mem.free(self.buf);
    }
}

fn create_memfd(name: &str) -> Result<File, MemoryError> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)
        .map_err(|errno| MemoryError::Memfd(errno.into()))?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_addresses_and_access() {
        let mem = FrontendMemory::new(1 << 20).unwrap();
        let buf = mem.alloc(4096, 4096).unwrap();
        assert!(buf.gpa >= DEFAULT_GUEST_BASE);
        mem.write(buf.gpa, b"hello").unwrap();
        let mut out = [0u8; 5];
        mem.read(buf.gpa, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        let ua = mem.user_addr(buf.gpa).unwrap();
        // SAFETY: ua points into the live mapping of `mem`, 5 bytes are inside it.
        let direct = unsafe { std::slice::from_raw_parts(ua as *const u8, 5) };
        assert_eq!(direct, b"hello");
        mem.fill(buf.gpa, 4096, 0xab).unwrap();
        assert_eq!(mem.read_vec(buf).unwrap(), vec![0xab; 4096]);
        assert!(mem.read(mem.guest_end() - 2, &mut out).is_err());
        mem.free(buf).unwrap();
        assert_eq!(mem.allocated(), 0);
    }
}
