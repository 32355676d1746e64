//! The test frontend as a load generator against qemu-storage-daemon: a short smoke run that
//! checks the loop completes without errors (always runs), and a measurement that prints
//! 4K random-read IOPS and latency at QD1 and QD32 (ignored by default: figures are for
//! people, not assertions):
//!
//! ```text
//! cargo test --release -p splitvmm-tests --test vhost_frontend_load -- --ignored --nocapture
//! ```
//! `SPLITVMM_LOAD_SECS` sets the seconds per run (default 3), `SPLITVMM_LOAD_IMAGE_MIB` the
//! image size (default 1024), `SPLITVMM_LOAD_SPIN_US` the frontend's busy-poll (default 0).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use splitvmm_tests::vhost::blk::loadgen::{run_device, LoadReport, LoadSpec, Pattern};
use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, QueueOptions};
use splitvmm_tests::vhost::qsd::{Qsd, QsdOptions};

const MIB: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A qsd on an image of `size` bytes written with non-zero data (so reads come from the page
/// cache, not from holes).
fn qsd_on_filled_image(size: u64, queues: u16) -> Qsd {
    let d = Qsd::with_new_image(
        size,
        &QsdOptions {
            num_queues: queues,
            ..QsdOptions::default()
        },
    )
    .expect("starting qemu-storage-daemon");
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(d.image())
        .unwrap();
    let chunk = vec![0xa5u8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        img.write_all_at(&chunk, off).unwrap();
    }
    d
}

fn device(d: &Qsd, queues: u16, spin: Duration) -> BlkFrontend {
    let opts = BlkOptions {
        queue: QueueOptions {
            spin,
            ..QueueOptions::default()
        },
        ..BlkOptions::default().with_queues(queues)
    };
    BlkFrontend::connect(d.socket(), opts).expect("handshake with qsd")
}

fn line(label: &str, r: &LoadReport, backend_cpu: Duration) -> String {
    let per_op = |d: Duration| d.as_secs_f64() * 1e6 / r.ops.max(1) as f64;
    format!(
        "{label:<20} {:>8.0} IOPS {:>7.1} MB/s  p50 {:>6.1} µs  p99 {:>7.1} µs  \
         CPU/op: frontend {:>5.2} µs, qsd {:>5.2} µs  ({} ops, {} errors)",
        r.iops(),
        r.mb_per_s(),
        r.percentile(50.0).as_secs_f64() * 1e6,
        r.percentile(99.0).as_secs_f64() * 1e6,
        per_op(r.cpu),
        per_op(backend_cpu),
        r.ops,
        r.errors
    )
}

#[test]
fn load_loop_runs_clean_against_qsd() {
    let d = qsd_on_filled_image(16 * MIB, 2);
    let mut dev = device(&d, 2, Duration::ZERO);
    for (pattern, qd) in [
        (Pattern::RandRead, 8),
        (Pattern::RandWrite, 4),
        (Pattern::SeqRead, 2),
    ] {
        let spec = LoadSpec {
            pattern,
            queue_depth: qd,
            duration: Duration::from_millis(200),
            ..LoadSpec::default()
        };
        let reports = run_device(&mut dev, &spec).unwrap();
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert!(r.ops > 0, "{pattern:?}: no I/O completed");
            assert_eq!(r.errors, 0, "{pattern:?}: failed requests");
        }
        for q in dev.queues_mut() {
            assert_eq!(q.in_flight(), 0);
        }
    }
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture (release build)"]
fn measure_4k_randread_iops_against_qsd() {
    let secs = env_u64("SPLITVMM_LOAD_SECS", 3);
    let size = env_u64("SPLITVMM_LOAD_IMAGE_MIB", 1024) * MIB;
    let spin = Duration::from_micros(env_u64("SPLITVMM_LOAD_SPIN_US", 0));
    let d = qsd_on_filled_image(size, 1);
    let mut dev = device(&d, 1, spin);
    // Warm the page cache and qsd's coroutine pool.
    let warm = LoadSpec {
        pattern: Pattern::SeqRead,
        block_size: 128 * 1024,
        queue_depth: 8,
        duration: Duration::from_secs(1),
        ..LoadSpec::default()
    };
    run_device(&mut dev, &warm).unwrap();
    let mut out = vec![format!(
        "qemu-storage-daemon, {} MiB page-cached image, 1 queue, {secs} s per run, frontend spin {spin:?}",
        size / MIB
    )];
    for qd in [1u16, 32] {
        let spec = LoadSpec {
            pattern: Pattern::RandRead,
            queue_depth: qd,
            duration: Duration::from_secs(secs),
            ..LoadSpec::default()
        };
        let cpu0 = d.process_ref().cpu_time().unwrap_or_default();
        let r = LoadReport::merge(&run_device(&mut dev, &spec).unwrap());
        let cpu = d
            .process_ref()
            .cpu_time()
            .unwrap_or_default()
            .saturating_sub(cpu0);
        out.push(line(&format!("4K randread QD{qd}"), &r, cpu));
    }
    eprintln!("{}", out.join("\n"));
}

/// The frontend's own ceiling: the same load loop against an in-process fake device that
/// completes every chain at once (a thread polling the avail ring), so the figure is what the
/// load generator itself costs. Needs two idle cores to mean anything.
#[test]
#[ignore = "measurement: run with --ignored --nocapture (release build)"]
fn measure_the_frontend_ceiling_against_an_instant_fake_device() {
    use splitvmm_tests::vhost::blk::loadgen::run_queue;
    use splitvmm_tests::vhost::blk::BlkQueue;
    use splitvmm_tests::vhost::memory::FrontendMemory;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let secs = env_u64("SPLITVMM_LOAD_SECS", 3);
    let mem = FrontendMemory::new(16 * MIB).unwrap();
    let mut out =
        vec!["in-process instant fake device, 1 queue, frontend spinning 1 ms".to_owned()];
    for qd in [1u16, 32] {
        let mut q = BlkQueue::new(
            &mem,
            0,
            256,
            QueueOptions {
                spin: Duration::from_millis(1),
                ..QueueOptions::default()
            },
        )
        .unwrap();
        let layout = q.vring().layout();
        let call = q.vring().call_fd().try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let device = {
            let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (mut next_avail, mut used) = (0u16, 0u16);
                while !stop.load(Ordering::Relaxed) {
                    let avail = mem.load_u16(layout.avail + 2, Ordering::Acquire).unwrap();
                    if avail == next_avail {
                        std::hint::spin_loop();
                        continue;
                    }
                    while next_avail != avail {
                        let head = mem
                            .load_u16(layout.avail_ring(next_avail), Ordering::Relaxed)
                            .unwrap();
                        let mut i = head;
                        loop {
                            let mut d = [0u8; 16];
                            mem.read(layout.desc + u64::from(i) * 16, &mut d).unwrap();
                            let flags = u16::from_le_bytes([d[12], d[13]]);
                            if flags & 1 == 0 {
                                let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
                                mem.write(addr, &[0]).unwrap();
                                break;
                            }
                            i = u16::from_le_bytes([d[14], d[15]]);
                        }
                        let mut e = [0u8; 8];
                        e[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
                        mem.write(layout.used_ring(used), &e).unwrap();
                        used = used.wrapping_add(1);
                        next_avail = next_avail.wrapping_add(1);
                    }
                    mem.store_u16(layout.used + 2, used, Ordering::Release)
                        .unwrap();
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if mem.load_u16(layout.avail, Ordering::Relaxed).unwrap() & 1 == 0 {
                        call.write(1).unwrap();
                    }
                }
            })
        };
        let spec = LoadSpec {
            pattern: Pattern::RandRead,
            queue_depth: qd,
            duration: Duration::from_secs(secs),
            ..LoadSpec::default()
        };
        let r = run_queue(&mut q, &spec, 1 << 30).unwrap();
        stop.store(true, Ordering::Relaxed);
        device.join().unwrap();
        out.push(line(&format!("4K randread QD{qd}"), &r, Duration::ZERO));
    }
    eprintln!("{}", out.join("\n"));
}
