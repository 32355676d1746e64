//! The vhost-user glue: one [`NetSession`] per frontend connection, implementing the backend
//! crate's `VhostUserBackend` (features, config space, and the per-pair event handler).
//!
//! Queue pair i is queues 2i (RX) and 2i+1 (TX), both on worker thread i, which also watches
//! pair i's tap poller (see `watch`). Each pair's [`PairWorker`] sits behind a mutex only that
//! thread takes, so no lock is shared between pairs on the data path.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::{self, CONFIG_SIZE};
use crate::stats::PairStats;
use crate::watch::TapSet;
use crate::worker::{PairWorker, RxEnd};
use crate::GuestMem;

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// What every session of one daemon shares.
#[derive(Clone)]
pub struct DeviceSettings {
    pub tap: Arc<TapSet>,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub num_queue_pairs: u16,
    pub queue_size: u16,
    /// Per-pair counters, kept across sessions.
    pub stats: Arc<[Arc<PairStats>]>,
}

/// The state of one frontend connection. Dropped (with its vrings, mappings and worker
/// threads, which the backend crate owns) when the frontend goes away.
pub struct NetSession {
    settings: DeviceSettings,
    mem: GuestMemoryAtomic<GuestMem>,
    config: [u8; CONFIG_SIZE],
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    workers: Vec<Mutex<PairWorker>>,
    /// One exit event per worker thread, made up front so that failing to make one fails the
    /// session (the crate cannot stop a worker that has none); handed out by `exit_event`.
    exit_events: Mutex<Vec<Option<(EventConsumer, EventNotifier)>>>,
    /// Read ends of the exit events handed out, which the backend crate leaks (see
    /// `release_exit_fds`).
    exit_fds: Mutex<Vec<RawFd>>,
}

impl NetSession {
    /// `mem` must be the same `GuestMemoryAtomic` handed to the daemon.
    pub fn new(settings: DeviceSettings, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<Self> {
        let pairs = settings.num_queue_pairs;
        let exit_events = (0..pairs)
            .map(|_| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).map(Some)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let workers = (0..pairs)
            .map(|p| Mutex::new(PairWorker::new(p, settings.stats[usize::from(p)].clone())))
            .collect();
        Ok(NetSession {
            config: device::config_space(&settings.mac, pairs, settings.mtu),
            settings,
            mem,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            workers,
            exit_events: Mutex::new(exit_events),
            exit_fds: Mutex::new(Vec::new()),
        })
    }

    /// The epoll `device_event` of a pair's tap poller: the crate reserves 0..=num_queues.
    fn tap_event(&self) -> u16 {
        2 * self.settings.num_queue_pairs + 1
    }

    /// Adds each pair's tap poller to its worker thread's epoll. Call once, after the daemon
    /// made its handlers and before it starts.
    pub fn register_tap_pollers(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<NetSession>>>],
    ) -> io::Result<()> {
        for (pair, handler) in handlers.iter().enumerate() {
            if let Some(fd) = self.settings.tap.poller_fd(pair as u16) {
                handler.register_listener(fd, EventSet::IN, u64::from(self.tap_event()))?;
            }
        }
        Ok(())
    }

