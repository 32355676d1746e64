//! Protocol tests of `splitvmm-blk` without a VM, part 2: bad guest input and a full backing
//! filesystem. Each bad request must fail alone (IOERR/UNSUPP where its status byte is
//! reachable; otherwise the chain is still completed), with one log line; the same queue then
//! serves good requests, nothing on the image changes, and the daemon stays up.

use std::time::{Duration, Instant};

use splitvmm_tests::vhost::blk::conformance::pattern;
use splitvmm_tests::vhost::blk::malformed::{enqueue_bogus_head, enqueue_malformed, Malformed};
use splitvmm_tests::vhost::blk::{
    BlkCompletion, BlkFrontend, BlkHeader, BlkOptions, BlkQueue, BlkRange, BlkRequest, BlkStatus,
    RequestSlot, SECTOR_SIZE,
};
use splitvmm_tests::vhost::blk_daemon::{BlkDaemon, BlkDaemonOptions, Tmpfs};
use splitvmm_tests::vhost::vring::{Link, RawDescriptor, Segment};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const MIB: u64 = 1 << 20;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Deadline for a bad request's completion.
const WAIT: Duration = Duration::from_secs(5);
/// Sectors 0..GUARD_SECTORS hold known data in the fault tests; bad requests aim at them.
const GUARD_SECTORS: u64 = 64;

/// Lines of the daemon's log about failed requests.
fn failure_lines(d: &BlkDaemon) -> usize {
    d.stderr()
        .lines()
        .filter(|l| l.contains("request at descriptor") && l.contains("fails with"))
        .count()
}

/// One daemon + connection whose first GUARD_SECTORS sectors hold a known pattern.
struct Rig {
    dev: BlkFrontend,
    d: BlkDaemon,
    guard: Vec<u8>,
}

impl Rig {
    fn new(size: u64) -> Self {
        // Every failure line is counted, so the daemon's log rate limit is off.
        let opts = BlkDaemonOptions {
            log_burst: Some(0),
            ..BlkDaemonOptions::default()
        };
        let d = BlkDaemon::with_new_image(size, &opts)
            .unwrap_or_else(|e| panic!("starting splitvmm-blk: {e}"));
        let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default()).unwrap();
        let guard = pattern((GUARD_SECTORS * SECTOR_SIZE) as usize, 0x5c);
        assert_eq!(dev.queue(0).write(0, &guard).unwrap(), BlkStatus::Ok);
        Rig { dev, d, guard }
    }

    fn q(&mut self) -> &mut BlkQueue {
        self.dev.queue(0)
    }

    /// After a bad request: exactly `logged` more failure lines, the daemon is up, the guard
    /// data is intact (read through the same queue, which proves it still serves), and a write
    /// + read elsewhere works.
    fn check_after(&mut self, what: &str, lines_before: usize, logged: usize) {
        assert!(
            self.d.is_running(),
            "{what}: the daemon died:\n{}",
            self.d.stderr()
        );
        let (status, back) = self
            .q()
            .read(0, GUARD_SECTORS * SECTOR_SIZE)
            .unwrap_or_else(|e| panic!("{what}: the queue no longer serves: {e}"));
        assert_eq!(status, BlkStatus::Ok, "{what}: good read after it");
        assert!(back == self.guard, "{what}: the guard data changed");
        let fresh = pattern(4096, what.len() as u8);
        assert_eq!(
            self.q().write(1000, &fresh).unwrap(),
            BlkStatus::Ok,
            "{what}"
        );
        assert!(self.q().read(1000, 4096).unwrap().1 == fresh, "{what}");
        let lines = failure_lines(&self.d) - lines_before;
        assert_eq!(
            lines, logged,
            "{what}: {lines} failure log lines, not {logged}"
        );
    }

    /// Runs one well-formed chain with a bad request in it; returns its completion.
    fn run_bad(&mut self, req: &BlkRequest) -> BlkCompletion {
        let q = self.q();
        q.submit(req).unwrap();
        let mut done = Vec::new();
        q.wait_deadline(1, Instant::now() + WAIT, &mut done)
            .unwrap_or_else(|e| panic!("{req:?}: no completion: {e}"));
        assert_eq!(done.len(), 1);
        done[0]
    }
}

/// What splitvmm-blk must do with each malformed chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The status byte in the chain's status descriptor says this.
    Status(BlkStatus),
    /// The chain's status descriptor is not reachable (a broken chain): the chain is completed
    /// and the status slot is left alone or gets IOERR.
    Completed,
    /// Odd but not invalid for a device (zero-length data; a chain as long as the queue, above
    /// seg_max): served or failed, either way alone.
    OkOrIoErr,
}

