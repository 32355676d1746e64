//! The io_uring engine on its own: many requests in flight, completion through the eventfd,
//! requests split over many iovecs, errors; and (ignored) a quick engine-level benchmark against
//! the sync engine.

use super::*;
use std::path::PathBuf;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

struct Image {
    path: PathBuf,
    disk: Arc<Disk>,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn image(name: &str, bytes: usize) -> Image {
    let path = std::env::temp_dir().join(format!(
        "splitvmm-blk-uring-{name}-{}.img",
        std::process::id()
    ));
    let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, pattern).expect("image");
    let disk = Arc::new(Disk::open(&path, false, false).expect("open"));
    Image { path, disk }
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i % 251) as u8)
        .collect()
}

fn mem(bytes: usize) -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), bytes)]).expect("guest memory")
}

fn tag(head: u16) -> Tag {
    Tag {
        head,
        status: GuestAddress(0),
    }
}

fn available() -> bool {
    match probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping: io_uring unavailable ({e})");
            false
        }
    }
}

/// An engine that sends everything through the ring (no RWF_NOWAIT attempt first).
fn ring_only(img: &Image, entries: u32) -> UringIo {
    let mut io = UringIo::new(img.disk.clone(), entries).expect("ring");
    io.nowait = false;
    io
}

#[test]
fn page_cache_hits_complete_at_once_and_misses_go_to_the_ring() {
    if !available() {
        return;
    }
    let img = image("nowait", 1 << 20);
    let mem = mem(1 << 20);
    let mut io = UringIo::new(img.disk.clone(), 8).expect("ring");
    let _ = std::fs::read(&img.path).expect("warm");
    let range = [GuestRange {
        addr: GuestAddress(0x1000),
        len: 8192,
    }];
    assert_eq!(
        io.read(tag(1), &mem, 4096, &range, 8192).expect("read"),
        Queued::Done
    );
    assert_eq!(io.in_flight(), 0);
    let mut got = vec![0u8; 8192];
    mem.read_slice(&mut got, GuestAddress(0x1000))
        .expect("guest");
    assert_eq!(got, pattern(4096, 8192));
    // Past the end of the file RWF_NOWAIT moves part of it; the ring reports the short read.
    assert_eq!(
        io.read(tag(2), &mem, (1 << 20) - 4096, &range, 8192)
            .expect("read"),
        Queued::Ring
    );
    io.submit();
    let done = drain(&mut io);
    assert!(
        matches!(done[0].result, Err(IoError::Short { done: 4096, .. })),
        "{:?}",
        done[0].result
    );
    // Writes: at once where the filesystem takes RWF_NOWAIT writes, else through the ring.
    let queued = io.write(tag(3), &mem, 0, &range, 8192).expect("write");
    if queued == Queued::Ring {
        io.submit();
        assert!(drain(&mut io)[0].result.is_ok());
    }
    mem.read_slice(&mut got, GuestAddress(0x1000))
        .expect("guest");
    assert!(std::fs::read(&img.path).expect("image")[..8192] == got[..]);
}

/// Waits for every request, returning the completions in arrival order.
fn drain(io: &mut UringIo) -> Vec<Completion> {
    let mut out = Vec::new();
    io.reap(|c| out.push(c));
    while io.in_flight() > 0 {
        io.wait();
        io.reap(|c| out.push(c));
    }
    out
}

#[test]
fn many_reads_in_flight_complete_with_the_right_bytes() {
    if !available() {
        return;
    }
    let img = image("many", 1 << 20);
    let mem = mem(1 << 20);
    let mut io = ring_only(&img, 64);
    for i in 0..64u16 {
        let range = [GuestRange {
            addr: GuestAddress(u64::from(i) * 4096),
            len: 4096,
        }];
        let offset = (63 - u64::from(i)) * 4096 + 512;
        assert!(io.read(tag(i), &mem, offset, &range, 4096).expect("queue") == Queued::Ring);
    }
    assert_eq!(io.in_flight(), 64);
    io.submit();
    let done = drain(&mut io);
    assert_eq!(done.len(), 64);
    let mut heads: Vec<u16> = done.iter().map(|c| c.tag.head).collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..64).collect::<Vec<_>>());
    for c in &done {
        assert!(c.result.is_ok(), "{:?}", c.result);
        assert_eq!((c.kind, c.len), (Kind::Read, 4096));
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(u64::from(c.tag.head) * 4096))
            .expect("guest");
        assert_eq!(
            got,
            pattern((63 - u64::from(c.tag.head)) * 4096 + 512, 4096)
        );
    }
}

