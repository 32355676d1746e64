//! Puts an interactive terminal on stdin into raw mode for the guest console and restores it.

use nix::sys::termios::{self, SetArg, Termios};

pub struct RawTerminal {
    saved: Option<Termios>,
}

impl RawTerminal {
    /// Switches stdin to raw mode when it is a terminal; does nothing otherwise.
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok();
        if let Some(original) = &saved {
            let mut raw = original.clone();
            termios::cfmakeraw(&mut raw);
            // Keep output processing so the VMM's own log lines still start at column 0.
            raw.output_flags = original.output_flags;
            if termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
                return RawTerminal { saved: None };
            }
        }
        RawTerminal { saved }
    }

    pub fn restore(&mut self) {
        if let Some(original) = self.saved.take() {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &original);
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}