fn expectation(kind: Malformed) -> Expect {
    use Malformed::*;
    match kind {
        DataOutsideMemory | DataStraddlingEnd | DataAddressOverflow | HeaderOutsideMemory
        | ReadIntoReadOnly | WriteFromWritable | HeaderWritable | ShortHeader => {
            Expect::Status(BlkStatus::IoErr)
        }
        Loop | NextOutOfRange | StatusReadOnly | MissingStatus | UnnegotiatedIndirect => {
            Expect::Completed
        }
        TooLong | ZeroLengthData => Expect::OkOrIoErr,
    }
}

#[test]
fn every_malformed_chain_fails_alone_and_the_queue_keeps_serving() {
    let mut rig = Rig::new(16 * MIB);
    let mut table = Vec::new();
    for kind in Malformed::ALL {
        let before = failure_lines(&rig.d);
        let q = rig.q();
        // Aimed at the guard data: sector 8 (a write there must not happen).
        let req = enqueue_malformed(q, kind, 8, 77).expect("queueing the chain");
        q.commit().unwrap();
        let mut done = Vec::new();
        q.wait_deadline(1, Instant::now() + WAIT, &mut done)
            .unwrap_or_else(|e| panic!("{kind:?}: the chain was not completed: {e}"));
        let c = done[0];
        drop(req);
        table.push(format!("{kind:?}: {:?}, used len {}", c.status, c.used_len));
        match expectation(kind) {
            Expect::Status(s) => assert_eq!(c.status, s, "{kind:?}"),
            Expect::Completed => assert!(
                matches!(c.status, BlkStatus::IoErr | BlkStatus::Other(0xff)),
                "{kind:?}: {:?}",
                c.status
            ),
            Expect::OkOrIoErr => assert!(
                matches!(c.status, BlkStatus::Ok | BlkStatus::IoErr),
                "{kind:?}: {:?}",
                c.status
            ),
        }
        let logged = usize::from(c.status != BlkStatus::Ok);
        rig.check_after(&format!("{kind:?}"), before, logged);
    }
    // Hand-built chains beyond the library's list.
    let mem = rig.dev.memory().clone();
    let end = mem.guest_end();
    let data = mem.alloc_owned(4096, 4096).unwrap();
    let d = data.gpa();
    let raw = |addr, len, flags, next| RawDescriptor {
        addr,
        len,
        flags,
        next,
    };
    type Build = Box<dyn Fn(RequestSlot) -> Vec<RawDescriptor>>;
    let custom: Vec<(&str, u32, Build, Expect)> = vec![
        (
            "status outside memory",
            VIRTIO_BLK_T_IN,
            Box::new(move |s: RequestSlot| {
                vec![
                    raw(s.header.gpa, 16, NEXT, Link::Pos(1)),
                    raw(d, 4096, WRITE | NEXT, Link::Pos(2)),
                    raw(end + 0x1000, 1, WRITE, Link::Index(0)),
                ]
            }),
            Expect::Completed,
        ),
        (
            "write from outside memory",
            VIRTIO_BLK_T_OUT,
            Box::new(move |s: RequestSlot| {
                vec![
                    raw(s.header.gpa, 16, NEXT, Link::Pos(1)),
                    raw(end + 0x10_0000, 4096, NEXT, Link::Pos(2)),
                    raw(s.status.gpa, 1, WRITE, Link::Index(0)),
                ]
            }),
            Expect::Status(BlkStatus::IoErr),
        ),
        (
            "a chain of more than 4 GiB",
            VIRTIO_BLK_T_IN,
            Box::new(move |s: RequestSlot| {
                vec![
                    raw(s.header.gpa, 16, NEXT, Link::Pos(1)),
                    raw(d, u32::MAX, WRITE | NEXT, Link::Pos(2)),
                    raw(s.status.gpa, 1, WRITE, Link::Index(0)),
                ]
            }),
            Expect::Completed,
        ),
        (
            "a descriptor that links to itself",
            VIRTIO_BLK_T_IN,
            Box::new(move |s: RequestSlot| vec![raw(s.header.gpa, 16, NEXT, Link::Pos(0))]),
            Expect::Completed,
        ),
        (
            "data then header order (readable after writable)",
            VIRTIO_BLK_T_IN,
            Box::new(move |s: RequestSlot| {
                vec![
                    raw(d, 4096, WRITE | NEXT, Link::Pos(1)),
                    raw(s.header.gpa, 16, NEXT, Link::Pos(2)),
                    raw(s.status.gpa, 1, WRITE, Link::Index(0)),
                ]
            }),
            Expect::Status(BlkStatus::IoErr),
        ),
    ];
    for (what, request_type, build, want) in custom {
        let before = failure_lines(&rig.d);
        let header = BlkHeader {
            request_type,
            ioprio: 0,
            sector: 8,
        };
        let q = rig.q();
        q.enqueue_raw(Some(&header), 0, &build).unwrap();
        q.commit().unwrap();
        let mut done = Vec::new();
        q.wait_deadline(1, Instant::now() + WAIT, &mut done)
            .unwrap_or_else(|e| panic!("{what}: the chain was not completed: {e}"));
        let c = done[0];
        table.push(format!("{what}: {:?}, used len {}", c.status, c.used_len));
        match want {
            Expect::Status(s) => assert_eq!(c.status, s, "{what}"),
            _ => assert!(
                matches!(c.status, BlkStatus::IoErr | BlkStatus::Other(0xff)),
                "{what}: {:?}",
                c.status
            ),
        }
        rig.check_after(what, before, 1);
    }
    drop(data);
    // An avail entry naming a descriptor past the table: consumed (no used entry can name it),
    // and the queue goes on.
    let before = failure_lines(&rig.d);
    let size = rig.q().vring().size();
    enqueue_bogus_head(rig.q(), size + 3).unwrap();
    rig.q().commit().unwrap();
    rig.check_after("avail head out of range", before, 1);
    eprintln!("splitvmm-blk and malformed chains:\n{}", table.join("\n"));
    // A new connection is served too.
    drop(rig.dev);
    let mut dev = BlkFrontend::connect(rig.d.socket(), BlkOptions::default()).unwrap();
    assert!(dev.queue(0).read(0, 4096).unwrap().1 == rig.guard[..4096]);
}

