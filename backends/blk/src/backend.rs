//! The vhost-user glue: one [`BlkSession`] per frontend connection, implementing the backend
//! crate's `VhostUserBackend` (features, config space, and the per-queue event handler).
//!
//! Each queue has its own worker thread (`queues_per_thread` maps queue i to thread i) and its
//! own [`QueueWorker`] behind a mutex only that thread takes, so no lock is shared between
//! queues on the I/O path.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config_space::{self, ConfigSpace};
use crate::disk::Disk;
use crate::inflight::{self, InflightMap};
use crate::io::EngineKind;
use crate::request::Limits;
use crate::worker::{QueueStats, QueueWorker};
use crate::GuestMem;

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// What every session of one daemon shares: the image and the command-line settings.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    pub disk: Arc<Disk>,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Arc<[u8]>,
    /// The I/O engine of every queue worker (already checked to be usable).
    pub engine: EngineKind,
    /// How long a worker keeps polling its queue (and its io_uring) for more work before it
    /// re-enables notifications and sleeps on the kick eventfd; zero turns polling off.
    pub poll: Duration,
}

/// The state of one frontend connection. Dropped (with its vrings, mappings and worker threads,
/// which the backend crate owns) when the frontend goes away; the next frontend gets a new one.
pub struct BlkSession {
    settings: DeviceSettings,
    mem: GuestMemoryAtomic<GuestMem>,
    config: ConfigSpace,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    stopping: AtomicBool,
    workers: Vec<Mutex<QueueWorker>>,
    /// Each queue's vring as the crate handed it to the worker thread, kept so that
    /// `stop_vring` (GET_VRING_BASE, on the control thread) can publish requests still in
    /// flight on the io_uring before the frontend reads the ring's base.
    vrings: Vec<Mutex<Option<Vring>>>,
    /// One exit event per worker thread, made up front so that failing to make one fails the
    /// session (the crate cannot stop a worker that has none); handed out by `exit_event`.
    exit_events: Mutex<Vec<Option<(EventConsumer, EventNotifier)>>>,
    /// Read ends of the exit events handed out, which the backend crate leaks (see
    /// `release_exit_fds`).
    exit_fds: Mutex<Vec<RawFd>>,
    /// The in-flight buffer of this connection (GET_INFLIGHT_FD / SET_INFLIGHT_FD).
    inflight: Mutex<Option<Arc<InflightMap>>>,
    /// Per queue: its worker must (re)start in-flight tracking before serving the ring (set
    /// when a buffer is installed and when the queue's kick fd arrives).
    inflight_pending: Vec<AtomicBool>,
}

impl BlkSession {
    /// `mem` must be the same `GuestMemoryAtomic` handed to the daemon: the crate swaps new
    /// mappings into it, and the workers read it without a lock.
    pub fn new(settings: DeviceSettings, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<Self> {
        let exit_events = (0..settings.num_queues)
            .map(|_| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).map(Some)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let workers = (0..settings.num_queues)
            .map(|q| {
                Mutex::new(QueueWorker::with_engine(
                    q,
                    settings.disk.clone(),
                    settings.serial.clone(),
                    settings.engine,
                    u32::from(settings.queue_size),
                ))
            })
            .collect();
        let vrings = (0..settings.num_queues).map(|_| Mutex::new(None)).collect();
        let inflight_pending = (0..settings.num_queues)
            .map(|_| AtomicBool::new(false))
            .collect();
        Ok(BlkSession {
            config: ConfigSpace::new(&settings),
            settings,
            mem,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            workers,
            vrings,
            exit_events: Mutex::new(exit_events),
            exit_fds: Mutex::new(Vec::new()),
            inflight: Mutex::new(None),
            inflight_pending,
        })
    }

    /// The epoll `device_event` of a worker's io_uring completion eventfd: the crate reserves
    /// 0..=num_queues (queues, then the exit event), so the first free number.
    fn completion_event(&self) -> u16 {
        self.settings.num_queues + 1
    }

    /// Adds each io_uring worker's completion eventfd to its worker thread's epoll (thread i
    /// serves queue i). Call once, after the daemon made its handlers and before it starts.
    pub fn register_completion_fds(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<BlkSession>>>],
    ) -> io::Result<()> {
        for (thread, handler) in handlers.iter().enumerate() {
            let fd = self.workers.get(thread).and_then(|w| {
                w.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .completion_fd()
            });
            if let Some(fd) = fd {
                handler.register_listener(fd, EventSet::IN, u64::from(self.completion_event()))?;
            }
        }
        Ok(())
    }

    /// Makes the workers stop taking new requests (the current one finishes).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Per-queue counters.
    pub fn stats(&self) -> Vec<QueueStats> {
        self.workers
            .iter()
            .map(|w| w.lock().unwrap_or_else(PoisonError::into_inner).stats())
            .collect()
    }

