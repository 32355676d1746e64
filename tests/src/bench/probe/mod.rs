//! The measuring side of a benchmark, run in the lane's host (L1 in the nested lane) next to the
//! VMM: it starts one VMM, timestamps the guest's marker lines as they come out of the VMM's
//! console with `CLOCK_MONOTONIC` (nanosecond resolution, unlike busybox `date` or the 10 ms of
//! `/proc/uptime`), samples the VMM's memory from `/proc/PID/smaps` at the init marker, and
//! prints one `SPLITVMM-RESULT` line. The guest's console is swallowed (every line of it would
//! also cost the lane's console time and could carry markers of its own); on failure its last
//! lines are printed with the markers defused.
//!
//! The guest side of the protocol (see [`super::boot::GUEST_INIT`]):
//!
//! | console line                 | meaning                                               |
//! |------------------------------|-------------------------------------------------------|
//! | `SPLITVMM-BENCH-INIT`        | the first thing the guest's `/init` does              |
//! | `SPLITVMM-BENCH-UPTIME S`    | the guest's `/proc/uptime` right after that           |
//! | `SPLITVMM-BENCH-NPROC N`     | the vCPUs the guest sees                              |
//! | `SPLITVMM-BENCH-POWEROFF`    | printed just before `poweroff -f`                     |

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use super::BenchError;

mod memory;

pub const INIT_MARKER: &str = "SPLITVMM-BENCH-INIT";
pub const UPTIME_MARKER: &str = "SPLITVMM-BENCH-UPTIME";
pub const NPROC_MARKER: &str = "SPLITVMM-BENCH-NPROC";
pub const POWEROFF_MARKER: &str = "SPLITVMM-BENCH-POWEROFF";

/// How many console (and stderr) lines a failure shows.
const TAIL: usize = 25;

/// What to start and how to recognise its guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeArgs {
    /// Names the result: `SPLITVMM-RESULT run.<key>=…`.
    pub key: String,
    /// A substring of the smaps path of the guest RAM mapping(s), e.g. `memfd:splitvmm-guest-ram`.
    pub ram_mapping: String,
    /// Run the program chrooted here (the sysroot's QEMU), without a `chroot`/`env` process in
    /// between that would count against its start-up time.
    pub chroot: Option<PathBuf>,
    /// Timestamp the first stdout or stderr line containing this (e.g. the VMM's log line
    /// that says it is entering the guest): reported as `stamp_us`.
    pub stamp: Option<String>,
    pub timeout: Duration,
    pub program: Vec<String>,
}

pub const PROBE_USAGE: &str = "usage: splitvmm-bench-boot probe --key KEY --ram-mapping SUBSTR \
[--chroot DIR] [--stamp STR] [--timeout SECS] -- PROGRAM [ARGS...]";

impl ProbeArgs {
    pub fn parse(args: &[String]) -> Result<Self, BenchError> {
        let usage = |msg: String| BenchError::Usage(format!("{msg}\n{PROBE_USAGE}"));
        let (mut key, mut ram_mapping, mut chroot, mut stamp) = (None, None, None, None);
        let mut timeout = Duration::from_secs(120);
        let mut it = args.iter();
        let mut program = Vec::new();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| usage(format!("{name} needs a value")))
            };
            match arg.as_str() {
                "--key" => key = Some(value("--key")?),
                "--ram-mapping" => ram_mapping = Some(value("--ram-mapping")?),
                "--chroot" => {
                    // The direct lane's sysroot is `/`: no chroot (nor root) needed.
                    let dir = PathBuf::from(value("--chroot")?);
                    chroot = (dir != Path::new("/")).then_some(dir);
                }
                "--stamp" => stamp = Some(value("--stamp")?),
                "--timeout" => {
                    let secs = value("--timeout")?;
                    timeout = Duration::from_secs(
                        secs.parse()
                            .map_err(|_| usage(format!("--timeout {secs}: not seconds")))?,
                    );
                }
                "--" => {
                    program = it.by_ref().cloned().collect();
                    break;
                }
                other => return Err(usage(format!("unknown probe argument {other:?}"))),
            }
        }
        if program.is_empty() {
            return Err(usage("no program after --".to_owned()));
        }
        Ok(ProbeArgs {
            key: key.ok_or_else(|| usage("--key is required".to_owned()))?,
            ram_mapping: ram_mapping
                .ok_or_else(|| usage("--ram-mapping is required".to_owned()))?,
            chroot,
            stamp,
            timeout,
            program,
        })
    }
}

