//! Routing across replicas of one model (several llama-servers, one per GPU): which replica gets a request.
//!
//! A coding agent resends its whole conversation every turn, and a replica that never saw it pays the full
//! prefill again; so the router prefers, in order:
//! 1. the replica that served the client's session before (Claude Code's `x-claude-code-session-id` or
//!    `metadata.user_id`'s `session_id`, Codex's `prompt_cache_key`); a new session goes to the least loaded
//!    replica with the fewest sessions (see [`choose`] for why not the longest prefix);
//! 2. without a session, the replica with the longest cached prefix of the request, from an approximate
//!    per-replica index of what the router itself sent there (a hash chain of fixed-size chunks of the
//!    translated request);
//! 3. the least loaded replica (in flight per slot and weight; on a tie, the fewest sessions, then the
//!    smallest index);
//!
//! and a balance guard overrides 1 and 2: affinity never sends to a replica whose slots are all busy while
//! another has a free slot. The index is a cache, never required: it is forgotten when a replica goes down,
//! when a replica reports far fewer cached tokens than predicted (it restarted or evicted), and on restart of
//! the proxy. [`choose`] is the policy, a pure function of the replicas' state; [`Router`] holds that state.

use std::collections::HashMap;
use std::fmt::Write;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::config::ReplicaSpec;
use super::stream::Usage;
use super::upstream::Upstream;

/// Replicas are tracked in a 64-bit "already tried" mask.
pub const MAX_REPLICAS: usize = 64;
/// Bytes of the translated request per chunk of the prefix index: ~128 tokens of text, fine enough for
/// conversations of thousands of tokens, coarse enough that a 20k-token prompt is ~160 hashes.
pub const CHUNK_BYTES: usize = 512;
/// Chunks hashed per request at most (2 MiB of request): bounds the per-request cost of a huge body.
const MAX_CHAIN: usize = 4096;
/// Chunk hashes remembered per replica (two generations of half this each): ~16 MiB of prompt text, more
/// than a llama-server's slots and host-RAM cache hold, in ~1 MiB of memory.
const INDEX_CAPACITY: usize = 32_768;
/// Sessions remembered (two generations): far more than one host serves at once.
const SESSION_CAPACITY: usize = 65_536;
/// Slots assumed for a replica whose `/slots` cannot be read (llama-server's default `-np` is 4).
pub const DEFAULT_SLOTS: u32 = 4;
/// Requests that may wait for a free slot when every replica is full; more are refused at once.
pub const MAX_QUEUED: usize = 64;
/// A replica that reports fewer cached tokens than this fraction of the prefix the index predicted has
/// lost its cache (a restart the probe did not see, an eviction).
const LOST_CACHE_RATIO: f64 = 0.25;
/// A health probe (or `/slots` read) that takes longer marks the replica down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often every replica is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------------------
// The policy

/// Why a replica was chosen (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Session,
    Prefix,
    Load,
    /// A retry after the replica first chosen failed before the answer started.
    Failover,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Session,
        Reason::Prefix,
        Reason::Load,
        Reason::Failover,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Session => "session",
            Reason::Prefix => "prefix",
            Reason::Load => "load",
            Reason::Failover => "failover",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// What the policy sees of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub up: bool,
    pub in_flight: u32,
    pub slots: u32,
    pub weight: u32,
    /// Chunks of this request's prefix the replica is believed to hold.
    pub prefix: u32,
    /// Chunk hashes in its index: how much of its cache the router already uses.
    pub indexed: u32,
    /// Sessions placed on it since it last came up.
    pub sessions: u32,
}

impl View {
    fn free(&self) -> bool {
        self.in_flight < self.slots.max(1)
    }

    /// In flight per (slot × weight), compared as integers.
    fn busy(&self) -> u64 {
        let capacity = u64::from(self.slots.max(1)) * u64::from(self.weight.max(1));
        u64::from(self.in_flight) * 1_000_000 / capacity
    }
}

/// What the request says about its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// The client names no session: its prompt is all there is to go by.
    Anonymous,
    /// A session the router has not placed yet (or forgot).
    NewSession,
    /// The replica that served the session before.
    Session(usize),
}

