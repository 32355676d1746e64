//! The tap as the daemon holds it for its whole life, across frontend sessions: one queue
//! descriptor per queue pair, each behind its own small epoll (the pair's "poller") that the
//! pair's worker thread watches, and a watcher thread that notices the tap being deleted and
//! attaches again when a tap of the same name exists.
//!
//! Why a poller per pair: the worker threads belong to vhost-user-backend and a session's epoll
//! handlers are gone when the session ends, while the tap and its descriptors outlive sessions
//! and are replaced when the tap comes back. The poller's descriptor never changes, so each
//! session registers it once; the tap descriptor inside is registered edge-triggered, so a
//! frame the guest has no buffer for does not spin the worker (the RX kick resumes it).
//!
//! Deleted tap (decision, see README): the daemon keeps its socket and its frontend; TX frames
//! are dropped and counted, RX is idle; within [`WATCH_INTERVAL`] of an interface of that name
//! existing again the daemon attaches to it, re-applies the header size, offloads, MTU and
//! `--host-ip`, and traffic resumes without the frontend noticing.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::{Config, HostIp, TapSource};
use crate::device::HDR_LEN;
use crate::tap::{self, TapError};

/// How often the watcher looks at the tap.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum WatchError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the epoll of queue pair {pair}: {source}")]
    Epoll { pair: u16, source: std::io::Error },
    #[error("cannot watch tap {name} queue {pair}: {source}")]
    Register {
        name: String,
        pair: u16,
        source: std::io::Error,
    },
    #[error("cannot start the tap watcher thread: {0}")]
    Thread(std::io::Error),
}

/// What a pair's poller reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollerEvents {
    pub readable: bool,
    pub error: bool,
}

struct Slot {
    file: RwLock<Option<Arc<File>>>,
    poller: Epoll,
    /// Whether this queue should take frames from the host (multi-queue taps only; queue 0
    /// always does).
    wanted: AtomicBool,
    /// Whether it is attached now; the mutex orders TUNSETQUEUE calls.
    attached: Mutex<bool>,
}

pub struct TapSet {
    name: String,
    multi_queue: bool,
    mtu: u16,
    host_ip: Option<HostIp>,
    slots: Vec<Slot>,
    hdr_len: AtomicUsize,
    offloads: AtomicU32,
    gone: AtomicBool,
    /// Serialises [`TapSet::check`] between the watcher and the workers (which call it when
    /// their poller reports an error), so a returning tap is attached once.
    checking: Mutex<()>,
    /// Whether the current outage's "cannot attach" was logged at warn level already.
    attach_warned: AtomicBool,
}

