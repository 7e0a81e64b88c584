//! How a command ended, and the exit code each outcome maps to. One place, so every command agrees:
//! 0 = done / healthy, 1 = ran fine but found problems (doctor) or would change something (`--check`),
//! 2 = could not run (bad input, unreachable host, ...).

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command did its job; nothing to report.
    Success,
    /// The command ran to the end and found problems, or (`--check`) found something to change.
    ProblemsFound,
    /// The command could not do its job at all.
    CouldNotRun,
}

impl Outcome {
    /// How bad: the fleet's exit code is its worst host's.
    pub fn severity(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::ProblemsFound => 1,
            Outcome::CouldNotRun => 2,
        }
    }

    pub fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Success => ExitCode::SUCCESS,
            Outcome::ProblemsFound => ExitCode::from(1),
            Outcome::CouldNotRun => ExitCode::from(2),
        }
    }
}
