//! Tests of one queue's request loop through a real split ring in guest memory: good requests
//! of every kind, and bad ones that fail alone while the queue keeps going.

use super::*;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestMemoryBackend;

const QUEUE_SIZE: u16 = 8;
const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const DATA2: u64 = 0x8000;
const STATUS: u64 = 0xf000;
const INDIRECT_TABLE: u64 = 0xe000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const DISK_SECTORS: u64 = 256;

/// The driver side of one split ring, written by hand.
struct Driver {
    mem: GuestMem,
    queue: Queue,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new() -> Self {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        queue.set_size(QUEUE_SIZE);
        queue
            .try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .expect("desc table");
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL))
            .expect("avail ring");
        queue
            .try_set_used_ring_address(GuestAddress(USED))
            .expect("used ring");
        queue.set_ready(true);
        Driver {
            mem,
            queue,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn put_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(table + 16 * u64::from(index)))
            .expect("descriptor");
    }

    /// Writes a chain at descriptor 0.. (linked in order) and makes it available.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) {
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last { *flags } else { flags | NEXT };
            self.put_desc(DESC_TABLE, i as u16, *addr, *len, flags, i as u16 + 1);
        }
        self.publish(0);
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .expect("avail idx");
    }

    fn header(&self, request_type: u32, sector: u64) {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&bytes, GuestAddress(HDR))
            .expect("header");
    }

    /// Runs the worker and returns the new used entries (id, len).
    fn run(&mut self, worker: &mut QueueWorker, limits: &Limits) -> Vec<(u32, u32)> {
        let stopping = AtomicBool::new(false);
        worker.process(&mut self.queue, &self.mem, limits, &stopping);
        // io_uring: the rest complete asynchronously; wait for them.
        worker.wait_idle(&mut self.queue, &self.mem);
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        let mut entries = Vec::new();
        while self.used_seen != used_idx {
            let at = USED + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
            entries.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        entries
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    /// Sets the status byte to a value no request produces, to see it change.
    fn clear_status(&self) {
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS))
            .expect("status");
    }

    fn read_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(addr))
            .expect("read guest");
        out
    }
}

struct TestDisk {
    path: PathBuf,
    disk: Arc<Disk>,
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn test_disk(name: &str, readonly: bool, direct: bool) -> TestDisk {
    let path = std::env::temp_dir().join(format!(
        "splitvmm-blk-worker-{name}-{}-{}.img",
        ENGINE.with(|e| e.get().name()),
        std::process::id()
    ));
    let pattern: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, pattern).expect("image");
    let disk = Arc::new(Disk::open(&path, readonly, direct).expect("open image"));
    TestDisk { path, disk }
}

fn limits(disk: &Disk) -> Limits {
    Limits {
        capacity_sectors: disk.capacity_sectors(),
        readonly: disk.readonly(),
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 1 << 20,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1 << 20,
        max_write_zeroes_seg: 4,
    }
}

thread_local! {
    /// The engine `worker()` gives this test thread (sync unless a test says otherwise).
    static ENGINE: std::cell::Cell<EngineKind> = const { std::cell::Cell::new(EngineKind::Sync) };
}

fn worker(disk: &TestDisk) -> QueueWorker {
    let engine = ENGINE.with(|e| e.get());
    let w = QueueWorker::with_engine(
        0,
        disk.disk.clone(),
        Arc::from(&b"serial-123"[..]),
        engine,
        u32::from(QUEUE_SIZE),
    );
    assert_eq!(w.engine(), engine, "io_uring unavailable here?");
    w
}

/// Every test above again, with io_uring as the engine (skipped where io_uring is unavailable).
#[test]
fn every_worker_test_with_io_uring() {
    if let Err(e) = crate::io::uring::probe() {
        eprintln!("skipping: io_uring unavailable ({e})");
        return;
    }
    ENGINE.with(|e| e.set(EngineKind::Uring));
    reads_and_writes_through_the_ring();
    indirect_chains_work();
    discard_and_write_zeroes_reach_the_file();
    bad_requests_fail_alone_and_the_queue_keeps_going();
    read_only_disk_and_backing_file_errors();
    direct_io_with_aligned_and_unaligned_buffers();
}

fn ok() -> u8 {
    VIRTIO_BLK_S_OK as u8
}

fn ioerr() -> u8 {
    VIRTIO_BLK_S_IOERR as u8
}

fn expected_pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i % 251) as u8)
        .collect()
}

