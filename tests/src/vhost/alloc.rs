//! A first-fit allocator over one range of guest-physical addresses, with coalescing on free.
//!
//! The frontend's memory is small (tens to hundreds of MiB) and allocations are few and long
//! lived (vrings, per-queue request areas, I/O buffers a test or a load generator keeps for its
//! whole run), so a sorted map of free ranges is plenty.

use std::collections::BTreeMap;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("cannot allocate {len} bytes aligned to {align}: no free range is large enough")]
    Exhausted { len: u64, align: u64 },
    #[error("cannot allocate {len} bytes aligned to {align}: the length must be non-zero and the alignment a power of two")]
    BadRequest { len: u64, align: u64 },
    #[error("cannot free [{start:#x}, +{len:#x}): it was not allocated (or was freed twice)")]
    NotAllocated { start: u64, len: u64 },
}

/// Free ranges of `[base, base + size)`, keyed by start, never adjacent (they are merged).
#[derive(Debug)]
pub struct RangeAllocator {
    base: u64,
    size: u64,
    free: BTreeMap<u64, u64>,
    allocated: u64,
}

impl RangeAllocator {
    pub fn new(base: u64, size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(base, size);
        }
        RangeAllocator {
            base,
            size,
            free,
            allocated: 0,
        }
    }

    /// Bytes handed out and not yet freed (alignment padding excluded).
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Returns the start of `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, AllocError> {
        if len == 0 || !align.is_power_of_two() {
            return Err(AllocError::BadRequest { len, align });
        }
        let mut found = None;
        for (&start, &flen) in &self.free {
            let Some(aligned) = start.checked_next_multiple_of(align) else {
                continue;
            };
            let pad = aligned - start;
            if pad.checked_add(len).is_some_and(|need| need <= flen) {
                found = Some((start, flen, aligned));
                break;
            }
        }
        let (start, flen, aligned) = found.ok_or(AllocError::Exhausted { len, align })?;
        self.free.remove(&start);
        if aligned > start {
            self.free.insert(start, aligned - start);
        }
        let end = aligned + len;
        let fend = start + flen;
        if fend > end {
            self.free.insert(end, fend - end);
        }
        self.allocated += len;
        Ok(aligned)
    }

    /// Gives back `[start, start + len)`, which must be exactly one earlier allocation.
    pub fn free(&mut self, start: u64, len: u64) -> Result<(), AllocError> {
        let err = AllocError::NotAllocated { start, len };
        let end = start.checked_add(len).ok_or(err.clone())?;
        if len == 0 || start < self.base || end > self.base + self.size {
            return Err(err);
        }
        // The range must not overlap any free range.
        if let Some((&ps, &pl)) = self.free.range(..=start).next_back() {
            if ps + pl > start {
                return Err(err);
            }
        }
        if let Some((&ns, _)) = self.free.range(start..).next() {
            if ns < end {
                return Err(err);
            }
        }
        let mut new_start = start;
        let mut new_len = len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                new_start = ps;
                new_len += pl;
            }
        }
        if let Some(nl) = self.free.remove(&end) {
            new_len += nl;
        }
        self.free.insert(new_start, new_len);
        self.allocated -= len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_and_coalesces() {
        let mut a = RangeAllocator::new(0x1000, 0x10000);
        let x = a.alloc(10, 1).unwrap();
        assert_eq!(x, 0x1000);
        let y = a.alloc(0x100, 0x1000).unwrap();
        assert_eq!(y, 0x2000);
        let z = a.alloc(16, 16).unwrap();
        assert_eq!(z, 0x1010);
        a.free(y, 0x100).unwrap();
        a.free(x, 10).unwrap();
        a.free(z, 16).unwrap();
        assert_eq!(a.allocated(), 0);
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.alloc(0x10000, 0x1000).unwrap(), 0x1000);
    }

    #[test]
    fn exhaustion_and_bad_frees() {
        let mut a = RangeAllocator::new(0, 4096);
        let x = a.alloc(4096, 4096).unwrap();
        assert_eq!(
            a.alloc(1, 1),
            Err(AllocError::Exhausted { len: 1, align: 1 })
        );
        assert!(a.alloc(0, 1).is_err());
        assert!(a.alloc(1, 3).is_err());
        a.free(x, 4096).unwrap();
        assert!(a.free(x, 4096).is_err(), "double free");
        assert!(a.free(8192, 1).is_err(), "outside");
    }
}
