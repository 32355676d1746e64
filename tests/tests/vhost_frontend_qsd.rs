//! The guest-less vhost-user-blk test frontend (`splitvmm_tests::vhost`) proven against a
//! backend no one here wrote: qemu-storage-daemon's vhost-user-blk export on a temporary image.
//! Real processes and sockets; every wait has a deadline.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use splitvmm_tests::vhost::blk::conformance::{self, pattern};
use splitvmm_tests::vhost::blk::{
    BlkFrontend, BlkOptions, BlkRange, BlkRequest, BlkStatus, QueueOptions, SECTOR_SIZE,
};
use splitvmm_tests::vhost::connection::MemoryMessage;
use splitvmm_tests::vhost::qsd::{Qsd, QsdOptions};
use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const MIB: u64 = 1 << 20;

fn qsd(size: u64, queues: u16) -> Qsd {
    Qsd::with_new_image(
        size,
        &QsdOptions {
            num_queues: queues,
            ..QsdOptions::default()
        },
    )
    .expect("starting qemu-storage-daemon")
}

fn connect(qsd: &Qsd, opts: BlkOptions) -> BlkFrontend {
    BlkFrontend::connect(qsd.socket(), opts).expect("vhost-user-blk handshake with qsd")
}

#[test]
fn handshake_negotiates_and_reports_the_image_capacity() {
    let d = qsd(64 * MIB, 1);
    let dev = connect(&d, BlkOptions::default());
    let n = *dev.negotiated().unwrap();
    eprintln!(
        "qsd offers features {:#x}, acked {:#x}; protocol offered {:?}, acked {:?}; queues {:?}, mem slots {:?}; config {:?}",
        n.offered_features, n.acked_features, n.offered_protocol, n.acked_protocol,
        n.backend_queues, n.max_mem_slots, dev.config()
    );
    assert_eq!(dev.capacity_bytes(), 64 * MIB);
    assert_eq!(dev.config().capacity, 64 * MIB / SECTOR_SIZE);
    assert!(n.has_feature(VIRTIO_F_VERSION_1));
    assert!(n.has_feature(VIRTIO_BLK_F_FLUSH));
    assert!(n.has_protocol(VhostUserProtocolFeatures::CONFIG));
    assert!(n.has_protocol(VhostUserProtocolFeatures::REPLY_ACK));
    assert_eq!(dev.config().blk_size, 512);
    assert!(dev.config().seg_max >= 1);
}

#[test]
fn written_patterns_read_back_at_several_sizes_and_offsets() {
    let d = qsd(64 * MIB, 1);
    let mut dev = connect(&d, BlkOptions::default());
    let q = dev.queue(0);
    // (sector, length, segments of the write, segments of the read)
    let cases: &[(u64, usize, &[u64], &[u64])] = &[
        (0, 512, &[512], &[512]),
        (1, 4096, &[4096], &[512, 3584]),
        (77, 8192, &[1000, 7192], &[4096, 4096]),
        (4096, 65536, &[65536], &[512; 128]),
        (100_000, 131072, &[4096, 512, 61952, 64512], &[131072]),
        (64 * MIB / SECTOR_SIZE - 8, 4096, &[2048, 2048], &[1, 4095]),
    ];
    conformance::check_layouts(q, d.image(), cases);
}

#[test]
fn flush_returns_ok() {
    let d = qsd(16 * MIB, 1);
    let mut dev = connect(&d, BlkOptions::default());
    assert!(dev.has_feature(VIRTIO_BLK_F_FLUSH));
    let q = dev.queue(0);
    assert_eq!(q.write(0, &pattern(4096, 9)).unwrap(), BlkStatus::Ok);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
}

#[test]
fn reads_beyond_capacity_fail_with_ioerr() {
    let d = qsd(16 * MIB, 1);
    let mut dev = connect(&d, BlkOptions::default());
    let sectors = dev.config().capacity;
    let q = dev.queue(0);
    assert_eq!(
        q.read(sectors, 512).unwrap().0,
        BlkStatus::IoErr,
        "first sector past the end"
    );
    assert_eq!(
        q.read(sectors - 1, 1024).unwrap().0,
        BlkStatus::IoErr,
        "straddling the end"
    );
    assert_eq!(
        q.read(u64::MAX / SECTOR_SIZE, 512).unwrap().0,
        BlkStatus::IoErr,
        "far past"
    );
    assert_eq!(
        q.read(sectors - 1, 512).unwrap().0,
        BlkStatus::Ok,
        "last sector"
    );
}

