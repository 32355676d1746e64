//! Tests of the virtio-pci transport against a real KVM VM (irqfds and MSI routes need one);
//! they skip where /dev/kvm is unusable.

use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;

use super::*;
use crate::virtio::{QueueConfig, STATUS_ACKNOWLEDGE, STATUS_DRIVER};

#[derive(Default)]
struct Record {
    activated: Vec<(u64, Vec<(u16, QueueConfig)>)>,
    resets: usize,
}

struct FakeDevice(Arc<Mutex<Record>>);

impl VirtioDevice for FakeDevice {
    fn name(&self) -> &str {
        "fake"
    }
    fn device_type(&self) -> u16 {
        2
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | 0x46
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8 + 0x10);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
    ) -> Result<(), crate::virtio::DeviceError> {
        let queues = queues.iter().map(|q| (q.index, q.config)).collect();
        self.0.lock().unwrap().activated.push((features, queues));
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
}

const BAR: u64 = 0xc010_0000;

/// A transport on a real KVM VM (irqfds and routes need one); `None` where /dev/kvm is
/// unusable.
fn transport() -> Option<(VirtioPciDevice, Arc<Mutex<Record>>)> {
    let vm = Kvm::new().ok()?.create_vm().ok()?;
    vm.create_irq_chip().ok()?;
    let routes = Arc::new(InterruptRoutes::new(Arc::new(vm)));
    let record = Arc::new(Mutex::new(Record::default()));
    let device =
        VirtioPciDevice::new(Box::new(FakeDevice(record.clone())), BAR, routes).expect("transport");
    Some((device, record))
}