/// The resolution of `CLOCK_MONOTONIC` (what [`Instant`] reads), in ns; 0 when unknown.
pub fn monotonic_resolution_ns() -> i64 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec through a valid pointer to a local.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC, &mut res) };
    if rc == 0 {
        res.tv_sec * 1_000_000_000 + res.tv_nsec
    } else {
        0
    }
}

pub use memory::{parse_smaps, sample_memory, MemSample};

/// What one run measured; times from just before the VMM was spawned.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// The `--stamp` line, when one was asked for and came.
    pub stamp: Option<Duration>,
    pub init: Duration,
    /// When the uptime line came, and the guest's uptime it carried (seconds, 10 ms steps).
    pub uptime_line: Option<(Duration, f64)>,
    pub nproc: Option<u32>,
    pub poweroff: Option<Duration>,
    pub exit: Duration,
    pub mem: MemSample,
}

impl RunReport {
    /// The value of the `SPLITVMM-RESULT run.KEY=` line: `ok k=v …`.
    pub fn render(&self) -> String {
        let us = |d: Duration| d.as_micros().to_string();
        let mut out = format!("ok init_us={} exit_us={}", us(self.init), us(self.exit));
        if let Some(stamp) = self.stamp {
            out.push_str(&format!(" stamp_us={}", us(stamp)));
        }
        if let Some(off) = self.poweroff {
            out.push_str(&format!(" poweroff_us={}", us(off)));
        }
        if let Some((at, uptime)) = self.uptime_line {
            out.push_str(&format!(
                " uptime_line_us={} guest_uptime_s={uptime}",
                us(at)
            ));
        }
        if let Some(n) = self.nproc {
            out.push_str(&format!(" nproc={n}"));
        }
        let m = &self.mem;
        out.push_str(&format!(
            " rss_kib={} ram_kib={} anon_kib={} hwm_kib={} ram_mappings={} procs={}",
            m.rss_kib, m.ram_kib, m.anon_kib, m.hwm_kib, m.ram_mappings, m.processes
        ));
        out
    }
}

/// What the reader and waiter threads send.
enum Event {
    Stamp(Instant),
    Init(Instant),
    Uptime(Instant, f64),
    Nproc(u32),
    PowerOff(Instant),
    /// A reader reached the end of its stream.
    Closed,
    Exited(Instant, std::io::Result<std::process::ExitStatus>),
}

/// The last lines of a stream, with markers defused so the lane's parser skips them.
#[derive(Default)]
struct Tail(VecDeque<String>);

impl Tail {
    fn push(&mut self, line: &str) {
        if self.0.len() == TAIL {
            self.0.pop_front();
        }
        self.0
            .push_back(line.trim_end().replace("SPLITVMM-", "splitvmm-"));
    }
}

/// A reader's line handling: the `--stamp` line, and the events for the run.
struct Lines {
    stamp: Option<String>,
    events: Sender<Event>,
}

impl Lines {
    fn send(&self, event: Event) {
        // The receiver only goes away once the run is over.
        let _ = self.events.send(event);
    }

    fn stamp(&mut self, line: &str, at: Instant) {
        if self.stamp.as_deref().is_some_and(|s| line.contains(s)) {
            self.stamp = None;
            self.send(Event::Stamp(at));
        }
    }
}

