//! One queue pair's data path, run on that pair's worker thread: TX (guest → tap) writes each
//! chain to the tap with one `writev` straight from guest memory; RX (tap → guest) reads a
//! frame into a bounce buffer and copies it into one receive chain, or into as many as it
//! needs with MRG_RXBUF.
//!
//! Why a bounce buffer on RX: a tap read consumes the frame whatever the buffers it was given,
//! and its size is unknown until it is read. Reading into a local buffer first lets the worker
//! keep the frame when the guest has posted too few buffers (it waits for the RX kick) instead
//! of losing it, and fill mergeable buffers exactly. TX needs no copy: the kernel copies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::device::has;
use crate::frame::{check_tx, TxDrop, TxRules, ETH_HLEN, MAX_FRAME};
use crate::stats::{bump, PairStats};
use crate::GuestMem;

/// The most descriptors one TX frame may have (the kernel's IOV_MAX).
const MAX_TX_SEGMENTS: usize = 1024;
/// The bounce buffer: the largest frame plus its header, with room for a 12-byte header.
const BOUNCE_LEN: usize = MAX_FRAME + 16;

/// How an RX pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxEnd {
    /// The tap has nothing more (or is gone).
    TapEmpty,
    /// A frame waits for the guest to post buffers.
    NeedBuffers,
}

/// One descriptor of an RX chain: where the guest wants bytes.
#[derive(Debug, Clone, Copy)]
struct Area {
    addr: u64,
    len: usize,
}

pub struct PairWorker {
    pair: u16,
    stats: Arc<PairStats>,
    rules: TxRules,
    mrg_rxbuf: bool,
    bounce: Vec<u8>,
    /// Length of a frame read from the tap and not yet delivered (0: none).
    pending: usize,
    iovecs: Vec<libc::iovec>,
    areas: Vec<Area>,
    /// (head, used length) of the chains the current RX frame fills.
    heads: Vec<(u16, u32)>,
}

// SAFETY: `iovecs` holds raw pointers only between filling it and the writev of one frame,
// both on the thread that owns the worker at that moment; nothing dereferences them later.
unsafe impl Send for PairWorker {}

impl PairWorker {
    pub fn new(pair: u16, stats: Arc<PairStats>) -> Self {
        PairWorker {
            pair,
            stats,
            rules: TxRules::new(0, 1500),
            mrg_rxbuf: false,
            bounce: vec![0; BOUNCE_LEN],
            pending: 0,
            iovecs: Vec::new(),
            areas: Vec::new(),
            heads: Vec::new(),
        }
    }

    /// Takes the negotiated features (at SET_FEATURES).
    pub fn set_features(&mut self, acked: u64, mtu: u16) {
        self.rules = TxRules::new(acked, mtu);
        self.mrg_rxbuf = has(acked, VIRTIO_NET_F_MRG_RXBUF);
    }

