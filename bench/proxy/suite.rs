//! The measurements run against every endpoint, in a fixed order, and what they produce.

use std::time::Duration;

use crate::load::{self, RunResult, StreamResult};
use crate::stats::{self, Summary};
use crate::targets::Proc;

pub struct Settings {
    pub secs: f64,
    pub rates: Vec<f64>,
    pub fast_chunks: usize,
    pub paced_chunks: usize,
    pub pace_us: u64,
}

impl Settings {
    pub fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }
}

pub struct NonStream {
    pub lat: Option<Summary>,
    pub rate: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl From<RunResult> for NonStream {
    fn from(r: RunResult) -> NonStream {
        NonStream {
            rate: r.rate(),
            errors: r.errors,
            first_error: r.first_error,
            lat: stats::summarize(r.latencies_us),
        }
    }
}

pub struct Streams {
    pub first_byte: Option<Summary>,
    pub first_content: Option<Summary>,
    pub event_delay: Option<Summary>,
    pub events_per_s: f64,
    pub streams: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl From<StreamResult> for Streams {
    fn from(r: StreamResult) -> Streams {
        Streams {
            events_per_s: r.events_per_s(),
            streams: r.streams,
            errors: r.errors,
            first_error: r.first_error,
            first_byte: stats::summarize(r.first_byte_us),
            first_content: stats::summarize(r.first_content_us),
            event_delay: stats::summarize(r.event_delay_us),
        }
    }
}

pub struct Measured {
    /// (rate, result) for the open-loop runs with one connection.
    pub fixed_rate: Vec<(f64, NonStream)>,
    pub max_1: NonStream,
    pub max_8: NonStream,
    pub stream_1: Streams,
    pub stream_64: Streams,
    pub paced: Streams,
    pub streams_256: Streams,
    /// CPU seconds of the measured process per 1000 streamed text events (64-stream run).
    pub cpu_per_1000_events: Option<f64>,
    pub rss_idle_kib: u64,
    pub rss_peak_kib: u64,
}

/// Warm-up: connection set-up, lazy imports and JITs of the peers are not what is measured.
async fn warm_up(ep: &load::Endpoint, s: &Settings) {
    load::nonstream(ep, 1, None, Duration::from_secs(1)).await;
    load::streams(ep, 1, s.fast_chunks, 0, Duration::from_secs(1), None).await;
}

/// The fixed-rate runs of several endpoints taken in turns, one second each, the order rotating every round,
/// until each has had `s.secs` at every rate. Tens of microseconds apart, the figures of direct access, the
/// pass-through floor and llmctl are only comparable when each saw the same moments of the machine: run one
/// after the other, a minute apart, they drifted by more than the differences measured (a direct p50 of
/// 140 µs in one run, 192 µs in the next).
pub async fn fixed_rates_interleaved(procs: &[&Proc], s: &Settings) -> Vec<Vec<(f64, NonStream)>> {
    for p in procs {
        warm_up(&p.endpoint, s).await;
    }
    let rounds = (s.secs.round() as usize).max(1);
    let round = Duration::from_secs_f64(s.secs / rounds as f64);
    let names: Vec<&str> = procs.iter().map(|p| p.name.as_str()).collect();
    let mut out: Vec<Vec<(f64, NonStream)>> = procs.iter().map(|_| vec![]).collect();
    for &r in &s.rates {
        eprintln!(
            "  non-streaming at {r} requests/s, 1 connection, {rounds} rounds of {:.1} s in turns: {}",
            round.as_secs_f64(),
            names.join(", ")
        );
        let mut parts: Vec<Vec<RunResult>> = procs.iter().map(|_| vec![]).collect();
        for i in 0..rounds {
            for k in 0..procs.len() {
                let j = (i + k) % procs.len();
                parts[j].push(load::nonstream(&procs[j].endpoint, 1, Some(r), round).await);
            }
        }
        for (o, p) in out.iter_mut().zip(parts) {
            let elapsed = p.iter().map(|x| x.elapsed).sum();
            o.push((r, RunResult::merge(p, elapsed).into()));
        }
    }
    out
}

/// Measures everything against `p`; the fixed-rate runs too unless `fixed` brings them (from
/// [`fixed_rates_interleaved`]).
pub async fn run(
    p: &Proc,
    s: &Settings,
    measure_process: bool,
    fixed: Option<Vec<(f64, NonStream)>>,
) -> Measured {
    let ep = &p.endpoint;
    let dur = s.dur();
    warm_up(ep, s).await;
    let pids = if measure_process {
        p.measured_pids()
    } else {
        vec![]
    };
    let rss_idle_kib = stats::status_kib(&pids, "VmRSS:");

    let fixed_rate = match fixed {
        Some(f) => f,
        None => {
            let mut f = vec![];
            for &r in &s.rates {
                eprintln!(
                    "  [{}] non-streaming at {r} requests/s, 1 connection",
                    p.name
                );
                f.push((r, load::nonstream(ep, 1, Some(r), dur).await.into()));
            }
            f
        }
    };
    eprintln!("  [{}] non-streaming, max throughput", p.name);
    let max_1 = load::nonstream(ep, 1, None, dur).await.into();
    let max_8 = load::nonstream(ep, 8, None, dur).await.into();
    eprintln!("  [{}] streams", p.name);
    let stream_1 = load::streams(ep, 1, s.fast_chunks, 0, dur, None)
        .await
        .into();
    let ticks0 = stats::cpu_ticks(&pids);
    let r64 = load::streams(ep, 64, s.fast_chunks, 0, dur, None).await;
    let ticks = stats::cpu_ticks(&pids).saturating_sub(ticks0);
    let cpu_per_1000_events = (measure_process && r64.content_events > 0).then(|| {
        ticks as f64 / stats::clock_ticks_per_second() as f64 / (r64.content_events as f64 / 1000.0)
    });
    let stream_64 = r64.into();
    eprintln!("  [{}] paced, stamped stream", p.name);
    let paced = load::streams(ep, 1, s.paced_chunks, s.pace_us, dur, Some(3))
        .await
        .into();
    eprintln!("  [{}] 256 concurrent streams", p.name);
    let streams_256 = load::streams(ep, 256, 100, 10_000, dur, Some(1))
        .await
        .into();
    let rss_peak_kib = stats::status_kib(&pids, "VmHWM:");
    Measured {
        fixed_rate,
        max_1,
        max_8,
        stream_1,
        stream_64,
        paced,
        streams_256,
        cpu_per_1000_events,
        rss_idle_kib,
        rss_peak_kib,
    }
}

/// One row of the one-connection closed-loop table: an endpoint (a front door, for llmctl) measured
/// non-streaming and streaming.
pub struct OneConn {
    pub name: String,
    pub nonstream: NonStream,
    pub stream: NonStream,
}

/// The wrk-like figures (bench/profile.sh, the measurement): one connection, closed loop, each
/// endpoint non-streaming and streaming, taken in turns of one second, the order rotating every round, as
/// [`fixed_rates_interleaved`] does and for the same reason (tens of microseconds apart, only figures taken
/// over the same moments of the machine compare).
pub async fn one_conn_interleaved(
    endpoints: &[(String, load::Endpoint)],
    s: &Settings,
) -> Vec<OneConn> {
    let variants: Vec<(&load::Endpoint, bool)> = endpoints
        .iter()
        .flat_map(|(_, ep)| [(ep, false), (ep, true)])
        .collect();
    for (ep, stream) in &variants {
        load::closed_loop(ep, *stream, Duration::from_millis(300)).await;
    }
    let rounds = (s.secs.round() as usize).max(1);
    let round = Duration::from_secs_f64(s.secs / rounds as f64);
    eprintln!(
        "  one connection, closed loop, {rounds} rounds of {:.1} s in turns: {} (each non-streaming and streaming)",
        round.as_secs_f64(),
        endpoints
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut parts: Vec<Vec<RunResult>> = variants.iter().map(|_| vec![]).collect();
    for i in 0..rounds {
        for k in 0..variants.len() {
            let j = (i + k) % variants.len();
            let (ep, stream) = variants[j];
            parts[j].push(load::closed_loop(ep, stream, round).await);
        }
    }
    let mut merged = parts.into_iter().map(|p| {
        let elapsed = p.iter().map(|x| x.elapsed).sum();
        NonStream::from(RunResult::merge(p, elapsed))
    });
    endpoints
        .iter()
        .map(|(name, _)| OneConn {
            name: name.clone(),
            nonstream: merged.next().expect("two results per endpoint"),
            stream: merged.next().expect("two results per endpoint"),
        })
        .collect()
}