/// The guest protocol's event for a console line, if it is one.
fn console_event(line: &str, now: Instant) -> Option<Event> {
    let value = |marker: &str| {
        line.find(marker)
            .map(|at| line[at + marker.len()..].trim().to_owned())
    };
    if let Some(v) = value(UPTIME_MARKER) {
        v.parse().ok().map(|s| Event::Uptime(now, s))
    } else if let Some(v) = value(NPROC_MARKER) {
        v.parse().ok().map(Event::Nproc)
    } else if line.contains(INIT_MARKER) {
        Some(Event::Init(now))
    } else if line.contains(POWEROFF_MARKER) {
        Some(Event::PowerOff(now))
    } else {
        None
    }
}

/// Reads a stream of lines to its end: each is timestamped as it comes, protocol lines become
/// events (when `protocol`, i.e. the console), the others go to the tail.
fn read_stream(out: impl Read, mut lines: Lines, protocol: bool) -> Tail {
    let mut reader = BufReader::new(out);
    let mut tail = Tail::default();
    let mut buf = Vec::new();
    while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
        let now = Instant::now();
        let line = String::from_utf8_lossy(&buf);
        lines.stamp(&line, now);
        match console_event(&line, now).filter(|_| protocol) {
            Some(event) => lines.send(event),
            None => tail.push(&line),
        }
        buf.clear();
    }
    lines.send(Event::Closed);
    tail
}

/// A run that went wrong: why, and the last console and stderr lines.
#[derive(Debug)]
pub struct RunFailure {
    pub reason: String,
    pub console: Vec<String>,
    pub stderr: Vec<String>,
}

/// Prepares `cmd` to chroot into `dir` in the child.
fn chroot_before_exec(cmd: &mut Command, dir: &Path) -> Result<(), String> {
    let root = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("--chroot {}: contains NUL", dir.display()))?;
    // SAFETY: the closure runs in the child between fork and exec. It makes two system calls
    // (chroot, chdir) on a string allocated before the fork and allocates nothing itself, so it
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// How long to wait, after the VMM exited, for its stdout and stderr to reach their end (a
/// descendant could hold them open).
const DRAIN: Duration = Duration::from_secs(2);

/// Runs the VMM once and measures it.
pub fn run(args: &ProbeArgs) -> Result<RunReport, RunFailure> {
    let fail = |reason: String| RunFailure {
        reason,
        console: Vec::new(),
        stderr: Vec::new(),
    };
    let (program, rest) = args
        .program
        .split_first()
        .ok_or_else(|| fail("no program".to_owned()))?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = &args.chroot {
        chroot_before_exec(&mut cmd, dir).map_err(fail)?;
    }
    let start = Instant::now();
    let deadline = start + args.timeout;
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {program}: {e}")))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let lines = || Lines {
        stamp: args.stamp.clone(),
        events: tx.clone(),
    };
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (out_lines, err_lines) = (lines(), lines());
    let readers = [
        stdout.map(|s| thread::spawn(move || read_stream(s, out_lines, true))),
        stderr.map(|s| thread::spawn(move || read_stream(s, err_lines, false))),
    ];
    let streams = readers.iter().flatten().count();
    let waiter = thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(Event::Exited(Instant::now(), status));
    });
    let mut run = Collected::default();
    let outcome = run.follow(args, pid, start, deadline, streams, &rx);
    // The waiter ends with the child (killed on the deadline); a reader only once its stream
    // ends, so one whose stream is still held open is left behind.
    let _ = waiter.join();
    let [console, stderr] = readers.map(|reader| match reader {
        Some(reader) if run.closed >= streams => reader
            .join()
            .map(|t| t.0.into_iter().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    });
    outcome.map_err(|reason| RunFailure {
        reason,
        console,
        stderr,
    })
}

