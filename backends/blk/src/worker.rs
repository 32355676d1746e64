//! One queue's request loop: pop a chain, validate it, do the I/O, write the status byte,
//! publish the used entry. Owned by that queue's worker thread; nothing here is shared with
//! other queues.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::disk::Disk;
use crate::io::sync::SyncIo;
use crate::io::IoError;
use crate::request::{self, GuestRange, Limits, Op};
use crate::GuestMem;

/// Counters of one queue over one session, logged when the session ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub requests: u64,
    pub failed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

pub struct QueueWorker {
    index: u16,
    io: SyncIo,
    serial: Arc<[u8]>,
    descs: Vec<Descriptor>,
    data: Vec<GuestRange>,
    scratch: Vec<GuestRange>,
    stats: QueueStats,
}

impl QueueWorker {
    pub fn new(index: u16, disk: Arc<Disk>, serial: Arc<[u8]>) -> Self {
        QueueWorker {
            index,
            io: SyncIo::new(disk),
            serial,
            descs: Vec::new(),
            data: Vec::new(),
            scratch: Vec::new(),
            stats: QueueStats::default(),
        }
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Serves every available request (or until `stopping` is set); returns how many used
    /// entries were published.
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        limits: &Limits,
        stopping: &AtomicBool,
    ) -> usize {
        let mut used = 0;
        while !stopping.load(Ordering::Relaxed) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            self.descs.clear();
            self.descs.extend(chain);
            let len = self.handle(head, mem, limits);
            if let Err(e) = queue.add_used(mem, head, len) {
                log::warn!(
                    "queue {}: cannot publish used entry for descriptor {head}: {e}",
                    self.index
                );
                continue;
            }
            used += 1;
        }
        used
    }

    /// Handles the chain in `self.descs`; returns the used length (bytes written to the guest).
    fn handle(&mut self, head: u16, mem: &GuestMem, limits: &Limits) -> u32 {
        self.stats.requests += 1;
        let request =
            match request::parse(&self.descs, mem, limits, &mut self.data, &mut self.scratch) {
                Ok(request) => request,
                Err(rejected) => {
                    self.stats.failed += 1;
                    let code = rejected.error.status();
                    log::warn!(
                        "queue {}: request at descriptor {head} fails with {}: {}",
                        self.index,
                        status_name(code),
                        rejected.error
                    );
                    return match rejected.status {
                        Some(addr) => self.set_status(mem, addr, code, 1),
                        None => 0,
                    };
                }
            };
        let result: Result<u32, IoError> = match &request.op {
            Op::Read { offset, len } => {
                let r = self.io.read(mem, *offset, &self.data, *len).map(|()| *len);
                if r.is_ok() {
                    self.stats.bytes_read += u64::from(*len);
                }
                r
            }
            Op::Write { offset, len } => {
                let r = self.io.write(mem, *offset, &self.data, *len).map(|()| 0);
                if r.is_ok() {
                    self.stats.bytes_written += u64::from(*len);
                }
                r
            }
            Op::Flush => self.io.flush().map(|()| 0),
            Op::GetId { len } => self.get_id(mem, *len),
            Op::Discard(segments) => self.io.discard(segments).map(|()| 0),
            Op::WriteZeroes(segments) => self.io.write_zeroes(segments).map(|()| 0),
        };
        match result {
            Ok(written) => self.set_status(mem, request.status, VIRTIO_BLK_S_OK as u8, written + 1),
            Err(e) => {
                self.stats.failed += 1;
                log::warn!(
                    "queue {}: request at descriptor {head} fails with IOERR: {e}",
                    self.index
                );
                self.set_status(mem, request.status, VIRTIO_BLK_S_IOERR as u8, 1)
            }
        }
    }

    /// Writes the status byte; returns `used_len`, or 0 if the byte could not be written.
    fn set_status(&self, mem: &GuestMem, addr: GuestAddress, code: u8, used_len: u32) -> u32 {
        match mem.write_obj(code, addr) {
            Ok(()) => used_len,
            Err(e) => {
                log::warn!(
                    "queue {}: cannot write status at {:#x}: {e}",
                    self.index,
                    addr.0
                );
                0
            }
        }
    }

    /// Writes the serial number, zero-padded to 20 bytes (or the buffer's size if smaller).
    fn get_id(&self, mem: &GuestMem, len: u32) -> Result<u32, IoError> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = self.serial.len().min(id.len());
        id[..n].copy_from_slice(&self.serial[..n]);
        let total = (len as usize).min(id.len());
        let mut done = 0;
        for range in &self.data {
            if done == total {
                break;
            }
            let n = (total - done).min(range.len as usize);
            mem.write_slice(&id[done..done + n], range.addr)
                .map_err(|_| IoError::GuestMemory {
                    addr: range.addr.0,
                    len: range.len,
                })?;
            done += n;
        }
        // total <= 20.
        Ok(total as u32)
    }
}

fn status_name(code: u8) -> &'static str {
    match u32::from(code) {
        VIRTIO_BLK_S_OK => "OK",
        VIRTIO_BLK_S_IOERR => "IOERR",
        _ => "UNSUPP",
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
