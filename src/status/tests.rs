//! `assess` on real outputs: the fixtures' nvidia-smi and llama-server captures, the proxy's own renderer, and the
//! container script run by a real `sh` on the units provision renders.

use super::*;
use crate::pve::{fixture, fixture_body};

fn probe(text: &str, rc: i32) -> Probe {
    Probe {
        text: text.to_string(),
        rc: Some(rc),
    }
}

fn proxy_metrics() -> String {
    use crate::proxy::metrics::{Metrics, RequestRecord};
    let m = Metrics::default();
    for (status, error_type, input, cached) in [
        (200, None, 900, 0),
        (200, None, 100, 900),
        (500, Some("api_error"), 0, 0),
    ] {
        m.request_started();
        m.request_finished(&RequestRecord {
            status,
            error_type,
            input_tokens: input,
            cache_read_input_tokens: cached,
            ..Default::default()
        });
    }
    m.render()
}

/// Every section of a healthy host, from real outputs.
fn healthy() -> BTreeMap<String, Probe> {
    let mut s = BTreeMap::new();
    let mut put = |k: &str, p: Probe| {
        s.insert(k.to_string(), p);
    };
    put(
        "proc-version",
        probe(&fixture_body(&fixture("proc-driver-nvidia-version.txt")), 0),
    );
    put(
        "lsmod",
        probe(
            "Module                  Size  Used by\nnvidia_uvm           2076672  0\nnvidia_drm            139264  0\nnvidia              14376960  3 nvidia_uvm,nvidia_modeset\nkvm_amd               208896  0\n",
            0,
        ),
    );
    put(
        "query-gpu",
        probe(
            &fixture_body(&fixture("nvidia-smi.query-gpu.rtx-pro-6000.txt")),
            0,
        ),
    );
    put("ct-status", probe("status: running", 0));
    put("services", probe("active\nactive", 0));
    put("llama-url", probe("http://127.0.0.1:8080", 0));
    put("llama-props", probe(&fixture("llama-server.props.json"), 0));
    put(
        "llama-slots",
        probe(&fixture("llama-server.slots-busy.json"), 0),
    );
    put(
        "llama-metrics",
        probe(&fixture("llama-server.metrics.txt"), 0),
    );
    put("proxy-url", probe("http://127.0.0.1:4000", 0));
    put("proxy-metrics", probe(&proxy_metrics(), 0));
    s
}

