//! Protocol tests of `splitvmm-blk` without a VM, part 1: the requests a well-behaved driver
//! makes. The real daemon on a temporary image, a real socket, memfd "guest" memory and
//! hand-built split vrings (`splitvmm_tests::vhost`); every wait has a deadline.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

use splitvmm_tests::vhost::blk::conformance::{self, pattern};
use splitvmm_tests::vhost::blk::{
    BlkFrontend, BlkHeader, BlkOptions, BlkRange, BlkRequest, BlkStatus, SECTOR_SIZE,
};
use splitvmm_tests::vhost::blk_daemon::{BlkDaemon, BlkDaemonOptions};
use splitvmm_tests::vhost::connection::MemoryMessage;
use splitvmm_tests::vhost::memory::FrontendMemory;
use splitvmm_tests::vhost::vring::{Link, RawDescriptor, Segment};
use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

const MIB: u64 = 1 << 20;

fn daemon(size: u64, opts: BlkDaemonOptions) -> BlkDaemon {
    BlkDaemon::with_new_image(size, &opts).unwrap_or_else(|e| panic!("starting splitvmm-blk: {e}"))
}

fn connect(d: &BlkDaemon, opts: BlkOptions) -> BlkFrontend {
    BlkFrontend::connect(d.socket(), opts).expect("vhost-user-blk handshake with splitvmm-blk")
}

#[test]
fn handshake_offers_the_features_and_reports_capacity_and_queues() {
    let d = daemon(
        64 * MIB,
        BlkDaemonOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    let dev = connect(&d, BlkOptions::default().with_queues(2));
    let n = *dev.negotiated().unwrap();
    eprintln!(
        "offered {:#x}, acked {:#x}, protocol {:?}, queues {:?}, slots {:?}, config {:?}",
        n.offered_features,
        n.acked_features,
        n.offered_protocol,
        n.backend_queues,
        n.max_mem_slots,
        dev.config()
    );
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ] {
        assert!(n.has_feature(bit), "feature bit {bit} not negotiated");
    }
    assert_eq!(n.offered_features & (1 << VIRTIO_BLK_F_RO), 0, "RO offered");
    for p in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(n.has_protocol(p), "protocol feature {p:?} not negotiated");
    }
    assert_eq!(n.backend_queues, Some(2));
    let c = dev.config();
    assert_eq!(c.capacity, 64 * MIB / SECTOR_SIZE);
    assert_eq!(c.blk_size, 512);
    assert_eq!(c.num_queues, 2);
    assert!(c.seg_max >= 1);
    assert!(c.max_discard_seg >= 1 && c.max_write_zeroes_seg >= 1);
}

#[test]
fn written_data_reads_back_at_several_sizes_offsets_and_segmentations() {
    let d = daemon(64 * MIB, BlkDaemonOptions::default());
    let mut dev = connect(&d, BlkOptions::default());
    let q = dev.queue(0);
    // (sector, length, segments of the write, segments of the read)
    let cases: &[(u64, usize, &[u64], &[u64])] = &[
        (0, 512, &[512], &[512]),
        (1, 4096, &[4096], &[512, 3584]),
        (77, 8192, &[1000, 7192], &[4096, 4096]),
        (4096, 65536, &[65536], &[512; 128]),
        (100_000, 131072, &[4096, 512, 61952, 64512], &[131072]),
        (5000, 12288, &[1, 4095, 1, 8191], &[3, 5, 12280]),
        (64 * MIB / SECTOR_SIZE - 8, 4096, &[2048, 2048], &[1, 4095]),
    ];
    conformance::check_layouts(q, d.image(), cases);
    // And what the image holds the daemon reads (written behind its back).
    let outside = pattern(8192, 99);
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(d.image())
        .unwrap();
    img.write_all_at(&outside, 50_000 * SECTOR_SIZE).unwrap();
    let (status, back) = q.read(50_000, 8192).unwrap();
    assert_eq!(status, BlkStatus::Ok);
    assert!(
        back == outside,
        "data written to the image behind the daemon's back"
    );
}

#[test]
fn used_lengths_count_the_bytes_the_device_wrote() {
    let d = daemon(16 * MIB, BlkDaemonOptions::default());
    let mut dev = connect(&d, BlkOptions::default());
    let mem = dev.memory().clone();
    let q = dev.queue(0);
    let buf = mem.alloc_owned(8192, 4096).unwrap();
    let read = q.run(&BlkRequest::read(0, &[buf.buf()])).unwrap();
    assert_eq!((read.status, read.used_len), (BlkStatus::Ok, 8193));
    let write = q.run(&BlkRequest::write(0, &[buf.buf()])).unwrap();
    assert_eq!((write.status, write.used_len), (BlkStatus::Ok, 1));
    let flush = q.run(&BlkRequest::flush()).unwrap();
    assert_eq!((flush.status, flush.used_len), (BlkStatus::Ok, 1));
}

