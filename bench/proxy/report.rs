//! The markdown report: one column per endpoint, added figures relative to direct, and the targets.

use std::fmt::Write;

use crate::stats::Summary;
use crate::suite::{Measured, NonStream, OneConn, Streams};

pub struct Column {
    pub name: String,
    pub version: String,
    pub result: Result<Measured, String>,
}

pub fn us(x: f64) -> String {
    if x.abs() < 1000.0 {
        format!("{x:.0} µs")
    } else {
        format!("{:.2} ms", x / 1000.0)
    }
}

fn pair(s: Option<Summary>) -> String {
    s.map_or("—".into(), |s| format!("{} / {}", us(s.p50), us(s.p99)))
}

fn added(s: Option<Summary>, base: Option<Summary>) -> String {
    match (s, base) {
        (Some(s), Some(b)) => format!("{} / {}", us(s.p50 - b.p50), us(s.p99 - b.p99)),
        _ => "—".into(),
    }
}

fn errs(n: u64, first: &Option<String>) -> String {
    match first {
        Some(e) if n > 0 => format!(
            " ({n} errors: {})",
            e.chars().take(80).collect::<String>().replace('|', "/")
        ),
        _ => String::new(),
    }
}

fn ns_cell(n: &NonStream) -> String {
    format!("{}{}", pair(n.lat), errs(n.errors, &n.first_error))
}

fn tput(n: &NonStream) -> String {
    format!(
        "{:.0}/s (p50 {}){}",
        n.rate,
        n.lat.map_or("—".into(), |s| us(s.p50)),
        errs(n.errors, &n.first_error)
    )
}

fn st_rate(s: &Streams) -> String {
    format!("{:.0}/s{}", s.events_per_s, errs(s.errors, &s.first_error))
}

fn mib(kib: u64) -> String {
    if kib == 0 {
        "—".into()
    } else {
        format!("{:.1} MB", kib as f64 / 1024.0)
    }
}

type Row<'a> = (
    String,
    Box<dyn Fn(&Measured, Option<&Measured>) -> String + 'a>,
);