/// A malformed chain between two good requests of the same batch: the good ones complete
/// correctly around it.
#[test]
fn a_malformed_chain_in_a_batch_fails_only_itself() {
    let mut rig = Rig::new(16 * MIB);
    let mem = rig.dev.memory().clone();
    let wbuf = mem.alloc_owned(4096, 4096).unwrap();
    let rbuf = mem.alloc_owned(4096, 4096).unwrap();
    // TooLong needs the whole (empty) queue for itself.
    for (n, kind) in Malformed::ALL
        .into_iter()
        .filter(|k| *k != Malformed::TooLong)
        .enumerate()
    {
        let data = pattern(4096, n as u8);
        wbuf.write(0, &data).unwrap();
        let q = rig.q();
        q.enqueue(&BlkRequest::write(2000, &[wbuf.buf()]).with_tag(1))
            .unwrap();
        let bad = enqueue_malformed(q, kind, 8, 2).unwrap();
        q.enqueue(&BlkRequest::read(16, &[rbuf.buf()]).with_tag(3))
            .unwrap();
        q.commit().unwrap();
        let mut done = Vec::new();
        q.wait_deadline(3, Instant::now() + WAIT, &mut done)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        drop(bad);
        let status = |tag| done.iter().find(|c| c.tag == tag).map(|c| c.status);
        assert_eq!(
            status(1),
            Some(BlkStatus::Ok),
            "{kind:?}: the write before it"
        );
        assert_eq!(
            status(3),
            Some(BlkStatus::Ok),
            "{kind:?}: the read after it"
        );
        assert!(
            rbuf.to_vec().unwrap() == rig.guard[16 * 512..16 * 512 + 4096],
            "{kind:?}: the read after it got wrong data"
        );
        assert!(rig.q().read(2000, 4096).unwrap().1 == data, "{kind:?}");
    }
    assert!(rig.d.is_running());
}

#[test]
fn unknown_request_types_fail_with_unsupp() {
    let mut rig = Rig::new(16 * MIB);
    let mem = rig.dev.memory().clone();
    let buf = mem.alloc_owned(4096, 4096).unwrap();
    // GET_LIFETIME (10), SECURE_ERASE (14), zoned (16+), and nonsense.
    for t in [3u32, 5, 6, 10, 12, 14, 16, 18, 99, 0x8000_0000, u32::MAX] {
        for data in [
            vec![],
            vec![Segment::writable(buf.buf())],
            vec![Segment::readable(buf.buf())],
        ] {
            let before = failure_lines(&rig.d);
            let c = rig.run_bad(&BlkRequest::new(t, 8, data.clone()));
            assert_eq!(c.status, BlkStatus::Unsupp, "type {t} with {data:?}");
            rig.check_after(&format!("type {t}"), before, 1);
        }
    }
}