#[test]
fn writes_over_more_iovecs_than_one_sqe_takes_then_flush() {
    if !available() {
        return;
    }
    let img = image("iov", 1 << 20);
    let mem = mem(1 << 20);
    // 2000 one-byte-apart ranges of 16 bytes: more than UIO_MAXIOV iovecs in one request.
    let ranges: Vec<GuestRange> = (0..2000u64)
        .map(|i| GuestRange {
            addr: GuestAddress(i * 17),
            len: 16,
        })
        .collect();
    let mut expected = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let bytes = vec![(i % 200) as u8 + 1; 16];
        mem.write_slice(&bytes, r.addr).expect("guest");
        expected.extend_from_slice(&bytes);
    }
    let mut io = ring_only(&img, 8);
    assert!(io.write(tag(1), &mem, 4096, &ranges, 32000).expect("queue") == Queued::Ring);
    io.submit();
    let done = drain(&mut io);
    assert_eq!(done.len(), 1);
    assert!(done[0].result.is_ok(), "{:?}", done[0].result);
    io.flush(tag(2));
    io.submit();
    let done = drain(&mut io);
    assert_eq!((done[0].kind, done[0].tag.head), (Kind::Flush, 2));
    assert!(done[0].result.is_ok());
    let file = std::fs::read(&img.path).expect("read image");
    assert_eq!(&file[4096..4096 + 32000], &expected[..]);
}

#[test]
fn completion_eventfd_fires_and_errors_come_back() {
    if !available() {
        return;
    }
    let img = image("err", 8192);
    let mem = mem(1 << 16);
    let mut io = ring_only(&img, 8);
    // Past the end of the file: a short read.
    let range = [GuestRange {
        addr: GuestAddress(0),
        len: 8192,
    }];
    assert!(io.read(tag(3), &mem, 4096, &range, 8192).expect("queue") == Queued::Ring);
    io.submit();
    let done = drain(&mut io);
    assert!(
        matches!(done[0].result, Err(IoError::Short { done: 4096, .. })),
        "{:?}",
        done[0].result
    );
    // Guest memory outside the map fails before anything is queued.
    let bad = [GuestRange {
        addr: GuestAddress(1 << 20),
        len: 512,
    }];
    assert!(matches!(
        io.read(tag(4), &mem, 0, &bad, 512),
        Err(IoError::GuestMemory { .. })
    ));
    assert_eq!(io.in_flight(), 0);
    // The eventfd is readable once an async completion happened or not at all; either way
    // consume_event never blocks and reap finds the CQE.
    io.flush(tag(5));
    io.submit();
    io.consume_event();
    assert_eq!(drain(&mut io).len(), 1);
}

#[test]
fn dropping_the_engine_waits_for_requests_in_flight() {
    if !available() {
        return;
    }
    let img = image("drop", 1 << 20);
    let mem = mem(1 << 20);
    let mut io = ring_only(&img, 256);
    for i in 0..200u16 {
        let range = [GuestRange {
            addr: GuestAddress(u64::from(i) * 4096),
            len: 4096,
        }];
        assert!(
            io.write(tag(i), &mem, u64::from(i) * 4096, &range, 4096)
                .expect("queue")
                == Queued::Ring
        );
    }
    io.submit();
    drop(io);
}

/// Engine-level comparison: 4K random reads from a page-cached image into guest memory, one
/// worker thread. `cargo test -p splitvmm-blk --release --lib bench_engines -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn bench_engines() {
    if !available() {
        return;
    }
    const IMAGE: usize = 256 << 20;
    const OPS: u64 = 400_000;
    let img = image("bench", IMAGE);
    let mem = mem(32 * 4096);
    let blocks = (IMAGE / 4096) as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 4096
    };
    let range = |i: u64| {
        [GuestRange {
            addr: GuestAddress((i % 32) * 4096),
            len: 4096,
        }]
    };
    // Warm the page cache.
    let _ = std::fs::read(&img.path).expect("warm");

    let mut sync = SyncIo::new(img.disk.clone());
    let start = Instant::now();
    for i in 0..OPS {
        sync.read(&mem, next(), &range(i), 4096).expect("read");
    }
    let sync_iops = OPS as f64 / start.elapsed().as_secs_f64();

    let mut nowait = UringIo::new(img.disk.clone(), 8).expect("ring");
    let start = Instant::now();
    for i in 0..OPS {
        let queued = nowait
            .read(tag(0), &mem, next(), &range(i), 4096)
            .expect("read");
        assert_eq!(queued, Queued::Done);
    }
    let nowait_iops = OPS as f64 / start.elapsed().as_secs_f64();

    let mut results = Vec::new();
    for qd in [1u64, 32] {
        let mut io = ring_only(&img, 64);
        let start = Instant::now();
        let mut done = 0u64;
        let mut issued = 0u64;
        while done < OPS {
            while issued < OPS && (io.in_flight() as u64) < qd {
                assert_eq!(
                    io.read(tag(0), &mem, next(), &range(issued), 4096)
                        .expect("queue"),
                    Queued::Ring
                );
                issued += 1;
            }
            io.submit();
            let mut n = 0;
            io.reap(|c| {
                assert!(c.result.is_ok());
                n += 1;
            });
            if n == 0 {
                io.wait();
            }
            done += n;
        }
        results.push((qd, OPS as f64 / start.elapsed().as_secs_f64()));
    }
    eprintln!("4K random reads, page cache, one thread:");
    eprintln!("  sync  preadv        {:>9.0} IOPS", sync_iops);
    eprintln!("  uring RWF_NOWAIT    {:>9.0} IOPS", nowait_iops);
    for (qd, iops) in results {
        eprintln!("  uring QD{qd:<2}         {iops:>9.0} IOPS");
    }
}
