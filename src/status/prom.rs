//! The Prometheus text format, as far as `llmctl status` reads it: llama-server's `/metrics` (names with a `:`,
//! `llamacpp:prompt_tokens_total`) and serve-proxy's (labels, histograms). Comments and `# TYPE` lines are
//! skipped; a line that is not a sample is skipped too, so one odd line does not hide the rest.

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    if name_end == 0 {
        return None;
    }
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"}` → the pairs and what follows the `}`. Values may hold `\\`, `\"` and `\n` escapes.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = s.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &after[1 + end + 1..];
    }
}

/// The value of a sample without labels (or the first one of that name).
pub fn value(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

/// The sum over every label set of a name; None when the name is absent.
pub fn sum(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = false;
    let total = samples
        .iter()
        .filter(|s| s.name == name)
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/fixtures/outputs/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }

    #[test]
    fn reads_llama_server_metrics() {
        let s = parse(&fixture("llama-server.metrics.txt"));
        assert_eq!(s.len(), 15, "{s:#?}");
        assert_eq!(value(&s, "llamacpp:prompt_tokens_total"), Some(32.0));
        assert_eq!(value(&s, "llamacpp:prompt_seconds_total"), Some(0.215));
        assert_eq!(
            value(&s, "llamacpp:tokens_predicted_seconds_total"),
            Some(0.157067)
        );
        assert_eq!(
            value(&s, "llamacpp:predicted_tokens_seconds"),
            Some(95.5006)
        );
        assert_eq!(value(&s, "llamacpp:requests_processing"), Some(0.0));
        assert_eq!(value(&s, "llamacpp:nothing"), None);
    }

    /// The proxy's own renderer is the other real source: what it writes, this reads back.
    #[test]
    fn reads_the_proxy_metrics_back() {
        use crate::proxy::metrics::{Metrics, RequestRecord};
        let m = Metrics::default();
        for (status, error_type) in [(200, None), (200, None), (529, Some("overloaded_error"))] {
            m.request_started();
            m.request_finished(&RequestRecord {
                status,
                error_type,
                input_tokens: 10,
                cache_read_input_tokens: 30,
                duration: std::time::Duration::from_millis(5),
                ..Default::default()
            });
        }
        let s = parse(&m.render());
        assert_eq!(sum(&s, "llmctl_proxy_requests_total"), Some(3.0));
        assert_eq!(sum(&s, "llmctl_proxy_errors_total"), Some(1.0));
        let ok = s
            .iter()
            .find(|x| x.name == "llmctl_proxy_requests_total" && x.label("status") == Some("200"))
            .unwrap();
        assert_eq!(ok.value, 2.0);
        let cached = s
            .iter()
            .find(|x| {
                x.name == "llmctl_proxy_tokens_total" && x.label("kind") == Some("cache_read")
            })
            .unwrap();
        assert_eq!(cached.value, 90.0);
        let inf = s
            .iter()
            .find(|x| {
                x.label("le") == Some("+Inf") && x.name.starts_with("llmctl_proxy_request_duration")
            })
            .unwrap();
        assert_eq!(inf.value, 3.0);
    }

    #[test]
    fn odd_lines_are_skipped_and_escapes_read() {
        let s = parse(
            "x_total{path=\"a\\\"b\\\\c\",k=\"\"} 3 1700000000\n}{ 4\nnot a sample\ny NaN\nz{k=\"unterminated} 1\nw +Inf\n",
        );
        assert_eq!(s.len(), 3, "{s:#?}");
        assert_eq!(s[0].label("path"), Some("a\"b\\c"));
        assert_eq!(s[0].label("k"), Some(""));
        assert_eq!(s[0].value, 3.0);
        assert!(s[1].value.is_nan());
        assert_eq!(s[2].value, f64::INFINITY);
        assert_eq!(sum(&s, "nothing"), None);
    }
}
