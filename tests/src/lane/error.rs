//! What can go wrong running a scenario. Every failure that happens after a machine started
//! carries the tail of its console, so a failing test explains itself.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::Lane;

/// How many console lines an error shows.
pub const TAIL_LINES: usize = 60;

/// The last lines of a console, shown under an error message.
#[derive(Clone, Default)]
pub struct ConsoleTail(pub String);

impl ConsoleTail {
    /// The last `lines` lines of `console`.
    pub fn of(console: &str, lines: usize) -> Self {
        let all: Vec<&str> = console.lines().collect();
        let from = all.len().saturating_sub(lines);
        ConsoleTail(all[from..].join("\n"))
    }
}

impl fmt::Display for ConsoleTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            write!(f, "--- the console is empty ---")
        } else {
            write!(
                f,
                "--- console, last {TAIL_LINES} lines ---\n{}\n--- end of console ---",
                self.0
            )
        }
    }
}

/// Where a failed run's files were left for inspection (or nothing).
#[derive(Clone, Default)]
pub struct Kept(pub Option<PathBuf>);

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(path) => write!(f, " (its files are kept in {})", path.display()),
            None => Ok(()),
        }
    }
}

#[derive(thiserror::Error)]
pub enum LaneError {
    /// An image, binary or host tool the lane needs is not there.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        what: String,
        path: PathBuf,
        hint: String,
    },

    #[error("SPLITVMM_LANE={0:?}: expected `nested` or `direct`")]
    BadLane(String),

    /// The scenario itself is unusable (e.g. a guest file with a relative path).
    #[error("scenario `{scenario}`: {reason}")]
    BadScenario { scenario: String, reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A host tool the fixture runs (mke2fs) failed.
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        tool: String,
        status: String,
        output: String,
    },

    /// The deadline passed; the machine was killed.
    #[error("scenario `{scenario}` timed out after {after:?} in the {lane} lane{kept}\n{tail}")]
    Timeout {
        scenario: String,
        lane: Lane,
        after: Duration,
        kept: Kept,
        tail: ConsoleTail,
    },

    /// The run ended without the lane's protocol completing (L1 could not set up, QEMU died,
    /// the host script vanished), or an outcome check failed.
    #[error("scenario `{scenario}` failed in the {lane} lane: {reason}{kept}\n{tail}")]
    Failed {
        scenario: String,
        lane: Lane,
        reason: String,
        kept: Kept,
        tail: ConsoleTail,
    },
}

/// `unwrap()`/`expect()` and `-> Result` tests print `Debug`: make it the readable message
/// (with the console tail), not an escaped struct dump.
impl fmt::Debug for LaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl LaneError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LaneError::Io {
            context: context.into(),
            source,
        }
    }
}

/// `.ctx("what")?` for io results.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, LaneError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, LaneError> {
        self.map_err(|source| LaneError::io(context(), source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let console: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        let tail = ConsoleTail::of(&console, TAIL_LINES);
        assert!(tail.0.starts_with("line 41\n"));
        assert!(tail.0.ends_with("line 100"));
        assert_eq!(ConsoleTail::of("a\nb", TAIL_LINES).0, "a\nb");
    }

    #[test]
    fn failures_show_the_console() {
        let error = LaneError::Failed {
            scenario: "boot".into(),
            lane: Lane::Nested,
            reason: "QEMU exited".into(),
            kept: Kept(Some("/tmp/x".into())),
            tail: ConsoleTail("Kernel panic".into()),
        };
        let text = format!("{error:?}");
        assert!(
            text.contains("scenario `boot` failed in the nested lane: QEMU exited"),
            "{text}"
        );
        assert!(text.contains("kept in /tmp/x"), "{text}");
        assert!(text.contains("Kernel panic"), "{text}");
    }
}