#[test]
fn reads_and_writes_through_the_ring() {
    let disk = test_disk("rw", false, false);
    let mut w = worker(&disk);
    let limits = limits(&disk.disk);
    let mut d = Driver::new();

    // Read sectors 8..16 into two buffers.
    d.header(VIRTIO_BLK_T_IN, 8);
    d.submit(&[
        (HDR, 16, 0),
        (DATA, 1024, WRITE),
        (DATA2, 3072, WRITE),
        (STATUS, 1, WRITE),
    ]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 4097)]);
    assert_eq!(d.status(), ok());
    let mut read = d.read_bytes(DATA, 1024);
    read.extend(d.read_bytes(DATA2, 3072));
    assert_eq!(read, expected_pattern(8 * 512, 4096));

    // Write 1 KiB of 0xab at sector 100, then read it back from the file.
    d.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .expect("data");
    d.header(VIRTIO_BLK_T_OUT, 100);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (DATA, 1024, 0), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ok());
    let file = std::fs::read(&disk.path).expect("image");
    assert_eq!(&file[100 * 512..101 * 512 + 512], &[0xab; 1024][..]);
    assert_eq!(file[99 * 512], expected_pattern(99 * 512, 1)[0]);

    // Flush.
    d.header(VIRTIO_BLK_T_FLUSH, 0);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ok());

    // GET_ID: the serial, zero-padded to 20 bytes.
    d.header(VIRTIO_BLK_T_GET_ID, 0);
    d.mem
        .write_slice(&[0xee; 20], GuestAddress(DATA))
        .expect("fill");
    d.submit(&[(HDR, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 21)]);
    let mut id = b"serial-123".to_vec();
    id.resize(20, 0);
    assert_eq!(d.read_bytes(DATA, 20), id);
    assert_eq!(w.stats().requests, 4);
    assert_eq!(w.stats().failed, 0);
    assert_eq!(w.stats().bytes_read, 4096);
    assert_eq!(w.stats().bytes_written, 1024);
}

#[test]
fn indirect_chains_work() {
    let disk = test_disk("indirect", false, false);
    let mut w = worker(&disk);
    let limits = limits(&disk.disk);
    let mut d = Driver::new();
    d.header(VIRTIO_BLK_T_IN, 2);
    d.put_desc(INDIRECT_TABLE, 0, HDR, 16, NEXT, 1);
    d.put_desc(INDIRECT_TABLE, 1, DATA, 512, WRITE | NEXT, 2);
    d.put_desc(INDIRECT_TABLE, 2, STATUS, 1, WRITE, 0);
    d.put_desc(
        DESC_TABLE,
        0,
        INDIRECT_TABLE,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    d.publish(0);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 513)]);
    assert_eq!(d.status(), ok());
    assert_eq!(d.read_bytes(DATA, 512), expected_pattern(1024, 512));
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    let disk = test_disk("discard", false, false);
    let mut w = worker(&disk);
    let limits = limits(&disk.disk);
    let mut d = Driver::new();
    let blocks_before = std::fs::metadata(&disk.path).expect("stat").blocks();

    // Write zeroes over sectors 0..8 without unmap, discard sectors 64..192 (64 KiB).
    let segment = |sector: u64, n: u32, flags: u32| {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&n.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        raw
    };
    d.mem
        .write_slice(&segment(0, 8, 0), GuestAddress(DATA))
        .expect("segment");
    d.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    d.submit(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ok());

    d.mem
        .write_slice(&segment(64, 128, 0), GuestAddress(DATA))
        .expect("segment");
    d.header(VIRTIO_BLK_T_DISCARD, 0);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ok());

    let file = std::fs::read(&disk.path).expect("image");
    assert!(file[..8 * 512].iter().all(|b| *b == 0));
    assert_eq!(file[8 * 512], expected_pattern(8 * 512, 1)[0]);
    let blocks_after = std::fs::metadata(&disk.path).expect("stat").blocks();
    assert!(
        blocks_after + 64 * 2 <= blocks_before,
        "discard freed nothing: {blocks_before} -> {blocks_after} blocks"
    );
}