    /// Closes the exit-event descriptors the backend crate leaked. Call only after the daemon
    /// that used this session has been dropped (its worker threads are joined by then).
    pub fn release_exit_fds(&self) {
        let mut fds = self.exit_fds.lock().unwrap_or_else(PoisonError::into_inner);
        for fd in fds.drain(..) {
            // Guard against a future crate version that closes the descriptor itself: only
            // close what is still an eventfd.
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            if !matches!(&link, Ok(target) if target.as_os_str() == "anon_inode:[eventfd]") {
                log::debug!("exit event fd {fd} is no longer ours ({link:?}); leaving it");
                continue;
            }
            // SAFETY: vhost-user-backend 0.24 (VringEpollHandler::new) turns the EventConsumer
            // we returned from exit_event() into a raw fd, registers it with its epoll and never
            // closes it. Its worker threads have been joined and its epoll handlers dropped, so
            // nothing uses the descriptor any more; closing it once here ends the leak.
            unsafe { libc::close(fd) };
        }
    }

    fn limits(&self) -> Limits {
        let acked = self.acked_features.load(Ordering::Relaxed);
        let disk = &self.settings.disk;
        Limits {
            capacity_sectors: disk.capacity_sectors(),
            readonly: disk.readonly(),
            discard: acked & (1 << VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: acked & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_discard_sectors: config_space::MAX_DISCARD_SECTORS,
            max_discard_seg: config_space::MAX_DISCARD_SEG,
            max_write_zeroes_sectors: config_space::MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg: config_space::MAX_WRITE_ZEROES_SEG,
        }
    }

    /// Serves one queue until it is empty (with EVENT_IDX: until no new request arrived while
    /// notifications were re-enabled), signalling the frontend as the ring asks.
    fn serve_queue(&self, vring: &Vring, queue_index: usize) {
        let Some(worker) = self.workers.get(queue_index) else {
            log::warn!("event for queue {queue_index}, which does not exist");
            return;
        };
        let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
        self.remember_vring(vring, queue_index);
        let limits = self.limits();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mem = self.mem.memory();
        if self
            .inflight_pending
            .get(queue_index)
            .is_some_and(|p| p.swap(false, Ordering::AcqRel))
        {
            let map = self
                .inflight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let view = map.and_then(|m| m.queue(queue_index as u16));
            let mut state = vring.get_mut();
            worker.attach_inflight(
                view,
                state.get_queue_mut(),
                &mem,
                self.acked_features.load(Ordering::Relaxed),
            );
        }
        loop {
            // Taken per batch, so that the control thread (GET_VRING_BASE) gets a turn even
            // while the guest keeps the queue busy.
            let mut state = vring.get_mut();
            if event_idx {
                if let Err(e) = state.disable_notification() {
                    log::warn!("queue {queue_index}: cannot disable notifications: {e}");
                }
            }
            let used = worker.process(state.get_queue_mut(), &mem, &limits, &self.stopping);
            if used > 0 {
                signal(&mut state, queue_index);
            }
            if !event_idx || self.stopping.load(Ordering::Relaxed) {
                return;
            }
            drop(state);
            if self.poll_for_work(vring, &mut worker, &mem, queue_index) {
                continue;
            }
            let mut state = vring.get_mut();
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::warn!("queue {queue_index}: cannot enable notifications: {e}");
                    return;
                }
            }
        }
    }
}

