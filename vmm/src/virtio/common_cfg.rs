//! The virtio-pci common configuration structure (virtio 1.2, 4.1.4.3): feature windows,
//! device status, queue selection and each queue's size, vector and ring addresses. Pure
//! register state; what a status change sets off is the transport's business.

use super::QueueConfig;

/// `VIRTIO_MSI_NO_VECTOR`.
pub const NO_VECTOR: u16 = 0xffff;
/// Bytes of the structure up to and including `queue_device`.
pub const COMMON_CFG_SIZE: u64 = 0x38;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub config: QueueConfig,
    pub vector: u16,
    pub enabled: bool,
}

/// What a guest write to the common config asks the transport to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommonWrite {
    Nothing,
    /// A new device status byte (the transport decides what it means and stores it).
    Status(u8),
    /// Queue `n`'s or the config MSI-X vector changed (interrupt attachment must follow).
    Vectors,
}

#[derive(Debug, Clone)]
pub struct CommonCfg {
    pub device_features: u64,
    pub driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    pub config_vector: u16,
    pub status: u8,
    pub config_generation: u8,
    queue_select: u16,
    pub queues: Vec<QueueState>,
    queue_max_size: u16,
    msix_vectors: u16,
}

impl CommonCfg {
    pub fn new(
        device_features: u64,
        num_queues: u16,
        queue_max_size: u16,
        msix_vectors: u16,
    ) -> Self {
        let mut cfg = CommonCfg {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            config_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: Vec::new(),
            queue_max_size,
            msix_vectors,
        };
        cfg.queues = vec![cfg.initial_queue(); usize::from(num_queues)];
        cfg
    }

    fn initial_queue(&self) -> QueueState {
        QueueState {
            config: QueueConfig {
                size: self.queue_max_size,
                desc: 0,
                driver: 0,
                device: 0,
            },
            vector: NO_VECTOR,
            enabled: false,
        }
    }

    /// Back to the state after power-on (the driver wrote status 0).
    pub fn reset(&mut self) {
        let queue = self.initial_queue();
        self.queues.iter_mut().for_each(|q| *q = queue);
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
    }

    fn selected(&self) -> Option<&QueueState> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// A vector the driver may use, or NO_VECTOR (what the driver then reads back as refusal).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The value of the register (or register half) at `offset`, as a dword to cut from.
    fn register(&self, offset: u64) -> (u64, u32) {
        let queue = self.selected();
        let feature_window = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        match offset {
            DEVICE_FEATURE_SELECT => (offset, self.device_feature_select),
            DEVICE_FEATURE => (
                offset,
                feature_window(self.device_features, self.device_feature_select),
            ),
            DRIVER_FEATURE_SELECT => (offset, self.driver_feature_select),
            DRIVER_FEATURE => (
                offset,
                feature_window(self.driver_features, self.driver_feature_select),
            ),
            CONFIG_MSIX_VECTOR => (offset, u32::from(self.config_vector)),
            // Fits: at most 64 queues.
            NUM_QUEUES => (offset, self.queues.len() as u32),
            DEVICE_STATUS => (offset, u32::from(self.status)),
            CONFIG_GENERATION => (offset, u32::from(self.config_generation)),
            QUEUE_SELECT => (offset, u32::from(self.queue_select)),
            QUEUE_SIZE => (offset, queue.map_or(0, |q| u32::from(q.config.size))),
            QUEUE_MSIX_VECTOR => (
                offset,
                queue.map_or(u32::from(NO_VECTOR), |q| u32::from(q.vector)),
            ),
            QUEUE_ENABLE => (offset, queue.map_or(0, |q| u32::from(q.enabled))),
            // Queue n notifies at notify_off n (times the multiplier).
            QUEUE_NOTIFY_OFF => (offset, u32::from(self.queue_select)),
            QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE => {
                (offset, queue.map_or(0, |q| self.address(q, offset) as u32))
            }
            o if (QUEUE_DESC..COMMON_CFG_SIZE).contains(&o) && o % 8 == 4 => (
                o,
                queue.map_or(0, |q| (self.address(q, o - 4) >> 32) as u32),
            ),
            other => (other, 0),
        }
    }

    fn address(&self, queue: &QueueState, offset: u64) -> u64 {
        match offset {
            QUEUE_DESC => queue.config.desc,
            QUEUE_DRIVER => queue.config.driver,
            _ => queue.config.device,
        }
    }

