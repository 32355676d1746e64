//! A minimal `log` backend: one line per record on stderr, prefixed with the program name.
//! The level comes from `SPLITVMM_LOG` (error, warn, info, debug, trace; default info).

use std::io::Write;

struct StderrLogger {
    program: &'static str,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            // Logging must never take the process down, so a failed write is dropped.
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}: {}: {}",
                self.program,
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls are ignored.
pub fn init(program: &'static str) {
    let level = std::env::var("SPLITVMM_LOG")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    if log::set_boxed_logger(Box::new(StderrLogger { program })).is_ok() {
        log::set_max_level(level);
    }
}
