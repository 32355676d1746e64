//! The split ring's memory format (virtio 1.x §2.7): where the descriptor table, available
//! ring and used ring sit, the entry types a driver writes and reads, and the event-index
//! arithmetic.

use super::memory::GuestBuf;

pub const DESC_SIZE: u64 = 16;
/// The largest split queue the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes per used-ring entry (id: u32, len: u32).
pub const USED_ELEM_SIZE: u64 = 8;

/// One buffer of a chain, as the driver sees it: `device_writes` marks it device-writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    /// At most `u32::MAX` (a descriptor's length field); longer fails when the chain is added.
    pub len: u64,
    pub device_writes: bool,
}

impl Segment {
    pub fn readable(buf: GuestBuf) -> Segment {
        Segment {
            gpa: buf.gpa,
            len: buf.len,
            device_writes: false,
        }
    }

    pub fn writable(buf: GuestBuf) -> Segment {
        Segment {
            gpa: buf.gpa,
            len: buf.len,
            device_writes: true,
        }
    }
}

/// Where a raw descriptor's `next` field points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The descriptor at this position of the same raw chain.
    Pos(usize),
    /// This descriptor-table index, whatever is there (possibly out of range).
    Index(u16),
}

/// A descriptor written exactly as given (flags included): for malformed chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDescriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: Link,
}

/// A used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub head: u16,
    pub len: u32,
}

/// Guest-physical addresses of the three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl VringLayout {
    /// Offsets of the parts in one area starting at 0 (descriptors, then the avail ring,
    /// then the used ring on the next 4 KiB boundary), and the area's length.
    pub fn plan(size: u16) -> (VringLayout, u64) {
        let n = u64::from(size);
        let desc = 0;
        let avail = n * DESC_SIZE;
        let avail_end = avail + 4 + 2 * n + 2;
        let used = avail_end.next_multiple_of(4096);
        let used_end = used + 4 + USED_ELEM_SIZE * n + 2;
        let layout = VringLayout {
            size,
            desc,
            avail,
            used,
        };
        (layout, used_end.next_multiple_of(4096))
    }

    /// The avail ring entry for running index `slot`.
    pub fn avail_ring(&self, slot: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(slot % self.size)
    }

    /// `used_event`, after the avail ring (EVENT_IDX).
    pub fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    /// The used ring entry for running index `slot`.
    pub fn used_ring(&self, slot: u16) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * u64::from(slot % self.size)
    }

    /// `avail_event`, after the used ring (EVENT_IDX).
    pub fn avail_event(&self) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * u64::from(self.size)
    }
}

/// Counters a load generator may report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub kicks: u64,
    pub kicks_suppressed: u64,
    pub call_waits: u64,
}

/// The virtio spec's `vring_need_event`: whether moving an index from `old` to `new` crosses
/// `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(10, 10, 3));
        assert!(need_event(65535, 2, 65534));
    }
}