/// What the events said so far.
#[derive(Default)]
struct Collected {
    stamp: Option<Duration>,
    init: Option<Duration>,
    uptime: Option<(Duration, f64)>,
    nproc: Option<u32>,
    poweroff: Option<Duration>,
    mem: Option<Result<MemSample, String>>,
    exited: Option<(Duration, std::io::Result<std::process::ExitStatus>)>,
    closed: usize,
}

impl Collected {
    /// Follows the run's events until the VMM exited and its streams ended (or [`DRAIN`] after
    /// the exit), or the deadline, when the VMM is killed.
    fn follow(
        &mut self,
        args: &ProbeArgs,
        pid: u32,
        start: Instant,
        deadline: Instant,
        streams: usize,
        rx: &Receiver<Event>,
    ) -> Result<RunReport, String> {
        loop {
            let until = match &self.exited {
                Some(_) if self.closed >= streams => return self.report(),
                Some((at, _)) => deadline.min(start + *at + DRAIN),
                None => deadline,
            };
            let event = match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) if self.exited.is_some() => return self.report(),
                Err(RecvTimeoutError::Timeout) => {
                    // The waiter has not reaped the child, so the pid is still its.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = rx.recv_timeout(Duration::from_secs(10));
                    let stage = if self.init.is_some() {
                        "after the init marker"
                    } else {
                        "before the guest's init marker"
                    };
                    return Err(format!(
                        "no exit after {} s ({stage}); killed",
                        args.timeout.as_secs()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("lost track of the VMM process".to_owned())
                }
            };
            match event {
                Event::Stamp(at) => self.stamp = self.stamp.or(Some(at - start)),
                Event::Init(at) => {
                    self.init = Some(at - start);
                    self.mem = Some(sample_memory(pid, &args.ram_mapping));
                }
                Event::Uptime(at, secs) => self.uptime = Some((at - start, secs)),
                Event::Nproc(n) => self.nproc = Some(n),
                Event::PowerOff(at) => self.poweroff = Some(at - start),
                Event::Closed => self.closed += 1,
                Event::Exited(at, status) => self.exited = Some((at - start, status)),
            }
        }
    }

    /// The report of a run whose VMM exited.
    fn report(&mut self) -> Result<RunReport, String> {
        let (exit, status) = self.exited.take().ok_or("the VMM has not exited")?;
        let status = status.map_err(|e| format!("waiting for the VMM: {e}"))?;
        if !status.success() {
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => status.to_string(),
            };
            return Err(format!(
                "the VMM ended with {how} (want 0: guest power-off)"
            ));
        }
        let init = self
            .init
            .ok_or("the VMM exited 0 but the guest's init marker never came")?;
        let mem = self.mem.take().ok_or("no memory sample")??;
        Ok(RunReport {
            stamp: self.stamp,
            init,
            uptime_line: self.uptime,
            nproc: self.nproc,
            poweroff: self.poweroff,
            exit,
            mem,
        })
    }
}