#[test]
fn a_healthy_host_is_up_with_every_reading() {
    let st = assess("root@pve", Some(103), &healthy());
    assert_eq!(st.outcome, "up", "{:#?}", st.problems);
    assert!(st.problems.is_empty() && st.notes.is_empty(), "{st:#?}");
    assert_eq!(outcome(&st), Outcome::Success);
    assert_eq!(st.driver.module_version.as_deref(), Some("580.173.02"));
    assert_eq!(st.driver.modules, ["nvidia_uvm", "nvidia_drm", "nvidia"]);
    assert_eq!(st.driver.nvidia_smi, "ok");
    assert_eq!(st.gpus.len(), 1);
    assert_eq!(st.gpus[0].power_draw_w, Some(26.47));
    assert_eq!(st.container.state, "running");
    assert_eq!(st.services["llmctl-proxy"], "active");
    let l = &st.llama_server;
    assert!(l.up && l.metrics);
    assert_eq!(l.model.as_deref(), Some("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(l.context_per_slot, Some(4096));
    assert_eq!(
        (l.slots_busy, l.slots_total),
        (Some(1), Some(2)),
        "from /slots"
    );
    assert_eq!(l.prompt_tokens_total, Some(32));
    assert_eq!(l.generated_tokens_total, Some(16));
    assert!((l.prompt_tokens_per_s.unwrap() - 32.0 / 0.215).abs() < 1e-9);
    assert!((l.generation_tokens_per_s.unwrap() - 16.0 / 0.157067).abs() < 1e-9);
    let p = &st.proxy;
    assert!(p.up);
    assert_eq!(
        (p.requests_total, p.errors_total, p.in_flight),
        (Some(3), Some(1), Some(0))
    );
    assert_eq!(
        p.prompt_cache_reuse,
        Some(900.0 / 1900.0),
        "900 of 1900 prompt tokens"
    );
    let text = render_text(&st);
    assert!(text.contains("up    llama-server   active, http://127.0.0.1:8080: SmolLM2-135M-Instruct.Q4_1.gguf, context 4096 per slot, 1 of 2 slots busy"), "{text}");
    assert!(
        text.contains("prefill 148.8 tok/s, generation 101.9 tok/s"),
        "{text}"
    );
    assert!(
        text.contains("3 requests, 1 errors, 0 in flight, prompt cache reuse 47%"),
        "{text}"
    );
    assert!(text.contains("26 / 600 W"), "{text}");
    assert!(text.ends_with("all up\n"), "{text}");
}

/// The proxy's own renderer with two replicas behind it (the router's `llmctl_proxy_replica_*` series): the
/// first served 3 requests, 1 failed, 1000 of 1600 prompt tokens from its cache; the second is marked down.
fn replica_proxy_metrics() -> String {
    use crate::proxy::router::{Replica as R, Router};
    use std::sync::atomic::Ordering;
    let replica = |url: &str| {
        let upstream = crate::proxy::upstream::Upstream::new(
            url,
            None,
            None,
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
            1,
        )
        .unwrap();
        R::new(
            crate::proxy::config::ReplicaSpec {
                url: url.into(),
                weight: 1,
                model: None,
                peer: false,
            },
            upstream,
        )
    };
    // Upstreams as provision writes them, and one spelled another way (localhost, a trailing slash).
    let router = Router::new(vec![
        replica("http://127.0.0.1:8080"),
        replica("http://localhost:8081/"),
    ]);
    let r0 = &router.replicas()[0].stats;
    r0.requests.fetch_add(3, Ordering::Relaxed);
    r0.errors.fetch_add(1, Ordering::Relaxed);
    r0.prompt_tokens.fetch_add(1600, Ordering::Relaxed);
    r0.cached_tokens.fetch_add(1000, Ordering::Relaxed);
    // A refused request: an error, and no traffic until a probe finds it healthy.
    router.failed(1, "connection refused");
    let mut out = proxy_metrics();
    router.render(&mut out);
    out
}

/// A host with one llama-server per GPU: no llama-server.service (so no `llama-*` sections), two replicas read
/// as the container script names their sections.
fn replica_host() -> BTreeMap<String, Probe> {
    let mut s = healthy();
    for k in ["llama-url", "llama-props", "llama-slots", "llama-metrics"] {
        s.remove(k);
    }
    // systemd answers `inactive` for llama-server, a unit it does not know.
    s.insert("services".into(), probe("inactive\nactive", 3));
    for (i, port) in [(0, 8080), (1, 8081)] {
        let u = format!("llama-server-gpu{i}");
        let mut put = |k: &str, p: Probe| {
            s.insert(format!("{u} {k}"), p);
        };
        put("active", probe("active", 0));
        put("gpu", probe(&i.to_string(), 0));
        put("url", probe(&format!("http://127.0.0.1:{port}"), 0));
        put("health", probe("{\"status\":\"ok\"}", 0));
        put("props", probe(&fixture("llama-server.props.json"), 0));
        put("slots", probe(&fixture("llama-server.slots-busy.json"), 0));
        put("metrics", probe(&fixture("llama-server.metrics.txt"), 0));
    }
    s.insert("proxy-metrics".into(), probe(&replica_proxy_metrics(), 0));
    s
}

#[test]
fn replicas_get_a_row_each_with_their_gpu_and_the_proxys_figures() {
    let st = assess("root@pve", Some(103), &replica_host());
    assert_eq!(st.outcome, "up", "{:#?}", st.problems);
    assert!(st.notes.is_empty(), "{:#?}", st.notes);
    // llama-server.service is not there: neither a service nor a problem.
    assert_eq!(
        st.services.keys().collect::<Vec<_>>(),
        ["llama-server-gpu0", "llama-server-gpu1", "llmctl-proxy"]
    );
    assert_eq!(st.replicas.len(), 2);
    let (r0, r1) = (&st.replicas[0], &st.replicas[1]);
    assert_eq!((r0.unit.as_str(), r0.gpu), ("llama-server-gpu0", Some(0)));
    assert_eq!((r1.unit.as_str(), r1.gpu), ("llama-server-gpu1", Some(1)));
    assert_eq!((r0.active.as_str(), r0.health.as_str()), ("active", "ok"));
    assert!(r0.server.up && r0.server.metrics);
    assert_eq!(r1.server.url.as_deref(), Some("http://127.0.0.1:8081"));
    assert_eq!(r1.server.context_per_slot, Some(4096));
    assert_eq!(
        (r1.server.slots_busy, r1.server.slots_total),
        (Some(1), Some(2))
    );
    let p0 = r0.proxy.as_ref().expect("the proxy's figures for gpu0");
    assert_eq!(p0.url, "http://127.0.0.1:8080");
    assert_eq!(
        (p0.up, p0.requests_total, p0.errors_total, p0.in_flight),
        (Some(true), Some(3), Some(1), Some(0))
    );
    assert_eq!(p0.prompt_cache_reuse, Some(1000.0 / 1600.0));
    let p1 = r1
        .proxy
        .as_ref()
        .expect("matched through localhost and the slash");
    assert_eq!(
        (p1.url.as_str(), p1.up),
        ("http://localhost:8081/", Some(false))
    );
    assert_eq!(p1.prompt_cache_reuse, None, "no prompt tokens yet");

    let text = render_text(&st);
    assert!(!text.contains("llama-server   "), "no single row:\n{text}");
    assert!(text.contains("up    llama-server-gpu0 active, gpu 0, http://127.0.0.1:8080, health ok, SmolLM2-135M-Instruct.Q4_1.gguf, context 4096 per slot, 1 of 2 slots busy\n                     prefill 148.8 tok/s"), "{text}");
    assert!(text.contains("\n                     proxy: routing to it, 3 requests, 1 errors, 0 in flight, prompt cache reuse 62%\n"), "{text}");
    assert!(
        text.contains("up    llama-server-gpu1 active, gpu 1, http://127.0.0.1:8081"),
        "{text}"
    );
    assert!(
        text.contains("proxy: marked down, 0 requests, 1 errors"),
        "{text}"
    );
    assert!(text.ends_with("all up\n"), "{text}");

    // Every field of a replica is documented, as the single server's are.
    let v = serde_json::to_value(&st).unwrap();
    let mut got = Vec::new();
    paths(&v, "", &mut got);
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/commands.md")).unwrap();
    for field in got.iter().filter(|f| f.starts_with("replicas")) {
        // A replica has the single server's fields too, documented once under `llama_server`.
        let own = field
            .strip_prefix("replicas[].")
            .is_none_or(|f| !SCHEMA_FIELDS.contains(&format!("llama_server.{f}").as_str()));
        if own {
            assert!(
                JSON_HELP.contains(&format!("`{field}`")),
                "`llmctl status --help` does not document `{field}`"
            );
            assert!(
                docs.contains(&format!("`{field}`")),
                "docs/commands.md does not document `{field}`"
            );
        }
    }
    assert!(
        got.contains(&"replicas[].proxy.prompt_cache_reuse".to_string()),
        "{got:#?}"
    );
}

#[test]
fn a_replica_down_or_unpinned_is_named_with_its_own_unit() {
    let mut s = replica_host();
    s.insert("llama-server-gpu1 active".into(), probe("failed", 3));
    s.insert(
        "llama-server-gpu1 health".into(),
        probe(
            "error: cannot reach http://127.0.0.1:8081/health: connection refused",
            2,
        ),
    );
    s.insert(
        "llama-server-gpu1 props".into(),
        probe(
            "error: cannot reach http://127.0.0.1:8081/props: connection refused",
            2,
        ),
    );
    s.insert("llama-server-gpu0 gpu".into(), probe("", 0));
    let st = assess("root@pve", Some(103), &s);
    assert_eq!(st.outcome, "down");
    assert_eq!(
        st.problems,
        [
            "llama-server-gpu0 is pinned to no GPU (no CUDA_VISIBLE_DEVICES in its unit): run `llmctl provision`",
            "llama-server-gpu1 is failed (`llmctl logs llama-server-gpu1` shows why)",
            "llama-server-gpu1 does not answer at http://127.0.0.1:8081: cannot reach http://127.0.0.1:8081/props: connection refused",
        ],
        "{:#?}",
        st.problems
    );
    assert_eq!(st.services["llama-server-gpu1"], "failed");
    let text = render_text(&st);
    assert!(text.contains("DOWN  llama-server-gpu1 failed, gpu 1, http://127.0.0.1:8081, health cannot reach http://127.0.0.1:8081/health: connection refused\n"), "{text}");
    assert!(
        text.contains("up    llama-server-gpu0 active, gpu ?, "),
        "{text}"
    );
    // `llmctl logs` takes the unit the problem names.
    assert_eq!(
        crate::logs::parse_service("llama-server-gpu1"),
        Ok(crate::logs::Service::Replica(1))
    );

    // An older installation's llama-server.service still beside the replicas: shown and judged too.
    let mut s = replica_host();
    s.insert("services".into(), probe("active\nactive", 0));
    for (k, f) in [
        ("llama-url", None),
        ("llama-props", Some("llama-server.props.json")),
        ("llama-slots", Some("llama-server.slots-busy.json")),
        ("llama-metrics", Some("llama-server.metrics.txt")),
    ] {
        let text = f.map_or_else(|| "http://127.0.0.1:8080".to_string(), fixture);
        s.insert(k.into(), probe(&text, 0));
    }
    let st = assess("root@pve", Some(103), &s);
    assert_eq!(st.services["llama-server"], "active");
    let text = render_text(&st);
    assert!(text.contains("up    llama-server   active"), "{text}");
    assert!(text.contains("up    llama-server-gpu1 active"), "{text}");
}

#[test]
fn proxy_upstreams_are_matched_by_host_and_port() {
    assert!(same_endpoint(
        "http://127.0.0.1:8081",
        "http://localhost:8081/"
    ));
    assert!(same_endpoint("http://[::1]:8080", "http://127.0.0.1:8080"));
    assert!(!same_endpoint(
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8081"
    ));
    assert!(!same_endpoint(
        "http://10.0.0.5:8080",
        "http://127.0.0.1:8080"
    ));
    assert!(same_endpoint("http://GPU-box", "http://gpu-box:80/v1"));
    assert!(!same_endpoint("not a url:x", "http://127.0.0.1:8080"));
}

#[test]
fn a_stopped_service_is_down_and_named() {
    let mut s = healthy();
    s.insert("services".into(), probe("active\ninactive", 3));
    s.insert(
        "proxy-metrics".into(),
        probe("error: cannot reach http://127.0.0.1:4000/metrics: error sending request for url (http://127.0.0.1:4000/metrics)", 2),
    );
    let st = assess("root@pve", Some(103), &s);
    assert_eq!(st.outcome, "down");
    assert_eq!(outcome(&st), Outcome::ProblemsFound);
    assert_eq!(st.services["llmctl-proxy"], "inactive");
    assert!(!st.proxy.up);
    assert_eq!(st.problems.len(), 2, "{:#?}", st.problems);
    assert!(
        st.problems[0].starts_with("llmctl-proxy is inactive"),
        "{:#?}",
        st.problems
    );
    assert!(
        st.problems[1].contains("does not answer at http://127.0.0.1:4000: cannot reach"),
        "{:#?}",
        st.problems
    );
    let text = render_text(&st);
    assert!(text.contains("DOWN  llmctl-proxy   inactive"), "{text}");
    assert!(text.contains("up    llama-server"), "{text}");
}

#[test]
fn metrics_off_is_a_note_not_a_failure() {
    let mut s = healthy();
    s.insert(
        "llama-metrics".into(),
        probe(
            &(fixture("llama-server.metrics-off.json")
                + "http://127.0.0.1:8080/metrics answered HTTP 501 Not Implemented"),
            1,
        ),
    );
    let st = assess("root@pve", Some(103), &s);
    assert_eq!(st.outcome, "up", "{:#?}", st.problems);
    assert!(!st.llama_server.metrics && st.llama_server.prompt_tokens_per_s.is_none());
    assert!(st.notes[0].contains("--metrics"), "{:#?}", st.notes);
}

#[test]
fn a_failed_pct_exec_is_one_problem() {
    let mut s = healthy();
    for k in [
        "llama-url",
        "llama-props",
        "llama-slots",
        "llama-metrics",
        "proxy-url",
        "proxy-metrics",
    ] {
        s.remove(k);
    }
    s.insert("services".into(), probe("", 0));
    let st = assess("root@pve", Some(103), &s);
    assert_eq!(st.problems.len(), 1, "{:#?}", st.problems);
    assert!(
        st.problems[0].starts_with("nothing could be read inside the container"),
        "{:#?}",
        st.problems
    );
}

#[test]
fn an_old_llmctl_in_the_container_gets_the_fix() {
    let mut s = healthy();
    let clap = "error: unexpected argument '--get' found\n\nUsage: llmctl probe --health <URL>\n\nFor more information, try '--help'.";
    s.insert("llama-props".into(), probe(clap, 2));
    let st = assess("root@pve", Some(103), &s);
    assert_eq!(st.outcome, "down");
    assert!(
        st.problems[0].contains("older than this one")
            && st.problems[0].contains("llmctl provision"),
        "{:#?}",
        st.problems
    );
}

#[test]
fn driver_and_container_problems() {
    let mut s = healthy();
    s.insert(
        "proc-version".into(),
        probe(
            "cat: /proc/driver/nvidia/version: No such file or directory",
            1,
        ),
    );
    s.insert(
        "query-gpu".into(),
        probe(&fixture_body(&fixture("nvidia-smi.no-driver.txt")), 9),
    );
    s.insert("ct-status".into(), probe("status: stopped", 0));
    let st = assess("root@pve", Some(103), &s);
    assert_eq!(st.driver.nvidia_smi, "no-driver");
    assert!(st.gpus.is_empty() && st.services.is_empty());
    assert!(
        !st.llama_server.up && st.llama_server.url.is_none(),
        "inside is not read"
    );
    assert_eq!(st.problems.len(), 3, "{:#?}", st.problems);
    assert!(
        st.problems[2].contains("container 103 is stopped"),
        "{:#?}",
        st.problems
    );
    let mut s = healthy();
    s.insert(
        "ct-status".into(),
        probe(
            "Configuration file 'nodes/pve/lxc/999.conf' does not exist",
            2,
        ),
    );
    assert_eq!(assess("root@pve", Some(999), &s).container.state, "missing");
    assert_eq!(assess("root@pve", None, &s).container.state, "none");
}

/// Every field of `--json`, by path. Renaming or removing one is a schema change: bump [`SCHEMA`], and this
/// list and docs/commands.md change with it.
const SCHEMA_FIELDS: &[&str] = &[
    "schema",
    "host",
    "vmid",
    "outcome",
    "problems",
    "notes",
    "driver",
    "driver.module_version",
    "driver.module_flavour",
    "driver.modules",
    "driver.nvidia_smi",
    "driver.version",
    "gpus",
    "gpus[].index",
    "gpus[].name",
    "gpus[].driver_version",
    "gpus[].utilization_pct",
    "gpus[].memory_used_mib",
    "gpus[].memory_total_mib",
    "gpus[].temperature_c",
    "gpus[].power_draw_w",
    "gpus[].power_limit_w",
    "container",
    "container.state",
    "container.detail",
    "services",
    "llama_server",
    "llama_server.url",
    "llama_server.up",
    "llama_server.error",
    "llama_server.model",
    "llama_server.context_per_slot",
    "llama_server.slots_total",
    "llama_server.slots_busy",
    "llama_server.metrics",
    "llama_server.prompt_tokens_per_s",
    "llama_server.generation_tokens_per_s",
    "llama_server.prompt_tokens_total",
    "llama_server.prompt_tokens_cached_total",
    "llama_server.generated_tokens_total",
    "proxy",
    "proxy.url",
    "proxy.up",
    "proxy.error",
    "proxy.requests_total",
    "proxy.errors_total",
    "proxy.in_flight",
    "proxy.input_tokens_total",
    "proxy.cache_read_tokens_total",
    "proxy.prompt_cache_reuse",
];

fn paths(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) if prefix != "services" => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(p.clone());
                paths(v, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            if let Some(first) = a.iter().find(|x| x.is_object()) {
                paths(first, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_json_schema_is_the_documented_one() {
    let v = serde_json::to_value(assess("root@pve", Some(103), &healthy())).unwrap();
    assert_eq!(v["schema"], "llmctl-status/1");
    let mut got = Vec::new();
    paths(&v, "", &mut got);
    got.sort();
    let mut want: Vec<String> = SCHEMA_FIELDS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(
        got, want,
        "the --json fields changed: update SCHEMA_FIELDS, docs/commands.md (and SCHEMA if a field changed meaning or went away)"
    );
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/commands.md")).unwrap();
    for field in SCHEMA_FIELDS {
        assert!(
            JSON_HELP.contains(&format!("`{field}`")),
            "`llmctl status --help` does not document `{field}`"
        );
        assert!(
            docs.contains(&format!("`{field}`")),
            "docs/commands.md does not document `{field}`"
        );
    }
    assert_eq!(v["services"]["llama-server"], "active");
    assert_eq!(v["driver"]["module_flavour"], "proprietary");
}

/// The container script under a real `sh`, on the units provision renders: it dials each service where its unit
/// says, with the key file its unit names (`/bin/echo` stands in for llmctl and prints what it was asked).
#[test]
fn the_container_script_reads_addresses_from_the_rendered_units() {
    use crate::provision::config::ProvisionConfig;
    let text = include_str!("../../templates/llmctl.toml");
    let cfg =
        ProvisionConfig::from_file(&crate::config::ConfigFile::parse(text, None).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let llama = dir.path().join("llama-server.service");
    let proxy = dir.path().join("llmctl-proxy.service");
    std::fs::write(
        &llama,
        units::render_llama_server_unit(
            &cfg,
            &units::Offload::from_config(&cfg),
            &units::Layout::of_config(&cfg).servers[0],
        )
        .unwrap(),
    )
    .unwrap();
    std::fs::write(
        &proxy,
        units::render_proxy_unit(&cfg, &units::Layout::of_config(&cfg)).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new("sh")
        .args(["-c", CT_SCRIPT, "llmctl-status", "/bin/echo"])
        .arg(&llama)
        .arg(&proxy)
        .output()
        .unwrap();
    let s = parse_sections(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        s["llama-url"].text,
        format!("http://127.0.0.1:{}", cfg.server.port)
    );
    assert_eq!(
        s["llama-metrics"].text,
        format!("probe --get http://127.0.0.1:{}/metrics", cfg.server.port)
    );
    assert_eq!(s["proxy-url"].text, "http://127.0.0.1:4000");
    assert_eq!(
        s["proxy-metrics"].text,
        "probe --get http://127.0.0.1:4000/metrics --api-key-file /etc/llmctl/proxy-api-key"
    );
    assert!(s.contains_key("services"));
    // A unit without --listen (serve-proxy's default) and without a key.
    std::fs::write(
        &proxy,
        "[Service]\nExecStart=/usr/local/bin/llmctl serve-proxy\n",
    )
    .unwrap();
    let out = std::process::Command::new("sh")
        .args(["-c", CT_SCRIPT, "llmctl-status", "/bin/echo"])
        .arg(&llama)
        .arg(&proxy)
        .arg(crate::proxy::config::DEFAULT_LISTEN)
        .output()
        .unwrap();
    let s = parse_sections(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        s["proxy-metrics"].text,
        "probe --get http://127.0.0.1:4000/metrics"
    );
    // Replica units (as provision renders them) in the directory given as $5: each dialled at its own port,
    // its GPU read from its unit.
    let rdir = dir.path().join("units");
    std::fs::create_dir_all(&rdir).unwrap();
    // `llmctl model plan`'s answer for two GPUs that each hold the model, as provision reads it.
    let json = r#"{"layout":"replicas","chosen":{"ngl":31,"n_cpu_moe":0},"servers":[
        {"gpus":[0],"port":8080,"env":{"CUDA_DEVICE_ORDER":"PCI_BUS_ID","CUDA_VISIBLE_DEVICES":"0"},"args":[]},
        {"gpus":[1],"port":8081,"env":{"CUDA_DEVICE_ORDER":"PCI_BUS_ID","CUDA_VISIBLE_DEVICES":"1"},"args":[]}]}"#;
    let layout = crate::provision::ct::layout_from_plan(&cfg, json).unwrap();
    for server in &layout.servers {
        std::fs::write(
            rdir.join(format!("{}.service", server.unit())),
            units::render_llama_server_unit(&cfg, &layout.offload, server).unwrap(),
        )
        .unwrap();
    }
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            CT_SCRIPT,
            "llmctl-status",
            "/bin/echo",
            "/nonexistent/a",
        ])
        .arg(&proxy)
        .arg(crate::proxy::config::DEFAULT_LISTEN)
        .arg(&rdir)
        .output()
        .unwrap();
    let s = parse_sections(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["llama-server-gpu1 url"].text, "http://127.0.0.1:8081");
    assert_eq!(s["llama-server-gpu1 gpu"].text, "1");
    assert_eq!(s["llama-server-gpu0 gpu"].text, "0");
    assert_eq!(
        s["llama-server-gpu1 health"].text,
        "probe --get http://127.0.0.1:8081/health"
    );
    assert_eq!(
        s["llama-server-gpu0 slots"].text,
        "probe --get http://127.0.0.1:8080/slots"
    );
    assert!(s.contains_key("llama-server-gpu0 active"));
    assert!(
        !s.contains_key("llama-url"),
        "no llama-server.service: not dialled"
    );
    // No units: nothing is dialled.
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            CT_SCRIPT,
            "llmctl-status",
            "/bin/echo",
            "/nonexistent/a",
            "/nonexistent/b",
        ])
        .output()
        .unwrap();
    let s = parse_sections(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s.keys().collect::<Vec<_>>(), ["services"]);
}

#[test]
fn scripts_take_user_data_only_through_argv() {
    assert!(HOST_SCRIPT.contains(&format!("--query-gpu={}", nvidia::STATUS_QUERY)));
    assert!(HOST_SCRIPT.contains("pct status \"$vmid\""));
    assert!(!HOST_SCRIPT.contains("{}") && !CT_SCRIPT.contains("{}"));
}