    /// A guest read of `data.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= COMMON_CFG_SIZE {
            return;
        }
        let (_, value) = self.register(offset);
        let bytes = value.to_le_bytes();
        let len = data.len().min(4);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    /// A guest write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CommonWrite {
        let mut bytes = [0u8; 4];
        let len = data.len().min(4);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u32::from_le_bytes(bytes);
        // Truncations below take the field's width, which is what the driver wrote.
        match offset {
            DEVICE_FEATURE_SELECT => self.device_feature_select = value,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = value,
            DRIVER_FEATURE => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return CommonWrite::Nothing,
                };
                self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift))
                    | (u64::from(value) << shift);
            }
            CONFIG_MSIX_VECTOR => {
                self.config_vector = self.checked_vector(value as u16);
                return CommonWrite::Vectors;
            }
            DEVICE_STATUS => return CommonWrite::Status(value as u8),
            QUEUE_SELECT => self.queue_select = value as u16,
            QUEUE_SIZE => {
                let max = self.queue_max_size;
                let size = value as u16;
                if let Some(q) = self.selected_mut() {
                    // Split rings may be any size up to the maximum; zero is not a ring.
                    if size != 0 && size <= max {
                        q.config.size = size;
                    }
                }
            }
            QUEUE_MSIX_VECTOR => {
                let vector = self.checked_vector(value as u16);
                if let Some(q) = self.selected_mut() {
                    q.vector = vector;
                    return CommonWrite::Vectors;
                }
            }
            QUEUE_ENABLE => {
                if let Some(q) = self.selected_mut() {
                    // Only 1 is meaningful; a driver disables a queue by resetting the device.
                    if value == 1 {
                        q.enabled = true;
                    }
                }
            }
            o if (QUEUE_DESC..COMMON_CFG_SIZE).contains(&o) && o % 4 == 0 => {
                let field = o - o % 8;
                let high = o % 8 == 4;
                if let Some(q) = self.selected_mut() {
                    let slot = match field {
                        QUEUE_DESC => &mut q.config.desc,
                        QUEUE_DRIVER => &mut q.config.driver,
                        _ => &mut q.config.device,
                    };
                    *slot = if high {
                        (*slot & 0xffff_ffff) | (u64::from(value) << 32)
                    } else {
                        (*slot & !0xffff_ffff) | u64::from(value)
                    };
                }
            }
            _ => {}
        }
        CommonWrite::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(cfg: &CommonCfg, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        cfg.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn read16(cfg: &CommonCfg, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        cfg.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn features_through_the_select_windows() {
        let mut cfg = CommonCfg::new(0x1_0000_0246, 2, 256, 3);
        assert_eq!(read32(&cfg, DEVICE_FEATURE), 0x246);
        cfg.write(DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        assert_eq!(read32(&cfg, DEVICE_FEATURE), 1);
        cfg.write(DEVICE_FEATURE_SELECT, &2u32.to_le_bytes());
        assert_eq!(read32(&cfg, DEVICE_FEATURE), 0);
        cfg.write(DRIVER_FEATURE, &0x42u32.to_le_bytes());
        cfg.write(DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        cfg.write(DRIVER_FEATURE, &1u32.to_le_bytes());
        assert_eq!(cfg.driver_features, 0x1_0000_0042);
        assert_eq!(read32(&cfg, DRIVER_FEATURE), 1);
        assert_eq!(read16(&cfg, NUM_QUEUES), 2);
    }

    #[test]
    fn queue_registers_follow_queue_select() {
        let mut cfg = CommonCfg::new(0, 2, 256, 3);
        cfg.write(QUEUE_SELECT, &1u16.to_le_bytes());
        assert_eq!(read16(&cfg, QUEUE_SIZE), 256);
        assert_eq!(read16(&cfg, QUEUE_NOTIFY_OFF), 1);
        cfg.write(QUEUE_SIZE, &128u16.to_le_bytes());
        cfg.write(QUEUE_SIZE, &512u16.to_le_bytes());
        assert_eq!(read16(&cfg, QUEUE_SIZE), 128, "above the maximum: ignored");
        assert_eq!(
            cfg.write(QUEUE_MSIX_VECTOR, &2u16.to_le_bytes()),
            CommonWrite::Vectors
        );
        assert_eq!(read16(&cfg, QUEUE_MSIX_VECTOR), 2);
        cfg.write(QUEUE_MSIX_VECTOR, &3u16.to_le_bytes());
        assert_eq!(read16(&cfg, QUEUE_MSIX_VECTOR), NO_VECTOR, "no such vector");
        // 64-bit addresses in two halves.
        cfg.write(QUEUE_DESC, &0x1000u32.to_le_bytes());
        cfg.write(QUEUE_DESC + 4, &0x2u32.to_le_bytes());
        cfg.write(QUEUE_DRIVER, &0x3000u32.to_le_bytes());
        cfg.write(QUEUE_DEVICE, &0x4000u32.to_le_bytes());
        cfg.write(QUEUE_ENABLE, &1u16.to_le_bytes());
        assert_eq!(read32(&cfg, QUEUE_DESC + 4), 2);
        assert_eq!(read32(&cfg, QUEUE_DEVICE), 0x4000);
        let q = cfg.queues[1];
        assert!(q.enabled);
        assert_eq!(
            q.config,
            QueueConfig {
                size: 128,
                desc: 0x2_0000_1000,
                driver: 0x3000,
                device: 0x4000
            }
        );
        assert!(!cfg.queues[0].enabled);
        // A queue that does not exist reads zero and takes nothing.
        cfg.write(QUEUE_SELECT, &7u16.to_le_bytes());
        assert_eq!(read16(&cfg, QUEUE_SIZE), 0);
        cfg.write(QUEUE_ENABLE, &1u16.to_le_bytes());
        cfg.reset();
        assert_eq!(cfg.queues[1].config.size, 256);
        assert!(!cfg.queues[1].enabled);
        assert_eq!(cfg.queues[1].vector, NO_VECTOR);
    }

    #[test]
    fn status_and_config_vector() {
        let mut cfg = CommonCfg::new(0, 1, 256, 2);
        assert_eq!(cfg.write(DEVICE_STATUS, &[0x0b]), CommonWrite::Status(0x0b));
        assert_eq!(cfg.status, 0, "the transport stores the status");
        cfg.write(CONFIG_MSIX_VECTOR, &0u16.to_le_bytes());
        assert_eq!(read16(&cfg, CONFIG_MSIX_VECTOR), 0);
        let mut byte = [0u8; 1];
        cfg.read(0x100, &mut byte);
        assert_eq!(byte, [0]);
    }
}
