//! Counters and histograms for `GET /metrics`, rendered in the Prometheus text format by hand: a few atomics
//! cost nothing per request and need no metrics crate.
//!
//! `llmctl_proxy_overhead_seconds` is the proxy's own added time, TensorZero-style: a request's total duration
//! minus the time spent waiting on the upstream (its headers and each of its chunks).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Bucket upper bounds in seconds. Time to first token and duration span CPU prefill (minutes) down to a
/// cached prompt on a GPU (tens of milliseconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// The proxy's own time: the target is under 0.1 ms at p50 and 1 ms at p99.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far and their sum in nanoseconds (read separately: a sample may straddle an
    /// observation, which a once-a-second dashboard does not notice).
    pub fn count_and_sum_nanos(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.sum_nanos.load(Ordering::Relaxed),
        )
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// What one finished request contributes.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    pub status: u16,
    /// The Anthropic error type when the request failed (also for an error sent inside a started stream).
    pub error_type: Option<&'static str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub ttft: Option<Duration>,
    pub duration: Duration,
    pub upstream_wait: Duration,
}

/// Cumulative figures at one moment (see [`Metrics::totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub generation_tokens: u64,
    pub generation_nanos: u64,
    pub ttft_count: u64,
    pub ttft_sum_nanos: u64,
    pub in_flight: i64,
}

