//! A virtio device whose rings a vhost-user backend serves: what every such device does the
//! same way, whatever its type. The VMM owns the feature bits offered to the guest and the
//! config space (both fixed when it connects); on DRIVER_OK it hands the backend the acked
//! features, guest RAM and each enabled queue, and on a driver reset it stops the rings.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::GuestMemoryMmap;

use super::frontend::{VhostUserConnection, VhostUserError};
use super::watch::spawn_hangup_watcher;
use crate::memory::{GuestRam, RamRegion};
use crate::virtio::{ActiveQueue, DeviceError, VirtioDevice};

/// What the guest sees of the device, decided by the type-specific code.
pub struct DeviceShape {
    /// For log lines, e.g. `disk 0 (/run/blk.sock)`.
    pub name: String,
    pub device_type: u16,
    pub num_queues: u16,
    pub queue_size: u16,
    pub features: u64,
    pub config_space: Vec<u8>,
    /// Queues below this index are enabled at DRIVER_OK, the rest stay disabled until the
    /// device's own logic enables them (a NIC's queue pairs beyond the first).
    pub enabled_at_start: u16,
}

/// The control channel, shared with whatever else of the device must send on it (a NIC's
/// control queue thread).
pub type SharedConnection = Arc<Mutex<VhostUserConnection>>;

/// Locks the connection; a panic elsewhere while holding it leaves nothing half-sent that
/// matters more than the panic itself.
pub fn lock(connection: &SharedConnection) -> MutexGuard<'_, VhostUserConnection> {
    connection.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the guest drives through virtio-pci; what the backend does with the rings.
pub struct VhostUserDevice {
    shape: DeviceShape,
    connection: SharedConnection,
    memory: GuestMemoryMmap,
    memfd: File,
    regions: Vec<RamRegion>,
    /// Queues handed to the backend by the last activation.
    started: Vec<u16>,
    /// Set by a failed message or by the hang-up watcher; cleared by nothing (no reconnect).
    failed: Arc<AtomicBool>,
}

impl VhostUserDevice {
    /// A device on a negotiated `connection`; starts watching it for hang-ups.
    pub fn new(
        shape: DeviceShape,
        connection: VhostUserConnection,
        ram: &GuestRam,
    ) -> Result<Self, VhostUserError> {
        let setup = |source| VhostUserError::SocketOptions {
            path: connection.path().to_owned(),
            source,
        };
        let memfd = ram
            .memfd
            .try_clone()
            .map_err(|source| VhostUserError::Memory {
                path: connection.path().to_owned(),
                source,
            })?;
        let failed = Arc::new(AtomicBool::new(false));
        let socket = connection.watch_socket().map_err(setup)?;
        spawn_hangup_watcher(shape.name.clone(), socket, failed.clone()).map_err(setup)?;
        Ok(VhostUserDevice {
            shape,
            connection: Arc::new(Mutex::new(connection)),
            memory: ram.memory.clone(),
            memfd,
            regions: ram.regions.clone(),
            started: Vec::new(),
            failed,
        })
    }

    /// The control channel, for device logic that enables and disables rings later.
    pub fn connection(&self) -> SharedConnection {
        self.connection.clone()
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn start(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), VhostUserError> {
        let mut connection = lock(&self.connection);
        connection.set_features(features)?;
        connection.set_mem_table(&self.memory, &self.memfd, &self.regions)?;
        for queue in queues {
            connection.setup_vring(
                queue.index,
                &queue.config,
                &self.memory,
                queue.kick,
                queue.call,
            )?;
            self.started.push(queue.index);
        }
        for queue in queues {
            if queue.index < self.shape.enabled_at_start {
                connection.enable_vring(queue.index, true)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn name(&self) -> &str {
        &self.shape.name
    }

    fn device_type(&self) -> u16 {
        self.shape.device_type
    }

    fn num_queues(&self) -> u16 {
        self.shape.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.shape.queue_size
    }

    fn device_features(&self) -> u64 {
        self.shape.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (index, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| self.shape.config_space.get(o + index))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing the VMM offers makes config space writable (no CONFIG_WCE, no
        // CTRL_MAC_ADDR through config).
        log::debug!(
            "{}: ignoring a {}-byte config write at {offset}",
            self.shape.name,
            data.len()
        );
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError> {
        if self.failed() {
            return Err(DeviceError("the backend failed earlier".into()));
        }
        self.start(features, queues).map_err(|error| {
            self.failed.store(true, Ordering::Release);
            DeviceError(error.to_string())
        })
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn reset(&mut self) {
        for index in std::mem::take(&mut self.started) {
            if self.failed() {
                break;
            }
            let mut connection = lock(&self.connection);
            let stopped = connection
                .enable_vring(index, false)
                .and_then(|()| connection.get_vring_base(index));
            if let Err(error) = stopped {
                log::error!(
                    "{}: cannot stop queue {index}: {error}; the device is marked failed",
                    self.shape.name
                );
                self.failed.store(true, Ordering::Release);
            }
        }
    }
}