impl TapSet {
    /// Creates or attaches the tap as the command line says, with the default header size
    /// (12 bytes), no offloads, and the host side configured.
    pub fn open(config: &Config) -> Result<Arc<Self>, WatchError> {
        let pairs = config.num_queue_pairs;
        let (name, files) = match &config.tap {
            TapSource::Name(name) => (name.clone(), tap::open_queues(name, pairs)?),
            TapSource::Fd(fd) => {
                let (name, file) = tap::adopt_fd(*fd)?;
                (name, vec![file])
            }
        };
        let slots = (0..pairs)
            .map(|pair| {
                Ok(Slot {
                    file: RwLock::new(None),
                    poller: Epoll::new().map_err(|source| WatchError::Epoll { pair, source })?,
                    wanted: AtomicBool::new(pair == 0),
                    attached: Mutex::new(true),
                })
            })
            .collect::<Result<Vec<_>, WatchError>>()?;
        let set = Arc::new(TapSet {
            name,
            multi_queue: pairs > 1,
            mtu: config.mtu,
            host_ip: config.host_ip,
            slots,
            hdr_len: AtomicUsize::new(HDR_LEN),
            offloads: AtomicU32::new(0),
            gone: AtomicBool::new(false),
            checking: Mutex::new(()),
            attach_warned: AtomicBool::new(false),
        });
        set.install(files)?;
        Ok(set)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// The current descriptor of queue `pair`, if the tap exists.
    pub fn file(&self, pair: u16) -> Option<Arc<File>> {
        self.slots
            .get(usize::from(pair))?
            .file
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The poller of queue `pair` (stable for the daemon's life).
    pub fn poller_fd(&self, pair: u16) -> Option<RawFd> {
        self.slots
            .get(usize::from(pair))
            .map(|s| s.poller.as_raw_fd())
    }

    /// Consumes what the poller of `pair` has (without blocking).
    pub fn drain_poller(&self, pair: u16) -> PollerEvents {
        let mut out = PollerEvents::default();
        let Some(slot) = self.slots.get(usize::from(pair)) else {
            return out;
        };
        let mut events = [EpollEvent::default(); 4];
        if let Ok(n) = slot.poller.wait(0, &mut events) {
            for e in &events[..n] {
                let set = e.event_set();
                out.readable |= set.contains(EventSet::IN);
                out.error |= set.intersects(EventSet::ERROR | EventSet::HANG_UP);
            }
        }
        out
    }

    /// Applies the negotiated header size and RX offloads (and remembers them for a tap that
    /// comes back).
    pub fn set_features(&self, hdr_len: usize, offloads: u32) -> Result<(), TapError> {
        self.hdr_len.store(hdr_len, Ordering::Release);
        self.offloads.store(offloads, Ordering::Release);
        for pair in 0..self.slots.len() as u16 {
            if let Some(file) = self.file(pair) {
                tap::set_vnet_hdr_len(&file, &self.name, hdr_len)?;
                // Offloads are per device; setting them once is enough.
                if pair == 0 {
                    tap::set_offloads(&file, &self.name, offloads)?;
                }
            }
        }
        Ok(())
    }

    /// Asks for queue `pair` to take frames from the host (or not). Only multi-queue taps
    /// detach queues, and never queue 0.
    pub fn want_attached(&self, pair: u16, wanted: bool) {
        if !self.multi_queue || pair == 0 {
            return;
        }
        let Some(slot) = self.slots.get(usize::from(pair)) else {
            return;
        };
        slot.wanted.store(wanted, Ordering::Release);
        self.sync_attached(pair);
    }

    fn sync_attached(&self, pair: u16) {
        let Some(slot) = self.slots.get(usize::from(pair)) else {
            return;
        };
        let mut attached = slot.attached.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted = slot.wanted.load(Ordering::Acquire);
        if *attached == wanted {
            return;
        }
        let Some(file) = self.file(pair) else {
            return;
        };
        match tap::set_queue_attached(&file, &self.name, wanted) {
            Ok(()) => {
                *attached = wanted;
                log::debug!(
                    "tap {} queue {pair} {}",
                    self.name,
                    if wanted { "attached" } else { "detached" }
                );
            }
            Err(e) if !self.is_gone() => log::warn!("{e}"),
            Err(_) => {}
        }
    }

    /// Puts fresh queue descriptors in place: header size, offloads, host side, pollers.
    fn install(&self, files: Vec<File>) -> Result<(), WatchError> {
        let hdr_len = self.hdr_len.load(Ordering::Acquire);
        let offloads = self.offloads.load(Ordering::Acquire);
        for (pair, file) in files.iter().enumerate() {
            tap::set_vnet_hdr_len(file, &self.name, hdr_len)?;
            if pair == 0 {
                tap::set_offloads(file, &self.name, offloads)?;
            }
        }
        match tap::configure_host(&self.name, self.mtu, self.host_ip) {
            Ok(()) => {}
            // Without CAP_NET_ADMIN (a persistent tap owned by this user, or one handed over
            // by descriptor) the host side is its owner's business: only --host-ip makes it
            // ours.
            Err(e) if self.host_ip.is_none() => {
                log::warn!("{e}; leaving the host side of the tap as it is")
            }
            Err(e) => return Err(e.into()),
        }
        for (pair, file) in files.into_iter().enumerate() {
            let slot = &self.slots[pair];
            let pair = pair as u16;
            slot.poller
                .ctl(
                    ControlOperation::Add,
                    file.as_raw_fd(),
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
                )
                .map_err(|source| WatchError::Register {
                    name: self.name.clone(),
                    pair,
                    source,
                })?;
            *slot.file.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(file));
            // Fresh queues come attached.
            *slot.attached.lock().unwrap_or_else(PoisonError::into_inner) = true;
            self.sync_attached(pair);
        }
        self.gone.store(false, Ordering::Release);
        Ok(())
    }

    /// Drops every queue descriptor of a deleted tap.
    fn uninstall(&self) {
        self.gone.store(true, Ordering::Release);
        for slot in &self.slots {
            let old = slot
                .file
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(file) = old {
                let _ = slot.poller.ctl(
                    ControlOperation::Delete,
                    file.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    /// One look at the tap: deleted → let go of it; gone and an interface of that name exists
    /// → attach again. Returns whether anything changed.
    pub fn check(&self) -> bool {
        let _one_at_a_time = self.checking.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.is_gone() {
            let deleted = self.file(0).is_some_and(|f| tap::is_deleted(&f));
            if deleted {
                log::warn!(
                    "tap {} was deleted; keeping the frontend, dropping TX frames until a tap \
                     named {} exists again",
                    self.name,
                    self.name
                );
                self.uninstall();
                return true;
            }
            return false;
        }
        if !tap::interface_exists(&self.name) {
            return false;
        }
        let files = match tap::open_queues(&self.name, self.slots.len() as u16) {
            Ok(files) => files,
            Err(e) => {
                // Once per outage at warn level (an interface of that name that we cannot
                // use needs someone's attention), then quietly every tick.
                if self.attach_warned.swap(true, Ordering::AcqRel) {
                    log::debug!("tap {} exists but cannot be attached: {e}", self.name);
                } else {
                    log::warn!(
                        "tap {} exists but cannot be attached (retrying): {e}",
                        self.name
                    );
                }
                return false;
            }
        };
        match self.install(files) {
            Ok(()) => {
                self.attach_warned.store(false, Ordering::Release);
                log::info!("tap {} is back; serving it again", self.name);
                true
            }
            Err(e) => {
                log::warn!("tap {} is back but cannot be set up: {e}", self.name);
                self.uninstall();
                false
            }
        }
    }

    /// Starts the watcher thread (for the daemon's life).
    pub fn start_watcher(self: &Arc<Self>) -> Result<(), WatchError> {
        let set = Arc::clone(self);
        std::thread::Builder::new()
            .name("tap-watch".into())
            .spawn(move || loop {
                std::thread::sleep(WATCH_INTERVAL);
                set.check();
            })
            .map(drop)
            .map_err(WatchError::Thread)
    }
}