    /// Sends every available TX chain to the tap (or drops it when there is no tap); returns
    /// how many used entries were added.
    pub fn tx(&mut self, queue: &mut Queue, mem: &GuestMem, tap: Option<&File>) -> usize {
        let mut used = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match self.tx_one(chain, mem, tap) {
                Ok(len) => {
                    bump(&self.stats.tx_frames, 1);
                    bump(&self.stats.tx_bytes, len as u64);
                }
                Err(TxFail::Drop(d)) => {
                    let counter = match d {
                        TxDrop::Malformed(_) => &self.stats.tx_malformed,
                        TxDrop::Oversized { .. } => &self.stats.tx_oversized,
                    };
                    self.stats
                        .drop_frame(counter, self.pair, format_args!("TX chain {head}: {d}"));
                }
                Err(TxFail::NoTap) => bump(&self.stats.tx_dropped, 1),
                Err(TxFail::Tap(e)) => self.stats.drop_frame(
                    &self.stats.tx_dropped,
                    self.pair,
                    format_args!("TX chain {head}: the tap refused it: {e}"),
                ),
            }
            self.iovecs.clear();
            // A TX buffer is only read: its used length is 0.
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::warn!("pair {}: cannot return TX chain {head}: {e}", self.pair);
            }
            used += 1;
        }
        used
    }

    fn tx_one(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMem>,
        mem: &GuestMem,
        tap: Option<&File>,
    ) -> Result<usize, TxFail> {
        let malformed = |why: String| TxFail::Drop(TxDrop::Malformed(why));
        let mut total = 0usize;
        let mut cut = false;
        let mut hdr = [0u8; 12];
        let hdr_len = self.rules.hdr_len;
        for desc in chain {
            cut = desc.has_next();
            if desc.is_write_only() {
                return Err(malformed(
                    "a device-writable descriptor in a TX chain".into(),
                ));
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if self.iovecs.len() == MAX_TX_SEGMENTS {
                return Err(malformed(format!(
                    "more than {MAX_TX_SEGMENTS} descriptors"
                )));
            }
            let addr = GuestAddress(desc.addr().0);
            let slice = mem.get_slice(addr, len).map_err(|e| {
                malformed(format!(
                    "descriptor [{:#x}, +{len}) is not guest memory: {e}",
                    addr.0
                ))
            })?;
            // Gather the header, which may be split over descriptors.
            if total < hdr_len {
                let n = (hdr_len - total).min(len);
                mem.read_slice(&mut hdr[total..total + n], addr)
                    .map_err(|e| malformed(format!("cannot read the header: {e}")))?;
            }
            total += len;
            self.iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: len,
            });
            if total > hdr_len + MAX_FRAME {
                return Err(TxFail::Drop(TxDrop::Oversized {
                    len: total.saturating_sub(hdr_len),
                    max: MAX_FRAME,
                }));
            }
        }
        if cut {
            return Err(malformed(
                "the chain's next link is out of the table or loops".into(),
            ));
        }
        if total < hdr_len {
            return Err(malformed(format!(
                "{total}-byte chain is shorter than the {hdr_len}-byte header"
            )));
        }
        let frame_len = total - hdr_len;
        check_tx(&hdr[..hdr_len], frame_len, &self.rules).map_err(TxFail::Drop)?;
        let Some(tap) = tap else {
            return Err(TxFail::NoTap);
        };
        // SAFETY: every iovec points into guest memory mapped by `mem`, which outlives the
        // call, with the length the descriptor gave and get_slice checked; the kernel only
        // reads from them.
        let rc = unsafe {
            libc::writev(
                tap.as_raw_fd(),
                self.iovecs.as_ptr(),
                self.iovecs.len() as libc::c_int,
            )
        };
        if rc < 0 {
            return Err(TxFail::Tap(io::Error::last_os_error()));
        }
        Ok(frame_len)
    }

    /// Moves frames from the tap into RX chains until the tap is empty or the guest has no
    /// buffers for the next frame; returns how many used entries were added and why it ended.
    pub fn rx(&mut self, queue: &mut Queue, mem: &GuestMem, tap: Option<&File>) -> (usize, RxEnd) {
        let mut used = 0;
        loop {
            if self.pending == 0 {
                let Some(tap) = tap else {
                    return (used, RxEnd::TapEmpty);
                };
                // SAFETY: reads at most bounce.len() bytes into the worker's own buffer.
                let rc = unsafe {
                    libc::read(
                        tap.as_raw_fd(),
                        self.bounce.as_mut_ptr().cast(),
                        self.bounce.len(),
                    )
                };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        log::debug!("pair {}: tap read failed: {e}", self.pair);
                    }
                    return (used, RxEnd::TapEmpty);
                }
                let n = rc as usize;
                if n < self.rules.hdr_len + ETH_HLEN {
                    self.stats.drop_frame(
                        &self.stats.rx_dropped,
                        self.pair,
                        format_args!("RX: {n}-byte read from the tap is too short"),
                    );
                    continue;
                }
                self.pending = n;
            }
            match self.deliver(queue, mem) {
                Some(n) => used += n,
                None => return (used, RxEnd::NeedBuffers),
            }
        }
    }

    /// Drops a frame held from an earlier pass (the session is going away).
    pub fn discard_pending(&mut self) {
        if self.pending != 0 {
            self.pending = 0;
            bump(&self.stats.rx_dropped, 1);
        }
    }

    /// Places the pending frame; `None` when the ring has too few buffers (nothing consumed).
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMem) -> Option<usize> {
        let start = queue.next_avail();
        let len = self.pending;
        let mut placed = 0usize;
        let mut chains = 0usize;
        self.heads.clear();
        while placed < len {
            if chains == usize::from(queue.size()) {
                // Every buffer of the ring together is too small: it never fits.
                return Some(self.drop_placed(queue, mem, "larger than the whole RX ring"));
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                queue.set_next_avail(start);
                return None;
            };
            chains += 1;
            let head = chain.head_index();
            let capacity = match self.rx_areas(chain, mem) {
                Ok(c) => c,
                Err(why) => {
                    self.stats.drop_frame(
                        &self.stats.rx_bad_chains,
                        self.pair,
                        format_args!("RX chain {head}: {why}"),
                    );
                    self.heads.push((head, 0));
                    return Some(self.drop_placed(queue, mem, "an RX chain was bad"));
                }
            };
            if !self.mrg_rxbuf && capacity < len {
                // Without MRG_RXBUF one chain must hold the frame; the next frame may fit.
                self.heads.push((head, 0));
                return Some(self.drop_placed(queue, mem, "larger than the RX buffer"));
            }
            let n = capacity.min(len - placed);
            if let Err(e) = self.copy_out(mem, placed, n) {
                self.heads.push((head, 0));
                self.stats.drop_frame(
                    &self.stats.rx_bad_chains,
                    self.pair,
                    format_args!("RX chain {head}: {e}"),
                );
                return Some(self.drop_placed(queue, mem, "an RX chain was bad"));
            }
            placed += n;
            self.heads.push((head, n as u32));
        }
        // num_buffers (VERSION_1 / MRG_RXBUF header) sits at bytes 10..12 of the header, in the
        // first chain; the tap leaves those bytes alone.
        if self.rules.hdr_len >= 12 {
            let count = self.heads.len() as u16;
            if let Some(area) = self.first_area_addr() {
                if let Err(e) = mem.write_slice(&count.to_le_bytes(), GuestAddress(area + 10)) {
                    log::debug!("pair {}: cannot write num_buffers: {e}", self.pair);
                }
            }
        }
        for &(head, n) in &self.heads {
            if let Err(e) = queue.add_used(mem, head, n) {
                log::warn!("pair {}: cannot return RX chain {head}: {e}", self.pair);
            }
        }
        bump(&self.stats.rx_frames, 1);
        bump(&self.stats.rx_bytes, (len - self.rules.hdr_len) as u64);
        self.pending = 0;
        Some(self.heads.len())
    }

    /// Gives every chain popped for the current frame back as used with length 0 and drops the
    /// frame; returns the number of used entries.
    fn drop_placed(&mut self, queue: &mut Queue, mem: &GuestMem, why: &str) -> usize {
        for &(head, _) in &self.heads {
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::warn!("pair {}: cannot return RX chain {head}: {e}", self.pair);
            }
        }
        let len = self.pending;
        self.stats.drop_frame(
            &self.stats.rx_dropped,
            self.pair,
            format_args!("RX: {len}-byte frame is {why}"),
        );
        self.pending = 0;
        self.heads.len()
    }

    /// Records the writable areas of an RX chain; returns its capacity.
    fn rx_areas(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMem>,
        mem: &GuestMem,
    ) -> Result<usize, String> {
        let first_chain = self.heads.is_empty();
        if first_chain {
            self.areas.clear();
        }
        let from = self.areas.len();
        let mut capacity = 0usize;
        let mut cut = false;
        for desc in chain {
            cut = desc.has_next();
            if !desc.is_write_only() {
                return Err("a device-readable descriptor in an RX chain".into());
            }
            let len = desc.len() as usize;
            if !mem.check_range(GuestAddress(desc.addr().0), len) {
                return Err(format!(
                    "descriptor [{:#x}, +{len}) is not guest memory",
                    desc.addr().0
                ));
            }
            capacity += len;
            self.areas.push(Area {
                addr: desc.addr().0,
                len,
            });
        }
        if cut {
            return Err("the chain's next link is out of the table or loops".into());
        }
        // The header (with num_buffers) must fit the first chain's first descriptor, so that
        // num_buffers can be written after the copy.
        if first_chain
            && self
                .areas
                .get(from)
                .is_none_or(|a| a.len < self.rules.hdr_len)
        {
            return Err("the first RX descriptor is shorter than the virtio-net header".into());
        }
        Ok(capacity)
    }

    /// Copies `n` bytes of the pending frame from offset `at` into the areas of the chain
    /// popped last.
    fn copy_out(
        &mut self,
        mem: &GuestMem,
        at: usize,
        n: usize,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0;
        // The last chain's areas are the ones not yet used: skip what earlier chains took.
        let mut skip = at;
        for area in &self.areas {
            if done == n {
                break;
            }
            if skip >= area.len {
                skip -= area.len;
                continue;
            }
            let room = area.len - skip;
            let k = room.min(n - done);
            let src = &self.bounce[at + done..at + done + k];
            mem.write_slice(src, GuestAddress(area.addr + skip as u64))?;
            skip = 0;
            done += k;
        }
        Ok(())
    }

    fn first_area_addr(&self) -> Option<u64> {
        self.areas.first().map(|a| a.addr)
    }
}

enum TxFail {
    Drop(TxDrop),
    NoTap,
    Tap(io::Error),
}
