//! A line-based unified diff, for showing the file changes a plan would apply. Files llmctl manages are small
//! (unit files, a container config), so a plain LCS table is fast enough and keeps this dependency-free.

/// Renders the change from `old` to `new` as a unified diff with `context` lines around each change.
/// Returns an empty string when the texts are equal.
pub fn unified(path: &str, old: &str, new: &str, context: usize) -> String {
    if old == new {
        return String::new();
    }
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let ops = edit_script(&a, &b);
    let mut out = format!("--- {path}\n+++ {path} (planned)\n");
    for hunk in hunks(&ops, context) {
        let (a_start, a_len, b_start, b_len) = hunk_range(&ops[hunk.clone()]);
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            range(a_start, a_len),
            range(b_start, b_len)
        ));
        for op in &ops[hunk] {
            match op {
                Op::Same(i, _) => out.push_str(&format!(" {}\n", a[*i])),
                Op::Del(i) => out.push_str(&format!("-{}\n", a[*i])),
                Op::Add(j) => out.push_str(&format!("+{}\n", b[*j])),
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Line `i` of old, equal to line `j` of new.
    Same(usize, usize),
    Del(usize),
    Add(usize),
}

fn edit_script(a: &[&str], b: &[&str]) -> Vec<Op> {
    // lcs[i][j] = length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut ops) = (0, 0, Vec::with_capacity(a.len() + b.len()));
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push(Op::Same(i, j));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Deletions first, as diff(1) prints them.
            ops.push(Op::Del(i));
            i += 1;
        } else {
            ops.push(Op::Add(j));
            j += 1;
        }
    }
    ops
}

/// Groups changes with up to `context` unchanged lines around them; nearby groups merge.
fn hunks(ops: &[Op], context: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (k, op) in ops.iter().enumerate() {
        if matches!(op, Op::Same(..)) {
            continue;
        }
        let start = k.saturating_sub(context);
        let end = (k + context + 1).min(ops.len());
        match out.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
    }
    out
}

/// (old start, old len, new start, new len), 0-based starts.
fn hunk_range(ops: &[Op]) -> (usize, usize, usize, usize) {
    let (mut a_start, mut b_start) = (None, None);
    let (mut a_len, mut b_len) = (0, 0);
    let (mut a_next, mut b_next) = (0, 0);
    for op in ops {
        match *op {
            Op::Same(i, j) => {
                a_start.get_or_insert(i);
                b_start.get_or_insert(j);
                a_len += 1;
                b_len += 1;
                a_next = i + 1;
                b_next = j + 1;
            }
            Op::Del(i) => {
                a_start.get_or_insert(i);
                a_len += 1;
                a_next = i + 1;
            }
            Op::Add(j) => {
                b_start.get_or_insert(j);
                b_len += 1;
                b_next = j + 1;
            }
        }
    }
    (
        a_start.unwrap_or(a_next),
        a_len,
        b_start.unwrap_or(b_next),
        b_len,
    )
}

/// `start,len` in unified-diff notation: 1-based, and an empty range names the line before it.
fn range(start: usize, len: usize) -> String {
    match len {
        0 => format!("{start},0"),
        1 => format!("{}", start + 1),
        _ => format!("{},{len}", start + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_diff() {
        assert_eq!(unified("f", "a\nb\n", "a\nb\n", 3), "");
    }

    #[test]
    fn adding_dev_lines_to_a_container_config() {
        let old =
            "arch: amd64\ncores: 12\nfeatures: nesting=1\nhostname: llm-server\nmemory: 40000\n";
        let new = "arch: amd64\ncores: 12\ndev0: /dev/nvidia0\ndev1: /dev/nvidiactl\nfeatures: nesting=1\nhostname: llm-server\nmemory: 40000\n";
        assert_eq!(
            unified("/etc/pve/lxc/103.conf", old, new, 1),
            "--- /etc/pve/lxc/103.conf\n+++ /etc/pve/lxc/103.conf (planned)\n@@ -2,2 +2,4 @@\n cores: 12\n+dev0: /dev/nvidia0\n+dev1: /dev/nvidiactl\n features: nesting=1\n"
        );
    }

    #[test]
    fn new_file_and_far_apart_changes() {
        assert_eq!(
            unified("u", "", "x\ny\n", 3),
            "--- u\n+++ u (planned)\n@@ -0,0 +1,2 @@\n+x\n+y\n"
        );
        let old: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let new = old
            .replace("\n2\n", "\ntwo\n")
            .replace("19\n", "nineteen\n");
        let d = unified("n", &old, &new, 1);
        assert_eq!(d.matches("@@ ").count(), 2, "{d}");
        assert!(
            d.contains("-2\n+two\n") && d.contains("-19\n+nineteen\n"),
            "{d}"
        );
    }
}