/// The replica for a request, and why; `None` when every replica was tried. `tried` has bit `i` set for each
/// replica that already failed this request.
///
/// A new session goes to the least loaded replica, then the one with the fewest sessions, and only then the
/// longest prefix: every session of one client shares its system prompt and tools, so "longest prefix" alone
/// would put every new session where the first one went, and leave the other replicas idle for good once the
/// sessions stick. Paying the shared prompt's prefill once per replica is the cheaper side. A request with no
/// session follows its longest prefix (its own conversation, the only identity it has).
pub fn choose(views: &[View], affinity: Affinity, tried: u64) -> Option<(usize, Reason)> {
    let n = views.len().min(MAX_REPLICAS);
    let untried = |i: usize| tried & (1u64 << i) == 0;
    let any_up = (0..n).any(|i| views[i].up && untried(i));
    // When every untried replica is marked down they are tried anyway: a probe's verdict may be a second
    // old, and a request that fails on all of them gets the last error, as with one upstream.
    let candidate = |i: usize| untried(i) && (views[i].up || !any_up);
    let some_free = (0..n).any(|i| candidate(i) && views[i].free());
    // The balance guard: affinity may pick a full replica only when no other has a free slot.
    let allowed = |i: usize| candidate(i) && (views[i].free() || !some_free);
    let because = |r: Reason| if tried != 0 { Reason::Failover } else { r };
    let emptiest = |i: &usize| {
        let v = &views[*i];
        (v.busy(), v.sessions, v.indexed)
    };

    match affinity {
        Affinity::Session(s) if s < n && allowed(s) => {
            return Some((s, because(Reason::Session)));
        }
        Affinity::NewSession => {
            let spread = |i: &usize| {
                let v = &views[*i];
                (v.busy(), v.sessions, std::cmp::Reverse(v.prefix), v.indexed)
            };
            return (0..n)
                .filter(|&i| allowed(i))
                .min_by_key(spread)
                .map(|i| (i, because(Reason::Load)));
        }
        // No session, or its replica is down or full: where the longest prefix is.
        _ => {}
    }
    let best = (0..n)
        .filter(|&i| allowed(i))
        .map(|i| views[i].prefix)
        .max()
        .unwrap_or(0);
    if best > 0
        && let Some(i) = (0..n)
            .filter(|&i| allowed(i) && views[i].prefix == best)
            .min_by_key(emptiest)
    {
        return Some((i, because(Reason::Prefix)));
    }
    (0..n)
        .filter(|&i| allowed(i))
        .min_by_key(emptiest)
        .map(|i| (i, because(Reason::Load)))
}

// ---------------------------------------------------------------------------------------------------------
// The request's key: session and prefix chain

/// What routing knows of a request.
#[derive(Debug, Clone, Default)]
pub struct RouteKey {
    pub session: Option<u64>,
    /// Hash chain of the request's full chunks: `chain[i]` stands for the first `i + 1` chunks.
    pub chain: Vec<u64>,
}

/// The session a client names: Claude Code's header, else its `metadata.user_id` (a JSON string with
/// `session_id`, or the older `user_…_session_<uuid>` form), else Codex's `prompt_cache_key` or `session-id`
/// header. Hashed: the router keeps no client text.
pub fn session_of(headers: &HeaderMap, body: &serde_json::Map<String, Value>) -> Option<u64> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    // A hop from a peer proxy carries the session it hashed (the client's headers stayed there).
    if let Some(s) = header(super::upstream::SESSION_HEADER)
        && let Ok(h) = u64::from_str_radix(s, 16)
    {
        return Some(h);
    }
    if let Some(s) = header("x-claude-code-session-id") {
        return Some(hash_bytes(s.as_bytes()));
    }
    if let Some(user) = body
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        && let Some(s) = session_in_user_id(user)
    {
        return Some(hash_bytes(s.as_bytes()));
    }
    if let Some(Value::String(k)) = body.get("prompt_cache_key")
        && !k.is_empty()
    {
        return Some(hash_bytes(k.as_bytes()));
    }
    header("session-id").map(|s| hash_bytes(s.as_bytes()))
}

/// The session id inside Claude Code's `metadata.user_id`; the rest of it names the user, not a session.
fn session_in_user_id(user: &str) -> Option<String> {
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(user)
        && let Some(Value::String(s)) = o.get("session_id")
        && !s.is_empty()
    {
        return Some(s.clone());
    }
    user.split_once("_session_")
        .map(|(_, s)| s.to_string())
        .filter(|s| !s.is_empty())
}

/// The prefix chain of a serialized chat request. Hashing starts at `"messages"`: the model name before it
/// may differ per replica, and everything the prompt is rendered from (system text, turns) follows in order,
/// so two turns of one conversation share a prefix of these bytes up to the first new message. The last,
/// partial chunk is left out: it changes with the next turn.
pub fn prompt_chain(body: &[u8]) -> Vec<u64> {
    let start = find(body, b",\"messages\":").unwrap_or(0);
    let rest = &body[start..];
    let mut chain = Vec::with_capacity((rest.len() / CHUNK_BYTES).min(MAX_CHAIN));
    let mut h = 0u64;
    for chunk in rest.chunks_exact(CHUNK_BYTES).take(MAX_CHAIN) {
        h = mix(h ^ hash_bytes(chunk));
        chain.push(h);
    }
    chain
}