pub fn table(cols: &[Column]) -> String {
    let direct = cols.first().and_then(|c| c.result.as_ref().ok());
    let mut rows: Vec<Row> = vec![];
    let rates: Vec<f64> = direct
        .map(|d| d.fixed_rate.iter().map(|(r, _)| *r).collect())
        .unwrap_or_default();
    for (i, r) in rates.iter().enumerate() {
        let label = format!("non-stream p50 / p99 at {r:.0} req/s, 1 conn");
        rows.push((
            label,
            Box::new(move |m, _| m.fixed_rate.get(i).map_or("—".into(), |(_, n)| ns_cell(n))),
        ));
        let label = format!("  added vs direct at {r:.0} req/s");
        rows.push((
            label,
            Box::new(move |m, d| {
                added(
                    m.fixed_rate.get(i).and_then(|(_, n)| n.lat),
                    d.and_then(|d| d.fixed_rate.get(i)?.1.lat),
                )
            }),
        ));
    }
    rows.push((
        "max throughput, 1 conn".into(),
        Box::new(|m, _| tput(&m.max_1)),
    ));
    rows.push((
        "max throughput, 8 conns".into(),
        Box::new(|m, _| tput(&m.max_8)),
    ));
    rows.push((
        "stream first byte p50 / p99".into(),
        Box::new(|m, _| pair(m.stream_1.first_byte)),
    ));
    rows.push((
        "  added vs direct".into(),
        Box::new(|m, d| added(m.stream_1.first_byte, d.and_then(|d| d.stream_1.first_byte))),
    ));
    rows.push((
        "stream first text event p50 / p99".into(),
        Box::new(|m, _| pair(m.stream_1.first_content)),
    ));
    rows.push((
        "  added vs direct".into(),
        Box::new(|m, d| {
            added(
                m.stream_1.first_content,
                d.and_then(|d| d.stream_1.first_content),
            )
        }),
    ));
    rows.push((
        "text events/s, 1 stream".into(),
        Box::new(|m, _| st_rate(&m.stream_1)),
    ));
    rows.push((
        "text events/s, 64 streams".into(),
        Box::new(|m, _| st_rate(&m.stream_64)),
    ));
    rows.push((
        "per-event delay p50 / p99 (paced)".into(),
        Box::new(|m, _| {
            format!(
                "{}{}",
                pair(m.paced.event_delay),
                errs(m.paced.errors, &m.paced.first_error)
            )
        }),
    ));
    rows.push((
        "  added per event vs direct".into(),
        Box::new(|m, d| added(m.paced.event_delay, d.and_then(|d| d.paced.event_delay))),
    ));
    rows.push((
        "CPU s per 1000 text events (64 streams)".into(),
        Box::new(|m, _| {
            m.cpu_per_1000_events
                .map_or("—".into(), |c| format!("{c:.3} s"))
        }),
    ));
    rows.push((
        "RSS idle (after warm-up)".into(),
        Box::new(|m, _| mib(m.rss_idle_kib)),
    ));
    rows.push((
        "peak RSS (VmHWM, incl. 256 streams)".into(),
        Box::new(|m, _| {
            format!(
                "{}{}",
                mib(m.rss_peak_kib),
                errs(m.streams_256.errors, &m.streams_256.first_error)
            )
        }),
    ));
    rows.push((
        "256 concurrent streams completed".into(),
        Box::new(|m, _| format!("{}/256", m.streams_256.streams)),
    ));

    let mut out = String::new();
    let _ = write!(out, "| |");
    for c in cols {
        let _ = write!(out, " {} {} |", c.name, c.version);
    }
    let _ = write!(out, "\n|---|");
    for _ in cols {
        let _ = write!(out, "---|");
    }
    out.push('\n');
    for (label, f) in &rows {
        let _ = write!(out, "| {label} |");
        for c in cols {
            let cell = match &c.result {
                Ok(m) => f(m, direct),
                Err(_) => "not measured".into(),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    for c in cols {
        if let Err(why) = &c.result {
            let _ = writeln!(
                out,
                "\n**{}** not measured: {}",
                c.name,
                why.replace('\n', " ").chars().take(600).collect::<String>()
            );
        }
    }
    out
}

/// The targets, checked for llmctl against direct and claude-code-router; next to each, what the
/// pass-through floor (a proxy that does nothing) measured, where it applies.
pub fn targets(
    llmctl: &Measured,
    direct: &Measured,
    ccr: Option<&Measured>,
    floor: Option<&Measured>,
) -> String {
    let mut out =
        String::from("| target | llmctl | met | pass-through floor |\n|---|---|---|---|\n");
    let mut line = |t: &str, m: String, ok: Option<bool>, f: String| {
        let v = ok.map_or("n/a", |b| if b { "yes" } else { "**no**" });
        let _ = writeln!(out, "| {t} | {m} | {v} | {f} |");
    };
    let first = |m: &Measured| m.fixed_rate.first().and_then(|(_, n)| n.lat);
    let floor_added = |pick: &dyn Fn(&Measured) -> Option<Summary>, p99: bool| match (
        floor.and_then(pick),
        pick(direct),
    ) {
        (Some(f), Some(d)) => us(if p99 { f.p99 - d.p99 } else { f.p50 - d.p50 }),
        _ => "—".into(),
    };
    match (first(llmctl), first(direct)) {
        (Some(l), Some(d)) => {
            line(
                "≤ 0.1 ms added p50, 1 conn",
                us(l.p50 - d.p50),
                Some(l.p50 - d.p50 <= 100.0),
                floor_added(&first, false),
            );
            line(
                "≤ 1 ms added p99, 1 conn",
                us(l.p99 - d.p99),
                Some(l.p99 - d.p99 <= 1000.0),
                floor_added(&first, true),
            );
        }
        _ => line("added latency, 1 conn", "—".into(), None, "—".into()),
    }
    match ccr {
        Some(c) if c.max_8.rate > 0.0 => {
            let x = llmctl.max_8.rate / c.max_8.rate;
            line(
                "≥ 5× claude-code-router throughput, 8 conns",
                format!(
                    "{x:.1}× ({:.0}/s vs {:.0}/s)",
                    llmctl.max_8.rate, c.max_8.rate
                ),
                Some(x >= 5.0),
                floor.map_or("—".into(), |f| format!("{:.0}/s", f.max_8.rate)),
            );
        }
        _ => line(
            "≥ 5× claude-code-router throughput, 8 conns",
            "claude-code-router not measured".into(),
            None,
            "—".into(),
        ),
    }
    let paced = |m: &Measured| m.paced.event_delay;
    match (llmctl.paced.event_delay, direct.paced.event_delay) {
        (Some(l), Some(d)) => line(
            "< 0.2 ms added per streamed event, p99",
            us(l.p99 - d.p99),
            Some(l.p99 - d.p99 < 200.0),
            floor_added(&paced, true),
        ),
        _ => line(
            "< 0.2 ms added per streamed event, p99",
            "—".into(),
            None,
            "—".into(),
        ),
    }
    let first_byte = |m: &Measured| m.stream_1.first_byte;
    match (llmctl.stream_1.first_byte, direct.stream_1.first_byte) {
        (Some(l), Some(d)) => line(
            "stream first byte within 1 ms of upstream's (p50)",
            us(l.p50 - d.p50),
            Some(l.p50 - d.p50 <= 1000.0),
            floor_added(&first_byte, false),
        ),
        _ => line(
            "stream first byte within 1 ms",
            "—".into(),
            None,
            "—".into(),
        ),
    }
    line(
        "< 30 MB RSS idle",
        mib(llmctl.rss_idle_kib),
        Some(llmctl.rss_idle_kib > 0 && llmctl.rss_idle_kib < 30 * 1024),
        floor.map_or("—".into(), |f| mib(f.rss_idle_kib)),
    );
    line(
        "< 100 MB RSS with 256 concurrent streams",
        mib(llmctl.rss_peak_kib),
        Some(
            llmctl.rss_peak_kib > 0
                && llmctl.rss_peak_kib < 100 * 1024
                && llmctl.streams_256.streams == 256,
        ),
        floor.map_or("—".into(), |f| mib(f.rss_peak_kib)),
    );
    out
}

/// The one-connection closed-loop table: p50 / p99 of each endpoint non-streaming and streaming, what each
/// adds over direct access (the first row) and that as a multiple of what nginx adds; then the issue's
/// acceptance: llmctl adds at most 1.5× what nginx adds, at p50 and p99, and /v1/responses costs what
/// /v1/messages costs.
fn pick(r: &OneConn, stream: bool) -> &NonStream {
    if stream { &r.stream } else { &r.nonstream }
}

pub fn one_conn(rows: &[OneConn]) -> String {
    let Some(direct) = rows.first() else {
        return "nothing measured\n".into();
    };
    let nginx = rows.iter().find(|r| r.name.starts_with("nginx"));
    let add = |m: &NonStream, d: &NonStream| match (m.lat, d.lat) {
        (Some(m), Some(d)) => Some((m.p50 - d.p50, m.p99 - d.p99)),
        _ => None,
    };
    let added = |r: &OneConn, stream: bool| add(pick(r, stream), pick(direct, stream));
    let ratio = |x: f64, base: f64| {
        if base > 0.0 {
            format!("{:.2}×", x / base)
        } else {
            "—".into()
        }
    };
    let mut out = String::from(
        "| endpoint | non-stream p50 / p99 | added p50 / p99 | ÷ nginx's added | stream p50 / p99 | added p50 / p99 | ÷ nginx's added |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = write!(out, "| {} |", r.name);
        for stream in [false, true] {
            let a = added(r, stream);
            let n = nginx.and_then(|n| added(n, stream));
            let _ = write!(
                out,
                " {} | {} | {} |",
                ns_cell(pick(r, stream)),
                a.map_or("—".into(), |(p50, p99)| format!(
                    "{} / {}",
                    us(p50),
                    us(p99)
                )),
                match (a, n) {
                    (Some(a), Some(n))
                        if !r.name.starts_with("nginx") && !std::ptr::eq(r, direct) =>
                        format!("{} / {}", ratio(a.0, n.0), ratio(a.1, n.1)),
                    _ => "".into(),
                }
            );
        }
        out.push('\n');
    }
    out.push_str("\n| target (one connection, closed loop) | measured | met |\n|---|---|---|\n");
    let mut line = |t: String, m: String, ok: Option<bool>| {
        let v = ok.map_or("n/a", |b| if b { "yes" } else { "**no**" });
        let _ = writeln!(out, "| {t} | {m} | {v} |");
    };
    for r in rows.iter().filter(|r| r.name.starts_with("llmctl")) {
        for stream in [false, true] {
            let kind = if stream { "streaming" } else { "non-streaming" };
            match (added(r, stream), nginx.and_then(|n| added(n, stream))) {
                (Some(a), Some(n)) => {
                    for (q, x, base) in [("p50", a.0, n.0), ("p99", a.1, n.1)] {
                        line(
                            format!("{}, {kind}: added {q} ≤ 1.5× nginx's", r.name),
                            format!("{} vs nginx's {} ({})", us(x), us(base), ratio(x, base)),
                            Some(x <= 1.5 * base.max(0.0)),
                        );
                    }
                }
                _ => line(
                    format!("{}, {kind}: added ≤ 1.5× nginx's", r.name),
                    "nginx or llmctl not measured".into(),
                    None,
                ),
            }
        }
    }
    let messages = rows.iter().find(|r| r.name.contains("/v1/messages"));
    let responses = rows.iter().find(|r| r.name.contains("/v1/responses"));
    if let (Some(m), Some(r)) = (messages, responses) {
        for stream in [false, true] {
            let kind = if stream { "streaming" } else { "non-streaming" };
            if let (Some(a), Some(b)) = (pick(m, stream).lat, pick(r, stream).lat) {
                // "The same": within a tenth of what the proxy adds, or 10 µs, whichever is more.
                let budget = added(m, stream).map_or(10.0, |(p50, _)| (p50 / 10.0).max(10.0));
                line(
                    format!("/v1/responses costs what /v1/messages costs, {kind} (p50)"),
                    format!("{} vs {} ({:+.0} µs)", us(b.p50), us(a.p50), b.p50 - a.p50),
                    Some(b.p50 - a.p50 <= budget),
                );
            }
        }
    }
    out
}