#[test]
fn get_id_answers_qsds_fixed_serial() {
    let d = qsd(16 * MIB, 1);
    let mut dev = connect(&d, BlkOptions::default());
    let (status, id) = dev.queue(0).get_id().unwrap();
    eprintln!("GET_ID: {status:?} {:?}", String::from_utf8_lossy(&id));
    assert_eq!(status, BlkStatus::Ok);
    // qsd 7.2 answers every vhost-user-blk export's GET_ID with this fixed serial.
    let mut want = [0u8; 20];
    want[..14].copy_from_slice(b"vhost_user_blk");
    assert_eq!(id, want);
}

#[test]
fn discard_and_write_zeroes() {
    let d = qsd(16 * MIB, 1);
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
    assert_eq!(q.write_zeroes(&[zero]).unwrap(), BlkStatus::Ok);
    let unmap = BlkRange {
        sector: 2048 + 64,
        num_sectors: 8,
        flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    assert_eq!(q.write_zeroes(&[unmap]).unwrap(), BlkStatus::Ok);
    let (status, back) = q.read(2048, 65536).unwrap();
    assert_eq!(status, BlkStatus::Ok);
    let mut want = data.clone();
    want[8 * 512..24 * 512].fill(0);
    want[64 * 512..72 * 512].fill(0);
    assert!(back == want, "write-zeroes left the wrong bytes");
    let discard = BlkRange {
        sector: 4096,
        num_sectors: 128,
        flags: 0,
    };
    assert_eq!(q.discard(&[discard]).unwrap(), BlkStatus::Ok);
}

#[test]
fn two_queues_both_work() {
    let d = qsd(32 * MIB, 2);
    let mut dev = connect(&d, BlkOptions::default().with_queues(2));
    assert_eq!(dev.negotiated().unwrap().backend_queues, Some(2));
    assert_eq!(dev.config().num_queues, 2);
    // Cross-check: what one queue writes the other reads.
    let a = pattern(8192, 11);
    let b = pattern(8192, 22);
    assert_eq!(dev.queue(0).write(0, &a).unwrap(), BlkStatus::Ok);
    assert_eq!(dev.queue(1).write(16, &b).unwrap(), BlkStatus::Ok);
    assert!(dev.queue(1).read(0, 8192).unwrap().1 == a);
    assert!(dev.queue(0).read(16, 8192).unwrap().1 == b);
    // Both at once, from two threads, on disjoint ranges.
    std::thread::scope(|s| {
        for (i, q) in dev.queues_mut().iter_mut().enumerate() {
            s.spawn(move || {
                for round in 0..50u64 {
                    let sector = 8192 * (i as u64 + 1) + round * 8;
                    let data = pattern(4096, (round as u8) ^ (i as u8 * 100));
                    assert_eq!(q.write(sector, &data).unwrap(), BlkStatus::Ok);
                    assert!(
                        q.read(sector, 4096).unwrap().1 == data,
                        "queue {i} round {round}"
                    );
                }
            });
        }
    });
}

/// Block `b` of the image starts with its number, so any 4K read shows where it came from.
fn stamp(block: u64) -> Vec<u8> {
    let mut v = pattern(4096, block as u8);
    v[..8].copy_from_slice(&block.to_le_bytes());
    v
}

#[test]
fn qd32_batches_of_random_4k_reads_return_the_right_blocks() {
    const BLOCKS: u64 = 4096; // 16 MiB
    let d = qsd(BLOCKS * 4096, 1);
    {
        let img = std::fs::OpenOptions::new()
            .write(true)
            .open(d.image())
            .unwrap();
        let mut all = Vec::with_capacity((BLOCKS * 4096) as usize);
        for b in 0..BLOCKS {
            all.extend_from_slice(&stamp(b));
        }
        img.write_all_at(&all, 0).unwrap();
    }
    let mut dev = connect(&d, BlkOptions::default());
    let mem = dev.memory().clone();
    let q = dev.queue(0);
    let bufs: Vec<_> = (0..32)
        .map(|_| mem.alloc_owned(4096, 4096).unwrap())
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..50 {
        let mut want = Vec::new();
        for (i, b) in bufs.iter().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let block = x % BLOCKS;
            want.push(block);
            q.enqueue(&BlkRequest::read(block * 8, &[b.buf()]).with_tag(i as u64))
                .unwrap();
        }
        q.commit().unwrap();
        let mut done = Vec::new();
        q.wait(32, &mut done).unwrap();
        assert_eq!(done.len(), 32, "round {round}");
        for c in &done {
            assert_eq!(c.status, BlkStatus::Ok);
            let i = c.tag as usize;
            assert!(
                bufs[i].to_vec().unwrap() == stamp(want[i]),
                "round {round}: buffer {i} does not hold block {}",
                want[i]
            );
        }
    }
    assert_eq!(q.in_flight(), 0);
    eprintln!("queue stats: {:?}", q.vring().stats());
}