/// The serialized chat request with another model: `{"model":M` + everything from `,"messages":` on (the
/// model is the first field of a `ChatRequest`). `None` when the body does not have that shape.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let rest = find(body, b",\"messages\":")?;
    if !body.starts_with(b"{\"model\":") {
        return None;
    }
    let name = serde_json::to_vec(model).ok()?;
    let mut out = Vec::with_capacity(body.len() + name.len());
    out.extend_from_slice(b"{\"model\":");
    out.extend_from_slice(&name);
    out.extend_from_slice(&body[rest..]);
    Some(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A fast non-cryptographic hash (FxHash's word step on four independent lanes, then a final mix): the
/// index is a guess, a rare collision costs one prefill, and the hash runs over every byte of every request.
/// Four lanes because one is bound by the multiply's latency (a 20k-token prompt took ~16 µs); four keep the
/// multiplier busy.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let step = |h: u64, w: &[u8]| {
        let mut a = [0u8; 8];
        a[..w.len()].copy_from_slice(w);
        (h.rotate_left(5) ^ u64::from_le_bytes(a)).wrapping_mul(K)
    };
    let mut lanes = [bytes.len() as u64, 1, 2, 3];
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = step(*lane, w);
        }
    }
    for w in blocks.remainder().chunks(8) {
        lanes[0] = step(lanes[0], w);
    }
    mix(lanes[0] ^ lanes[1].rotate_left(16) ^ lanes[2].rotate_left(32) ^ lanes[3].rotate_left(48))
}

/// SplitMix64's finalizer: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The keys are hashes already: hashing them again would only cost time.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// A bounded map with approximate LRU eviction: inserts go to the current generation; when it is full, the
/// previous generation is dropped and the current one takes its place. O(1) per operation, at most
/// `capacity` entries, and anything used within the last `capacity / 2` inserts survives.
struct TwoGen<V> {
    current: IdMap<V>,
    previous: IdMap<V>,
    half: usize,
}

impl<V: Copy> TwoGen<V> {
    fn new(capacity: usize) -> Self {
        TwoGen {
            current: IdMap::default(),
            previous: IdMap::default(),
            half: (capacity / 2).max(1),
        }
    }

    fn get(&self, k: u64) -> Option<V> {
        self.current
            .get(&k)
            .or_else(|| self.previous.get(&k))
            .copied()
    }

    fn insert(&mut self, k: u64, v: V) {
        self.current.insert(k, v);
        if self.current.len() >= self.half {
            self.previous = std::mem::take(&mut self.current);
        }
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }
}

