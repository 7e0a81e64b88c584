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

    /// What a real POSIX shell makes of `join(argv)`: it must be argv again, byte for byte.
    #[test]
    fn sh_reads_back_the_same_argv() {
        let nasty = [
            "plain",
            "",
            "two words",
            "it's",
            "\"double\"",
            "$(touch /tmp/llmctl-pwned)",
            "`id`",
            "a\nb",
            "tab\there",
            "back\\slash",
            "*",
            "~",
            "semi;colon",
            "pipe|amp&",
            "ünïcødé",
            "--flag=value with space",
            "'",
            "''",
        ];
        // printf prints each argument NUL-terminated, so the argv is recovered exactly.
        let mut argv = vec!["printf", "%s\\0"];
        argv.extend(nasty);
        let line = join(&argv);
        let out = std::process::Command::new("sh")
            .args(["-c", &line])
            .output()
            .expect("sh runs");
        assert!(out.status.success());
        let got: Vec<&[u8]> = out.stdout.split(|&b| b == 0).collect();
        let want: Vec<&[u8]> = nasty
            .iter()
            .map(|s| s.as_bytes())
            .chain([&b""[..]])
            .collect();
        assert_eq!(got, want);
    }
}