fn config32(device: &mut VirtioPciDevice, offset: usize) -> u32 {
    let mut data = [0u8; 4];
    device.config_read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn bar32(device: &mut VirtioPciDevice, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    device.bar_read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write_bar(device: &mut VirtioPciDevice, offset: u64, value: u32, len: usize) {
    device.bar_write(offset, &value.to_le_bytes()[..len]);
}

#[test]
fn capabilities_point_into_bar_0() {
    let Some((mut device, _)) = transport() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    assert_eq!(config32(&mut device, 0), 0x1042_1af4);
    assert_eq!(config32(&mut device, 8) & 0xff, 1, "revision 1: modern");
    assert_eq!(config32(&mut device, 0x2c), 0x0042_1af4, "subsystem");
    assert_eq!(
        config32(&mut device, 0x10),
        (BAR as u32) | 0b100,
        "64-bit BAR"
    );
    assert_eq!(config32(&mut device, 0x3c) >> 8 & 0xff, 0, "no INTx pin");
    // Walk the capability list: (id, cfg_type, bar, offset, length, extra).
    let mut caps = Vec::new();
    let mut at = (config32(&mut device, 0x34) & 0xff) as usize;
    while at != 0 {
        let head = config32(&mut device, at);
        let id = head & 0xff;
        if id == u32::from(MSIX_CAPABILITY_ID) {
            let table = config32(&mut device, at + 4);
            let pba = config32(&mut device, at + 8);
            caps.push((id, head >> 16 & 0x7ff, 0, table, pba, 0));
        } else {
            let kind = head >> 24;
            let bar = config32(&mut device, at + 4) & 0xff;
            let offset = config32(&mut device, at + 8);
            let len = config32(&mut device, at + 12);
            let multiplier = if kind == 2 {
                config32(&mut device, at + 16)
            } else {
                0
            };
            assert_eq!(
                head >> 16 & 0xff,
                if kind == 2 { 20 } else { 16 },
                "cap_len"
            );
            caps.push((id, kind, bar, offset, len, multiplier));
        }
        at = (head >> 8 & 0xff) as usize;
    }
    assert_eq!(
        caps,
        vec![
            // MSI-X: 3 vectors (table size - 1 = 2), table and PBA in BAR 0.
            (0x11, 2, 0, 0x4000, 0x6000, 0),
            (0x09, 1, 0, 0x0000, 0x38, 0),
            (0x09, 3, 0, 0x1000, 1, 0),
            (0x09, 4, 0, 0x2000, 0x1000, 0),
            (0x09, 2, 0, 0x3000, 8, 4),
        ]
    );
    // Memory decoding off: no BAR to route to.
    assert_eq!(device.bar0(), None);
    device.config_write(4, &[0x06, 0]);
    assert_eq!(device.bar0(), Some((BAR, BAR_SIZE)));
    // Device config reads go to the device.
    assert_eq!(bar32(&mut device, DEVICE_CFG_OFFSET + 2), 0x1212_1212);
}

#[test]
fn driver_bring_up_and_reset() {
    let Some((mut device, record)) = transport() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    device.config_write(4, &[0x06, 0]);
    // MSI-X on (message control bit 15 at capability + 3), two vectors programmed.
    let msix = device.msix_capability;
    device.config_write(msix + 3, &[0x80]);
    for vector in 0..2u64 {
        let entry = MSIX_TABLE_OFFSET + vector * 16;
        write_bar(&mut device, entry, 0xfee0_0000, 4);
        write_bar(&mut device, entry + 8, 0x30 + vector as u32, 4);
        write_bar(&mut device, entry + 12, 0, 4);
    }
    write_bar(
        &mut device,
        0x14,
        u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
        1,
    );
    assert_eq!(bar32(&mut device, 0x04), 0x46, "device features, low half");
    // Ack features 0x6 and VERSION_1.
    write_bar(&mut device, 0x0c, 0x6, 4);
    write_bar(&mut device, 0x08, 1, 4);
    write_bar(&mut device, 0x0c, 1, 4);
    // Queue 1: vector 1, smaller ring, addresses, enabled. Queue 0 stays off.
    write_bar(&mut device, 0x16, 1, 2);
    write_bar(&mut device, 0x1a, 1, 2);
    assert_eq!(bar32(&mut device, 0x1a) & 0xffff, 1, "vector accepted");
    write_bar(&mut device, 0x18, 64, 2);
    write_bar(&mut device, 0x20, 0x10_0000, 4);
    write_bar(&mut device, 0x28, 0x10_1000, 4);
    write_bar(&mut device, 0x30, 0x10_2000, 4);
    write_bar(&mut device, 0x1c, 1, 2);
    assert_eq!(device.attached, vec![None, Some(device.first_gsi + 1)]);
    let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    write_bar(&mut device, 0x14, u32::from(status), 1);
    assert_eq!(bar32(&mut device, 0x14) & 0xff, u32::from(status));
    write_bar(&mut device, 0x14, u32::from(status | STATUS_DRIVER_OK), 1);
    let queue = QueueConfig {
        size: 64,
        desc: 0x10_0000,
        driver: 0x10_1000,
        device: 0x10_2000,
    };
    assert_eq!(
        record.lock().unwrap().activated,
        vec![((1 << VIRTIO_F_VERSION_1) | 0x6, vec![(1, queue)])]
    );
    // Masking vector 1 detaches the irqfd; unmasking attaches it again.
    write_bar(&mut device, MSIX_TABLE_OFFSET + 16 + 12, 1, 4);
    assert_eq!(device.attached[1], None);
    write_bar(&mut device, MSIX_TABLE_OFFSET + 16 + 12, 0, 4);
    assert_eq!(device.attached[1], Some(device.first_gsi + 1));
    // A notify write that exits to the VMM still kicks the queue.
    write_bar(&mut device, NOTIFY_OFFSET + 4, 1, 2);
    assert_eq!(device.kicks[1].read().unwrap(), 1);
    // Reset: the device stops, the queues forget their vectors and detach.
    write_bar(&mut device, 0x14, 0, 1);
    assert_eq!(record.lock().unwrap().resets, 1);
    assert_eq!(device.attached, vec![None, None]);
    assert_eq!(bar32(&mut device, 0x14) & 0xff, 0);
}

#[test]
fn failed_device_needs_reset_but_resets_to_zero() {
    let Some((mut device, _)) = transport() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    device.config_write(4, &[0x06, 0]);
    write_bar(&mut device, 0x14, u32::from(STATUS_ACKNOWLEDGE), 1);
    device.mark_failed();
    let status = bar32(&mut device, 0x14) & 0xff;
    assert_eq!(
        status,
        u32::from(STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET)
    );
    // Linux polls the status after writing 0 until it reads 0.
    write_bar(&mut device, 0x14, 0, 1);
    device.mark_failed();
    assert_eq!(bar32(&mut device, 0x14) & 0xff, 0);
}

#[test]
fn features_ok_needs_offered_features_and_version_1() {
    let Some((mut device, record)) = transport() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    device.config_write(4, &[0x06, 0]);
    // Bit 0 is not offered.
    write_bar(&mut device, 0x0c, 0x1, 4);
    write_bar(&mut device, 0x08, 1, 4);
    write_bar(&mut device, 0x0c, 1, 4);
    write_bar(&mut device, 0x14, u32::from(STATUS_FEATURES_OK), 1);
    assert_eq!(bar32(&mut device, 0x14) & 0xff, 0, "FEATURES_OK refused");
    // Without VERSION_1.
    write_bar(&mut device, 0x08, 0, 4);
    write_bar(&mut device, 0x0c, 0x2, 4);
    write_bar(&mut device, 0x08, 1, 4);
    write_bar(&mut device, 0x0c, 0, 4);
    write_bar(
        &mut device,
        0x14,
        u32::from(STATUS_FEATURES_OK | STATUS_DRIVER_OK),
        1,
    );
    assert_eq!(bar32(&mut device, 0x14) & 0xff, u32::from(STATUS_DRIVER_OK));
    assert!(record.lock().unwrap().activated.is_empty(), "not started");
}