/// Chunks of `chain` a replica's index holds, counted from the start. A binary search: a chain hash stands for
/// its whole prefix, so when chunk `i` is present all before it were sent there too (eviction can break
/// this, and then the estimate is merely shorter or longer by what was evicted).
fn matched(index: &TwoGen<()>, chain: &[u64]) -> usize {
    let (mut lo, mut hi) = (0, chain.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if index.get(chain[mid - 1]).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

// ---------------------------------------------------------------------------------------------------------
// The router's state

/// Per-replica counters for `/metrics` and the dashboard.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub decisions: [AtomicU64; 4],
}

pub struct Replica {
    pub spec: ReplicaSpec,
    pub upstream: Upstream,
    up: AtomicBool,
    in_flight: AtomicU32,
    slots: AtomicU32,
    /// `/slots` was read since the replica last came up.
    slots_read: AtomicBool,
    pub stats: ReplicaStats,
}

impl Replica {
    pub fn new(spec: ReplicaSpec, upstream: Upstream) -> Self {
        Replica {
            spec,
            upstream,
            // Up until a probe or a request says otherwise: the first requests need not wait for a probe.
            up: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            slots: AtomicU32::new(DEFAULT_SLOTS),
            slots_read: AtomicBool::new(false),
            stats: ReplicaStats::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn slots(&self) -> u32 {
        self.slots.load(Ordering::Relaxed)
    }
}

struct Index {
    /// Session hash → replica.
    sessions: TwoGen<u16>,
    /// Sessions placed on each replica since it last came up (new ones and ones moved there).
    placed: Vec<u32>,
    /// One set of chain hashes per replica.
    prefixes: Vec<TwoGen<()>>,
}

pub struct Router {
    replicas: Vec<Replica>,
    index: Mutex<Index>,
    /// Woken when a slot frees or a replica comes back, for requests waiting in the queue.
    freed: tokio::sync::Notify,
    queued: AtomicUsize,
}

/// What [`Router::acquire`] gives.
pub enum Acquired {
    Lease(Lease),
    /// Every replica was tried.
    Exhausted,
    /// Every slot is busy and the queue is full, or the wait for a slot ran out.
    Busy(String),
}

/// A request's hold on a replica: counted in flight until dropped.
pub struct Lease {
    router: Arc<Router>,
    pub replica: usize,
    pub reason: Reason,
    /// Chunks the index predicted the replica holds, and the request's chunks.
    predicted: usize,
    chunks: usize,
}

impl Lease {
    pub fn replica(&self) -> &Replica {
        &self.router.replicas[self.replica]
    }

    /// The answer is over: its tokens go to the replica's counters, and what it reported as cached corrects
    /// the index.
    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn finish(&self, usage: &crate::proxy::stream::Usage, failed: bool) {
        self.router
            .finished(self.replica, usage, failed, self.predicted, self.chunks);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica().in_flight.fetch_sub(1, Ordering::Relaxed);
        self.router.freed.notify_waiters();
    }
}

impl Router {
    pub fn new(replicas: Vec<Replica>) -> Self {
        let n = replicas.len();
        Router {
            replicas,
            index: Mutex::new(Index {
                sessions: TwoGen::new(SESSION_CAPACITY),
                placed: vec![0; n],
                prefixes: (0..n).map(|_| TwoGen::new(INDEX_CAPACITY)).collect(),
            }),
            freed: tokio::sync::Notify::new(),
            queued: AtomicUsize::new(0),
        }
    }

    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// The peers (other proxies of the fleet) as a "tried" mask: what a hop must not be sent to.
    pub fn peer_mask(&self) -> u64 {
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.spec.peer)
            .fold(0, |m, (i, _)| m | 1u64 << i)
    }

    /// The replica for calls that any of them can answer (the model list, token counts, the dashboard's
    /// upstream figures): the first of this proxy's own llama-servers that is up, else the first peer up
    /// (which answers the model list but not llama.cpp's own endpoints), else the first replica.
    pub fn primary(&self) -> &Upstream {
        let r = self
            .replicas
            .iter()
            .find(|r| !r.spec.peer && r.is_up())
            .or_else(|| self.replicas.iter().find(|r| r.is_up()))
            .unwrap_or(&self.replicas[0]);
        &r.upstream
    }

    /// The replica whose health is this proxy's own: the first of its own llama-servers up, else the first
    /// of them. Never a peer: a peer serves this proxy's hops from its own llama-servers only, so a proxy whose
    /// model is down must say so even while its peers are up (or every peer would send it hops it cannot serve).
    pub fn own_primary(&self) -> &Upstream {
        let own = || self.replicas.iter().filter(|r| !r.spec.peer);
        let r = own()
            .find(|r| r.is_up())
            .or_else(|| own().next())
            .unwrap_or(&self.replicas[0]);
        &r.upstream
    }

    /// Picks a replica, waiting for a free slot when every one is busy (only with several replicas: one
    /// upstream queues requests itself, as before routing existed). `wait` bounds that wait.
    pub async fn acquire(self: &Arc<Self>, key: &RouteKey, tried: u64, wait: Duration) -> Acquired {
        match self.try_pick(key, tried) {
            Pick::Chosen(l) => return Acquired::Lease(l),
            Pick::Exhausted => return Acquired::Exhausted,
            Pick::Full => {}
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Acquired::Busy(format!(
                "every slot of every replica is busy and {MAX_QUEUED} requests already wait; try again shortly"
            ));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let out = loop {
            let notified = self.freed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            match self.try_pick(key, tried) {
                Pick::Chosen(l) => break Acquired::Lease(l),
                Pick::Exhausted => break Acquired::Exhausted,
                Pick::Full => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break Acquired::Busy(format!(
                    "every slot of every replica stayed busy for {}s (queue_timeout_secs); try again shortly",
                    wait.as_secs_f64()
                ));
            }
        };
        self.queued.fetch_sub(1, Ordering::Relaxed);
        out
    }

    fn try_pick(self: &Arc<Self>, key: &RouteKey, tried: u64) -> Pick {
        // Nothing panics while holding the lock; were it poisoned, the index is still a usable guess.
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let owner = key.session.map(|s| index.sessions.get(s).map(usize::from));
        let affinity = match owner {
            None => Affinity::Anonymous,
            Some(None) => Affinity::NewSession,
            Some(Some(r)) => Affinity::Session(r),
        };
        let views: Vec<View> = self
            .replicas
            .iter()
            .zip(&index.prefixes)
            .zip(&index.placed)
            .map(|((r, p), &placed)| View {
                up: r.is_up(),
                in_flight: r.in_flight(),
                slots: r.slots(),
                weight: r.spec.weight,
                prefix: u32::try_from(matched(p, &key.chain)).unwrap_or(u32::MAX),
                indexed: u32::try_from(p.len()).unwrap_or(u32::MAX),
                sessions: placed,
            })
            .collect();
        let Some((i, reason)) = choose(&views, affinity, tried) else {
            return Pick::Exhausted;
        };
        // With one upstream there is nothing to balance: it queues requests itself, as it always did.
        if self.replicas.len() > 1 && !views[i].free() {
            return Pick::Full;
        }
        if let Some(s) = key.session
            && let Ok(slot) = u16::try_from(i)
        {
            if owner != Some(Some(i)) {
                index.placed[i] = index.placed[i].saturating_add(1);
            }
            index.sessions.insert(s, slot);
        }
        // The replica will hold this prompt once it has read it: the next turn matches it.
        let prefixes = &mut index.prefixes[i];
        for &h in &key.chain {
            prefixes.insert(h, ());
        }
        // Counted before the lock is released: a concurrent pick must see this slot taken.
        let r = &self.replicas[i];
        r.in_flight.fetch_add(1, Ordering::Relaxed);
        drop(index);
        r.stats.requests.fetch_add(1, Ordering::Relaxed);
        r.stats.decisions[reason.slot()].fetch_add(1, Ordering::Relaxed);
        Pick::Chosen(Lease {
            router: self.clone(),
            replica: i,
            reason,
            predicted: views[i].prefix as usize,
            chunks: key.chain.len(),
        })
    }

    /// A replica failed a request (refused, 5xx, timed out, or broke off an answer whose client had received
    /// nothing yet): no more traffic until a probe finds it healthy, and its index is forgotten (what comes
    /// back may be a fresh process).
    pub fn failed(&self, i: usize, why: &str) {
        let r = &self.replicas[i];
        r.stats.errors.fetch_add(1, Ordering::Relaxed);
        // One upstream gets every request either way, and no probe would bring it back.
        if self.replicas.len() > 1 {
            self.mark_down(i, why);
        }
    }

    /// A replica broke off a stream under way (killed, connection lost, silent past the idle timeout): as
    /// [`Self::failed`], but the error is counted with the answer's own end ([`Lease::finish`]).
    pub fn broke(&self, i: usize, why: &str) {
        if self.replicas.len() > 1 {
            self.mark_down(i, why);
        }
    }

    /// A replica answered (its headers came): it is up, whatever the last probe said.
    pub fn answered(&self, i: usize) {
        if !self.replicas[i].is_up() {
            self.mark_up(i, None);
        }
    }

    fn mark_down(&self, i: usize, why: &str) {
        let r = &self.replicas[i];
        if r.up.swap(false, Ordering::Relaxed) {
            r.slots_read.store(false, Ordering::Relaxed);
            tracing::warn!(replica = %r.spec.url, "replica marked down: {why}");
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            index.prefixes[i].clear();
            index.placed[i] = 0;
        }
    }

    fn mark_up(&self, i: usize, slots: Option<u32>) {
        let r = &self.replicas[i];
        if let Some(n) = slots.filter(|&n| n > 0) {
            r.slots.store(n, Ordering::Relaxed);
        }
        if !r.up.swap(true, Ordering::Relaxed) {
            tracing::info!(replica = %r.spec.url, slots = r.slots(), "replica is up; it gets traffic again");
            self.freed.notify_waiters();
        }
    }

    fn finished(&self, i: usize, usage: &Usage, failed: bool, predicted: usize, chunks: usize) {
        let r = &self.replicas[i];
        let prompt = usage.input_tokens + usage.cache_read_input_tokens;
        r.stats.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        r.stats
            .cached_tokens
            .fetch_add(usage.cache_read_input_tokens, Ordering::Relaxed);
        if failed {
            r.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if lost_cache(predicted, chunks, usage.cache_read_input_tokens, prompt) {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            tracing::debug!(replica = %r.spec.url, predicted, chunks, cached = usage.cache_read_input_tokens, "replica reused much less than predicted; forgetting its prefix index");
            index.prefixes[i].clear();
        }
    }

    /// Probes every replica's health at once: `/health` (down on an error or no answer within
    /// [`PROBE_TIMEOUT`]), and `/slots` the first time and whenever one comes back.
    pub async fn probe(&self) {
        let probes = self.replicas.iter().enumerate().map(|(i, r)| async move {
            let health = tokio::time::timeout(PROBE_TIMEOUT, r.upstream.health()).await;
            match health {
                Ok(Ok(())) => {
                    let slots = if r.is_up() && r.slots_read.load(Ordering::Relaxed) {
                        None
                    } else {
                        r.slots_read.store(true, Ordering::Relaxed);
                        tokio::time::timeout(PROBE_TIMEOUT, r.upstream.slots())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    };
                    self.mark_up(i, slots);
                }
                Ok(Err(e)) => self.mark_down(i, &e.to_proxy_error(&r.spec.url).message),
                Err(_) => self.mark_down(
                    i,
                    &format!(
                        "GET /health did not answer within {}s",
                        PROBE_TIMEOUT.as_secs()
                    ),
                ),
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// `llmctl_proxy_replica_*` lines for `GET /metrics`.
    pub fn render(&self, out: &mut String) {
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        type Get = fn(&Replica) -> u64;
        let series: [(&str, &str, &str, Get); 7] = [
            (
                "llmctl_proxy_replica_up",
                "gauge",
                "1 while the replica is taking traffic.",
                |r| u64::from(r.is_up()),
            ),
            (
                "llmctl_proxy_replica_in_flight",
                "gauge",
                "Requests on the replica now.",
                |r| u64::from(r.in_flight()),
            ),
            (
                "llmctl_proxy_replica_slots",
                "gauge",
                "The replica's slots (from /slots, else 4).",
                |r| u64::from(r.slots()),
            ),
            (
                "llmctl_proxy_replica_requests_total",
                "counter",
                "Requests routed to the replica (each failover attempt counts).",
                |r| r.stats.requests.load(Ordering::Relaxed),
            ),
            (
                "llmctl_proxy_replica_errors_total",
                "counter",
                "Requests the replica failed (before or during the answer).",
                |r| r.stats.errors.load(Ordering::Relaxed),
            ),
            (
                "llmctl_proxy_replica_prompt_tokens_total",
                "counter",
                "Prompt tokens the replica reported.",
                |r| r.stats.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "llmctl_proxy_replica_cached_prompt_tokens_total",
                "counter",
                "Prompt tokens the replica reused from its cache.",
                |r| r.stats.cached_tokens.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, get) in series {
            gauge(out, name, kind, help);
            for r in &self.replicas {
                let _ = writeln!(
                    out,
                    "{name}{{replica=\"{}\"}} {}",
                    label(&r.spec.url),
                    get(r)
                );
            }
        }
        let name = "llmctl_proxy_routing_decisions_total";
        gauge(
            out,
            name,
            "counter",
            "Routing decisions, by replica and reason.",
        );
        for r in &self.replicas {
            for reason in Reason::ALL {
                let n = r.stats.decisions[reason.slot()].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{name}{{replica=\"{}\",reason=\"{}\"}} {n}",
                    label(&r.spec.url),
                    reason.as_str()
                );
            }
        }
    }

    /// The replicas' figures for the dashboard's data.
    pub fn to_json(&self) -> Value {
        let list: Vec<Value> = self
            .replicas
            .iter()
            .map(|r| {
                let s = &r.stats;
                let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let decisions: serde_json::Map<String, Value> = Reason::ALL
                    .iter()
                    .map(|reason| {
                        (
                            reason.as_str().to_string(),
                            json!(load(&s.decisions[reason.slot()])),
                        )
                    })
                    .collect();
                json!({
                    "url": r.spec.url,
                    "up": r.is_up(),
                    "weight": r.spec.weight,
                    "slots": r.slots(),
                    "in_flight": r.in_flight(),
                    "requests": load(&s.requests),
                    "errors": load(&s.errors),
                    "prompt_tokens": load(&s.prompt_tokens),
                    "cached_prompt_tokens": load(&s.cached_tokens),
                    "decisions": decisions,
                })
            })
            .collect();
        Value::Array(list)
    }
}

enum Pick {
    Chosen(Lease),
    Exhausted,
    Full,
}

/// The replica reused far less than the index predicted: its cache is not what the index says.
fn lost_cache(
    predicted_chunks: usize,
    chunks: usize,
    cached_tokens: u64,
    prompt_tokens: u64,
) -> bool {
    if predicted_chunks == 0 || chunks == 0 || prompt_tokens == 0 {
        return false;
    }
    let predicted = predicted_chunks as f64 / chunks as f64;
    let reported = cached_tokens as f64 / prompt_tokens as f64;
    predicted >= 0.5 && reported < predicted * LOST_CACHE_RATIO
}

/// A Prometheus label value: `\` and `"` escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Probes the replicas every `interval`, forever (a task on the accepting thread).
pub async fn probe_forever(router: Arc<Router>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        router.probe().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_carries_the_session_its_peer_hashed() {
        let mut h = HeaderMap::new();
        h.insert("x-claude-code-session-id", "abc".parse().unwrap());
        let hashed = session_of(&h, &serde_json::Map::new()).unwrap();
        let mut hop = HeaderMap::new();
        hop.insert(
            super::super::upstream::SESSION_HEADER,
            format!("{hashed:016x}").parse().unwrap(),
        );
        assert_eq!(session_of(&hop, &serde_json::Map::new()), Some(hashed));
    }

    fn up(in_flight: u32) -> View {
        View {
            up: true,
            in_flight,
            slots: 4,
            weight: 1,
            prefix: 0,
            indexed: 0,
            sessions: 0,
        }
    }

    fn with_prefix(mut v: View, prefix: u32) -> View {
        v.prefix = prefix;
        v
    }

    use Affinity::{Anonymous, NewSession, Session};

    #[test]
    fn the_session_wins_while_its_replica_has_a_free_slot() {
        let views = [up(0), with_prefix(up(3), 0), with_prefix(up(0), 9)];
        assert_eq!(choose(&views, Session(1), 0), Some((1, Reason::Session)));
    }

    #[test]
    fn the_longest_prefix_wins_without_a_session() {
        let views = [with_prefix(up(0), 2), with_prefix(up(2), 7), up(0)];
        assert_eq!(choose(&views, Anonymous, 0), Some((1, Reason::Prefix)));
        // Equal prefixes (a shared system prompt): the less loaded of them.
        let views = [with_prefix(up(2), 7), with_prefix(up(1), 7), up(0)];
        assert_eq!(choose(&views, Anonymous, 0), Some((1, Reason::Prefix)));
    }

    #[test]
    fn new_sessions_spread_even_where_one_replica_holds_the_shared_prompt() {
        // Replica 0 holds the system prompt every session shares and one session already; 1 is empty.
        let mut a = with_prefix(up(0), 30);
        a.sessions = 1;
        let views = [a, up(0)];
        assert_eq!(choose(&views, NewSession, 0), Some((1, Reason::Load)));
        // Equal sessions and load: the longer prefix saves a prefill.
        let mut b = up(0);
        b.sessions = 1;
        let views = [a, b];
        assert_eq!(choose(&views, NewSession, 0), Some((0, Reason::Load)));
        // Load first: the idle replica, whatever it holds.
        let views = [up(0), with_prefix(up(1), 30)];
        assert_eq!(choose(&views, NewSession, 0), Some((0, Reason::Load)));
    }

    #[test]
    fn without_affinity_the_least_loaded_then_the_emptiest() {
        let views = [up(2), up(1), up(3)];
        assert_eq!(choose(&views, Anonymous, 0), Some((1, Reason::Load)));
        let mut a = up(0);
        a.indexed = 50;
        let views = [a, up(0)];
        assert_eq!(choose(&views, Anonymous, 0), Some((1, Reason::Load)));
        // Weight: 2 in flight on a weight-3 replica is less loaded than 1 on a weight-1 one.
        let mut heavy = up(2);
        heavy.weight = 3;
        let views = [up(1), heavy];
        assert_eq!(choose(&views, Anonymous, 0), Some((1, Reason::Load)));
    }

    #[test]
    fn the_balance_guard_moves_affinity_off_a_full_replica_while_another_has_room() {
        // The session's replica is full (4 of 4) and replica 1 idles: the request goes there.
        let views = [with_prefix(up(4), 9), up(0)];
        assert_eq!(choose(&views, Session(0), 0), Some((1, Reason::Load)));
        // Every replica full: affinity again (piling on is no worse anywhere).
        let views = [with_prefix(up(4), 9), up(5)];
        assert_eq!(choose(&views, Session(0), 0), Some((0, Reason::Session)));
        assert_eq!(choose(&views, Anonymous, 0), Some((0, Reason::Prefix)));
        // A full prefix owner gives way to a shorter prefix with room, not to an empty replica.
        let views = [with_prefix(up(4), 9), with_prefix(up(1), 3), up(0)];
        assert_eq!(choose(&views, Anonymous, 0), Some((1, Reason::Prefix)));
        assert_eq!(choose(&views, Session(0), 0), Some((1, Reason::Prefix)));
    }

    #[test]
    fn down_replicas_are_skipped_and_a_retry_is_a_failover() {
        let mut down = with_prefix(up(0), 9);
        down.up = false;
        let views = [down, up(3)];
        assert_eq!(choose(&views, Session(0), 0), Some((1, Reason::Load)));
        // Replica 1 already failed this request: the only one left is down, and it is tried anyway.
        assert_eq!(
            choose(&views, Session(0), 0b10),
            Some((0, Reason::Failover))
        );
        // Both tried: nothing left.
        assert_eq!(choose(&views, Session(0), 0b11), None);
        // A failover to an up replica among several: least loaded of the rest.
        let views = [up(0), up(2), up(1)];
        assert_eq!(choose(&views, Session(0), 0b1), Some((2, Reason::Failover)));
    }

    #[test]
    fn a_session_naming_a_replica_that_no_longer_exists_is_ignored() {
        assert_eq!(choose(&[up(0)], Session(5), 0), Some((0, Reason::Load)));
        assert_eq!(choose(&[], Anonymous, 0), None);
    }

    #[test]
    fn chains_share_a_prefix_exactly_as_far_as_the_bodies_do() {
        let turn = |n: usize| {
            let msgs: Vec<Value> = (0..n)
                .map(|i| json!({"role": "user", "content": format!("message {i} {}", "x".repeat(700))}))
                .collect();
            serde_json::to_vec(&json!({"model": "m", "messages": msgs, "stream": true})).unwrap()
        };
        let (a, b) = (prompt_chain(&turn(4)), prompt_chain(&turn(6)));
        assert!(a.len() >= 5 && b.len() > a.len(), "{} {}", a.len(), b.len());
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        // All but the chunk that straddles the end of turn 4's messages.
        assert!(common >= a.len() - 1, "{common} of {}", a.len());
        // Another model name in front changes nothing.
        let other = String::from_utf8(turn(4))
            .unwrap()
            .replace("\"m\"", "\"other-model\"");
        assert_eq!(prompt_chain(other.as_bytes()), a);
        // A body shorter than a chunk has no chain.
        assert!(prompt_chain(b"{\"model\":\"m\",\"messages\":[]}").is_empty());
    }

    #[test]
    fn the_hash_sees_every_byte_and_the_length() {
        let base = vec![7u8; 100];
        let h = hash_bytes(&base);
        for i in [0, 8, 31, 32, 63, 96, 99] {
            let mut other = base.clone();
            other[i] ^= 1;
            assert_ne!(hash_bytes(&other), h, "byte {i}");
        }
        assert_ne!(hash_bytes(&base[..99]), h);
        assert_ne!(hash_bytes(b""), hash_bytes(b"\0"));
    }

    #[test]
    fn a_replicas_model_replaces_the_requests() {
        let body = br#"{"model":"a","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let out = with_model(body, "b\"c").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "b\"c");
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(with_model(b"{}", "b"), None);
    }

    #[test]
    fn the_index_matches_the_longest_prefix_and_forgets_in_generations() {
        let mut idx = TwoGen::new(8);
        let chain: Vec<u64> = (1..=6).map(mix).collect();
        for &h in &chain[..3] {
            idx.insert(h, ());
        }
        assert_eq!(matched(&idx, &chain), 3);
        assert_eq!(matched(&idx, &chain[..2]), 2);
        assert_eq!(matched(&idx, &[]), 0);
        // Four more inserts: the first generation (three entries + one) is dropped, the second kept.
        for i in 100..108 {
            idx.insert(mix(i), ());
        }
        assert!(idx.len() <= 8);
        assert_eq!(matched(&idx, &chain), 0);
    }

    #[test]
    fn sessions_come_from_claude_codes_header_or_metadata_or_codexs_cache_key() {
        let mut h = HeaderMap::new();
        let body = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(session_of(&h, &body(json!({}))), None);
        let meta = json!({"metadata": {"user_id": "{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"S1\"}"}});
        assert_eq!(session_of(&h, &body(meta)), Some(hash_bytes(b"S1")));
        let old = json!({"metadata": {"user_id": "user_abc_account__session_S2"}});
        assert_eq!(session_of(&h, &body(old)), Some(hash_bytes(b"S2")));
        // A user id without a session names a user, not a session.
        let user = json!({"metadata": {"user_id": "someone"}});
        assert_eq!(session_of(&h, &body(user)), None);
        let codex = json!({"prompt_cache_key": "01a2"});
        assert_eq!(
            session_of(&h, &body(codex.clone())),
            Some(hash_bytes(b"01a2"))
        );
        h.insert("x-claude-code-session-id", "S3".parse().unwrap());
        assert_eq!(session_of(&h, &body(codex)), Some(hash_bytes(b"S3")));
    }

    #[test]
    fn a_replica_that_reused_far_less_than_predicted_lost_its_cache() {
        assert!(lost_cache(8, 10, 0, 2000));
        assert!(!lost_cache(8, 10, 1500, 2000));
        // Little was predicted: nothing to learn.
        assert!(!lost_cache(2, 10, 0, 2000));
        assert!(!lost_cache(0, 0, 0, 0));
    }
}