#[test]
fn sectors_beyond_capacity_fail_with_ioerr_and_write_nothing() {
    let mut rig = Rig::new(16 * MIB);
    let sectors = rig.dev.config().capacity;
    let last = pattern(512, 0xa1);
    assert_eq!(rig.q().write(sectors - 1, &last).unwrap(), BlkStatus::Ok);
    let mem = rig.dev.memory().clone();
    let buf = mem.alloc_owned(8192, 4096).unwrap();
    buf.write(0, &pattern(8192, 0x17)).unwrap();
    let b = |len: u64| buf.buf().slice(0, len);
    let cases: Vec<(&str, BlkRequest)> = vec![
        ("read at capacity", BlkRequest::read(sectors, &[b(512)])),
        (
            "read straddling the end",
            BlkRequest::read(sectors - 1, &[b(1024)]),
        ),
        (
            "read far past",
            BlkRequest::read(u64::MAX / SECTOR_SIZE, &[b(512)]),
        ),
        (
            "read with sector*512 overflowing",
            BlkRequest::read(u64::MAX, &[b(512)]),
        ),
        (
            "read with sector+len overflowing",
            BlkRequest::read(u64::MAX - 1, &[b(4096)]),
        ),
        ("write at capacity", BlkRequest::write(sectors, &[b(512)])),
        (
            "write straddling the end",
            BlkRequest::write(sectors - 1, &[b(4096)]),
        ),
        (
            "write with sector*512 overflowing",
            BlkRequest::write(u64::MAX, &[b(512)]),
        ),
        ("read of a partial sector", BlkRequest::read(0, &[b(100)])),
        ("write of a partial sector", BlkRequest::write(0, &[b(600)])),
    ];
    for (what, req) in cases {
        let before = failure_lines(&rig.d);
        let c = rig.run_bad(&req);
        assert_eq!(c.status, BlkStatus::IoErr, "{what}");
        rig.check_after(what, before, 1);
    }
    // The last sector still holds what was written there, and can be read.
    assert_eq!(
        rig.q().read(sectors - 1, 512).unwrap(),
        (BlkStatus::Ok, last)
    );
    let len = std::fs::metadata(rig.d.image()).unwrap().len();
    assert_eq!(len, 16 * MIB, "the image grew");
}

