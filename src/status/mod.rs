//! `llmctl status`: one screen with what a home-lab user checks by hand: the host's driver and module, each GPU's
//! readings, the container, both services, the model llama-server serves and how fast, and the proxy's traffic.
//!
//! One SSH round trip: a host-side script (a constant; the vmid and the container script travel in argv) prints
//! each read as a `==> name <==` section (doctor's format, [`crate::host::facts::parse_sections`]), then runs
//! the container's reads in one `pct exec`, where the llmctl binary provision installed reads the HTTP endpoints
//! (`llmctl probe --get`, as provision's health checks do: the container needs no curl, and the proxy key is read
//! from its file there, never passed in argv). Without a vmid, a first round lists the containers to pick one.
//! Turning sections into a [`Status`] is pure ([`assess`]), so it is tested on real outputs.
//! Exit: 0 everything up, 1 something down, 2 the host cannot be reached. Over a fleet, each host's status is
//! this one, read in parallel by `fleet::commands::status`.

pub mod prom;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::cli::GlobalArgs;
use crate::host::facts::{self, Probe, parse_sections};
use crate::outcome::Outcome;
use crate::provision::units;
use crate::pve::lxc::LxcConfig;
use crate::pve::nvidia::{self, GpuReading, SmiReport};
use crate::remote::HostArgs;
use crate::transport::{Cmd, Transport, TransportError};

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: HostArgs,
    /// Print the status as JSON (the schema is below); with --watch, one object per line.
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds (default 2) until Ctrl-C.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub watch: Option<u64>,
}

/// The `schema` field of `--json`: bumped only when a field changes meaning or goes away.
pub const SCHEMA: &str = "llmctl-status/1";

/// `llmctl status --help` ends with the `--json` schema, so docs/commands.md (generated from the help) has it.
pub const JSON_HELP: &str = "\
Exit status: 0 all up, 1 something is down (the problems say what), 2 the host cannot be reached.

Several hosts ([[hosts]], [cluster], several --host): each host's status under its heading, then a
summary table (up / down / unreachable, and why); the exit status is the worst host's. --json is
then one document: {\"outcome\": \"up\"|\"down\"|\"unreachable\", \"hosts\": [each host's object below,
with its \"name\"]}. --watch shows one host.

JSON (--json): one object (with --watch, one per line). Within schema `llmctl-status/1` fields
are only added; one that changes meaning or goes away changes `schema`. Unknown values are null.
  `schema`                               \"llmctl-status/1\"
  `host`, `vmid`                         what was examined (`vmid` null: no container found)
  `outcome`                              \"up\" (exit 0), \"down\" (exit 1); \"unreachable\" (exit 2) has
                                         only `schema`, `host`, `vmid`, `outcome` and `error`
  `problems`                             why it is down, one line each; [] when up
  `notes`                                worth knowing, not down (llama-server without --metrics)
  `driver`                               the host's NVIDIA driver:
  `driver.module_version`                the loaded kernel module's version; null: none
  `driver.module_flavour`                \"open\" or \"proprietary\"
  `driver.modules`                       NVIDIA modules in lsmod: [\"nvidia_uvm\", \"nvidia\", ...]
  `driver.nvidia_smi`                    \"ok\", \"mismatch\", \"no-driver\", \"not-found\" or \"error\"
  `driver.version`                       the driver version nvidia-smi reports
  `gpus`                                 one object per GPU (nvidia-smi --query-gpu):
  `gpus[].index`, `gpus[].name`, `gpus[].driver_version`
  `gpus[].utilization_pct`               0-100
  `gpus[].memory_used_mib`, `gpus[].memory_total_mib`
  `gpus[].temperature_c`
  `gpus[].power_draw_w`, `gpus[].power_limit_w`
  `container`                            the GPU container:
  `container.state`                      \"running\", \"stopped\", \"missing\", \"none\" or \"unknown\"
  `container.detail`                     pct status's answer, or why the state is unknown
  `services`                             unit -> systemctl is-active (\"active\", \"failed\", ...)
  `llama_server`                         read inside the container:
  `llama_server.url`                     where it was dialled (from its unit); null: no unit
                                         (with replicas and no llama-server.service: see `replicas`)
  `llama_server.up`                      /props answered; else `llama_server.error` says why
  `llama_server.error`
  `llama_server.model`                   the model file it serves
  `llama_server.context_per_slot`        n_ctx of each slot
  `llama_server.slots_total`, `llama_server.slots_busy`
  `llama_server.metrics`                 /metrics answered (provision runs it with --metrics)
  `llama_server.prompt_tokens_per_s`     prefill speed, average since it started
  `llama_server.generation_tokens_per_s` generation speed, average since it started
  `llama_server.prompt_tokens_total`, `llama_server.prompt_tokens_cached_total`
  `llama_server.generated_tokens_total`
  `replicas`                             only with one llama-server per GPU: one object per replica
                                         unit (GPU order), with every `llama_server` field and:
  `replicas[].unit`                      \"llama-server-gpu<i>\"
  `replicas[].gpu`                       the GPU its unit pins (CUDA_VISIBLE_DEVICES); null: none
  `replicas[].active`                    systemctl is-active of its unit
  `replicas[].health`                    \"ok\" when /health answered 200, else why not
  `replicas[].proxy`                     the proxy's figures for it; null: not its upstream
  `replicas[].proxy.url`, `replicas[].proxy.up`, `replicas[].proxy.slots`
  `replicas[].proxy.requests_total`, `replicas[].proxy.errors_total`, `replicas[].proxy.in_flight`
  `replicas[].proxy.prompt_tokens_total`, `replicas[].proxy.cached_prompt_tokens_total`
  `replicas[].proxy.prompt_cache_reuse`  cached / prompt tokens, 0-1
  `proxy`                                llmctl serve-proxy, read inside the container with its key:
  `proxy.url`, `proxy.up`, `proxy.error` as for llama_server
  `proxy.requests_total`, `proxy.errors_total`, `proxy.in_flight`
  `proxy.input_tokens_total`, `proxy.cache_read_tokens_total`
  `proxy.prompt_cache_reuse`             cache_read / (input + cache_read), 0-1";

/// The host-side round. `$1`: `all` (host reads, then the container), `ct` (the container only) or `list` (the
/// containers' configs only); `$2`: the vmid, empty when not known yet (then the containers' configs are listed
/// instead); `$3` and on: the container script and its arguments.
pub const HOST_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
mode=$1; vmid=$2; shift 2
if [ "$mode" = all ]; then
  sec proc-version cat /proc/driver/nvidia/version
  sec lsmod lsmod
  sec query-gpu nvidia-smi --query-gpu=index,name,driver_version,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw,power.limit --format=csv,nounits
fi
if [ -z "$vmid" ] && [ "$mode" != ct ]; then
  for f in /etc/pve/lxc/*.conf; do
    [ -f "$f" ] || continue
    v=${f##*/}
    sec "ct-config ${v%.conf}" cat "$f"
  done
fi
if [ -n "$vmid" ]; then
  st=$(pct status "$vmid" 2>&1); rc=$?
  printf '==> %s <==\n%s\n==> rc=%s <==\n' ct-status "$st" "$rc"
  case "$st" in
    *running*) pct exec "$vmid" -- sh -c "$@" ;;
  esac
fi
"##;

/// Inside the container. `$1`: the llmctl binary, `$2`/`$3`: the llama-server and proxy unit files, `$4`:
/// serve-proxy's default `--listen`, `$5`: the directory of the replica units (`llama-server-gpu<i>.service`, one
/// llama-server per GPU; empty: none looked for). Each replica's sections are named `<unit> <read>`. Each service is dialled where its own unit says it listens (what provision
/// wrote; without the flag, the program's default: 8080 is llama-server's), on 127.0.0.1 when it listens on
/// every address; the proxy key file is the one its unit hands the service (`LoadCredential=`).
pub const CT_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
bin=$1; llama_unit=$2; proxy_unit=$3; default_listen=$4; replica_dir=$5
opt() { sed -n "s/^ExecStart=.*[[:space:]]$2[[:space:]][[:space:]]*\"\{0,1\}\([^[:space:]\"]*\).*/\1/p" "$1" | head -n 1; }
dial() { case "$1" in ''|0.0.0.0|::|'[::]') echo 127.0.0.1 ;; *) echo "$1" ;; esac; }
sec services systemctl is-active llama-server llmctl-proxy
if [ -f "$llama_unit" ]; then
  port=$(opt "$llama_unit" --port)
  llama="http://$(dial "$(opt "$llama_unit" --host)"):${port:-8080}"
  sec llama-url echo "$llama"
  sec llama-props "$bin" probe --get "$llama/props"
  sec llama-slots "$bin" probe --get "$llama/slots"
  sec llama-metrics "$bin" probe --get "$llama/metrics"
