//! Reading a machine's console incrementally, against a deadline.
//!
//! A thread turns the byte stream into lines (carriage returns dropped, invalid UTF-8 replaced)
//! and hands them over a channel, so the reader never blocks past the deadline.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::markers::Marker;

/// What waiting for the next line gave (a line is recorded in the [`Console`]).
#[derive(Debug)]
pub enum Next {
    Line,
    Eof,
    Deadline,
}

/// A console being read: everything so far, with its markers and when they came.
pub struct Console {
    rx: Receiver<String>,
    start: Instant,
    text: String,
    timeline: Vec<(Duration, Marker)>,
    log: Option<File>,
    echo: bool,
}

impl Console {
    /// Starts reading `stream`; times are measured from `start`. Lines are also appended to
    /// `log` when given, and echoed to stderr when `SPLITVMM_LANE_ECHO` is set.
    pub fn spawn(stream: impl Read + Send + 'static, start: Instant, log: Option<File>) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || split_lines(stream, |line| tx.send(line).is_ok()));
        Console {
            rx,
            start,
            text: String::new(),
            timeline: Vec::new(),
            log,
            echo: std::env::var_os("SPLITVMM_LANE_ECHO").is_some(),
        }
    }

    /// The next line, or end of stream, or `deadline` passing first. The line is already
    /// recorded (text, marker, log) when this returns.
    pub fn next(&mut self, deadline: Instant) -> Next {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(line) => {
                self.record(&line);
                Next::Line
            }
            Err(RecvTimeoutError::Timeout) => Next::Deadline,
            Err(RecvTimeoutError::Disconnected) => Next::Eof,
        }
    }

    /// Appends text that did not come from the stream (e.g. QEMU's stderr) to the console.
    pub fn note(&mut self, text: &str) {
        for line in text.lines() {
            self.record(line);
        }
    }

    fn record(&mut self, line: &str) {
        if let Some(marker) = Marker::parse(line) {
            self.timeline.push((self.start.elapsed(), marker));
        }
        self.text.push_str(line);
        self.text.push('\n');
        if let Some(log) = &mut self.log {
            // The log is a debugging aid; a failed write must not fail the run.
            let _ = writeln!(log, "{line}");
        }
        if self.echo {
            eprintln!("console| {line}");
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn timeline(&self) -> &[(Duration, Marker)] {
        &self.timeline
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Takes what was read.
    pub fn into_parts(self) -> (String, Vec<(Duration, Marker)>) {
        (self.text, self.timeline)
    }
}

/// Reads `stream` to its end, calling `emit` per line (without `\n` and `\r`); the last partial
/// line is emitted too. Stops early when `emit` returns false.
pub fn split_lines(mut stream: impl Read, mut emit: impl FnMut(String) -> bool) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if !emit(clean(&line)) {
                return;
            }
        }
    }
    if !pending.is_empty() {
        emit(clean(&pending));
    }
}

fn clean(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .filter(|&c| c != '\r' && c != '\n')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_keeps_the_last_partial_one() {
        let mut lines = Vec::new();
        split_lines(&b"a\r\r\nb\n\xffc\nlast"[..], |l| {
            lines.push(l);
            true
        });
        assert_eq!(lines, ["a", "b", "\u{fffd}c", "last"]);
    }

    #[test]
    fn records_markers_and_reports_eof() {
        let stream = &b"boot\nSPLITVMM-GUEST-DONE rc=0\n"[..];
        let mut console = Console::spawn(stream, Instant::now(), None);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = 0;
        loop {
            match console.next(deadline) {
                Next::Line => lines += 1,
                Next::Eof => break,
                Next::Deadline => panic!("deadline"),
            }
        }
        assert_eq!(lines, 2);
        assert_eq!(console.text(), "boot\nSPLITVMM-GUEST-DONE rc=0\n");
        assert_eq!(console.timeline().len(), 1);
        assert_eq!(console.timeline()[0].1, Marker::GuestDone { rc: 0 });
    }

    #[test]
    fn deadline_does_not_wait_for_a_silent_stream() {
        // A pipe whose writer stays open: nothing arrives.
        let (reader, _writer) = nix::unistd::pipe().expect("pipe");
        let mut console = Console::spawn(File::from(reader), Instant::now(), None);
        let started = Instant::now();
        assert!(matches!(
            console.next(started + Duration::from_millis(50)),
            Next::Deadline
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