#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cache_read_tokens: AtomicU64,
    /// Tokens after a request's first one, and the time from its first token to its end: their ratio is the
    /// generation speed clients saw, which the dashboard charts (two adds per request, no lock).
    generation_tokens: AtomicU64,
    generation_nanos: AtomicU64,
    in_flight: AtomicI64,
    ttft: Histogram,
    duration: Histogram,
    overhead: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            errors: Mutex::default(),
            input_tokens: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
            cache_read_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            generation_nanos: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            ttft: Histogram::new(LATENCY_BUCKETS),
            duration: Histogram::new(LATENCY_BUCKETS),
            overhead: Histogram::new(OVERHEAD_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records a request that `request_started` counted.
    pub fn request_finished(&self, r: &RequestRecord) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut m) = self.requests.lock() {
            *m.entry(r.status).or_default() += 1;
        }
        if let Some(kind) = r.error_type
            && let Ok(mut m) = self.errors.lock()
        {
            *m.entry(kind).or_default() += 1;
        }
        self.input_tokens
            .fetch_add(r.input_tokens, Ordering::Relaxed);
        self.output_tokens
            .fetch_add(r.output_tokens, Ordering::Relaxed);
        self.cache_read_tokens
            .fetch_add(r.cache_read_input_tokens, Ordering::Relaxed);
        if let Some(t) = r.ttft {
            self.ttft.observe(t);
            if r.output_tokens > 1 {
                let after_first = r.duration.saturating_sub(t);
                self.generation_tokens
                    .fetch_add(r.output_tokens - 1, Ordering::Relaxed);
                self.generation_nanos.fetch_add(
                    u64::try_from(after_first.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
        }
        self.duration.observe(r.duration);
        self.overhead
            .observe(r.duration.saturating_sub(r.upstream_wait));
    }

    /// The cumulative figures the dashboard samples once a second. Only the error map takes its lock; the rest
    /// are atomics, so sampling adds nothing a request waits for.
    pub fn totals(&self) -> Totals {
        let (ttft_count, ttft_sum_nanos) = self.ttft.count_and_sum_nanos();
        Totals {
            // Every finished request is observed in `duration`: the same count as the sum of requests_total.
            requests: self.duration.count_and_sum_nanos().0,
            errors: self
                .errors
                .lock()
                .map(|m| m.values().sum())
                .unwrap_or_default(),
            input_tokens: self.input_tokens.load(Ordering::Relaxed),
            output_tokens: self.output_tokens.load(Ordering::Relaxed),
            cache_read_tokens: self.cache_read_tokens.load(Ordering::Relaxed),
            generation_tokens: self.generation_tokens.load(Ordering::Relaxed),
            generation_nanos: self.generation_nanos.load(Ordering::Relaxed),
            ttft_count,
            ttft_sum_nanos,
            in_flight: self.in_flight(),
        }
    }

    /// Errors so far by type (the dashboard's breakdown).
    pub fn errors_by_type(&self) -> BTreeMap<&'static str, u64> {
        self.errors.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP llmctl_proxy_requests_total Requests answered, by HTTP status.\n");
        out.push_str("# TYPE llmctl_proxy_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for (status, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "llmctl_proxy_requests_total{{status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP llmctl_proxy_errors_total Errors, by Anthropic error type (including errors inside a started stream).\n");
        out.push_str("# TYPE llmctl_proxy_errors_total counter\n");
        if let Ok(m) = self.errors.lock() {
            for (kind, n) in m.iter() {
                let _ = writeln!(out, "llmctl_proxy_errors_total{{type=\"{kind}\"}} {n}");
            }
        }
        out.push_str("# HELP llmctl_proxy_tokens_total Tokens reported by the upstream.\n");
        out.push_str("# TYPE llmctl_proxy_tokens_total counter\n");
        for (kind, v) in [
            ("input", &self.input_tokens),
            ("output", &self.output_tokens),
            ("cache_read", &self.cache_read_tokens),
        ] {
            let _ = writeln!(
                out,
                "llmctl_proxy_tokens_total{{kind=\"{kind}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP llmctl_proxy_generation_tokens_total Output tokens after each request's first one.\n");
        out.push_str("# TYPE llmctl_proxy_generation_tokens_total counter\n");
        let _ = writeln!(
            out,
            "llmctl_proxy_generation_tokens_total {}",
            self.generation_tokens.load(Ordering::Relaxed)
        );
        out.push_str("# HELP llmctl_proxy_generation_seconds_total Time from each request's first token to its end.\n");
        out.push_str("# TYPE llmctl_proxy_generation_seconds_total counter\n");
        let _ = writeln!(
            out,
            "llmctl_proxy_generation_seconds_total {}",
            self.generation_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        out.push_str("# HELP llmctl_proxy_in_flight_requests Requests being served now.\n");
        out.push_str("# TYPE llmctl_proxy_in_flight_requests gauge\n");
        let _ = writeln!(out, "llmctl_proxy_in_flight_requests {}", self.in_flight());
        self.ttft.render(
            &mut out,
            "llmctl_proxy_time_to_first_token_seconds",
            "Time from the request to the first content event.",
        );
        self.duration.render(
            &mut out,
            "llmctl_proxy_request_duration_seconds",
            "Time from the request to its last byte.",
        );
        self.overhead.render(
            &mut out,
            "llmctl_proxy_overhead_seconds",
            "Request duration minus time spent waiting on the upstream.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix} in\n{text}"))
    }

    #[test]
    fn renders_counters_histograms_and_gauge() {
        let m = Metrics::default();
        for _ in 0..3 {
            m.request_started();
        }
        m.request_finished(&RequestRecord {
            status: 200,
            input_tokens: 10,
            output_tokens: 5,
            cache_read_input_tokens: 2,
            ttft: Some(Duration::from_millis(70)),
            duration: Duration::from_millis(300),
            upstream_wait: Duration::from_micros(299_950),
            ..Default::default()
        });
        m.request_finished(&RequestRecord {
            status: 529,
            error_type: Some("overloaded_error"),
            duration: Duration::from_millis(2),
            ..Default::default()
        });
        let text = m.render();
        assert_eq!(
            line(&text, "llmctl_proxy_requests_total{status=\"200\"}"),
            "llmctl_proxy_requests_total{status=\"200\"} 1"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_requests_total{status=\"529\"}"),
            "llmctl_proxy_requests_total{status=\"529\"} 1"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_errors_total{"),
            "llmctl_proxy_errors_total{type=\"overloaded_error\"} 1"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_tokens_total{kind=\"input\"}"),
            "llmctl_proxy_tokens_total{kind=\"input\"} 10"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_tokens_total{kind=\"cache_read\"}"),
            "llmctl_proxy_tokens_total{kind=\"cache_read\"} 2"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_in_flight_requests "),
            "llmctl_proxy_in_flight_requests 1"
        );
        // 70 ms falls in the 0.1 s bucket, not the 0.05 s one; buckets are cumulative.
        assert_eq!(
            line(
                &text,
                "llmctl_proxy_time_to_first_token_seconds_bucket{le=\"0.05\"}"
            ),
            "llmctl_proxy_time_to_first_token_seconds_bucket{le=\"0.05\"} 0"
        );
        assert_eq!(
            line(
                &text,
                "llmctl_proxy_time_to_first_token_seconds_bucket{le=\"0.1\"}"
            ),
            "llmctl_proxy_time_to_first_token_seconds_bucket{le=\"0.1\"} 1"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_time_to_first_token_seconds_count"),
            "llmctl_proxy_time_to_first_token_seconds_count 1"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_request_duration_seconds_count"),
            "llmctl_proxy_request_duration_seconds_count 2"
        );
        // Overheads: 50 µs and 2 ms.
        assert_eq!(
            line(
                &text,
                "llmctl_proxy_overhead_seconds_bucket{le=\"0.00005\"}"
            ),
            "llmctl_proxy_overhead_seconds_bucket{le=\"0.00005\"} 1"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_overhead_seconds_bucket{le=\"+Inf\"}"),
            "llmctl_proxy_overhead_seconds_bucket{le=\"+Inf\"} 2"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_request_duration_seconds_sum"),
            "llmctl_proxy_request_duration_seconds_sum 0.302"
        );
    }

    #[test]
    fn generation_counts_the_tokens_and_time_after_the_first_token() {
        let m = Metrics::default();
        for r in [
            // 11 tokens, the first at 0.2 s, the last at 1.2 s: 10 tokens in 1 s.
            RequestRecord {
                status: 200,
                output_tokens: 11,
                ttft: Some(Duration::from_millis(200)),
                duration: Duration::from_millis(1200),
                ..Default::default()
            },
            // One token: no generation time to speak of.
            RequestRecord {
                status: 200,
                output_tokens: 1,
                ttft: Some(Duration::from_millis(100)),
                duration: Duration::from_millis(150),
                ..Default::default()
            },
            // No first token (an error): nothing.
            RequestRecord {
                status: 529,
                error_type: Some("overloaded_error"),
                duration: Duration::from_millis(5),
                ..Default::default()
            },
        ] {
            m.request_started();
            m.request_finished(&r);
        }
        let t = m.totals();
        assert_eq!(
            t,
            Totals {
                requests: 3,
                errors: 1,
                input_tokens: 0,
                output_tokens: 12,
                cache_read_tokens: 0,
                generation_tokens: 10,
                generation_nanos: 1_000_000_000,
                ttft_count: 2,
                ttft_sum_nanos: 300_000_000,
                in_flight: 0,
            }
        );
        let text = m.render();
        assert_eq!(
            line(&text, "llmctl_proxy_generation_tokens_total "),
            "llmctl_proxy_generation_tokens_total 10"
        );
        assert_eq!(
            line(&text, "llmctl_proxy_generation_seconds_total "),
            "llmctl_proxy_generation_seconds_total 1"
        );
        assert_eq!(
            m.errors_by_type(),
            BTreeMap::from([("overloaded_error", 1)])
        );
    }

    #[test]
    fn every_sample_line_is_prometheus_syntax() {
        let m = Metrics::default();
        m.request_started();
        m.request_finished(&RequestRecord {
            status: 200,
            duration: Duration::from_secs(1000),
            ..Default::default()
        });
        let re = regex::Regex::new(r#"^[a-z_]+(\{[a-z_]+="[^"]*"\})? [0-9.e+-]+$"#).unwrap();
        for l in m.render().lines().filter(|l| !l.starts_with('#')) {
            assert!(re.is_match(l), "bad line: {l}");
        }
    }
}
