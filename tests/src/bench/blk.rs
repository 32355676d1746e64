//! `splitvmm-bench blk`: the guest-less load generator ([`crate::vhost::blk::loadgen`]) pointed
//! at any vhost-user-blk backend's socket, with the backend's CPU time from `/proc/PID/stat`.
//! `splitvmm-bench pread`: the host's own single-thread 4K `pread` rate on a file (the ceiling
//! `scripts/bench-blk` compares against). `scripts/bench-blk` starts the backends and runs both.
//!
//! ```text
//! splitvmm-bench blk --socket PATH [--queues N] [--qd N] [--pattern P] [--bs SIZE]
//!                    [--seconds S] [--warmup S] [--spin-us N] [--no-flush]
//!                    [--backend-pid PID] [--idle] [--kv | --json]
//! splitvmm-bench pread --file PATH [--bs SIZE] [--seconds S] [--kv | --json]
//! ```
//!
//! Latency is per request, from the moment it is made available to the moment the frontend sees
//! it used (the load loop's clock), so at QD>1 it includes time queued behind other requests.
//! Backend CPU is the whole process's user + system time over the measured interval (all its
//! threads), per completed request and as a share of one core.

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

use super::BenchError;
use crate::vhost::blk::loadgen::{run_device, thread_cpu_time, LoadReport, LoadSpec, Pattern};
use crate::vhost::blk::{BlkFrontend, BlkOptions, QueueOptions};

pub const USAGE: &str = "\
usage: splitvmm-bench blk --socket PATH [options]     drive a vhost-user-blk backend
       splitvmm-bench pread --file PATH [options]     the host's own pread rate on a file