    /// The session is over: frames held for the guest are dropped, and queues of a multi-queue
    /// tap other than the first stop taking frames until a guest uses them again.
    pub fn stop(&self) {
        for (pair, worker) in self.workers.iter().enumerate() {
            worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .discard_pending();
            self.settings.tap.want_attached(pair as u16, false);
        }
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

    fn worker(&self, pair: usize) -> Option<std::sync::MutexGuard<'_, PairWorker>> {
        self.workers
            .get(pair)
            .map(|w| w.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sends what the guest queued on TX, until no new chain arrived while notifications were
    /// re-enabled (EVENT_IDX).
    fn serve_tx(&self, vring: &Vring, pair: usize) {
        let Some(mut worker) = self.worker(pair) else {
            return;
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mem = self.mem.memory();
        let tap = self.settings.tap.file(pair as u16);
        loop {
            let mut state = vring.get_mut();
            if event_idx {
                let _ = state.disable_notification();
            }
            let used = worker.tx(state.get_queue_mut(), &mem, tap.as_deref());
            if used > 0 {
                signal(&mut state, pair, "TX");
            }
            if !event_idx || !matches!(state.enable_notification(), Ok(true)) {
                return;
            }
        }
    }

    /// Moves frames from the tap to the guest until the tap is empty or the guest has no more
    /// buffers (then the RX kick brings us back).
    fn serve_rx(&self, vring: &Vring, pair: usize) {
        let Some(mut worker) = self.worker(pair) else {
            return;
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mem = self.mem.memory();
        let tap = self.settings.tap.file(pair as u16);
        loop {
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return;
            }
            if event_idx {
                let _ = state.disable_notification();
            }
            let (used, end) = worker.rx(state.get_queue_mut(), &mem, tap.as_deref());
            if used > 0 {
                signal(&mut state, pair, "RX");
            }
            match end {
                // Kicks are not needed while the tap is empty: the tap wakes us.
                RxEnd::TapEmpty => return,
                RxEnd::NeedBuffers => {
                    if !event_idx {
                        return;
                    }
                    // Ask for the kick that says buffers were posted; if some came meanwhile,
                    // go on at once.
                    if !matches!(state.enable_notification(), Ok(true)) {
                        return;
                    }
                }
            }
        }
    }
}

/// Signals the frontend if the ring asks for it (always without EVENT_IDX).
fn signal(state: &mut VringState<GuestMemoryAtomic<GuestMem>>, pair: usize, which: &str) {
    let notify = state.needs_notification().unwrap_or_else(|e| {
        log::warn!("pair {pair} {which}: cannot read used_event: {e}");
        true
    });
    if notify {
        if let Err(e) = state.signal_used_queue() {
            log::warn!("pair {pair} {which}: cannot signal the frontend: {e}");
        }
    }
}

impl VhostUserBackend for NetSession {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.settings.num_queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        device::device_features()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        for worker in &self.workers {
            worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_features(features, self.settings.mtu);
        }
        let hdr_len = device::header_len(features);
        let offloads = device::tap_offloads(features);
        match self.settings.tap.set_features(hdr_len, offloads) {
            Ok(()) => log::debug!(
                "features {features:#x}: {hdr_len}-byte header, tap offloads {offloads:#x}"
            ),
            // A deleted tap gets them when it comes back.
            Err(e) => log::warn!("{e}"),
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        device::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        device::read_config(&self.config, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in our config space is writable (no legacy MAC writes: no CTRL_MAC_ADDR).
        // Failing would make the crate drop the connection, so the write is ignored.
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
        // Pair i (queues 2i and 2i+1) on worker thread i; MAX_QUEUE_PAIRS (32) keeps the
        // shift in range.
        (0..self.settings.num_queue_pairs)
            .map(|p| 0b11u64 << (2 * p))
            .collect()
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

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            log::warn!("unexpected event set {evset:?} on pair {thread_id}");
            return Ok(());
        }
        // Thread i serves pair i: its vring list is [RX, TX].
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            log::warn!("pair {thread_id} has {} vrings, not 2", vrings.len());
            return Ok(());
        };
        let pair = thread_id as u16;
        match device_event {
            0 => {
                // The guest uses this pair: let the tap steer frames to it.
                self.settings.tap.want_attached(pair, true);
                self.serve_rx(rx, thread_id);
            }
            1 => {
                self.settings.tap.want_attached(pair, true);
                self.serve_tx(tx, thread_id);
            }
            e if e == self.tap_event() => {
                let events = self.settings.tap.drain_poller(pair);
                if events.error {
                    // Probably deleted: let go of it now rather than at the next watch tick.
                    self.settings.tap.check();
                }
                let in_use = {
                    let state = rx.get_ref();
                    state.is_enabled() && state.get_queue().ready()
                };
                if in_use {
                    self.serve_rx(rx, thread_id);
                } else if pair != 0 {
                    // Frames for a pair the guest does not use: send them elsewhere.
                    self.settings.tap.want_attached(pair, false);
                }
            }
            other => log::warn!("unknown event {other} on pair {thread_id}"),
        }
        Ok(())
    }
}