#[test]
fn twenty_connects_and_disconnects_leave_the_daemon_serving() {
    let mut d = qsd(16 * MIB, 1);
    for i in 0..20u8 {
        let mut dev = connect(&d, BlkOptions::default());
        let q = dev.queue(0);
        let data = pattern(4096, i);
        assert_eq!(q.write(u64::from(i) * 8, &data).unwrap(), BlkStatus::Ok);
        assert!(
            q.read(u64::from(i) * 8, 4096).unwrap().1 == data,
            "cycle {i}"
        );
        drop(dev);
        assert!(
            d.is_running(),
            "qsd died after disconnect {i}:\n{}",
            d.stderr()
        );
    }
    // Everything written through the 20 connections is still there.
    let mut dev = connect(&d, BlkOptions::default());
    for i in 0..20u8 {
        assert!(dev.queue(0).read(u64::from(i) * 8, 4096).unwrap().1 == pattern(4096, i));
    }
}

#[test]
fn reconnect_resumes_the_same_rings() {
    let mut d = qsd(16 * MIB, 2);
    let mut dev = connect(&d, BlkOptions::default().with_queues(2));
    conformance::check_reconnect_resumes_rings(&mut dev, || d.is_running());
}

#[test]
fn add_mem_reg_and_no_event_idx_variants_work() {
    let d = qsd(16 * MIB, 1);
    let offered = {
        let dev = connect(&d, BlkOptions::default());
        dev.negotiated().unwrap().offered_protocol.unwrap()
    };
    let mut variants = vec![(
        "no EVENT_IDX",
        BlkOptions::default().without_feature(VIRTIO_RING_F_EVENT_IDX),
    )];
    if offered.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
        variants.push((
            "ADD_MEM_REG",
            BlkOptions::default().with_memory_message(MemoryMessage::AddMemReg),
        ));
    }
    let mut always_kick = BlkOptions::default();
    always_kick.queue = QueueOptions {
        always_kick: true,
        spin: Duration::from_micros(50),
        ..QueueOptions::default()
    };
    variants.push(("always kick + spin", always_kick));
    for (name, opts) in variants {
        let event_idx_wanted = opts.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut dev = connect(&d, opts);
        assert_eq!(
            dev.has_feature(VIRTIO_RING_F_EVENT_IDX),
            event_idx_wanted
                && dev.negotiated().unwrap().offered_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            "{name}"
        );
        let q = dev.queue(0);
        for i in 0..40u64 {
            let data = pattern(4096, i as u8);
            assert_eq!(q.write(i * 8, &data).unwrap(), BlkStatus::Ok, "{name}");
            assert!(q.read(i * 8, 4096).unwrap().1 == data, "{name}: round {i}");
        }
    }
}

#[test]
fn a_read_only_export_offers_ro_and_fails_writes() {
    let d = Qsd::with_new_image(
        16 * MIB,
        &QsdOptions {
            writable: false,
            ..QsdOptions::default()
        },
    )
    .expect("starting qemu-storage-daemon");
    let mut dev = connect(&d, BlkOptions::default());
    assert!(dev.has_feature(VIRTIO_BLK_F_RO));
    let q = dev.queue(0);
    let status = q.write(0, &pattern(4096, 1)).unwrap();
    // qsd 7.2 fails the write with IOERR (not UNSUPP).
    assert_eq!(status, BlkStatus::IoErr);
    assert_eq!(q.read(0, 4096).unwrap(), (BlkStatus::Ok, vec![0; 4096]));
}
