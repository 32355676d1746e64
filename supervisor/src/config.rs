//! The command line of `splitvmm-supervise` and its validation into a [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;

/// First delay before a restart; doubled for each crash that follows a short run.
pub const DEFAULT_RESTART_DELAY_MS: u64 = 100;
/// The longest delay between restarts of a backend that keeps crashing.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "splitvmm-supervise",
    version,
    about = "Holds a vhost-user backend's listening socket and restarts the backend when it dies",
    after_help = "The backend gets the socket as systemd passes it (descriptor 3, LISTEN_FDS=1, \
                  LISTEN_PID): splitvmm-blk and splitvmm-net serve it without --socket."
)]
pub struct Args {
    /// Listening socket to create (mode 0600) and hand to every instance of the backend.
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: PathBuf,
    /// Milliseconds before restarting a backend that died (doubled, up to 5 s, while it keeps
    /// dying within a second of its start).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_RESTART_DELAY_MS)]
    pub restart_delay_ms: u64,
    /// Give up (exit 1) after this many restarts; by default restart forever.
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u64>,
    /// The backend and its arguments.
    #[arg(last = true, required = true, value_name = "BACKEND")]
    pub command: Vec<String>,
}

/// A validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: PathBuf,
    pub restart_delay: Duration,
    pub max_restarts: Option<u64>,
    pub program: String,
    pub args: Vec<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--restart-delay-ms {0} is outside 1 to 60000")]
    RestartDelay(u64),
    #[error("no backend command after --")]
    NoCommand,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if !(1..=60_000).contains(&args.restart_delay_ms) {
            return Err(ConfigError::RestartDelay(args.restart_delay_ms));
        }
        let mut command = args.command.into_iter();
        let program = command.next().ok_or(ConfigError::NoCommand)?;
        Ok(Config {
            socket: args.socket,
            restart_delay: Duration::from_millis(args.restart_delay_ms),
            max_restarts: args.max_restarts,
            program,
            args: command.collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_backend_after_the_double_dash() {
        let args = Args::try_parse_from([
            "splitvmm-supervise",
            "--socket",
            "/tmp/s.sock",
            "--max-restarts",
            "3",
            "--",
            "splitvmm-blk",
            "--image",
            "/tmp/x",
        ])
        .expect("clap");
        let config = Config::try_from(args).expect("valid");
        assert_eq!(config.program, "splitvmm-blk");
        assert_eq!(config.args, ["--image", "/tmp/x"]);
        assert_eq!(config.max_restarts, Some(3));
        assert_eq!(
            config.restart_delay,
            Duration::from_millis(DEFAULT_RESTART_DELAY_MS)
        );
    }

    #[test]
    fn refuses_a_missing_command_and_silly_delays() {
        assert!(Args::try_parse_from(["splitvmm-supervise", "--socket", "/tmp/s"]).is_err());
        for delay in ["0", "60001"] {
            let args = Args::try_parse_from([
                "splitvmm-supervise",
                "--socket",
                "/tmp/s",
                "--restart-delay-ms",
                delay,
                "--",
                "x",
            ])
            .expect("clap");
            assert!(matches!(
                Config::try_from(args),
                Err(ConfigError::RestartDelay(_))
            ));
        }
    }
}
