//! docs/commands.md is the `--help` of every command, so the reference cannot drift from the binary.
//! Regenerate it with `UPDATE_DOCS=1 cargo test --test command_docs`.

use std::process::Command;

const COMMANDS: &[&[&str]] = &[
    &[],
    &["serve-proxy"],
    &["client-config"],
    &["doctor"],
    &["status"],
    &["logs"],
    &["model", "inspect"],
    &["model", "plan"],
    &["model", "fetch"],
    &["init"],
    &["provision"],
];

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(args)
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .expect("run llmctl --help");
    assert!(out.status.success(), "llmctl {args:?} --help failed");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

fn render() -> String {
    let mut doc = String::from(
        "# Command reference\n\n\
         Generated from `llmctl <command> --help` by `UPDATE_DOCS=1 cargo test --test command_docs`; \
         a test fails when this file and the binary disagree. The user guide is [guide.md](guide.md).\n",
    );
    for args in COMMANDS {
        let title = if args.is_empty() {
            "llmctl".to_string()
        } else {
            format!("llmctl {}", args.join(" "))
        };
        doc.push_str(&format!("\n## `{title}`\n\n```text\n{}```\n", help(args)));
    }
    doc
}

#[test]
fn commands_md_matches_the_binary() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/commands.md");
    let expected = render();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(path, &expected).expect("write docs/commands.md");
        return;
    }
    let actual = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        actual == expected,
        "docs/commands.md is out of date: run `UPDATE_DOCS=1 cargo test --test command_docs`"
    );
}