/// `probe` mode: run, print the result line (and a failure's tails); the status is 0 when the
/// run worked.
pub fn main(args: &ProbeArgs) -> bool {
    match run(args) {
        Ok(report) => {
            println!(
                "bench: {}: init {:.1} ms, exit {:.1} ms, overhead {} KiB",
                args.key,
                report.init.as_secs_f64() * 1e3,
                report.exit.as_secs_f64() * 1e3,
                report.mem.overhead_kib()
            );
            println!("SPLITVMM-RESULT run.{}={}", args.key, report.render());
            true
        }
        Err(failure) => {
            println!("bench: {}: FAILED: {}", args.key, failure.reason);
            for (name, lines) in [("console", &failure.console), ("stderr", &failure.stderr)] {
                println!("bench: {}: last {} {name} lines:", args.key, lines.len());
                for line in lines {
                    println!("  | {line}");
                }
            }
            let reason = failure.reason.replace('\n', " ");
            println!("SPLITVMM-RESULT run.{}=failed {reason}", args.key);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_arguments() {
        let args: Vec<String> = [
            "--key",
            "1.splitvmm.1",
            "--ram-mapping",
            "memfd:x",
            "--chroot",
            "/sysroot",
            "--timeout",
            "30",
            "--",
            "/bin/vmm",
            "--kernel",
            "k",
        ]
        .map(String::from)
        .to_vec();
        let parsed = ProbeArgs::parse(&args).expect("parses");
        assert_eq!(parsed.key, "1.splitvmm.1");
        assert_eq!(parsed.chroot.as_deref(), Some(Path::new("/sysroot")));
        assert_eq!(parsed.timeout, Duration::from_secs(30));
        assert_eq!(parsed.program, ["/bin/vmm", "--kernel", "k"]);
        assert!(ProbeArgs::parse(&args[..8]).is_err());
    }

    /// A fake VMM: prints the markers, maps nothing named like guest RAM, so the run fails
    /// with a clear reason; and one that exits 1.
    #[test]
    fn failures_are_explained() {
        let probe = |script: &str| {
            run(&ProbeArgs {
                key: "t".into(),
                ram_mapping: "memfd:does-not-exist".into(),
                chroot: None,
                stamp: Some("STAMP".into()),
                timeout: Duration::from_secs(20),
                program: vec!["sh".into(), "-c".into(), script.into()],
            })
        };
        let no_ram = probe(&format!(
            "echo noise; echo {INIT_MARKER}; sleep 0.5; echo {POWEROFF_MARKER}"
        ))
        .expect_err("no RAM mapping");
        assert!(no_ram.reason.contains("memfd:does-not-exist"), "{no_ram:?}");
        assert_eq!(no_ram.console, ["noise"]);
        let exit1 = probe("echo SPLITVMM-RESULT x=1; echo oops >&2; exit 1").expect_err("exit 1");
        assert!(exit1.reason.contains("exit status 1"), "{exit1:?}");
        assert_eq!(exit1.console, ["splitvmm-RESULT x=1"]);
        assert_eq!(exit1.stderr, ["oops"]);
        let quiet = probe("exit 0").expect_err("no marker");
        assert!(quiet.reason.contains("init marker never came"), "{quiet:?}");
    }

    /// A fake VMM that speaks the guest protocol; its stack stands in for guest RAM.
    #[test]
    fn a_run_reports_every_marker() {
        let script = format!(
            "echo STAMP here >&2; echo {INIT_MARKER}; sleep 0.2; echo '{UPTIME_MARKER} 1.25'; \
             echo '{NPROC_MARKER} 2'; echo {POWEROFF_MARKER}; echo bye"
        );
        let report = run(&ProbeArgs {
            key: "t".into(),
            ram_mapping: "[stack]".into(),
            chroot: None,
            stamp: Some("STAMP".into()),
            timeout: Duration::from_secs(20),
            program: vec!["sh".into(), "-c".into(), script],
        })
        .expect("the fake run works");
        assert!(report.stamp.is_some());
        assert!(report.init < report.exit);
        assert_eq!(report.uptime_line.map(|(_, s)| s), Some(1.25));
        assert_eq!(report.nproc, Some(2));
        // (Lines are stamped when read, so with a fake this quick the exit may come first.)
        assert!(report.poweroff.is_some_and(|p| p >= report.init));
        assert!(report.mem.ram_mappings >= 1 && report.mem.rss_kib > report.mem.ram_kib);
        let line = report.render();
        assert!(line.starts_with("ok init_us="), "{line}");
        assert!(
            line.contains(" nproc=2 ") && line.contains(" stamp_us="),
            "{line}"
        );
    }

    #[test]
    fn deadline_kills() {
        let started = Instant::now();
        let failure = run(&ProbeArgs {
            key: "t".into(),
            ram_mapping: "x".into(),
            chroot: None,
            stamp: Some("STAMP".into()),
            timeout: Duration::from_secs(1),
            program: vec!["sleep".into(), "30".into()],
        })
        .expect_err("times out");
        assert!(failure.reason.contains("killed"), "{failure:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
