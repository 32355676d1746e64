//! A closed-loop load generator on top of [`BlkQueue`]: keeps `queue_depth` requests in flight
//! per queue for a duration, one thread per queue, and reports IOPS, bandwidth and latency
//! percentiles. The core of `splitvmm-bench blk`.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use crate::vhost::memory::{GuestBuf, MemoryError};
use crate::vhost::vring::Segment;

use super::device::BlkFrontend;
use super::queue::{BlkQueue, QueueError};
use super::request::{BlkHeader, BlkStatus, SECTOR_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("load spec: {0}")]
    Spec(String),
    #[error("load buffers: {0}")]
    Memory(#[from] MemoryError),
    #[error("load on queue: {0}")]
    Queue(#[from] QueueError),
    #[error("a load thread panicked")]
    ThreadPanicked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSpec {
    pub pattern: Pattern,
    pub block_size: u64,
    pub queue_depth: u16,
    pub duration: Duration,
    /// Bytes of the device the offsets fall in, from 0 (0: the whole device).
    pub span: u64,
    pub seed: u64,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: 1,
            duration: Duration::from_secs(1),
            span: 0,
            seed: 0x5eed,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub ops: u64,
    pub bytes: u64,
    /// Completions with a status other than OK.
    pub errors: u64,
    pub elapsed: Duration,
    /// CPU time (user + system) of the thread that drove the queue.
    pub cpu: Duration,
    /// Per-request latency in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
}

impl LoadReport {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile (0–100) latency.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies_ns.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (self.latencies_ns.len() - 1) as f64).round() as usize;
        Duration::from_nanos(self.latencies_ns[rank.min(self.latencies_ns.len() - 1)])
    }

    /// Several queues' reports as one (elapsed: the longest).
    pub fn merge(reports: &[LoadReport]) -> LoadReport {
        let mut all = LoadReport::default();
        for r in reports {
            all.ops += r.ops;
            all.bytes += r.bytes;
            all.errors += r.errors;
            all.elapsed = all.elapsed.max(r.elapsed);
            all.cpu += r.cpu;
            all.latencies_ns.extend_from_slice(&r.latencies_ns);
        }
        all.latencies_ns.sort_unstable();
        all
    }
}

/// xorshift64*: cheap and good enough to scatter offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Drives one queue with `spec` on a device of `capacity` bytes.
pub fn run_queue(
    q: &mut BlkQueue,
    spec: &LoadSpec,
    capacity: u64,
) -> Result<LoadReport, LoadError> {
    let span = if spec.span == 0 {
        capacity
    } else {
        spec.span.min(capacity)
    };
    if spec.block_size == 0 || spec.block_size & (SECTOR_SIZE - 1) != 0 {
        return Err(LoadError::Spec(format!(
            "block size {} is not a positive multiple of 512",
            spec.block_size
        )));
    }
    let blocks = span / spec.block_size;
    let qd = usize::from(spec.queue_depth);
    if blocks == 0 || qd == 0 {
        return Err(LoadError::Spec(format!(
            "nothing to do: {blocks} blocks of {} in the span, queue depth {qd}",
            spec.block_size
        )));
    }
    let mem = std::sync::Arc::clone(q.memory());
    let bufs = (0..qd)
        .map(|_| mem.alloc_owned(spec.block_size, 4096))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rng = Rng(spec.seed.wrapping_mul(2).wrapping_add(u64::from(q.index())) | 1);
    let mut seq = 0u64;
    let mut next_sector = |rng: &mut Rng| {
        let block = match spec.pattern {
            Pattern::RandRead | Pattern::RandWrite => rng.next() % blocks,
            Pattern::SeqRead | Pattern::SeqWrite => {
                seq += 1;
                (seq - 1) % blocks
            }
        };
        block * spec.block_size / SECTOR_SIZE
    };
    let request_type = if spec.pattern.is_write() {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let submit = |q: &mut BlkQueue, sector: u64, buf: GuestBuf, tag: u64| {
        let header = BlkHeader {
            request_type,
            ioprio: 0,
            sector,
        };
        let seg = Segment {
            gpa: buf.gpa,
            len: buf.len,
            device_writes: !spec.pattern.is_write(),
        };
        q.enqueue_parts(&header, &[seg], tag)
    };
    let mut report = LoadReport {
        latencies_ns: Vec::with_capacity(1 << 20),
        ..LoadReport::default()
    };
    let mut started = vec![Instant::now(); qd];
    let cpu_begin = thread_cpu_time();
    let begin = Instant::now();
    let end = begin + spec.duration;
    for (i, b) in bufs.iter().enumerate() {
        started[i] = Instant::now();
        submit(q, next_sector(&mut rng), b.buf(), i as u64)?;
    }
    q.commit()?;
    let mut done = Vec::with_capacity(qd);
    while q.in_flight() > 0 {
        done.clear();
        q.wait(1, &mut done)?;
        let now = Instant::now();
        let more = now < end;
        for c in &done {
            // Tags are the buffer indices given out above, all below `qd`.
            let i = c.tag as usize;
            report
                .latencies_ns
                .push(now.duration_since(started[i]).as_nanos() as u64);
            report.ops += 1;
            if c.status == BlkStatus::Ok {
                report.bytes += spec.block_size;
            } else {
                report.errors += 1;
            }
            if more {
                started[i] = now;
                submit(q, next_sector(&mut rng), bufs[i].buf(), c.tag)?;
            }
        }
        if more {
            q.commit()?;
        }
    }
    report.elapsed = begin.elapsed();
    report.cpu = thread_cpu_time().saturating_sub(cpu_begin);
    report.latencies_ns.sort_unstable();
    Ok(report)
}

/// User + system CPU time of the calling thread (zero if the kernel will not say).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Drives every queue of `dev` with `spec`, one thread per queue; one report per queue.
pub fn run_device(dev: &mut BlkFrontend, spec: &LoadSpec) -> Result<Vec<LoadReport>, LoadError> {
    let capacity = dev.capacity_bytes();
    std::thread::scope(|s| {
        let handles: Vec<_> = dev
            .queues_mut()
            .iter_mut()
            .map(|q| s.spawn(move || run_queue(q, spec, capacity)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| LoadError::ThreadPanicked)?)
            .collect()
    })
}