#[test]
fn discard_and_write_zeroes_with_bad_ranges_or_flags_fail_alone() {
    let mut rig = Rig::new(16 * MIB);
    let c = *rig.dev.config();
    let sectors = c.capacity;
    let r = |sector: u64, num_sectors: u32, flags: u32| BlkRange {
        sector,
        num_sectors,
        flags,
    };
    // Every bad request starts with a valid range over the guard data: nothing of a failed
    // request may be applied.
    let good = r(0, 16, 0);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let too_many = vec![r(0, 1, 0); c.max_discard_seg.max(c.max_write_zeroes_seg) as usize + 1];
    let cases: Vec<(&str, u32, Vec<BlkRange>, BlkStatus)> = vec![
        (
            "discard past capacity",
            VIRTIO_BLK_T_DISCARD,
            vec![good, r(sectors, 8, 0)],
            BlkStatus::IoErr,
        ),
        (
            "discard straddling the end",
            VIRTIO_BLK_T_DISCARD,
            vec![good, r(sectors - 4, 8, 0)],
            BlkStatus::IoErr,
        ),
        (
            "discard overflowing",
            VIRTIO_BLK_T_DISCARD,
            vec![good, r(u64::MAX - 2, 8, 0)],
            BlkStatus::IoErr,
        ),
        (
            "discard with the unmap flag",
            VIRTIO_BLK_T_DISCARD,
            vec![good, r(32, 8, unmap)],
            BlkStatus::Unsupp,
        ),
        (
            "discard with unknown flags",
            VIRTIO_BLK_T_DISCARD,
            vec![good, r(32, 8, 0x8000_0000)],
            BlkStatus::Unsupp,
        ),
        (
            "discard above max_discard_sectors",
            VIRTIO_BLK_T_DISCARD,
            vec![
                good,
                r(0, c.max_discard_sectors.saturating_add(1).max(1), 0),
            ],
            BlkStatus::IoErr,
        ),
        (
            "discard with too many segments",
            VIRTIO_BLK_T_DISCARD,
            too_many.clone(),
            BlkStatus::IoErr,
        ),
        (
            "write-zeroes past capacity",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![good, r(sectors, 1, 0)],
            BlkStatus::IoErr,
        ),
        (
            "write-zeroes overflowing",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![good, r(u64::MAX, 1, unmap)],
            BlkStatus::IoErr,
        ),
        (
            "write-zeroes with unknown flags",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![good, r(32, 8, 2)],
            BlkStatus::Unsupp,
        ),
        (
            "write-zeroes above max_write_zeroes_sectors",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![
                good,
                r(0, c.max_write_zeroes_sectors.saturating_add(1).max(1), 0),
            ],
            BlkStatus::IoErr,
        ),
        (
            "write-zeroes with too many segments",
            VIRTIO_BLK_T_WRITE_ZEROES,
            too_many,
            BlkStatus::IoErr,
        ),
    ];
    let mem = rig.dev.memory().clone();
    for (what, t, ranges, want) in cases {
        let raw = BlkRange::encode_all(&ranges);
        let buf = mem.alloc_owned(raw.len() as u64, 64).unwrap();
        buf.write(0, &raw).unwrap();
        let before = failure_lines(&rig.d);
        let c = rig.run_bad(&BlkRequest::new(t, 0, vec![Segment::readable(buf.buf())]));
        assert_eq!(c.status, want, "{what}");
        rig.check_after(what, before, 1);
    }
    // Malformed segment tables: none, not a multiple of 16 bytes, device-writable.
    let table = mem.alloc_owned(64, 64).unwrap();
    table
        .write(0, &BlkRange::encode_all(&[good, good, good, good]))
        .unwrap();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let shapes: Vec<(&str, Vec<Segment>)> = vec![
            ("no segment table", vec![]),
            (
                "a 15-byte table",
                vec![Segment::readable(table.buf().slice(0, 15))],
            ),
            (
                "a 24-byte table",
                vec![Segment::readable(table.buf().slice(0, 24))],
            ),
            (
                "a device-writable table",
                vec![Segment::writable(table.buf().slice(0, 16))],
            ),
        ];
        for (shape, data) in shapes {
            let what = format!("type {t} with {shape}");
            let before = failure_lines(&rig.d);
            let c = rig.run_bad(&BlkRequest::new(t, 0, data));
            assert_eq!(c.status, BlkStatus::IoErr, "{what}");
            rig.check_after(&what, before, 1);
        }
    }
    // Wrong-direction data and missing buffers on the other request types.
    let buf = mem.alloc_owned(4096, 4096).unwrap();
    let wrong: Vec<(&str, BlkRequest)> = vec![
        (
            "read into a readable buffer",
            BlkRequest::new(VIRTIO_BLK_T_IN, 0, vec![Segment::readable(buf.buf())]),
        ),
        (
            "write from a writable buffer",
            BlkRequest::new(VIRTIO_BLK_T_OUT, 0, vec![Segment::writable(buf.buf())]),
        ),
        (
            "get-id without a buffer",
            BlkRequest::new(VIRTIO_BLK_T_GET_ID, 0, vec![]),
        ),
        (
            "get-id into a readable buffer",
            BlkRequest::new(
                VIRTIO_BLK_T_GET_ID,
                0,
                vec![Segment::readable(buf.buf().slice(0, 20))],
            ),
        ),
    ];
    for (what, req) in wrong {
        let before = failure_lines(&rig.d);
        let c = rig.run_bad(&req);
        assert_eq!(c.status, BlkStatus::IoErr, "{what}");
        rig.check_after(what, before, 1);
    }
}

/// The image on an 8 MiB tmpfs but 64 MiB large (sparse): writes that need space the
/// filesystem no longer has fail with IOERR, nothing lands anywhere else, data written before
/// reads back, overwrites of allocated blocks still work, and once a discard frees space the
/// failed write goes through.
#[test]
fn a_full_backing_filesystem_fails_writes_with_ioerr_and_keeps_serving_sync_io() {
    full_filesystem("sync");
}

/// The same with the io_uring engine (short writes, then ENOSPC, through the ring).
#[test]
fn a_full_backing_filesystem_fails_writes_with_ioerr_and_keeps_serving_io_uring() {
    full_filesystem("uring");
}