fi
if [ -n "$replica_dir" ]; then
  for f in "$replica_dir"/llama-server-gpu*.service; do
    [ -f "$f" ] || continue
    u=${f##*/}; u=${u%.service}
    case $u in *[!a-z0-9-]*) continue ;; esac
    port=$(opt "$f" --port)
    url="http://$(dial "$(opt "$f" --host)"):${port:-8080}"
    sec "$u active" systemctl is-active "$u"
    sec "$u gpu" sed -n 's/^Environment=.*CUDA_VISIBLE_DEVICES=\([0-9][0-9]*\).*/\1/p' "$f"
    sec "$u url" echo "$url"
    sec "$u health" "$bin" probe --get "$url/health"
    sec "$u props" "$bin" probe --get "$url/props"
    sec "$u slots" "$bin" probe --get "$url/slots"
    sec "$u metrics" "$bin" probe --get "$url/metrics"
  done
fi
if [ -f "$proxy_unit" ]; then
  listen=$(opt "$proxy_unit" --listen)
  listen=${listen:-$default_listen}
  proxy="http://$(dial "${listen%:*}"):${listen##*:}"
  key=$(sed -n 's/^LoadCredential=proxy-api-key://p' "$proxy_unit" | head -n 1)
  sec proxy-url echo "$proxy"
  if [ -n "$key" ]; then
    sec proxy-metrics "$bin" probe --get "$proxy/metrics" --api-key-file "$key"
  else
    sec proxy-metrics "$bin" probe --get "$proxy/metrics"
  fi
fi
"##;

pub const LLAMA_UNIT: &str = facts::LLAMA_UNIT;
pub const PROXY_UNIT: &str = facts::PROXY_UNIT;

/// Everything `status` shows; `--json` prints it as is (docs/commands.md documents each field).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub schema: &'static str,
    pub host: String,
    pub vmid: Option<u32>,
    /// `up`, `down` or `unreachable`.
    pub outcome: &'static str,
    /// Why the outcome is `down`, one line each; empty when `up`.
    pub problems: Vec<String>,
    /// What is worth knowing but is not down (e.g. llama-server without `--metrics`).
    pub notes: Vec<String>,
    pub driver: Driver,
    pub gpus: Vec<GpuReading>,
    pub container: Container,
    /// unit → `systemctl is-active` answer (`active`, `inactive`, `failed`, ...).
    pub services: BTreeMap<String, String>,
    pub llama_server: LlamaServer,
    /// One llama-server per GPU (`llama-server-gpu<i>.service`), in GPU order; absent (not `[]`) on a host that
    /// runs the one llama-server.service, so that its document is what it was before replicas.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Replica>,
    pub proxy: Proxy,
}

