//! The one place where arguments become a shell command line. Remote commands (SSH exec takes a string)
//! are built only through [`join`], so no caller ever concatenates untrusted text into a shell.

/// Quotes one argument for a POSIX shell.
pub fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Joins arguments into one shell command line, each quoted.
pub fn join<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(quote("pct"), "pct");
        assert_eq!(quote("/etc/pve/lxc/103.conf"), "/etc/pve/lxc/103.conf");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(join(&["echo", "a;b", "c"]), "echo 'a;b' c");
    }
}