blk options:
  --socket PATH        the backend's vhost-user socket (required)
  --queues N           queues to drive, one thread each (default 1)
  --qd N               requests in flight per queue (default 1)
  --pattern P          randread | randwrite | seqread | seqwrite (default randread)
  --bs SIZE            request size: bytes, or with K/M (default 4K)
  --seconds S          measured seconds (default 3; fractions allowed)
  --warmup S           unmeasured seconds of the same load first (default 0.5)
  --spin-us N          frontend busy-polls the used ring N µs before sleeping (default 0)
  --no-flush           do not ack VIRTIO_BLK_F_FLUSH (writes then are write-through)
  --always-kick        kick after every batch, whatever EVENT_IDX / NO_NOTIFY says
  --backend-pid PID    report this process's CPU time (from /proc/PID/stat)
  --idle               no load: after a short burst, sample the backend's CPU for --seconds
                       with the frontend connected and idle (needs --backend-pid; from
                       /proc/PID/task/*/schedstat, ns, where the kernel keeps it)
  --kv                 key=value lines instead of the human line
  --json               one JSON object instead of the human line

pread options:
  --file PATH          the file (required); read it once first to have it page-cached
  --bs SIZE            request size (default 4K)
  --seconds S          measured seconds (default 3)
  --kv | --json        as above

Exit status: 0 done, 1 the run failed or a request completed with an error, 2 usage.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Kv,
    Json,
}

/// `splitvmm-bench blk`'s validated command line.
#[derive(Debug, Clone, PartialEq)]
pub struct BlkArgs {
    pub socket: PathBuf,
    pub queues: u16,
    pub qd: u16,
    pub pattern: Pattern,
    pub bs: u64,
    pub seconds: f64,
    pub warmup: f64,
    pub spin_us: u64,
    pub flush: bool,
    pub always_kick: bool,
    pub backend_pid: Option<u32>,
    pub idle: bool,
    pub format: Format,
}

/// `splitvmm-bench pread`'s validated command line.
#[derive(Debug, Clone, PartialEq)]
pub struct PreadArgs {
    pub file: PathBuf,
    pub bs: u64,
    pub seconds: f64,
    pub format: Format,
}

fn usage(msg: impl std::fmt::Display) -> BenchError {
    BenchError::Usage(format!("splitvmm-bench: {msg}\n{USAGE}"))
}

/// `4096`, `4K`, `4k`, `128K`, `1M`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn parse_pattern(s: &str) -> Option<Pattern> {
    Some(match s {
        "randread" => Pattern::RandRead,
        "randwrite" => Pattern::RandWrite,
        "seqread" => Pattern::SeqRead,
        "seqwrite" => Pattern::SeqWrite,
        _ => return None,
    })
}

pub fn pattern_name(p: Pattern) -> &'static str {
    match p {
        Pattern::RandRead => "randread",
        Pattern::RandWrite => "randwrite",
        Pattern::SeqRead => "seqread",
        Pattern::SeqWrite => "seqwrite",
    }
}

fn parse_seconds(opt: &str, v: &str, min: f64) -> Result<f64, BenchError> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= min && s <= 3600.0 => Ok(s),
        _ => Err(usage(format!(
            "{opt} '{v}' is not a number of seconds from {min} to 3600"
        ))),
    }
}

fn parse_bs(v: &str) -> Result<u64, BenchError> {
    match parse_size(v) {
        Some(b) if b > 0 && b % 512 == 0 && b <= 16 << 20 => Ok(b),
        _ => Err(usage(format!(
            "--bs '{v}' is not a multiple of 512 bytes up to 16M (e.g. 4K, 128K)"
        ))),
    }
}

/// Walks `--opt value` pairs and bare flags; `f` gets (option, value or None for flags).
/// `Ok(false)`: `--help` was asked for.
fn walk(
    args: &[String],
    flags: &[&str],
    mut f: impl FnMut(&str, Option<&str>) -> Result<(), BenchError>,
) -> Result<bool, BenchError> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Ok(false);
        }
        // `--opt=value` too.
        if let Some((opt, v)) = a.split_once('=').filter(|(o, _)| o.starts_with("--")) {
            if flags.contains(&opt) {
                return Err(usage(format!("{opt} takes no value")));
            }
            f(opt, Some(v))?;
        } else if flags.contains(&a.as_str()) {
            f(a, None)?;
        } else if a.starts_with("--") {
            let v = it
                .next()
                .ok_or_else(|| usage(format!("{a} needs a value")))?;
            f(a, Some(v))?;
        } else {
            return Err(usage(format!("unexpected argument '{a}'")));
        }
    }
    Ok(true)
}

fn set_format(format: &mut Format, new: Format) -> Result<(), BenchError> {
    if *format != Format::Text && *format != new {
        return Err(usage("--kv and --json exclude each other"));
    }
    *format = new;
    Ok(())
}

impl BlkArgs {
    /// `Ok(None)`: `--help` (print [`USAGE`]).
    pub fn parse(args: &[String]) -> Result<Option<Self>, BenchError> {
        let mut a = BlkArgs {
            socket: PathBuf::new(),
            queues: 1,
            qd: 1,
            pattern: Pattern::RandRead,
            bs: 4096,
            seconds: 3.0,
            warmup: 0.5,
            spin_us: 0,
            flush: true,
            always_kick: false,
            backend_pid: None,
            idle: false,
            format: Format::Text,
        };
        let mut socket = None;
        let go = walk(
            args,
            &["--no-flush", "--always-kick", "--idle", "--kv", "--json"],
            |opt, v| {
                let v = v.unwrap_or_default();
                match opt {
                    "--socket" | "--socket-path" => socket = Some(PathBuf::from(v)),
                    "--queues" => {
                        a.queues = v
                            .parse()
                            .ok()
                            .filter(|q| (1..=64).contains(q))
                            .ok_or_else(|| usage(format!("--queues '{v}' is not from 1 to 64")))?
                    }
                    "--qd" => {
                        a.qd = v
                            .parse()
                            .ok()
                            .filter(|q| (1..=256).contains(q))
                            .ok_or_else(|| usage(format!("--qd '{v}' is not from 1 to 256")))?
                    }
                    "--pattern" => {
                        a.pattern = parse_pattern(v).ok_or_else(|| {
                            usage(format!(
                                "--pattern '{v}' is not randread, randwrite, seqread or seqwrite"
                            ))
                        })?
                    }
                    "--bs" => a.bs = parse_bs(v)?,
                    "--seconds" => a.seconds = parse_seconds(opt, v, 0.01)?,
                    "--warmup" => a.warmup = parse_seconds(opt, v, 0.0)?,
                    "--spin-us" => {
                        a.spin_us = v.parse().ok().filter(|s| *s <= 1_000_000).ok_or_else(|| {
                            usage(format!("--spin-us '{v}' is not from 0 to 1000000"))
                        })?
                    }
                    "--backend-pid" => {
                        let pid: u32 =
                            v.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                                usage(format!("--backend-pid '{v}' is not a pid"))
                            })?;
                        if proc_cpu_time(pid).is_none() {
                            return Err(usage(format!(
                                "--backend-pid {pid}: no such process (cannot read /proc/{pid}/stat)"
                            )));
                        }
                        a.backend_pid = Some(pid);
                    }
                    "--no-flush" => a.flush = false,
                    "--always-kick" => a.always_kick = true,
                    "--idle" => a.idle = true,
                    "--kv" => set_format(&mut a.format, Format::Kv)?,
                    "--json" => set_format(&mut a.format, Format::Json)?,
                    _ => return Err(usage(format!("unknown option '{opt}'"))),
                }
                Ok(())
            },
        )?;
        if !go {
            return Ok(None);
        }
        a.socket = socket.ok_or_else(|| usage("--socket PATH is required"))?;
        if a.idle && a.backend_pid.is_none() {
            return Err(usage("--idle needs --backend-pid"));
        }
        Ok(Some(a))
    }
}

impl PreadArgs {
    /// `Ok(None)`: `--help` (print [`USAGE`]).
    pub fn parse(args: &[String]) -> Result<Option<Self>, BenchError> {
        let mut a = PreadArgs {
            file: PathBuf::new(),
            bs: 4096,
            seconds: 3.0,
            format: Format::Text,
        };
        let mut file = None;
        let go = walk(args, &["--kv", "--json"], |opt, v| {
            let v = v.unwrap_or_default();
            match opt {
                "--file" => file = Some(PathBuf::from(v)),
                "--bs" => a.bs = parse_bs(v)?,
                "--seconds" => a.seconds = parse_seconds(opt, v, 0.01)?,
                "--kv" => set_format(&mut a.format, Format::Kv)?,
                "--json" => set_format(&mut a.format, Format::Json)?,
                _ => return Err(usage(format!("unknown option '{opt}'"))),
            }
            Ok(())
        })?;
        if !go {
            return Ok(None);
        }
        a.file = file.ok_or_else(|| usage("--file PATH is required"))?;
        Ok(Some(a))
    }
}

/// User + system CPU time of process `pid` so far, all threads (from `/proc/PID/stat`).
pub fn proc_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name (which may hold spaces and parentheses): utime and
    // stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(Duration::from_nanos((utime + stime) * 1_000_000_000 / hz))
}

/// Time on a CPU of every live thread of process `pid`, in nanoseconds (the first field of
/// `/proc/PID/task/TID/schedstat`): finer than `/proc/PID/stat`'s clock ticks, for idle CPU.
pub fn proc_sched_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        // A thread that ended between the listing and the read counts as nothing.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// One result as ordered (key, value) pairs, printed as text, key=value lines or JSON.
#[derive(Debug, Default, Clone)]
pub struct Record {
    fields: Vec<(&'static str, Value)>,
}

#[derive(Debug, Clone)]
enum Value {
    Str(String),
    Int(u64),
    Float(f64, usize),
    Bool(bool),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x, prec) => write!(f, "{x:.prec$}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Record {
    fn s(&mut self, k: &'static str, v: impl Into<String>) -> &mut Self {
        self.fields.push((k, Value::Str(v.into())));
        self
    }
    fn i(&mut self, k: &'static str, v: u64) -> &mut Self {
        self.fields.push((k, Value::Int(v)));
        self
    }
    fn f(&mut self, k: &'static str, v: f64, prec: usize) -> &mut Self {
        self.fields.push((k, Value::Float(v, prec)));
        self
    }
    fn b(&mut self, k: &'static str, v: bool) -> &mut Self {
        self.fields.push((k, Value::Bool(v)));
        self
    }

    pub fn get(&self, k: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
    }

    pub fn kv(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.fields {
            let _ = writeln!(out, "{k}={v}");
        }
        out.pop();
        out
    }

    pub fn json(&self) -> String {
        let body: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| match v {
                Value::Str(s) => format!("\"{k}\":{}", json_str(s)),
                Value::Float(x, _) if !x.is_finite() => format!("\"{k}\":null"),
                _ => format!("\"{k}\":{v}"),
            })
            .collect();
        format!("{{{}}}", body.join(","))
    }

    pub fn render(&self, format: Format, text: impl FnOnce(&Record) -> String) -> String {
        match format {
            Format::Text => text(self),
            Format::Kv => self.kv(),
            Format::Json => self.json(),
        }
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn run_error(what: impl std::fmt::Display) -> BenchError {
    BenchError::RunsFailed(format!("splitvmm-bench: {what}"))
}

/// Runs `splitvmm-bench blk`; the record to print, and whether every request succeeded.
pub fn run_blk(a: &BlkArgs) -> Result<(Record, bool), BenchError> {
    let mut opts = BlkOptions {
        queue: QueueOptions {
            spin: Duration::from_micros(a.spin_us),
            always_kick: a.always_kick,
            ..QueueOptions::default()
        },
        ..BlkOptions::default().with_queues(a.queues)
    };
    if !a.flush {
        opts = opts.without_feature(VIRTIO_BLK_F_FLUSH);
    }
    let buffers = u64::from(a.queues) * u64::from(a.qd) * a.bs;
    opts.memory_size = opts.memory_size.max(buffers + (32 << 20));
    let mut dev = BlkFrontend::connect(&a.socket, opts).map_err(run_error)?;
    let flush = dev.has_feature(VIRTIO_BLK_F_FLUSH);
    let capacity = dev.capacity_bytes();
    let mut rec = Record::default();
    rec.s("socket", a.socket.display().to_string())
        .i("capacity_bytes", capacity)
        .i("queues", u64::from(a.queues))
        .b("flush", flush);
    if a.idle {
        return run_idle(a, &mut dev, rec);
    }
    let spec = LoadSpec {
        pattern: a.pattern,
        block_size: a.bs,
        queue_depth: a.qd,
        duration: Duration::from_secs_f64(a.warmup),
        ..LoadSpec::default()
    };
    if a.warmup > 0.0 {
        run_device(&mut dev, &spec).map_err(run_error)?;
    }
    let spec = LoadSpec {
        duration: Duration::from_secs_f64(a.seconds),
        seed: spec.seed ^ 0x9e37_79b9,
        ..spec
    };
    let cpu0 = a.backend_pid.and_then(proc_cpu_time);
    let t0 = Instant::now();
    let reports = run_device(&mut dev, &spec).map_err(run_error)?;
    let wall = t0.elapsed();
    let cpu1 = a.backend_pid.and_then(proc_cpu_time);
    let r = LoadReport::merge(&reports);
    let ops = r.ops.max(1) as f64;
    rec.i("qd", u64::from(a.qd))
        .s("pattern", pattern_name(a.pattern))
        .i("bs", a.bs)
        .f("seconds", r.elapsed.as_secs_f64(), 3)
        .i("ops", r.ops)
        .i("errors", r.errors)
        .f("iops", r.iops(), 0)
        .f("mb_per_s", r.mb_per_s(), 1)
        .f("p50_us", us(r.percentile(50.0)), 2)
        .f("p99_us", us(r.percentile(99.0)), 2)
        .f("p999_us", us(r.percentile(99.9)), 2)
        .f("frontend_cpu_us_per_req", us(r.cpu) / ops, 3);
    match (cpu0, cpu1) {
        (Some(c0), Some(c1)) => {
            let cpu = c1.saturating_sub(c0);
            rec.f("backend_cpu_us_per_req", us(cpu) / ops, 3).f(
                "backend_cpu_pct",
                100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
                1,
            );
        }
        _ if a.backend_pid.is_some() => {
            // The backend died during the run.
            return Err(run_error(format!(
                "backend pid {} vanished during the run",
                a.backend_pid.unwrap_or_default()
            )));
        }
        _ => {}
    }
    let ok = r.errors == 0 && r.ops > 0;
    Ok((rec, ok))
}

/// Connected, a short burst of I/O (so any post-I/O polling kicks in), a pause, then the
/// backend's CPU share over `seconds` of no I/O.
fn run_idle(
    a: &BlkArgs,
    dev: &mut BlkFrontend,
    mut rec: Record,
) -> Result<(Record, bool), BenchError> {
    let burst = LoadSpec {
        pattern: Pattern::RandRead,
        block_size: 4096,
        queue_depth: 1,
        duration: Duration::from_millis(200),
        ..LoadSpec::default()
    };
    run_device(dev, &burst).map_err(run_error)?;
    std::thread::sleep(Duration::from_millis(500));
    let pid = a.backend_pid.unwrap_or_default();
    let (c0, s0) = (proc_cpu_time(pid), proc_sched_ns(pid));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let wall = t0.elapsed();
    let (c1, s1) = (proc_cpu_time(pid), proc_sched_ns(pid));
    let (Some(c0), Some(c1)) = (c0, c1) else {
        return Err(run_error(format!("backend pid {pid} vanished while idle")));
    };
    // schedstat (ns) where the kernel keeps it, else /proc/PID/stat (clock ticks).
    let cpu = match (s0, s1) {
        (Some(s0), Some(s1)) if s1 >= s0 => Duration::from_nanos(s1 - s0),
        _ => c1.saturating_sub(c0),
    };
    rec.s("pattern", "idle")
        .f("seconds", wall.as_secs_f64(), 3)
        .f("backend_idle_cpu_ms", cpu.as_secs_f64() * 1e3, 2)
        .f(
            "backend_idle_cpu_pct",
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
            3,
        )
        .f(
            "backend_idle_cpu_ms_stat",
            c1.saturating_sub(c0).as_secs_f64() * 1e3,
            0,
        );
    Ok((rec, true))
}

pub fn text_blk(r: &Record) -> String {
    let g = |k: &str| r.get(k).unwrap_or_else(|| "-".to_owned());
    if g("pattern") == "idle" {
        return format!(
            "idle, frontend connected: backend CPU {} ms over {} s ({} % of a core)",
            g("backend_idle_cpu_ms"),
            g("seconds"),
            g("backend_idle_cpu_pct")
        );
    }
    let mut s = format!(
        "{} bs={} qd={} queues={} flush={}: {} IOPS, {} MB/s, p50 {} µs, p99 {} µs, \
         frontend CPU {} µs/req",
        g("pattern"),
        g("bs"),
        g("qd"),
        g("queues"),
        g("flush"),
        g("iops"),
        g("mb_per_s"),
        g("p50_us"),
        g("p99_us"),
        g("frontend_cpu_us_per_req"),
    );
    if r.get("backend_cpu_us_per_req").is_some() {
        let _ = write!(
            s,
            ", backend CPU {} µs/req ({} % of a core)",
            g("backend_cpu_us_per_req"),
            g("backend_cpu_pct")
        );
    }
    let _ = write!(s, " ({} ops, {} errors)", g("ops"), g("errors"));
    s
}

/// Runs `splitvmm-bench pread`: one thread, random block-aligned offsets, `pread` each.
pub fn run_pread(a: &PreadArgs) -> Result<Record, BenchError> {
    let file = std::fs::File::open(&a.file)
        .map_err(|e| BenchError::Setup(format!("cannot open {}: {e}", a.file.display())))?;
    let size = file
        .metadata()
        .map_err(|e| BenchError::Setup(format!("cannot stat {}: {e}", a.file.display())))?
        .len();
    let blocks = size / a.bs;
    if blocks == 0 {
        return Err(BenchError::Setup(format!(
            "{} is smaller than one {}-byte block",
            a.file.display(),
            a.bs
        )));
    }
    let mut buf = vec![0u8; a.bs as usize];
    let mut x: u64 = 0x5eed_1234_abcd_0001;
    let mut lat = Vec::with_capacity(1 << 22);
    let cpu0 = thread_cpu_time();
    let begin = Instant::now();
    let end = begin + Duration::from_secs_f64(a.seconds);
    let mut now = begin;
    let mut bytes = 0u64;
    while now < end {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let block = x.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks;
        let n = file
            .read_at(&mut buf, block * a.bs)
            .map_err(|e| run_error(format!("pread {}: {e}", a.file.display())))?;
        bytes += n as u64;
        let t = Instant::now();
        lat.push(t.duration_since(now).as_nanos() as u64);
        now = t;
    }
    let elapsed = begin.elapsed();
    let cpu = thread_cpu_time().saturating_sub(cpu0);
    lat.sort_unstable();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * (lat.len() - 1) as f64).round() as usize;
        lat[rank.min(lat.len() - 1)] as f64 / 1e3
    };
    let ops = lat.len() as f64;
    let mut rec = Record::default();
    rec.s("file", a.file.display().to_string())
        .s("pattern", "pread")
        .i("bs", a.bs)
        .f("seconds", elapsed.as_secs_f64(), 3)
        .i("ops", lat.len() as u64)
        .f("iops", ops / elapsed.as_secs_f64(), 0)
        .f("mb_per_s", bytes as f64 / 1e6 / elapsed.as_secs_f64(), 1)
        .f("p50_us", pct(50.0), 2)
        .f("p99_us", pct(99.0), 2)
        .f("cpu_us_per_req", us(cpu) / ops, 3);
    Ok(rec)
}

pub fn text_pread(r: &Record) -> String {
    let g = |k: &str| r.get(k).unwrap_or_else(|| "-".to_owned());
    format!(
        "pread bs={} (one thread, page cache): {} IOPS, {} MB/s, p50 {} µs, p99 {} µs, \
         CPU {} µs/req ({} ops)",
        g("bs"),
        g("iops"),
        g("mb_per_s"),
        g("p50_us"),
        g("p99_us"),
        g("cpu_us_per_req"),
        g("ops")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("128k"), Some(131072));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn blk_args() {
        let a = BlkArgs::parse(&args(
            "--socket /s --queues 2 --qd 32 --pattern randwrite --bs 128K --seconds 0.5 --kv",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(a.socket, PathBuf::from("/s"));
        assert_eq!((a.queues, a.qd, a.bs), (2, 32, 131072));
        assert_eq!(a.pattern, Pattern::RandWrite);
        assert_eq!(a.format, Format::Kv);
        assert!(a.flush);
        for bad in [
            "",
            "--qd 0 --socket /s",
            "--socket /s --bs 1000",
            "--socket /s --pattern x",
            "--socket /s --kv --json",
            "--socket /s --idle",
            "--socket",
            "--socket /s extra",
        ] {
            assert!(
                matches!(BlkArgs::parse(&args(bad)), Err(BenchError::Usage(_))),
                "{bad}"
            );
        }
        assert!(matches!(BlkArgs::parse(&args("--help")), Ok(None)));
    }

    #[test]
    fn records() {
        let mut r = Record::default();
        r.s("a", "x\"y").i("n", 3).f("f", 1.25, 1).b("b", true);
        assert_eq!(r.kv(), "a=x\"y\nn=3\nf=1.2\nb=true");
        assert_eq!(r.json(), r#"{"a":"x\"y","n":3,"f":1.2,"b":true}"#);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(proc_cpu_time(std::process::id()).is_some());
        assert!(proc_sched_ns(std::process::id()).is_some_and(|ns| ns > 0));
    }
}