/// VERSION_1 implies ANY_LAYOUT: the header may share a descriptor with the data, and the data
/// with the status byte.
#[test]
fn any_layout_header_with_data_and_data_with_status() {
    let d = daemon(16 * MIB, BlkDaemonOptions::default());
    let mut dev = connect(&d, BlkOptions::default());
    let mem = dev.memory().clone();
    let q = dev.queue(0);
    let data = pattern(4096, 42);
    // Write: one readable descriptor with header + data, then the status slot.
    let hd = mem.alloc_owned(16 + 4096, 4096).unwrap();
    let header = BlkHeader {
        request_type: VIRTIO_BLK_T_OUT,
        ioprio: 0,
        sector: 24,
    };
    hd.write(0, &header.encode()).unwrap();
    hd.write(16, &data).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    q.enqueue_raw(None, 1, |s| {
        vec![
            RawDescriptor {
                addr: hd.gpa(),
                len: 16 + 4096,
                flags: next,
                next: Link::Pos(1),
            },
            RawDescriptor {
                addr: s.status.gpa,
                len: 1,
                flags: write,
                next: Link::Index(0),
            },
        ]
    })
    .unwrap();
    q.commit().unwrap();
    let mut done = Vec::new();
    q.wait(1, &mut done).unwrap();
    assert_eq!(done[0].status, BlkStatus::Ok, "header+data write");
    // Read: the header slot, then one writable descriptor with data + status.
    let ds = mem.alloc_owned(4096 + 1, 4096).unwrap();
    ds.write(4096, &[0xff]).unwrap();
    let header = BlkHeader {
        request_type: VIRTIO_BLK_T_IN,
        ioprio: 0,
        sector: 24,
    };
    q.enqueue_raw(Some(&header), 2, |s| {
        vec![
            RawDescriptor {
                addr: s.header.gpa,
                len: 16,
                flags: next,
                next: Link::Pos(1),
            },
            RawDescriptor {
                addr: ds.gpa(),
                len: 4096 + 1,
                flags: write,
                next: Link::Index(0),
            },
        ]
    })
    .unwrap();
    q.commit().unwrap();
    done.clear();
    q.wait(1, &mut done).unwrap();
    assert_eq!(done[0].used_len, 4097);
    let back = ds.to_vec().unwrap();
    assert_eq!(
        back[4096], 0,
        "status byte at the end of the data descriptor"
    );
    assert!(
        back[..4096] == data[..],
        "data read with the status in the same descriptor"
    );
}

#[test]
fn flush_returns_ok() {
    let d = daemon(16 * MIB, BlkDaemonOptions::default());
    let mut dev = connect(&d, BlkOptions::default());
    let q = dev.queue(0);
    assert_eq!(q.write(0, &pattern(4096, 9)).unwrap(), BlkStatus::Ok);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
}

#[test]
fn get_id_answers_the_serial() {
    let serial = "splitvmm-disk-0042";
    let d = daemon(
        16 * MIB,
        BlkDaemonOptions {
            serial: Some(serial.into()),
            ..Default::default()
        },
    );
    let mut dev = connect(&d, BlkOptions::default());
    let mem = dev.memory().clone();
    let q = dev.queue(0);
    let (status, id) = q.get_id().unwrap();
    assert_eq!(status, BlkStatus::Ok);
    let mut want = [0u8; 20];
    want[..serial.len()].copy_from_slice(serial.as_bytes());
    assert_eq!(id, want, "GET_ID: {:?}", String::from_utf8_lossy(&id));
    // The id split over two descriptors, and a buffer shorter than 20 bytes (truncated).
    let buf = mem.alloc_owned(20, 64).unwrap();
    mem.fill(buf.gpa(), 20, 0xee).unwrap();
    let two = BlkRequest::new(
        VIRTIO_BLK_T_GET_ID,
        0,
        vec![
            Segment::writable(buf.buf().slice(0, 7)),
            Segment::writable(buf.buf().slice(7, 13)),
        ],
    );
    let c = q.run(&two).unwrap();
    assert_eq!((c.status, c.used_len), (BlkStatus::Ok, 21));
    assert_eq!(buf.to_vec().unwrap(), want);
    mem.fill(buf.gpa(), 20, 0xee).unwrap();
    let short = BlkRequest::new(
        VIRTIO_BLK_T_GET_ID,
        0,
        vec![Segment::writable(buf.buf().slice(0, 8))],
    );
    let c = q.run(&short).unwrap();
    assert_eq!((c.status, c.used_len), (BlkStatus::Ok, 9));
    let back = buf.to_vec().unwrap();
    assert_eq!(&back[..8], &serial.as_bytes()[..8]);
    assert_eq!(&back[8..], &[0xee; 12], "wrote past the id buffer");

    // Without --serial the id is all zeros; a 20-byte serial fills it with no NUL.
    drop(dev);
    for (serial, want) in [
        (None, [0u8; 20]),
        (Some("ABCDEFGHIJKLMNOPQRST"), *b"ABCDEFGHIJKLMNOPQRST"),
    ] {
        let d = daemon(
            MIB,
            BlkDaemonOptions {
                serial: serial.map(str::to_owned),
                ..Default::default()
            },
        );
        let mut dev = connect(&d, BlkOptions::default());
        assert_eq!(
            dev.queue(0).get_id().unwrap(),
            (BlkStatus::Ok, want),
            "{serial:?}"
        );
    }
}