fn full_filesystem(engine: &str) {
    const FS: u64 = 8 * MIB;
    const CHUNK: u64 = MIB;
    let fs =
        Tmpfs::mount(FS).unwrap_or_else(|e| panic!("the test needs root to mount a tmpfs: {e}"));
    let image = fs.path().join("big.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    let opts = BlkDaemonOptions {
        extra_args: vec!["--io-engine".into(), engine.into()],
        ..Default::default()
    };
    let mut d =
        BlkDaemon::start(&image, &opts).unwrap_or_else(|e| panic!("starting splitvmm-blk: {e}"));
    let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default()).unwrap();
    let q = dev.queue(0);
    // Model of the image: what must be where.
    let mut model = vec![0u8; (64 * MIB) as usize];
    let early = pattern((2 * MIB) as usize, 1);
    assert_eq!(q.write(0, &early).unwrap(), BlkStatus::Ok);
    model[..early.len()].copy_from_slice(&early);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    // 1 MiB chunks from 16 MiB on: about 6 fit, then the filesystem is full.
    let mut failed = Vec::new();
    for i in 0..12u64 {
        let at = 16 * MIB + i * CHUNK;
        let data = pattern(CHUNK as usize, 10 + i as u8);
        let status = q.write(at / SECTOR_SIZE, &data).unwrap();
        match status {
            BlkStatus::Ok => {
                assert!(
                    failed.is_empty(),
                    "chunk {i} written after chunk {failed:?} failed"
                );
                model[at as usize..(at + CHUNK) as usize].copy_from_slice(&data);
            }
            BlkStatus::IoErr => failed.push(i),
            other => panic!("chunk {i}: {other:?}"),
        }
    }
    eprintln!("chunks that did not fit: {failed:?}");
    assert!(
        !failed.is_empty() && failed.len() < 12,
        "expected some chunks to fit and some not: {failed:?}"
    );
    assert!(d.is_running(), "the daemon died:\n{}", d.stderr());
    assert!(
        d.stderr().contains("No space left on device"),
        "no ENOSPC in the log:\n{}",
        d.stderr()
    );
    // A small write to unallocated space fails too; an overwrite of allocated blocks works.
    assert_eq!(
        q.write(40 * MIB / SECTOR_SIZE, &[7u8; 4096]).unwrap(),
        BlkStatus::IoErr
    );
    let over = pattern(4096, 0xcc);
    assert_eq!(q.write(8, &over).unwrap(), BlkStatus::Ok);
    model[4096..8192].copy_from_slice(&over);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    // What was written reads back through the daemon; nothing landed anywhere else. A failed
    // chunk's own range may hold part of its data (a short write); everything else is exact.
    let (status, back) = q.read(0, 32 * MIB).unwrap();
    assert_eq!(status, BlkStatus::Ok);
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(on_disk.len(), model.len(), "the image changed size");
    let failed_data: std::collections::HashMap<u64, Vec<u8>> = failed
        .iter()
        .map(|&i| (i, pattern(CHUNK as usize, 10 + i as u8)))
        .collect();
    let failed_chunk = |off: u64| {
        off.checked_sub(16 * MIB)
            .and_then(|rel| failed_data.get(&(rel / CHUNK)))
    };
    for (name, view) in [("daemon read", &back[..]), ("image file", &on_disk[..])] {
        for (blk, (got, want)) in view.chunks(4096).zip(model.chunks(4096)).enumerate() {
            let off = blk as u64 * 4096;
            if let Some(data) = failed_chunk(off) {
                let at = (off % CHUNK) as usize;
                assert!(
                    got.iter().all(|&b| b == 0) || got == &data[at..at + 4096],
                    "{name}: a failed chunk's block at {off:#x} holds neither zeros nor its data"
                );
            } else {
                assert!(got == want, "{name}: wrong bytes at {off:#x}");
            }
        }
    }
    // Free space by discarding the early data: the first failed chunk now fits.
    let discard = BlkRange {
        sector: 0,
        num_sectors: (2 * MIB / SECTOR_SIZE) as u32,
        flags: 0,
    };
    assert_eq!(q.discard(&[discard]).unwrap(), BlkStatus::Ok);
    let i = failed[0];
    let data = pattern(CHUNK as usize, 10 + i as u8);
    let sector = (16 * MIB + i * CHUNK) / SECTOR_SIZE;
    assert_eq!(
        q.write(sector, &data).unwrap(),
        BlkStatus::Ok,
        "after freeing space"
    );
    assert!(q.read(sector, CHUNK).unwrap().1 == data);
    assert!(d.is_running());
    drop(dev);
    drop(d);
    drop(fs);
}
