//! What routing adds per request: serve-proxy's router over 8 replicas with 1,000 sessions in its index.
//! Per request that is hashing the translated body into its prefix chain, the session lookup, the prefix
//! match on every replica, the policy, recording the choice, and the answer's feedback, as `pump::open` and
//! the request's end do. Figures only (no timed assertions): `cargo bench --bench router`.
//!
//! Bodies look like a coding agent's: a system prompt shared by every session (as Claude Code's is), then the
//! session's own turns. Two sizes: ~8 KB (a short conversation) and ~80 KB (Claude Code's ~20k-token first
//! prompt).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use llmctl::proxy::config::ReplicaSpec;
use llmctl::proxy::router::{self, Acquired, Affinity, Replica, RouteKey, Router, View};
use llmctl::proxy::stream::Usage;
use llmctl::proxy::upstream::Upstream;
use serde_json::json;

const REPLICAS: usize = 8;
const SESSIONS: usize = 1000;
const ITERATIONS: usize = 20_000;

fn router() -> Arc<Router> {
    let replicas = (0..REPLICAS)
        .map(|i| {
            let url = format!("http://127.0.0.1:{}", 30_000 + i);
            let upstream = Upstream::new(
                &url,
                None,
                Some("m"),
                Duration::from_secs(1),
                Duration::from_secs(1),
                0,
            )
            .expect("an upstream client");
            let spec = ReplicaSpec {
                url,
                weight: 1,
                model: None,
                peer: false,
            };
            Replica::new(spec, upstream)
        })
        .collect();
    Arc::new(Router::new(replicas))
}

/// Session `s`'s body: the shared system prompt, then its own turns, serialized as the proxy sends it.
fn body(s: usize, bytes: usize) -> Vec<u8> {
    let system =
        "You are an interactive CLI tool that helps users with software engineering tasks. "
            .repeat(bytes * 3 / 4 / 84);
    let own = format!("session {s}: ").repeat(bytes / 4 / 14);
    serde_json::to_vec(&json!({"model": "m", "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": own},
    ], "stream": true}))
    .expect("JSON")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(label: &str, bytes: usize, sessions: usize, iterations: usize) {
    let r = router();
    let bodies: Vec<Vec<u8>> = (0..sessions).map(|s| body(s, bytes)).collect();
    let usage = Usage {
        input_tokens: 100,
        output_tokens: 10,
        cache_read_input_tokens: (bytes / 4) as u64,
    };
    let route = |s: usize| {
        let key = RouteKey {
            session: Some(router::hash_bytes(format!("session-{s}").as_bytes())),
            chain: router::prompt_chain(&bodies[s]),
        };
        match r.acquire(&key, 0, Duration::ZERO).now_or_never() {
            Some(Acquired::Lease(lease)) => {
                lease.finish(&usage, false);
                black_box(lease.replica)
            }
            _ => panic!("no replica: every slot should be free between requests"),
        }
    };
    // Every session once, so the index holds 1,000 conversations.
    for s in 0..sessions {
        route(s);
    }
    let mut times = Vec::with_capacity(iterations);
    let mut x = 12345u64;
    for _ in 0..iterations {
        // A cheap LCG spreads the sessions without a random-number crate.
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let s = (x >> 33) as usize % sessions;
        let t = Instant::now();
        route(s);
        times.push(t.elapsed());
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "routing, {REPLICAS} replicas, {sessions} sessions, {label} body ({} bytes, {} chunks): p50 {:.2} µs, p99 {:.2} µs, mean {:.2} µs",
        bodies[0].len(),
        router::prompt_chain(&bodies[0]).len(),
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
    );
}

fn policy_only(iterations: usize) {
    let views: Vec<View> = (0..REPLICAS as u32)
        .map(|i| View {
            up: true,
            in_flight: i % 3,
            slots: 4,
            weight: 1,
            prefix: i * 7 % 5,
            indexed: i * 100,
            sessions: i,
        })
        .collect();
    let t = Instant::now();
    for i in 0..iterations {
        black_box(router::choose(
            black_box(&views),
            Affinity::Session(i % REPLICAS),
            0,
        ));
    }
    println!(
        "policy alone (choose over {REPLICAS} replicas): {:.3} µs per decision",
        t.elapsed().as_secs_f64() * 1e6 / iterations as f64
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not, and then one short pass checks that the
    // bench still runs, without measuring anything worth printing.
    let measure = std::env::args().any(|a| a == "--bench");
    let (sessions, iterations) = if measure {
        (SESSIONS, ITERATIONS)
    } else {
        (20, 20)
    };
    policy_only(iterations);
    run("8 KB", 8 * 1024, sessions, iterations);
    run("80 KB", 80 * 1024, sessions, iterations);
}