#[test]
fn discard_and_write_zeroes() {
    let d = daemon(16 * MIB, BlkDaemonOptions::default());
    let mut dev = connect(&d, BlkOptions::default());
    assert!(dev.has_feature(VIRTIO_BLK_F_DISCARD));
    assert!(dev.has_feature(VIRTIO_BLK_F_WRITE_ZEROES));
    let q = dev.queue(0);
    let data = pattern(65536, 3);
    assert_eq!(q.write(2048, &data).unwrap(), BlkStatus::Ok);
    let zero = BlkRange {
        sector: 2048 + 8,
        num_sectors: 16,
        flags: 0,
    };
    let unmap = BlkRange {
        sector: 2048 + 64,
        num_sectors: 8,
        flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    // Two ranges in one request.
    assert_eq!(q.write_zeroes(&[zero, unmap]).unwrap(), BlkStatus::Ok);
    let odd = BlkRange {
        sector: 2048 + 101,
        num_sectors: 3,
        flags: 0,
    };
    assert_eq!(q.write_zeroes(&[odd]).unwrap(), BlkStatus::Ok);
    let (status, back) = q.read(2048, 65536).unwrap();
    assert_eq!(status, BlkStatus::Ok);
    let mut want = data.clone();
    want[8 * 512..24 * 512].fill(0);
    want[64 * 512..72 * 512].fill(0);
    want[101 * 512..104 * 512].fill(0);
    assert!(back == want, "write-zeroes left the wrong bytes");

    // Discard deallocates: the image's blocks go down, and the range reads as zeros.
    let image = d.image().to_owned();
    let blocks = || std::fs::metadata(&image).unwrap().blocks();
    assert_eq!(
        q.write(8192, &pattern(MIB as usize, 5)).unwrap(),
        BlkStatus::Ok
    );
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    let before = blocks();
    let discard = BlkRange {
        sector: 8192,
        num_sectors: (MIB / SECTOR_SIZE) as u32,
        flags: 0,
    };
    let second = BlkRange {
        sector: 4096,
        num_sectors: 8,
        flags: 0,
    };
    assert_eq!(q.discard(&[discard, second]).unwrap(), BlkStatus::Ok);
    let after = blocks();
    assert!(
        after + MIB / 512 / 2 <= before,
        "discarding 1 MiB freed too little: {before} -> {after} blocks"
    );
    let (status, back) = q.read(8192, MIB).unwrap();
    assert_eq!(status, BlkStatus::Ok);
    assert!(
        back.iter().all(|&b| b == 0),
        "a discarded range reads non-zero"
    );
    // Data next to the discarded range is untouched.
    assert!(q.read(2048, 65536).unwrap().1 == want);
}

#[test]
fn two_queues_serve_at_once() {
    let d = daemon(
        32 * MIB,
        BlkDaemonOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    let mut dev = connect(&d, BlkOptions::default().with_queues(2));
    assert_eq!(dev.config().num_queues, 2);
    // What one queue writes the other reads.
    let a = pattern(8192, 11);
    let b = pattern(8192, 22);
    assert_eq!(dev.queue(0).write(0, &a).unwrap(), BlkStatus::Ok);
    assert_eq!(dev.queue(1).write(16, &b).unwrap(), BlkStatus::Ok);
    assert!(dev.queue(1).read(0, 8192).unwrap().1 == a);
    assert!(dev.queue(0).read(16, 8192).unwrap().1 == b);
    // Both at once, from two threads, batches of 16 on disjoint ranges.
    let mem = dev.memory().clone();
    std::thread::scope(|s| {
        for (i, q) in dev.queues_mut().iter_mut().enumerate() {
            let mem = Arc::clone(&mem);
            s.spawn(move || {
                let bufs: Vec<_> = (0..16)
                    .map(|_| mem.alloc_owned(4096, 4096).unwrap())
                    .collect();
                for round in 0..20u64 {
                    let base = 8192 * (i as u64 + 1) + round * 16 * 8;
                    for (k, b) in bufs.iter().enumerate() {
                        b.write(
                            0,
                            &pattern(4096, (round as u8) ^ (k as u8) ^ (i as u8 * 100)),
                        )
                        .unwrap();
                        q.enqueue(&BlkRequest::write(base + k as u64 * 8, &[b.buf()]))
                            .unwrap();
                    }
                    q.commit().unwrap();
                    let mut done = Vec::new();
                    q.wait(16, &mut done).unwrap();
                    assert!(done.iter().all(|c| c.status == BlkStatus::Ok));
                    for k in 0..16u64 {
                        let want = pattern(4096, (round as u8) ^ (k as u8) ^ (i as u8 * 100));
                        assert!(
                            q.read(base + k * 8, 4096).unwrap().1 == want,
                            "queue {i} round {round} block {k}"
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn read_only_offers_ro_fails_writes_and_serves_reads() {
    let dir = splitvmm_tests::vhost::process::TempDir::new("blk-ro").unwrap();
    let image = dir.path().join("ro.img");
    let content = pattern(4 * MIB as usize, 77);
    std::fs::write(&image, &content).unwrap();
    let d = BlkDaemon::start(
        &image,
        &BlkDaemonOptions {
            readonly: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("starting splitvmm-blk: {e}"));
    let mut dev = connect(&d, BlkOptions::default());
    assert!(dev.has_feature(VIRTIO_BLK_F_RO));
    let offered = dev.negotiated().unwrap().offered_features;
    assert_eq!(
        offered & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0,
        "discard / write-zeroes offered on a read-only disk"
    );
    let q = dev.queue(0);
    assert_eq!(q.write(0, &pattern(4096, 1)).unwrap(), BlkStatus::IoErr);
    assert_eq!(q.write(100, &pattern(512, 1)).unwrap(), BlkStatus::IoErr);
    let range = BlkRange {
        sector: 0,
        num_sectors: 8,
        flags: 0,
    };
    assert_eq!(q.discard(&[range]).unwrap(), BlkStatus::Unsupp);
    assert_eq!(q.write_zeroes(&[range]).unwrap(), BlkStatus::Unsupp);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    assert_eq!(q.get_id().unwrap().0, BlkStatus::Ok);
    let (status, back) = q.read(0, 4 * MIB).unwrap();
    assert_eq!(status, BlkStatus::Ok);
    assert!(back == content, "read-only disk reads back wrong");
    assert!(std::fs::read(&image).unwrap() == content, "image changed");
    drop(dev);
    drop(d);
}

#[test]
fn other_memory_layouts_and_notification_modes_work() {
    let d = daemon(16 * MIB, BlkDaemonOptions::default());
    let variants = [
        (
            "no EVENT_IDX",
            BlkOptions::default().without_feature(VIRTIO_RING_F_EVENT_IDX),
            None,
        ),
        (
            "ADD_MEM_REG",
            BlkOptions::default().with_memory_message(MemoryMessage::AddMemReg),
            None,
        ),
        ("guest memory at 0", BlkOptions::default(), Some(0u64)),
        (
            "guest memory above 4 GiB",
            BlkOptions::default(),
            Some(5u64 << 30),
        ),
    ];
    for (name, opts, base) in variants {
        let mut dev = match base {
            None => connect(&d, opts),
            Some(base) => BlkFrontend::connect_with_memory(
                d.socket(),
                opts,
                FrontendMemory::with_base(base, 16 * MIB).unwrap(),
            )
            .unwrap(),
        };
        let q = dev.queue(0);
        for i in 0..20u64 {
            let data = pattern(4096, i as u8 ^ 0x33);
            assert_eq!(q.write(i * 8, &data).unwrap(), BlkStatus::Ok, "{name}");
            assert!(q.read(i * 8, 4096).unwrap().1 == data, "{name}: round {i}");
        }
    }
}