#[test]
fn bad_requests_fail_alone_and_the_queue_keeps_going() {
    let disk = test_disk("bad", false, false);
    let mut w = worker(&disk);
    let limits = limits(&disk.disk);
    let mut d = Driver::new();

    // Data buffer outside guest memory: IOERR.
    d.header(VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, 0), (0x20_0000, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ioerr());

    // Unknown request type: UNSUPP.
    d.header(77, 0);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_UNSUPP as u8);

    // A loop: 0 -> 1 -> 0 -> ... The queue crate stops after QUEUE_SIZE descriptors; IOERR goes
    // to the last byte of the last (device-writable) descriptor it saw.
    d.header(VIRTIO_BLK_T_IN, 0);
    d.put_desc(DESC_TABLE, 0, HDR, 16, NEXT, 1);
    d.put_desc(DESC_TABLE, 1, DATA, 512, WRITE | NEXT, 0);
    d.publish(0);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.read_bytes(DATA + 511, 1), vec![ioerr()]);

    // A next index beyond the queue.
    d.put_desc(DESC_TABLE, 0, HDR, 16, NEXT, QUEUE_SIZE + 3);
    d.publish(0);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 0)]);

    // A head index beyond the queue: nothing can be published for it; the queue moves on.
    d.publish(QUEUE_SIZE + 1);
    assert_eq!(d.run(&mut w, &limits), vec![]);

    // Read beyond the capacity: IOERR.
    d.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ioerr());

    // And a good request still works.
    d.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 513)]);
    assert_eq!(d.status(), ok());
    assert_eq!(
        d.read_bytes(DATA, 512),
        expected_pattern((DISK_SECTORS - 1) * 512, 512)
    );
    assert_eq!(w.stats().requests, 7);
    assert_eq!(w.stats().failed, 6);
}

#[test]
fn read_only_disk_and_backing_file_errors() {
    let disk = test_disk("ro", true, false);
    let mut w = worker(&disk);
    let limits = limits(&disk.disk);
    let mut d = Driver::new();
    d.header(VIRTIO_BLK_T_OUT, 0);
    d.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ioerr());

    // The image shrinks under the backend: reading past its new end is IOERR, not a crash,
    // and reading what is left still works.
    let rw = test_disk("shrink", false, false);
    let mut w = worker(&rw);
    let rw_limits = self::limits(&rw.disk);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rw.path)
        .and_then(|f| f.set_len(16 * 512))
        .expect("truncate");
    d.header(VIRTIO_BLK_T_IN, 32);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &rw_limits), vec![(0, 1)]);
    assert_eq!(d.status(), ioerr());
    d.header(VIRTIO_BLK_T_IN, 15);
    d.clear_status();
    d.submit(&[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &rw_limits), vec![(0, 513)]);
    assert_eq!(d.status(), ok());
}

#[test]
fn direct_io_with_aligned_and_unaligned_buffers() {
    let disk = test_disk("direct", false, true);
    let mut w = worker(&disk);
    let limits = limits(&disk.disk);
    let mut d = Driver::new();
    // Aligned: straight preadv with O_DIRECT.
    d.header(VIRTIO_BLK_T_IN, 8);
    d.submit(&[(HDR, 16, 0), (DATA, 4096, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 4097)]);
    assert_eq!(d.status(), ok());
    assert_eq!(d.read_bytes(DATA, 4096), expected_pattern(4096, 4096));
    // Unaligned guest buffers (split at an odd place): through the bounce buffer.
    d.header(VIRTIO_BLK_T_IN, 16);
    d.clear_status();
    d.submit(&[
        (HDR, 16, 0),
        (DATA + 3, 1000, WRITE),
        (DATA2 + 5, 3096, WRITE),
        (STATUS, 1, WRITE),
    ]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 4097)]);
    assert_eq!(d.status(), ok());
    let mut read = d.read_bytes(DATA + 3, 1000);
    read.extend(d.read_bytes(DATA2 + 5, 3096));
    assert_eq!(read, expected_pattern(16 * 512, 4096));
    // Unaligned write, then read it back from the file.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    d.mem
        .write_slice(&data[..100], GuestAddress(DATA + 1))
        .expect("data");
    d.mem
        .write_slice(&data[100..], GuestAddress(DATA2 + 1))
        .expect("data");
    d.header(VIRTIO_BLK_T_OUT, 24);
    d.clear_status();
    d.submit(&[
        (HDR, 16, 0),
        (DATA + 1, 100, 0),
        (DATA2 + 1, 3996, 0),
        (STATUS, 1, WRITE),
    ]);
    assert_eq!(d.run(&mut w, &limits), vec![(0, 1)]);
    assert_eq!(d.status(), ok());
    let file = std::fs::read(&disk.path).expect("image");
    assert_eq!(&file[24 * 512..24 * 512 + 4096], &data[..]);
    assert!(d.mem.check_range(GuestAddress(DATA), 1));
}
