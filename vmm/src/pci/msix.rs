//! MSI-X: the capability's message-control bits, the vector table and the pending-bit array
//! the guest programs through a BAR.
//!
//! The VMM does not deliver these interrupts itself: each active vector becomes a KVM MSI route
//! whose GSI has the queue's call eventfd attached as an irqfd (see [`crate::interrupts`]). This
//! module only keeps the guest-visible state and says which vectors are deliverable now.

/// PCI capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors one function may have (the table-size field is 11 bits).
pub const MAX_MSIX_VECTORS: u16 = 2048;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASKED: u32 = 1;

/// One MSI message: where the guest wants it written and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    vector_control: u32,
}

impl Default for Entry {
    /// Entries start masked (PCI 3.0, 6.8.2.9).
    fn default() -> Self {
        Entry {
            address_low: 0,
            address_high: 0,
            data: 0,
            vector_control: VECTOR_CONTROL_MASKED,
        }
    }
}

/// What a guest access changed, so the caller knows what to re-program in KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixChange {
    None,
    /// Only this vector's message or mask.
    Vector(u16),
    /// Enable or function mask: every vector.
    All,
}

#[derive(Debug, Clone)]
pub struct MsixState {
    entries: Vec<Entry>,
    control: u16,
}

impl MsixState {
    /// `vectors` entries, 1 to [`MAX_MSIX_VECTORS`] (the caller's constant; clamped).
    pub fn new(vectors: u16) -> Self {
        let vectors = vectors.clamp(1, MAX_MSIX_VECTORS);
        MsixState {
            entries: vec![Entry::default(); usize::from(vectors)],
            control: 0,
        }
    }

    pub fn vectors(&self) -> u16 {
        // At most MAX_MSIX_VECTORS entries (constructor).
        self.entries.len() as u16
    }