/// One replica: a llama-server pinned to one GPU, its own unit and port.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Replica {
    /// Its unit, `llama-server-gpu<i>`.
    pub unit: String,
    /// The GPU its unit pins it to (`CUDA_VISIBLE_DEVICES`); None: the unit pins none.
    pub gpu: Option<u32>,
    /// `systemctl is-active` of its unit.
    pub active: String,
    /// `ok` when `/health` answered 200, else why not (`answered HTTP 503 ...` while the model loads).
    pub health: String,
    /// What it answers, as for the one llama-server (`url`, `up`, `model`, slots, context, speeds).
    #[serde(flatten)]
    pub server: LlamaServer,
    /// The proxy's own figures for this replica (its `llmctl_proxy_replica_*` series); None when the proxy did
    /// not answer or does not route to it.
    pub proxy: Option<ProxyReplica>,
}

/// serve-proxy's figures for one upstream, from its `llmctl_proxy_replica_*` series.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProxyReplica {
    /// The upstream as the proxy names it (its `replica` label).
    pub url: String,
    /// The proxy takes it as up (its last probe or request succeeded).
    pub up: Option<bool>,
    pub requests_total: Option<u64>,
    pub errors_total: Option<u64>,
    pub in_flight: Option<u64>,
    /// Its slots as the proxy reads them (`/slots`, else a default).
    pub slots: Option<u64>,
    /// Prompt tokens of its answers, the cached ones included.
    pub prompt_tokens_total: Option<u64>,
    pub cached_prompt_tokens_total: Option<u64>,
    /// cached / prompt tokens: the share of its prompts it served from its own cache.
    pub prompt_cache_reuse: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Driver {
    /// The loaded kernel module's version (`/proc/driver/nvidia/version`); None: no module loaded.
    pub module_version: Option<String>,
    /// `open` or `proprietary`.
    pub module_flavour: Option<nvidia::ModuleFlavour>,
    /// NVIDIA modules in `lsmod` (`nvidia`, `nvidia_uvm`, ...).
    pub modules: Vec<String>,
    /// What nvidia-smi answered: `ok`, `mismatch`, `no-driver`, `not-found`, `error`.
    pub nvidia_smi: &'static str,
    /// The user-space driver version nvidia-smi reports.
    pub version: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Container {
    /// `running`, `stopped`, `missing`, `none` (no container on the host) or `unknown`.
    pub state: &'static str,
    /// `pct status`'s answer, or why it is unknown.
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LlamaServer {
    /// Where it was dialled from inside the container; None when there is no unit.
    pub url: Option<String>,
    /// `/props` answered.
    pub up: bool,
    pub error: Option<String>,
    /// The model file it serves (`model_path`'s file name).
    pub model: Option<String>,
    /// Tokens of context each slot has (`n_ctx`).
    pub context_per_slot: Option<u64>,
    pub slots_total: Option<u64>,
    pub slots_busy: Option<u64>,
    /// `/metrics` answered (llama-server runs with `--metrics`).
    pub metrics: bool,
    /// Average prefill speed since it started: prompt tokens / seconds spent on them.
    pub prompt_tokens_per_s: Option<f64>,
    /// Average generation speed since it started.
    pub generation_tokens_per_s: Option<f64>,
    pub prompt_tokens_total: Option<u64>,
    /// Prompt tokens taken from llama-server's own cache instead of being computed again.
    pub prompt_tokens_cached_total: Option<u64>,
    pub generated_tokens_total: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Proxy {
    pub url: Option<String>,
    /// `/metrics` answered (with the key).
    pub up: bool,
    pub error: Option<String>,
    pub requests_total: Option<u64>,
    /// Requests answered with an error (including errors inside a started stream), all types.
    pub errors_total: Option<u64>,
    pub in_flight: Option<u64>,
    pub input_tokens_total: Option<u64>,
    pub cache_read_tokens_total: Option<u64>,
    /// cache_read / (input + cache_read): the share of prompt tokens served from the prompt cache.
    pub prompt_cache_reuse: Option<f64>,
}

// ------------------------------------------------------------------------------------------------ parsing

/// `systemctl is-active A B` prints one state per unit, in order.
pub fn parse_is_active(text: &str, units: &[&str]) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .zip(units)
        .map(|(state, unit)| (unit.to_string(), state.to_string()))
        .collect()
}

/// NVIDIA's modules in `lsmod` output, in its order.
pub fn nvidia_modules(lsmod: &str) -> Vec<String> {
    crate::pve::system::parse_lsmod(lsmod)
        .into_iter()
        .filter(|m| m == "nvidia" || m.starts_with("nvidia_"))
        .collect()
}

/// `pct status` → the container's state and the line to show.
pub fn parse_pct_status(probe: &Probe) -> (&'static str, String) {
    let text = probe.text.trim();
    let state = if probe.ok() && text.ends_with("running") {
        "running"
    } else if probe.ok() && text.ends_with("stopped") {
        "stopped"
    } else if text.contains("does not exist") {
        "missing"
    } else {
        "unknown"
    };
    (
        state,
        text.lines().next().unwrap_or("no answer").to_string(),
    )
}

/// What a `llmctl probe --get` section says when it failed, in one line: an llmctl too old to have `--get`
/// gets the fix, not clap's usage text.
fn probe_error(p: &Probe) -> String {
    if p.text.contains("unexpected argument '--get'") {
        return format!(
            "the llmctl in the container ({}) is older than this one and cannot read endpoints: run `llmctl provision` to update it",
            units::LLMCTL_BIN
        );
    }
    if p.rc == Some(127) || (p.text.contains("not found") && p.text.contains(units::LLMCTL_BIN)) {
        return format!(
            "{} is not installed in the container: run `llmctl provision`",
            units::LLMCTL_BIN
        );
    }
    // reqwest's chain and probe's "answered HTTP ..." line are the informative parts.
    let last = p
        .text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no answer");
    last.trim_start_matches("error: ").to_string()
}

fn as_count(v: f64) -> u64 {
    if v.is_finite() && v >= 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// Tokens per second from a tokens counter and a seconds counter; None before the first request.
fn rate(tokens: Option<f64>, seconds: Option<f64>) -> Option<f64> {
    match (tokens, seconds) {
        (Some(t), Some(s)) if s > 0.0 && t.is_finite() => Some(t / s),
        _ => None,
    }
}

/// llama-server's `/props`, `/slots` and `/metrics` sections.
pub fn assess_llama(s: &BTreeMap<String, Probe>) -> LlamaServer {
    assess_server(s, "llama-")
}

/// A llama-server's sections, named `<prefix>url`, `<prefix>props`, ...: `llama-` for llama-server.service,
/// `<unit> ` for a replica.
fn assess_server(s: &BTreeMap<String, Probe>, prefix: &str) -> LlamaServer {
    let get = |read: &str| s.get(&format!("{prefix}{read}"));
    let mut l = LlamaServer {
        url: get("url").map(|p| p.text.trim().to_string()),
        ..LlamaServer::default()
    };
    let Some(props) = get("props") else {
        return l;
    };
    if !props.ok() {
        l.error = Some(probe_error(props));
        return l;
    }
    match serde_json::from_str::<serde_json::Value>(&props.text) {
        Ok(v) => {
            l.up = true;
            l.model = v["model_path"]
                .as_str()
                .map(|p| p.rsplit('/').next().unwrap_or(p).to_string());
            l.context_per_slot = v["default_generation_settings"]["n_ctx"].as_u64();
            l.slots_total = v["total_slots"].as_u64();
        }
        Err(e) => {
            l.error = Some(format!("/props is not JSON: {e}"));
            return l;
        }
    }
    if let Some(slots) = get("slots").filter(|p| p.ok())
        && let Ok(serde_json::Value::Array(list)) = serde_json::from_str(&slots.text)
    {
        l.slots_total = Some(list.len() as u64);
        l.slots_busy = Some(
            list.iter()
                .filter(|x| x["is_processing"].as_bool() == Some(true))
                .count() as u64,
        );
    }
    if let Some(m) = get("metrics").filter(|p| p.ok()) {
        let samples = prom::parse(&m.text);
        let v = |name: &str| prom::value(&samples, &format!("llamacpp:{name}"));
        l.metrics = v("prompt_tokens_total").is_some();
        l.prompt_tokens_total = v("prompt_tokens_total").map(as_count);
        l.prompt_tokens_cached_total = v("prompt_tokens_cached_total").map(as_count);
        l.generated_tokens_total = v("tokens_predicted_total").map(as_count);
        l.prompt_tokens_per_s = rate(v("prompt_tokens_total"), v("prompt_seconds_total"));
        l.generation_tokens_per_s = rate(
            v("tokens_predicted_total"),
            v("tokens_predicted_seconds_total"),
        );
        if l.slots_busy.is_none() {
            l.slots_busy = v("requests_processing").map(as_count);
        }
    }
    l
}

/// The replicas' sections (`<unit> url`, ...), in GPU order (`llama-server-gpu10` after `llama-server-gpu2`),
/// each with the proxy's figures for its URL out of `proxy_replicas`.
pub fn assess_replicas(
    s: &BTreeMap<String, Probe>,
    proxy_replicas: &[ProxyReplica],
) -> Vec<Replica> {
    let mut units: Vec<(u32, &str)> = s
        .keys()
        .filter_map(|k| {
            let unit = k.strip_suffix(" url")?;
            let i = unit
                .strip_prefix(facts::REPLICA_UNIT_PREFIX)?
                .parse()
                .ok()?;
            Some((i, unit))
        })
        .collect();
    units.sort_unstable();
    units
        .into_iter()
        .map(|(_, unit)| {
            let get = |read: &str| s.get(&format!("{unit} {read}"));
            let server = assess_server(s, &format!("{unit} "));
            let health = match get("health") {
                None => "not read".to_string(),
                Some(p) if p.ok() => serde_json::from_str::<serde_json::Value>(&p.text)
                    .ok()
                    .and_then(|v| v["status"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "ok".into()),
                Some(p) => probe_error(p),
            };
            let proxy = server.url.as_deref().and_then(|url| {
                proxy_replicas
                    .iter()
                    .find(|r| same_endpoint(&r.url, url))
                    .cloned()
            });
            Replica {
                unit: unit.to_string(),
                gpu: get("gpu").and_then(|p| p.text.trim().parse().ok()),
                active: get("active")
                    .map_or_else(|| "unknown".to_string(), |p| p.text.trim().to_string()),
                health,
                server,
                proxy,
            }
        })
        .collect()
}

/// `http://host:port[/]` → (host, port), the host lowercased and every loopback spelling as one.
fn endpoint(url: &str) -> Option<(String, u16)> {
    let rest = url.trim().split_once("://").map_or(url.trim(), |(_, r)| r);
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()?),
        _ => (authority, 80),
    };
    let host = host.to_ascii_lowercase();
    let host = match host.as_str() {
        "localhost" | "127.0.0.1" | "[::1]" | "0.0.0.0" | "[::]" => "127.0.0.1".to_string(),
        _ => host,
    };
    Some((host, port))
}

/// The proxy names its upstreams as configured (`http://127.0.0.1:8081`, `http://localhost:8081/`), status
/// dials what the unit says: the same server when host and port are.
pub fn same_endpoint(a: &str, b: &str) -> bool {
    match (endpoint(a), endpoint(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// The proxy's `llmctl_proxy_replica_*` series, one entry per `replica` label, in the order they first appear.
pub fn proxy_replicas(samples: &[prom::Sample]) -> Vec<ProxyReplica> {
    let mut out: Vec<ProxyReplica> = Vec::new();
    for x in samples {
        let Some(series) = x.name.strip_prefix("llmctl_proxy_replica_") else {
            continue;
        };
        let Some(url) = x.label("replica") else {
            continue;
        };
        let i = match out.iter().position(|r| r.url == url) {
            Some(i) => i,
            None => {
                out.push(ProxyReplica {
                    url: url.to_string(),
                    ..ProxyReplica::default()
                });
                out.len() - 1
            }
        };
        let r = &mut out[i];
        let n = Some(as_count(x.value));
        match series {
            "up" => r.up = Some(x.value >= 1.0),
            "in_flight" => r.in_flight = n,
            "slots" => r.slots = n,
            "requests_total" => r.requests_total = n,
            "errors_total" => r.errors_total = n,
            "prompt_tokens_total" => r.prompt_tokens_total = n,
            "cached_prompt_tokens_total" => r.cached_prompt_tokens_total = n,
            _ => {}
        }
    }
    for r in &mut out {
        r.prompt_cache_reuse = match (r.prompt_tokens_total, r.cached_prompt_tokens_total) {
            (Some(p), Some(c)) if p > 0 => Some(c as f64 / p as f64),
            _ => None,
        };
    }
    out
}

/// serve-proxy's `/metrics` section.
pub fn assess_proxy(s: &BTreeMap<String, Probe>) -> Proxy {
    let mut p = Proxy {
        url: s.get("proxy-url").map(|p| p.text.trim().to_string()),
        ..Proxy::default()
    };
    let Some(m) = s.get("proxy-metrics") else {
        return p;
    };
    if !m.ok() {
        p.error = Some(probe_error(m));
        return p;
    }
    let samples = prom::parse(&m.text);
    let tokens = |kind: &str| {
        samples
            .iter()
            .find(|x| x.name == "llmctl_proxy_tokens_total" && x.label("kind") == Some(kind))
            .map(|x| as_count(x.value))
    };
    p.up = true;
    // A counter with no request yet has no labelled line at all: zero, not unknown.
    p.requests_total = Some(prom::sum(&samples, "llmctl_proxy_requests_total").map_or(0, as_count));
    p.errors_total = Some(prom::sum(&samples, "llmctl_proxy_errors_total").map_or(0, as_count));
    p.in_flight = prom::value(&samples, "llmctl_proxy_in_flight_requests").map(as_count);
    p.input_tokens_total = tokens("input");
    p.cache_read_tokens_total = tokens("cache_read");
    p.prompt_cache_reuse = match (p.input_tokens_total, p.cache_read_tokens_total) {
        (Some(i), Some(c)) if i + c > 0 => Some(c as f64 / (i + c) as f64),
        _ => None,
    };
    p
}

/// The host's sections (and the container's, in the same map) → the status. Pure.
pub fn assess(host: &str, vmid: Option<u32>, s: &BTreeMap<String, Probe>) -> Status {
    let get = |name: &str| s.get(name).cloned().unwrap_or_default();
    let mut problems = Vec::new();
    let mut notes = Vec::new();

    let module = nvidia::parse_proc_version(&get("proc-version").text);
    let query = get("query-gpu");
    let (smi, gpus) = if query.ok() {
        match nvidia::parse_readings(&query.text) {
            Ok(g) => ("ok", g),
            Err(e) => {
                problems.push(format!("nvidia-smi: {e}"));
                ("error", Vec::new())
            }
        }
    } else {
        let word = match nvidia::parse_smi(&query.text, query.rc) {
            SmiReport::Mismatch { .. } => "mismatch",
            SmiReport::NoDriver => "no-driver",
            SmiReport::NotFound => "not-found",
            _ => "error",
        };
        let said = query.lines().first().cloned().unwrap_or_default();
        problems.push(format!("nvidia-smi fails ({word}): {said}"));
        (word, Vec::new())
    };
    if module.is_none() {
        problems.push(
            "no NVIDIA kernel module is loaded on the host (`llmctl doctor` says why)".into(),
        );
    }
    let driver = Driver {
        module_version: module.as_ref().map(|m| m.version.clone()),
        module_flavour: module.as_ref().map(|m| m.flavour),
        modules: nvidia_modules(&get("lsmod").text),
        nvidia_smi: smi,
        version: gpus.iter().find_map(|g| g.driver_version.clone()),
    };

    let container = match (vmid, s.get("ct-status")) {
        (None, _) => Container {
            state: "none",
            detail: "no container on the host".into(),
        },
        (Some(_), None) => Container {
            state: "unknown",
            detail: "not examined".into(),
        },
        (Some(_), Some(p)) => {
            let (state, detail) = parse_pct_status(p);
            Container { state, detail }
        }
    };
    match (container.state, vmid) {
        ("running", _) => {}
        (_, Some(v)) => problems.push(format!(
            "container {v} is {}: {}",
            container.state, container.detail
        )),
        (_, None) => problems.push("no container to look at: pass --vmid N".into()),
    }

    let mut services = BTreeMap::new();
    let mut llama_server = LlamaServer::default();
    let mut replicas = Vec::new();
    let mut proxy = Proxy::default();
    if container.state == "running" {
        services = parse_is_active(&get("services").text, &[LLAMA_UNIT, PROXY_UNIT]);
    }
    // One llama-server per GPU, and no llama-server.service file beside them (the script dials the single
    // unit only when its file is there): the replicas are the llama-servers, and llama-server.service's
    // `inactive` (systemd's answer for a unit it does not know) is no problem.
    let replica_only = if container.state == "running" && !services.is_empty() {
        let figures = s
            .get("proxy-metrics")
            .filter(|m| m.ok())
            .map(|m| proxy_replicas(&prom::parse(&m.text)))
            .unwrap_or_default();
        replicas = assess_replicas(s, &figures);
        !replicas.is_empty() && !s.contains_key("llama-url")
    } else {
        false
    };
    if replica_only {
        services.remove(LLAMA_UNIT);
    }
    for r in &replicas {
        services.insert(r.unit.clone(), r.active.clone());
    }
    if container.state == "running" && services.is_empty() {
        // `pct exec` itself failed: every read inside failed with it, and one problem says so.
        problems.push(format!(
            "nothing could be read inside the container (`pct exec` printed: {})",
            get("services")
                .lines()
                .first()
                .cloned()
                .unwrap_or_else(|| "nothing".into())
        ));
    } else if container.state == "running" {
        for unit in [LLAMA_UNIT, PROXY_UNIT] {
            match services.get(unit).map(String::as_str) {
                Some("active") | None => {}
                Some(state) => {
                    problems.push(format!("{unit} is {state} (`llmctl logs` shows why)"))
                }
            }
        }
        llama_server = assess_llama(s);
        proxy = assess_proxy(s);
        match (&llama_server.url, &llama_server.error) {
            (None, _) if replica_only => {}
            (None, _) => problems.push(format!(
                "llama-server has no unit ({}): run `llmctl provision`",
                units::LLAMA_SERVER_UNIT_PATH
            )),
            (Some(url), Some(e)) => {
                problems.push(format!("llama-server does not answer at {url}: {e}"))
            }
            _ => {}
        }
        if llama_server.up && !llama_server.metrics {
            let m = get("llama-metrics");
            notes.push(if m.text.contains("--metrics") {
                "llama-server runs without --metrics (no tokens/s): run `llmctl provision` to turn it on".into()
            } else {
                format!("llama-server's /metrics could not be read: {}", probe_error(&m))
            });
        }
        for r in &replicas {
            let unit = &r.unit;
            if r.active != "active" {
                problems.push(format!(
                    "{unit} is {} (`llmctl logs {unit}` shows why)",
                    r.active
                ));
            }
            if let (Some(url), Some(e)) = (&r.server.url, &r.server.error) {
                problems.push(format!("{unit} does not answer at {url}: {e}"));
            }
            if r.gpu.is_none() {
                problems.push(format!(
                    "{unit} is pinned to no GPU (no CUDA_VISIBLE_DEVICES in its unit): run `llmctl provision`"
                ));
            }
            if r.server.up && !r.server.metrics {
                let m = get(&format!("{unit} metrics"));
                notes.push(if m.text.contains("--metrics") {
                    format!("{unit} runs without --metrics (no tokens/s): run `llmctl provision` to turn it on")
                } else {
                    format!("{unit}'s /metrics could not be read: {}", probe_error(&m))
                });
            }
        }
        match (&proxy.url, &proxy.error) {
            (None, _) => problems.push(format!(
                "llmctl-proxy has no unit ({}): run `llmctl provision`",
                units::PROXY_UNIT_PATH
            )),
            (Some(url), Some(e)) => {
                problems.push(format!("llmctl-proxy does not answer at {url}: {e}"))
            }
            _ => {}
        }
    }

    Status {
        schema: SCHEMA,
        host: host.to_string(),
        vmid,
        outcome: if problems.is_empty() { "up" } else { "down" },
        problems,
        notes,
        driver,
        gpus,
        container,
        services,
        llama_server,
        replicas,
        proxy,
    }
}

// ------------------------------------------------------------------------------------------------ I/O

fn round(t: &dyn Transport, mode: &str, vmid: Option<u32>) -> Result<BTreeMap<String, Probe>> {
    let argv = [
        "sh",
        "-c",
        HOST_SCRIPT,
        "llmctl-status",
        mode,
        &vmid.map(|v| v.to_string()).unwrap_or_default(),
        CT_SCRIPT,
        "llmctl-status",
        units::LLMCTL_BIN,
        units::LLAMA_SERVER_UNIT_PATH,
        units::PROXY_UNIT_PATH,
        crate::proxy::config::DEFAULT_LISTEN,
        facts::REPLICA_UNIT_DIR.trim_end_matches('/'),
    ];
    let target = t.describe();
    let out = t
        .run(&Cmd::new(argv).timeout(Duration::from_secs(60)))
        .with_context(|| format!("cannot read the status of {target}"))?;
    let sections = parse_sections(&out.stdout);
    if sections.is_empty() {
        bail!(
            "the status script on {target} printed nothing readable (exit {:?}): {}",
            out.status,
            out.stderr.lines().next().unwrap_or("")
        );
    }
    if let Some(p) = sections.get("ct-status")
        && p.rc == Some(127)
    {
        return Err(TransportError::NotProxmox {
            host: target,
            detail: format!("`pct` {}", p.text.trim()),
        }
        .into());
    }
    Ok(sections)
}

/// The containers' configs a round listed, by vmid.
fn configs(sections: &BTreeMap<String, Probe>) -> BTreeMap<u32, LxcConfig> {
    sections
        .iter()
        .filter_map(|(name, p)| {
            let v = name.strip_prefix("ct-config ")?.parse().ok()?;
            Some((v, LxcConfig::parse(&p.text)))
        })
        .collect()
}

/// The container to look at when none was named: doctor's rule (the only one with NVIDIA devices, else the
/// only one), one round trip.
pub fn find_vmid(t: &dyn Transport) -> Result<u32> {
    let sections = round(t, "list", None)?;
    facts::pick_vmid(&configs(&sections))?.with_context(|| {
        format!(
            "there is no container on {}: pass --vmid N (or set [host] vmid in llmctl.toml)",
            t.describe()
        )
    })
}

/// Reads everything: one round when the vmid is known; else one to list the containers, one for the chosen.
pub fn gather(t: &dyn Transport, vmid: Option<u32>) -> Result<Status> {
    let mut sections = round(t, "all", vmid)?;
    let mut vmid = vmid;
    if vmid.is_none() {
        vmid = facts::pick_vmid(&configs(&sections))?;
        if let Some(v) = vmid {
            sections.extend(round(t, "ct", Some(v))?);
        }
    }
    Ok(assess(&t.describe(), vmid, &sections))
}

/// `--json`'s document for a host whose status could not be read (unreachable, not Proxmox): why, and nothing
/// else, so a script reading stdout gets a document either way.
pub fn unreachable_json(host: &str, vmid: Option<u32>, error: &str) -> serde_json::Value {
    serde_json::json!({
        "schema": SCHEMA, "host": host, "vmid": vmid, "outcome": "unreachable", "error": error,
    })
}

pub fn run(global: &GlobalArgs, args: StatusArgs) -> Result<Outcome> {
    let file = crate::config::ConfigFile::load(global.config.as_deref())?;
    let ssh = args.target.ssh.options();
    let (config, host) =
        match crate::fleet::select(&file, &args.target.host, args.target.vmid, &ssh)? {
            crate::fleet::Selection::One { config, host, .. } => (config, host),
            crate::fleet::Selection::Fleet { members, preface } => {
                return crate::fleet::commands::status(global, &args, &members, preface.as_deref());
            }
        };
    let remote = args.target.resolve_one(&config, host.as_deref())?;
    let unreachable =
        |e: &anyhow::Error| unreachable_json(&remote.host, remote.vmid, &format!("{e:#}"));
    let transport = match remote.connect() {
        Ok(t) => t,
        Err(e) => {
            if args.json {
                // A script reading stdout gets a document either way.
                println!("{}", unreachable(&e));
            }
            return Err(e);
        }
    };
    let Some(every) = args.watch else {
        let status = match gather(transport.as_ref(), remote.vmid) {
            Ok(s) => s,
            Err(e) => {
                if args.json {
                    println!("{}", unreachable(&e));
                }
                return Err(e);
            }
        };
        let mut stdout = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer_pretty(&mut stdout, &status)?;
            writeln!(stdout)?;
        } else {
            stdout.write_all(render_text(&status).as_bytes())?;
        }
        return Ok(outcome(&status));
    };
    // --watch: the same connection every time; a failed read is shown and tried again, not the end.
    let clear = !args.json && std::io::stdout().is_terminal();
    loop {
        let shown = match gather(transport.as_ref(), remote.vmid) {
            Ok(s) if args.json => serde_json::to_string(&s)? + "\n",
            Ok(s) => render_text(&s),
            Err(e) if args.json => unreachable(&e).to_string() + "\n",
            Err(e) => format!("llmctl status: {}\n\nerror: {e:#}\n", remote.host),
        };
        let mut stdout = std::io::stdout().lock();
        if clear {
            // Home and clear, then the new screen: one write, so it does not flicker.
            stdout.write_all(format!("\x1b[H\x1b[2J{shown}").as_bytes())?;
        } else {
            stdout.write_all(shown.as_bytes())?;
        }
        stdout.flush()?;
        drop(stdout);
        std::thread::sleep(Duration::from_secs(every));
    }
}

pub fn outcome(s: &Status) -> Outcome {
    if s.problems.is_empty() {
        Outcome::Success
    } else {
        Outcome::ProblemsFound
    }
}

// ------------------------------------------------------------------------------------------------ text

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".to_string(), |v| v.to_string())
}

fn tag(up: bool) -> &'static str {
    if up { "up  " } else { "DOWN" }
}

/// The screen: one line per thing, `up`/`DOWN` first, then the problems and notes.
pub fn render_text(s: &Status) -> String {
    let mut out = format!(
        "llmctl status: {}{}\n\n",
        s.host,
        s.vmid
            .map(|v| format!(", container {v}"))
            .unwrap_or_default()
    );
    let d = &s.driver;
    let module = match (&d.module_version, d.module_flavour) {
        (Some(v), Some(f)) => format!(
            "module {v} ({}) loaded",
            match f {
                nvidia::ModuleFlavour::Open => "open",
                nvidia::ModuleFlavour::Proprietary => "proprietary",
            }
        ),
        _ => "no module loaded".to_string(),
    };
    out.push_str(&format!(
        "{}  driver         {}, {module}, nvidia-smi {}{}\n",
        tag(d.module_version.is_some() && d.nvidia_smi == "ok"),
        d.version.as_deref().unwrap_or("?"),
        d.nvidia_smi,
        if d.modules.is_empty() {
            String::new()
        } else {
            format!(" [{}]", d.modules.join(", "))
        }
    ));
    for (i, g) in s.gpus.iter().enumerate() {
        let mem = match (g.memory_used_mib, g.memory_total_mib) {
            (Some(u), Some(t)) => format!("{u} / {t} MiB"),
            _ => "memory n/a".into(),
        };
        out.push_str(&format!(
            "      gpu {:<10} {}: {}% busy, {mem}, {} C, {} / {} W\n",
            g.index.unwrap_or(i as u32),
            g.name,
            opt(g.utilization_pct.map(|v| format!("{v:.0}"))),
            opt(g.temperature_c.map(|v| format!("{v:.0}"))),
            opt(g.power_draw_w.map(|v| format!("{v:.0}"))),
            opt(g.power_limit_w.map(|v| format!("{v:.0}"))),
        ));
    }
    out.push_str(&format!(
        "{}  container      {}\n",
        tag(s.container.state == "running"),
        s.container.detail
    ));
    if s.container.state == "running" {
        let l = &s.llama_server;
        let active = |u: &str| s.services.get(u).map_or("?", String::as_str).to_string();
        // With replicas only, llama-server.service is not there to show: a row per replica instead.
        let single = s.replicas.is_empty() || s.services.contains_key(LLAMA_UNIT);
        if single {
            out.push_str(&render_llama(l, &active(LLAMA_UNIT)));
        }
        for r in &s.replicas {
            out.push_str(&render_replica(r));
        }
        let p = &s.proxy;
        out.push_str(&format!(
            "{}  llmctl-proxy   {}, {}",
            tag(active(PROXY_UNIT) == "active" && p.up),
            active(PROXY_UNIT),
            p.url.as_deref().unwrap_or("no unit")
        ));
        if p.up {
            out.push_str(&format!(
                ": {} requests, {} errors, {} in flight, prompt cache reuse {}\n",
                opt(p.requests_total),
                opt(p.errors_total),
                opt(p.in_flight),
                p.prompt_cache_reuse
                    .map_or_else(|| "n/a".into(), |r| format!("{:.0}%", r * 100.0))
            ));
        } else {
            out.push('\n');
        }
    }
    out.push('\n');
    for p in &s.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    for n in &s.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if s.problems.is_empty() {
        out.push_str("all up\n");
    } else {
        out.push_str(&format!("down: {} problem(s)\n", s.problems.len()));
    }
    out
}

/// The one llama-server's row: `up`/`DOWN`, its unit's state, where it was dialled, what it serves.
fn render_llama(l: &LlamaServer, active: &str) -> String {
    let mut out = format!(
        "{}  llama-server   {}, {}",
        tag(active == "active" && l.up),
        active,
        l.url.as_deref().unwrap_or("no unit")
    );
    out.push_str(&render_served(l));
    out
}

/// What a llama-server that answered serves (`: model, context ..., slots`), and its speeds on a line of their
/// own; a newline alone when it did not answer.
fn render_served(l: &LlamaServer) -> String {
    if !l.up {
        return "\n".into();
    }
    let mut out = format!(
        ": {}, context {} per slot, {} of {} slots busy\n",
        l.model.as_deref().unwrap_or("?"),
        opt(l.context_per_slot),
        opt(l.slots_busy),
        opt(l.slots_total)
    );
    if l.metrics {
        out.push_str(&format!(
            "                     prefill {} tok/s, generation {} tok/s ({} prompt tokens, {} cached, {} generated)\n",
            opt(l.prompt_tokens_per_s.map(|v| format!("{v:.1}"))),
            opt(l.generation_tokens_per_s.map(|v| format!("{v:.1}"))),
            opt(l.prompt_tokens_total),
            opt(l.prompt_tokens_cached_total),
            opt(l.generated_tokens_total)
        ));
    }
    out
}

/// A replica's row: as the one llama-server's, with its GPU and `/health`, then the proxy's figures for it.
fn render_replica(r: &Replica) -> String {
    let l = &r.server;
    let mut out = format!(
        "{}  {:<14} {}, gpu {}, {}, health {}",
        tag(r.active == "active" && l.up),
        r.unit,
        r.active,
        opt(r.gpu),
        l.url.as_deref().unwrap_or("no url"),
        r.health
    );
    out.push_str(&if l.up {
        render_served(l).replacen(": ", ", ", 1)
    } else {
        "\n".into()
    });
    if let Some(p) = &r.proxy {
        out.push_str(&format!(
            "                     proxy: {}, {} requests, {} errors, {} in flight, prompt cache reuse {}\n",
            match p.up {
                Some(true) => "routing to it",
                Some(false) => "marked down",
                None => "?",
            },
            opt(p.requests_total),
            opt(p.errors_total),
            opt(p.in_flight),
            p.prompt_cache_reuse
                .map_or_else(|| "n/a".into(), |r| format!("{:.0}%", r * 100.0))
        ));
    }
    out
}

#[cfg(test)]
mod tests;