impl BlkSession {
    /// Busy-polls queue `queue_index` for up to the configured window, with notifications still
    /// disabled so that the frontend does not kick: publishes io_uring completions as they land
    /// and returns true as soon as the guest made a new request available. Returns false when
    /// the window passed with nothing new (or polling is off), so the caller sleeps.
    ///
    /// This is what takes an eventfd write and an epoll wakeup off each request of a busy queue
    /// (the fastest vhost-user backends do the same); an idle queue polls once per window and
    /// then sleeps, so it does not burn a core.
    fn poll_for_work(
        &self,
        vring: &Vring,
        worker: &mut QueueWorker,
        mem: &GuestMem,
        queue_index: usize,
    ) -> bool {
        let window = self.settings.poll;
        if window.is_zero() {
            return false;
        }
        let deadline = Instant::now() + window;
        loop {
            {
                // Taken per round so that the control thread can get in between.
                let mut state = vring.get_mut();
                if worker.complete_ready(state.get_queue_mut(), mem) > 0 {
                    signal(&mut state, queue_index);
                }
                let queue = state.get_queue();
                match queue.avail_idx(mem, Ordering::Acquire) {
                    Ok(avail) if avail.0 != queue.next_avail() => return true,
                    Ok(_) => {}
                    // The ring is unreadable: sleep, and let the next kick's pass report it.
                    Err(_) => return false,
                }
            }
            if self.stopping.load(Ordering::Relaxed) || Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn remember_vring(&self, vring: &Vring, queue_index: usize) {
        if let Some(slot) = self.vrings.get(queue_index) {
            let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                *slot = Some(vring.clone());
            }
        }
    }

    /// Publishes the io_uring completions of queue `queue_index`, signalling the frontend as
    /// the ring asks (EVENT_IDX: only when it crossed used_event).
    fn serve_completions(&self, vring: &Vring, queue_index: usize) {
        let Some(worker) = self.workers.get(queue_index) else {
            return;
        };
        let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let used = worker.complete(state.get_queue_mut(), &mem);
        if used > 0 {
            signal(&mut state, queue_index);
        }
    }
}

/// Signals the frontend if the ring asks for it (always without EVENT_IDX).
fn signal(state: &mut VringState<GuestMemoryAtomic<GuestMem>>, queue_index: usize) {
    let notify = state.needs_notification().unwrap_or_else(|e| {
        log::warn!("queue {queue_index}: cannot read used_event: {e}");
        true
    });
    if notify {
        if let Err(e) = state.signal_used_queue() {
            log::warn!("queue {queue_index}: cannot signal the frontend: {e}");
        }
    }
}

/// The virtio features offered.
pub fn device_features(readonly: bool) -> u64 {
    let mut features = 1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_MQ
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if readonly {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else {
        features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    features
}

/// The vhost-user protocol features offered.
///
/// INFLIGHT_SHMFD: backend-side in-flight tracking (`crate::inflight`). vhost-user-backend 0.24
/// answers GET_INFLIGHT_FD / SET_INFLIGHT_FD with "not supported" in its request handler
/// (`VhostUserHandler`, private to the crate, so it cannot be wrapped from outside), so the
/// workspace builds a patched copy (third_party/vhost-user-backend) whose handler hands those
/// messages, and the moment a queue's kick fd is set, to `VhostUserBackend` hooks implemented
/// below.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

impl BlkSession {
    fn install_inflight(&self, map: InflightMap) {
        *self.inflight.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(map));
        for pending in &self.inflight_pending {
            pending.store(true, Ordering::Release);
        }
    }
}

impl VhostUserBackend for BlkSession {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(self.settings.disk.readonly())
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in our config space is writable (no CONFIG_WCE). Failing here would make the
        // crate drop the connection, so the write is ignored, as the spec allows for read-only
        // fields.
        log::debug!(
            "ignoring a {}-byte config write at offset {offset}",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // The crate swapped the new mappings into the GuestMemoryAtomic we share with it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Queue i on worker thread i; MAX_QUEUES (64) keeps the shift in range.
        (0..self.settings.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let event = self
            .exit_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(thread_index)
            .and_then(Option::take);
        match &event {
            Some((consumer, _)) => self
                .exit_fds
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(consumer.as_raw_fd()),
            None => log::error!("no exit event for worker {thread_index}"),
        }
        event
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        inflight::check_geometry(msg.num_queues, msg.queue_size, self.settings.num_queues)?;
        let (map, file, size) = InflightMap::create(msg.num_queues, msg.queue_size)?;
        self.install_inflight(map);
        log::debug!(
            "in-flight buffer made: {} queue(s) of {}, {size} bytes",
            msg.num_queues,
            msg.queue_size
        );
        Ok((
            VhostUserInflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        inflight::check_geometry(msg.num_queues, msg.queue_size, self.settings.num_queues)?;
        let map = InflightMap::map(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
        )?;
        log::debug!(
            "in-flight buffer set: {} queue(s) of {}",
            msg.num_queues,
            msg.queue_size
        );
        self.install_inflight(map);
        Ok(())
    }

    fn vring_kick_set(&self, queue_index: u32, vring: &Vring) {
        let queue_index = queue_index as usize;
        let Some(pending) = self.inflight_pending.get(queue_index) else {
            return;
        };
        self.remember_vring(vring, queue_index);
        if self
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return;
        }
        pending.store(true, Ordering::Release);
        // Kick the queue ourselves (as libvhost-user does), so requests found in flight are
        // resubmitted even if the frontend never kicks again; the worker sees it once the ring
        // is enabled.
        if let Some(kick) = vring.get_ref().get_kick() {
            let one: u64 = 1;
            // SAFETY: an 8-byte write from a local to the kick eventfd the vring holds.
            let rc = unsafe {
                libc::write(
                    kick.as_raw_fd(),
                    std::ptr::from_ref(&one).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if rc < 0 {
                log::warn!(
                    "queue {queue_index}: cannot kick the queue: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The crate marked the queue not ready; wait for what the ring still has in flight and
        // publish it, so the base the frontend reads next covers only finished requests.
        let queue_index = queue_index as usize;
        let Some(worker) = self.workers.get(queue_index) else {
            return Ok(());
        };
        let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
        if worker.in_flight() == 0 {
            return Ok(());
        }
        let vring = self.vrings[queue_index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(vring) = vring else {
            return Ok(());
        };
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if worker.wait_idle(state.get_queue_mut(), &mem) > 0 {
            signal(&mut state, queue_index);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            log::warn!("unexpected event set {evset:?} on queue {thread_id}");
            return Ok(());
        }
        // Each thread serves one queue, so its vring list has one entry (device_event 0) and the
        // thread index is the queue index.
        if device_event == self.completion_event() {
            if let Some(vring) = vrings.first() {
                self.serve_completions(vring, thread_id);
            }
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            log::warn!("event {device_event} on worker {thread_id} has no vring");
            return Ok(());
        };
        self.serve_queue(vring, thread_id);
        Ok(())
    }
}
