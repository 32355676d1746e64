//! Checks that hold for every vhost-user-blk backend, shared by the tests that run them against
//! qemu-storage-daemon (proving the frontend) and against splitvmm-blk (proving the backend).
//! They panic with a message naming what differed, as test assertions do.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{BlkFrontend, BlkQueue, BlkStatus, SECTOR_SIZE};

/// Bytes that differ with every offset and with `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

/// One write/read-back case: sector, length, segments of the write, segments of the read.
pub type LayoutCase<'a> = (u64, usize, &'a [u64], &'a [u64]);

/// Writes each case's pattern split as its write segments, reads it back split as its read
/// segments, flushes, and checks the bytes landed at the right place in `image`.
pub fn check_layouts(q: &mut BlkQueue, image: &Path, cases: &[LayoutCase<'_>]) {
    for (i, &(sector, len, wsegs, rsegs)) in cases.iter().enumerate() {
        let data = pattern(len, i as u8 + 1);
        assert_eq!(
            q.write_segmented(sector, &data, wsegs).unwrap(),
            BlkStatus::Ok,
            "write at sector {sector}, {len} bytes in {wsegs:?}"
        );
        let (status, back) = q.read_segmented(sector, rsegs).unwrap();
        assert_eq!(status, BlkStatus::Ok, "read at sector {sector}");
        assert!(
            back == data,
            "read-back differs at sector {sector}, {len} bytes"
        );
    }
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    let img = std::fs::File::open(image).unwrap();
    for (i, &(sector, len, _, _)) in cases.iter().enumerate() {
        let mut on_disk = vec![0; len];
        img.read_exact_at(&mut on_disk, sector * SECTOR_SIZE)
            .unwrap();
        assert!(
            on_disk == pattern(len, i as u8 + 1),
            "image content at sector {sector}"
        );
    }
}

/// On a 2-queue device: writes through queue 0, stops (GET_VRING_BASE must report our avail
/// index), reconnects three times reading everything back through queue 1, and checks the rings
/// went on from where they were instead of restarting at 0. `backend_alive` is asked after each
/// reconnect.
pub fn check_reconnect_resumes_rings(
    dev: &mut BlkFrontend,
    mut backend_alive: impl FnMut() -> bool,
) {
    for i in 0..10u64 {
        assert_eq!(
            dev.queue(0).write(i * 8, &pattern(4096, i as u8)).unwrap(),
            BlkStatus::Ok
        );
    }
    let before = dev.queue(0).vring().next_avail();
    assert_eq!(
        dev.stop().unwrap(),
        vec![u32::from(before), 0],
        "GET_VRING_BASE"
    );
    for _ in 0..3 {
        dev.reconnect().unwrap();
        assert!(backend_alive(), "the backend died across a reconnect");
        for i in 0..10u64 {
            let (s, back) = dev.queue(1).read(i * 8, 4096).unwrap();
            assert_eq!(s, BlkStatus::Ok);
            assert!(back == pattern(4096, i as u8));
        }
        assert_eq!(dev.queue(0).flush().unwrap(), BlkStatus::Ok);
    }
    assert_eq!(dev.queue(0).vring().next_avail(), before + 3);
    assert_eq!(dev.queue(1).vring().next_avail(), 30);
}
