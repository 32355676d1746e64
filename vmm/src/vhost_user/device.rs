//! A virtio device whose rings a vhost-user backend serves: what every such device does the
//! same way, whatever its type. The VMM owns the feature bits offered to the guest and the
//! config space (both fixed when it connects); on DRIVER_OK it hands the backend the acked
//! features, guest RAM and each enabled queue, and on a driver reset it stops the rings. The
//! backend itself sits behind a [`Link`], which survives the backend restarting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;

use super::frontend::{Requirements, VhostUserConnection, VhostUserError};
use super::link::{self, lock, Link, Replay, SharedLink, SharedRam};
use super::reconnect;
use crate::config::LinkOptions;
use crate::memory::GuestRam;
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

/// How the device deals with its backend going away.
pub struct LinkSetup {
    pub needs: Requirements,
    pub replay: Replay,
    pub options: LinkOptions,
}

/// What the guest drives through virtio-pci; what the backend does with the rings.
pub struct VhostUserDevice {
    shape: DeviceShape,
    link: SharedLink,
    memory: GuestMemoryMmap,
    /// Set when the backend cannot be resumed (or a reconnect gave up); read on every status
    /// poll without the link's lock.
    failed: Arc<AtomicBool>,
}

impl VhostUserDevice {
    /// A device on a negotiated `connection`; starts the thread that watches it for hang-ups
    /// and reconnects.
    pub fn new(
        shape: DeviceShape,
        connection: VhostUserConnection,
        setup: LinkSetup,
        ram: &GuestRam,
    ) -> Result<Self, VhostUserError> {
        let path = connection.path().to_owned();
        let socket_setup = |source| VhostUserError::SocketOptions {
            path: path.clone(),
            source,
        };
        let memfd = ram
            .memfd
            .try_clone()
            .map_err(|source| VhostUserError::Memory {
                path: path.clone(),
                source,
            })?;
        let socket = connection.watch_socket().map_err(socket_setup)?;
        let shared = SharedRam {
            memory: ram.memory.clone(),
            memfd,
            regions: ram.regions.clone(),
        };
        let link = Link::new(
            shape.name.clone(),
            connection,
            setup.needs,
            setup.replay,
            shared,
            shape.queue_size,
        );
        let failed = link.failed_flag();
        let link = Arc::new(Mutex::new(link));
        let give_up = setup.options.reconnect_ms.map(Duration::from_millis);
        reconnect::spawn(link.clone(), socket, give_up).map_err(socket_setup)?;
        Ok(VhostUserDevice {
            shape,
            link,
            memory: ram.memory.clone(),
            failed,
        })
    }

    /// The link to the backend, for device logic that enables and disables rings later.
    pub fn link(&self) -> SharedLink {
        self.link.clone()
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn start(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError> {
        let mut link = lock(&self.link);
        let rings = queues
            .iter()
            .map(|queue| {
                link::ring(
                    link.path(),
                    queue.index,
                    queue.config,
                    queue.kick,
                    queue.call,
                    queue.index < self.shape.enabled_at_start,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| DeviceError(error.to_string()))?;
        if !link.is_connected() {
            log::info!(
                "{}: started while its backend is away; the rings go to the next one",
                self.shape.name
            );
        }
        link.start(features, rings);
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
        self.start(features, queues)
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn reset(&mut self) {
        lock(&self.link).reset();
    }
}