    /// Bytes of the vector table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors()) * MSIX_ENTRY_SIZE
    }

    /// The capability body after ID and next pointer: message control (table size - 1),
    /// table offset/BIR, PBA offset/BIR; and which of its bits the guest may write.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut writable = [0u8; 10];
        // Enable (bit 15) and function mask (bit 14) in the high byte of message control.
        writable[1] = 0xc0;
        (body, writable)
    }

    /// Takes the message-control word as the guest left it in config space.
    pub fn set_control(&mut self, control: u16) -> MsixChange {
        let control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        if control == self.control {
            return MsixChange::None;
        }
        self.control = control;
        MsixChange::All
    }

    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    /// The message of `vector` if the guest has it deliverable now: MSI-X enabled, the
    /// function and the vector unmasked.
    pub fn active_message(&self, vector: u16) -> Option<MsiMessage> {
        if self.control != CONTROL_ENABLE {
            return None;
        }
        let entry = self.entries.get(usize::from(vector))?;
        (entry.vector_control & VECTOR_CONTROL_MASKED == 0).then(|| MsiMessage {
            address: (u64::from(entry.address_high) << 32) | u64::from(entry.address_low),
            data: entry.data,
        })
    }

    /// A guest read of the table at `offset` (4- or 8-byte accesses; others read zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut at = offset;
        for chunk in data.chunks_mut(4) {
            if let Some(value) = self.dword(at) {
                let bytes = value.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            at += 4;
        }
    }

    fn dword(&self, offset: u64) -> Option<u32> {
        if !offset.is_multiple_of(4) {
            return None;
        }
        let entry = self
            .entries
            .get(usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?)?;
        Some(match offset % MSIX_ENTRY_SIZE {
            0 => entry.address_low,
            4 => entry.address_high,
            8 => entry.data,
            _ => entry.vector_control,
        })
    }

    /// A guest write to the table; returns what changed.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> MsixChange {
        if !offset.is_multiple_of(4) || !(data.len() == 4 || data.len() == 8) {
            return MsixChange::None;
        }
        let Ok(index) = usize::try_from(offset / MSIX_ENTRY_SIZE) else {
            return MsixChange::None;
        };
        let Some(entry) = self.entries.get_mut(index) else {
            return MsixChange::None;
        };
        let before = *entry;
        let mut at = offset % MSIX_ENTRY_SIZE;
        for chunk in data.chunks_exact(4) {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match at {
                0 => entry.address_low = value,
                4 => entry.address_high = value,
                8 => entry.data = value,
                12 => entry.vector_control = value & VECTOR_CONTROL_MASKED,
                _ => {}
            }
            at += 4;
        }
        if *entry == before {
            MsixChange::None
        } else {
            // Fits: index < entries.len() <= MAX_MSIX_VECTORS.
            MsixChange::Vector(index as u16)
        }
    }

    /// A guest read of the pending-bit array. Nothing is ever pending here: while a vector is
    /// masked its irqfd is detached and the interrupt waits in the call eventfd instead.
    pub fn read_pba(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write32(msix: &mut MsixState, offset: u64, value: u32) -> MsixChange {
        msix.write_table(offset, &value.to_le_bytes())
    }

    #[test]
    fn capability_announces_table_and_pba() {
        let msix = MsixState::new(3);
        let (body, writable) = msix.capability(0, 0x4000, 0x6000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2);
        assert_eq!(
            u32::from_le_bytes([body[2], body[3], body[4], body[5]]),
            0x4000
        );
        assert_eq!(
            u32::from_le_bytes([body[6], body[7], body[8], body[9]]),
            0x6000
        );
        assert_eq!(writable, [0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(msix.table_size(), 48);
    }

    #[test]
    fn vectors_start_masked_and_need_enable() {
        let mut msix = MsixState::new(2);
        assert_eq!(write32(&mut msix, 16, 0xfee0_0000), MsixChange::Vector(1));
        assert_eq!(write32(&mut msix, 24, 0x4021), MsixChange::Vector(1));
        // Same value again: nothing changed.
        assert_eq!(write32(&mut msix, 24, 0x4021), MsixChange::None);
        assert_eq!(msix.active_message(1), None, "masked, disabled");
        assert_eq!(write32(&mut msix, 28, 0), MsixChange::Vector(1));
        assert_eq!(msix.active_message(1), None, "disabled");
        assert_eq!(msix.set_control(CONTROL_ENABLE | 0x1), MsixChange::All);
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4021,
        };
        assert_eq!(msix.active_message(1), Some(message));
        assert_eq!(msix.active_message(0), None, "vector 0 still masked");
        assert_eq!(msix.active_message(2), None, "no such vector");
        // Function mask hides every vector.
        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(msix.active_message(1), None);
        msix.set_control(CONTROL_ENABLE);
        assert_eq!(msix.active_message(1), Some(message));
        assert_eq!(msix.set_control(CONTROL_ENABLE), MsixChange::None);
    }

    #[test]
    fn table_reads_back_and_ignores_bad_accesses() {
        let mut msix = MsixState::new(2);
        msix.write_table(0, &0x1_fee0_1000u64.to_le_bytes());
        let mut data = [0u8; 8];
        msix.read_table(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x1_fee0_1000);
        let mut control = [0u8; 4];
        msix.read_table(12, &mut control);
        assert_eq!(u32::from_le_bytes(control), 1, "masked at reset");
        // Only the mask bit of vector control is stored.
        write32(&mut msix, 12, 0xffff_fffe);
        msix.read_table(12, &mut control);
        assert_eq!(u32::from_le_bytes(control), 0);
        // Out of range, unaligned, odd sizes: ignored, read zero.
        assert_eq!(write32(&mut msix, 32, 5), MsixChange::None);
        assert_eq!(msix.write_table(2, &[1, 2, 3, 4]), MsixChange::None);
        assert_eq!(msix.write_table(0, &[1, 2]), MsixChange::None);
        msix.read_table(32, &mut control);
        assert_eq!(control, [0; 4]);
        let mut pba = [0xffu8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba, [0; 8]);
    }
}
