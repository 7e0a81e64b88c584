//! Whether output to a stream may be decorated (colour, spinners, progress bars): only on a terminal, and not
//! when the user said no: `NO_COLOR` set to anything non-empty (no-color.org) or `TERM=dumb`.

use std::io::IsTerminal;

/// stderr may carry colour and live progress.
pub fn fancy_stderr() -> bool {
    decide(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// The rule itself, pure.
pub fn decide(
    is_terminal: bool,
    no_color: Option<&std::ffi::OsStr>,
    term: Option<&std::ffi::OsStr>,
) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
}

#[cfg(test)]
mod tests {
    use super::decide;
    use std::ffi::OsStr;

    #[test]
    fn no_color_and_dumb_terminals_turn_decoration_off() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert!(decide(true, None, os("xterm-256color")));
        assert!(!decide(false, None, os("xterm")));
        assert!(!decide(true, os("1"), os("xterm")));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(decide(true, os(""), os("xterm")));
        assert!(!decide(true, None, os("dumb")));
        assert!(decide(true, None, None));
    }
}
