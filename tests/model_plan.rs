//! Offload plans for header-only models shaped like real ones, on 8 GB and 24 GB GPUs.

#[path = "model_support.rs"]
mod support;

use llmctl::model::gguf;
use llmctl::model::plan::{self, CacheType, Hardware, Options, PlanError, Strategy};
use llmctl::model::shape::{self, ModelShape};
use support::*;

fn shape_of(w: GgufWriter) -> ModelShape {
    shape::from_header(&gguf::read_header(&w.bytes()[..]).unwrap()).unwrap()
}

const MIB: u64 = 1 << 20;

/// The guide's machine: RTX 2000 Ada laptop (8 GB; nvidia-smi reports 8188 MiB), 40 GB container.
const GUIDE_GPU: Hardware = Hardware {
    vram_mib: 8188,
    ram_mib: Some(40000),
};
const GPU_24GB: Hardware = Hardware {
    vram_mib: 24564,
    ram_mib: Some(40000),
};

/// The guide's llama-server settings: 32K context, q4_0 cache.
fn guide_options() -> Options {
    Options {
        ctx: Some(32768),
        cache_type: CacheType::Q4_0,
        ..Options::default()
    }
}

#[test]
fn gemma4_26b_on_8gb_keeps_experts_in_ram_and_beats_ngl_12() {
    let s = shape_of(gemma4_26b_a4b());
    let p = plan::plan(&s, &GUIDE_GPU, &guide_options()).unwrap();
    let Strategy::ExpertsOnCpu { n_cpu_moe } = p.chosen.strategy else {
        panic!("expected experts on the CPU, got {:?}", p.chosen.strategy);
    };
    assert!(n_cpu_moe < s.n_layer, "some experts fit on the GPU");
    assert!(p.chosen.vram.total() <= GUIDE_GPU.vram_mib * MIB);
    // One more layer's experts on the GPU would not fit: n_cpu_moe is the smallest that does.
    let tighter = plan::evaluate(&s, &guide_options(), 32768, s.n_layer + 1, n_cpu_moe - 1);
    assert!(!plan::fits_hardware(&tighter, &GUIDE_GPU));
    // The guide's hand-picked 12 layers: it reads more from RAM per token than the plan.
    let guide = plan::evaluate(&s, &guide_options(), 32768, 13, 0);
    assert!(
        p.chosen.ram_bytes_per_token * 2 < guide.ram_bytes_per_token,
        "plan {} vs -ngl 12 {}",
        p.chosen.ram_bytes_per_token,
        guide.ram_bytes_per_token
    );
    assert!(p.flags.windows(2).any(|f| f[0] == "--n-cpu-moe"));
    insta::assert_snapshot!("gemma4_26b_a4b_8gb", llmctl::model::render_plan(&p));
}

#[test]
fn gemma4_26b_on_24gb_fits_entirely() {
    let s = shape_of(gemma4_26b_a4b());
    let p = plan::plan(&s, &GPU_24GB, &guide_options()).unwrap();
    assert_eq!(p.chosen.strategy, Strategy::AllOnGpu);
    assert_eq!(p.chosen.ram_bytes_per_token, 0);
    insta::assert_snapshot!("gemma4_26b_a4b_24gb", llmctl::model::render_plan(&p));
}

#[test]
fn qwen36_35b_a3b_on_8gb_and_24gb() {
    let s = shape_of(qwen36_35b_a3b());
    let small = plan::plan(&s, &GUIDE_GPU, &Options::default()).unwrap();
    let Strategy::ExpertsOnCpu { n_cpu_moe } = small.chosen.strategy else {
        panic!("{:?}", small.chosen.strategy);
    };
    let alt = small
        .alternative
        .as_ref()
        .expect("partial -ngl was the other option");
    assert!(small.chosen.ram_bytes_per_token < alt.ram_bytes_per_token);
    let tighter = plan::evaluate(&s, &Options::default(), 32768, s.n_layer + 1, n_cpu_moe - 1);
    assert!(!plan::fits_hardware(&tighter, &GUIDE_GPU));
    // ~21 GB at Q4_K_M: a 24 GB card holds all of it.
    let big = plan::plan(&s, &GPU_24GB, &Options::default()).unwrap();
    assert_eq!(big.chosen.strategy, Strategy::AllOnGpu);
    insta::assert_snapshot!("qwen36_35b_a3b_8gb", llmctl::model::render_plan(&small));
    insta::assert_snapshot!("qwen36_35b_a3b_24gb", llmctl::model::render_plan(&big));
}

#[test]
fn qwen36_27b_dense_takes_the_largest_ngl() {
    let s = shape_of(qwen36_27b());
    let small = plan::plan(&s, &GUIDE_GPU, &Options::default()).unwrap();
    assert!(matches!(
        small.chosen.strategy,
        Strategy::PartialLayers { .. }
    ));
    assert!(
        small.alternative.is_none(),
        "a dense model has no expert placement"
    );
    let one_more = plan::evaluate(&s, &Options::default(), 32768, small.chosen.ngl + 1, 0);
    assert!(
        !plan::fits_hardware(&one_more, &GUIDE_GPU),
        "-ngl is the largest that fits"
    );
    // ~16 GB at Q4_K_M: a 24 GB card holds all of it.
    let big = plan::plan(&s, &GPU_24GB, &Options::default()).unwrap();
    assert_eq!(big.chosen.strategy, Strategy::AllOnGpu);
    insta::assert_snapshot!("qwen36_27b_8gb", llmctl::model::render_plan(&small));
    insta::assert_snapshot!("qwen36_27b_24gb", llmctl::model::render_plan(&big));
}

#[test]
fn sliding_window_layers_only_cache_their_window() {
    let s = shape_of(gemma4_26b_a4b());
    let opts = Options {
        cache_type: CacheType::F16,
        ..guide_options()
    };
    let p = plan::evaluate(&s, &opts, 32768, 31, 30);
    // 25 sliding layers × pad256(1024 + 512) cells × 8 heads × (256 + 256) × 2 bytes
    // + 5 full layers × 32768 cells × 2 heads × (512 + 512) × 2 bytes.
    let expected = 25 * 1536 * 8 * 512 * 2 + 5 * 32768 * 2 * 1024 * 2;
    assert_eq!(p.vram.kv_cache, expected);
}

#[test]
fn a_context_that_fits_nowhere_is_refused() {
    let s = shape_of(qwen36_27b());
    // ~16 GB of weights against 8000 MiB of RAM + ~7.5 GiB of usable VRAM.
    let hw = Hardware {
        vram_mib: 8188,
        ram_mib: Some(8000),
    };
    let err = plan::plan(&s, &hw, &Options::default()).unwrap_err();
    let PlanError::DoesNotFit { advice, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        advice.contains("smaller quantization") || advice.contains("--ctx"),
        "{err}"
    );

    // The full 262144-token context at f16 on top of ~21 GB of weights does not fit in 20000 MiB + 8 GB.
    let s = shape_of(qwen36_35b_a3b());
    let hw = Hardware {
        vram_mib: 8188,
        ram_mib: Some(20000),
    };
    let opts = Options {
        ctx: Some(262144),
        cache_type: CacheType::F16,
        ..Options::default()
    };
    let msg = plan::plan(&s, &hw, &opts).unwrap_err().to_string();
    assert!(
        msg.contains("does not fit") && msg.contains("--ctx"),
        "{msg}"
    );
}

#[test]
fn bad_inputs_are_explained() {
    let s = shape_of(qwen36_27b());
    let e = plan::plan(
        &s,
        &Hardware {
            vram_mib: 0,
            ram_mib: None,
        },
        &Options::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("nvidia-smi"));
    let e = plan::plan(
        &s,
        &GUIDE_GPU,
        &Options {
            ctx: Some(0),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("--ctx"));
}

#[test]
fn plan_on_the_real_smollm2_fits_entirely() {
    let located = llmctl::model::source::read_local(&smollm2_path()).unwrap();
    let s = shape::from_header(&located.header).unwrap();
    let p = plan::plan(&s, &GUIDE_GPU, &Options::default()).unwrap();
    assert_eq!(p.chosen.strategy, Strategy::AllOnGpu);
    // The default context is the model's training context when that is smaller than 32768.
    assert_eq!(p.ctx, 8192);
    assert_eq!(
        p.flags,
        [
            "-ngl", "31", "-c", "8192", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", "-ub", "512",
            "-np", "1"
        ]
    );
}

/// `llmctl model plan ARGS` with no llmctl.toml around (an empty working directory): exit code, stdout, stderr.
fn plan_cli(args: &[&str]) -> (i32, String, String) {
    plan_cli_in(&tempfile::tempdir().unwrap(), args)
}

fn plan_cli_in(dir: &tempfile::TempDir, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(["model", "plan"])
        .arg(smollm2_path())
        .args(args)
        .current_dir(dir.path())
        .env_remove("LLMCTL_CONFIG")
        .output()
        .expect("run llmctl model plan");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn huge_numbers_are_refused_by_the_planner_not_a_panic() {
    let s = shape_of(qwen36_27b());
    let cases: [(&str, Hardware, Options); 6] = [
        (
            "--ram",
            Hardware {
                vram_mib: 8188,
                ram_mib: Some(17592186044416),
            },
            Options::default(),
        ),
        (
            "--vram",
            Hardware {
                vram_mib: 18446744073709551,
                ram_mib: Some(40000),
            },
            Options::default(),
        ),
        (
            "--reserve",
            GUIDE_GPU,
            Options {
                reserve_mib: u64::MAX,
                ..Options::default()
            },
        ),
        (
            "--ctx",
            GUIDE_GPU,
            Options {
                ctx: Some(u64::MAX),
                ..Options::default()
            },
        ),
        (
            "--ctx",
            GUIDE_GPU,
            Options {
                ctx: Some(100_000_000_000),
                ..Options::default()
            },
        ),
        (
            "--ubatch",
            GUIDE_GPU,
            Options {
                ubatch: u64::MAX,
                ..Options::default()
            },
        ),
    ];
    for (flag, hw, opts) in cases {
        let e = plan::plan(&s, &hw, &opts).unwrap_err();
        assert!(
            matches!(e, PlanError::BadInput(_)) && e.to_string().contains(flag),
            "{flag}: {e}"
        );
    }
}

#[test]
fn a_context_over_llama_cpps_32_bit_limit_or_far_past_training_is_refused() {
    // No training context in the header: only the 32-bit limit applies.
    let mut s = shape_of(qwen36_27b());
    s.context_length = None;
    let big = Hardware {
        vram_mib: 80_000,
        ram_mib: Some(60_000_000),
    };
    let at = |ctx| Options {
        ctx: Some(ctx),
        ..Options::default()
    };
    let e = plan::plan(&s, &big, &at(plan::MAX_CTX + 1)).unwrap_err();
    assert!(
        e.to_string().contains("--ctx") && e.to_string().contains("2147483392"),
        "{e}"
    );
    // The largest context llama-server takes is planned (and does not fit).
    let e = plan::plan(&s, &big, &at(plan::MAX_CTX)).unwrap_err();
    assert!(matches!(e, PlanError::DoesNotFit { .. }), "{e}");
    // Far past the training context is refused, not warned about.
    let s = shape_of(qwen36_27b());
    let train = s.context_length.unwrap();
    let e = plan::plan(&s, &big, &at(train * 8 + 256)).unwrap_err();
    assert!(
        matches!(e, PlanError::BadInput(_)) && e.to_string().contains("training context"),
        "{e}"
    );
}

#[test]
fn the_cli_refuses_huge_numbers_naming_the_flag_and_its_range() {
    for args in [
        &["--vram", "8000", "--ram", "17592186044416"][..],
        &["--vram", "8000", "--reserve", "18446744073709551615"],
        &["--vram", "8000", "--ctx", "18446744073709551615"],
        &["--vram", "8000", "--ctx", "100000000000"],
        &["--vram", "18446744073709551"],
        &["--vram", "8000", "--ubatch", "0"],
    ] {
        let (code, _, err) = plan_cli(args);
        let flag = args[args.len() - 2];
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains("..="), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn an_absurd_context_is_refused_at_once() {
    // Before: a linear search over ~3.9 million contexts (minutes); the process timeout is only a hang guard.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(["model", "plan"])
        .arg(smollm2_path())
        .args(["--vram", "8000", "--ctx", "1000000000", "--ram", "100"])
        .current_dir(tempfile::tempdir().unwrap().path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("llmctl model plan --ctx 1000000000 --ram 100 still runs after 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Exit 2: the command could not run (bad input).
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--ctx") && err.contains("training context"),
        "{err}"
    );
}

#[test]
fn without_ram_the_plan_uses_this_machines_memory_and_says_so() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024;
    let (code, out, err) = plan_cli(&["--vram", "8000"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("MemTotal") && out.contains(&format!("{total_mib} MiB")),
        "{out}"
    );
    assert!(!out.contains("not checked"), "{out}");
    let (code, out, err) = plan_cli(&["--vram", "8000", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ram_mib"], total_mib);

    // A model without a training context at a 2-billion-token context: a KV cache of tens of TB, which no
    // machine has, so the plan is refused (before: planned, exit 0).
    let mut w = qwen36_27b();
    w.kvs.retain(|(k, _)| !k.ends_with(".context_length"));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-context.gguf");
    std::fs::write(&model, w.bytes()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(["model", "plan"])
        .arg(&model)
        .args(["--vram", "8000", "--ctx", "2000000000"])
        .current_dir(dir.path())
        .env_remove("LLMCTL_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("does not fit") && err.contains("this machine"),
        "{err}"
    );
}

fn flag<'a>(out: &'a str, name: &str) -> &'a str {
    let line = out
        .lines()
        .find(|l| l.starts_with("llama-server flags:"))
        .unwrap_or_else(|| panic!("no flags in {out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == name)
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    words[i + 1]
}

#[test]
fn plan_reads_server_settings_from_llmctl_toml_and_flags_override_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("llmctl.toml"),
        "[server]\ncontext = 16384\nubatch = 64\ncache_type_k = \"q8_0\"\ncache_type_v = \"q4_0\"\n",
    )
    .unwrap();
    let (code, out, err) = plan_cli_in(&dir, &["--vram", "8000", "--ram", "40000"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(flag(&out, "-c"), "16384", "{out}");
    assert_eq!(flag(&out, "-ub"), "64", "{out}");
    assert_eq!(flag(&out, "-ctk"), "q8_0", "{out}");
    assert_eq!(flag(&out, "-ctv"), "q4_0", "{out}");
    assert!(
        out.contains("llmctl.toml"),
        "the plan says where its settings came from: {out}"
    );
    // Flags win.
    let (code, out, err) = plan_cli_in(
        &dir,
        &[
            "--vram",
            "8000",
            "--ram",
            "40000",
            "--ctx",
            "4096",
            "--ubatch",
            "256",
            "--cache-type",
            "f16",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(flag(&out, "-c"), "4096", "{out}");
    assert_eq!(flag(&out, "-ub"), "256", "{out}");
    assert_eq!(flag(&out, "-ctk"), "f16", "{out}");
    assert_eq!(flag(&out, "-ctv"), "f16", "{out}");

    // A config without [server]: provision runs llama-server with the section's defaults (q4_0, -ub 128, 32768),
    // so the plan does too; --config names the file.
    let other = tempfile::tempdir().unwrap();
    let cfg = other.path().join("lab.toml");
    std::fs::write(&cfg, "[host]\ntarget = \"local\"\nvmid = 103\n").unwrap();
    let (code, out, err) = plan_cli_in(
        &tempfile::tempdir().unwrap(),
        &[
            "--vram",
            "8000",
            "--ram",
            "40000",
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(flag(&out, "-c"), "32768", "{out}");
    assert_eq!(flag(&out, "-ub"), "128", "{out}");
    assert_eq!(flag(&out, "-ctk"), "q4_0", "{out}");
    assert_eq!(flag(&out, "-ctv"), "q4_0", "{out}");

    // Without a config: the planner's own defaults.
    let (code, out, err) = plan_cli(&["--vram", "8000", "--ram", "40000"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(flag(&out, "-ub"), "512", "{out}");
    assert_eq!(flag(&out, "-ctk"), "q8_0", "{out}");
}

#[test]
fn a_v_cache_of_another_type_is_sized_as_its_own() {
    let s = shape_of(qwen36_27b());
    let both = |k, v| Options {
        ctx: Some(32768),
        cache_type: k,
        cache_type_v: v,
        ..Options::default()
    };
    let q8 = plan::evaluate(&s, &both(CacheType::Q8_0, None), 32768, 0, 0);
    let q4 = plan::evaluate(&s, &both(CacheType::Q4_0, None), 32768, 0, 0);
    let mixed = plan::evaluate(
        &s,
        &both(CacheType::Q8_0, Some(CacheType::Q4_0)),
        32768,
        0,
        0,
    );
    assert_eq!(mixed.ram.kv_cache * 2, q8.ram.kv_cache + q4.ram.kv_cache);
}

#[test]
fn plan_refuses_a_bad_server_section_in_provisions_words() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("llmctl.toml"),
        "[server]\ncache_type_k = \"q3\"\n",
    )
    .unwrap();
    let (code, _, err) = plan_cli_in(&dir, &["--vram", "8000", "--ram", "40000"]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("[server].cache_type_k: \"q3\" is not a llama.cpp cache type"),
        "{err}"
    );
    // A misspelt section is an error here as in every command, not a silent default.
    std::fs::write(dir.path().join("llmctl.toml"), "[sever]\ncontext = 8192\n").unwrap();
    let (code, _, err) = plan_cli_in(&dir, &["--vram", "8000", "--ram", "40000"]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("unknown section [sever]; did you mean [server]?"),
        "{err}"
    );
}

/// Issue 16 item 10: two GPUs are not one GPU of their summed memory. Each keeps its own CUDA context and compute
/// buffers, so a model sized to just fit the sum under one reserve does not fit two GPUs.
#[test]
fn two_gpus_keep_a_context_and_compute_buffers_each() {
    let s = shape_of(qwen36_27b());
    let one = Options::default();
    let two = Options {
        gpus: 2,
        ..Options::default()
    };
    let as_one = plan::evaluate(&s, &one, 32768, s.n_layer + 1, 0);
    let as_two = plan::evaluate(&s, &two, 32768, s.n_layer + 1, 0);
    assert_eq!(
        as_two.vram.overhead - as_one.vram.overhead,
        plan::DEFAULT_RESERVE_MIB * MIB,
        "a second CUDA context"
    );
    assert_eq!(as_two.vram.compute, 2 * as_one.vram.compute);
    // Memory that holds it all on one GPU of that size, split over two halves: it no longer fits whole.
    let exact = Hardware {
        vram_mib: as_one.vram.total().div_ceil(MIB),
        ram_mib: Some(40000),
    };
    assert!(plan::fits_hardware(&as_one, &exact));
    assert!(!plan::fits_hardware(&as_two, &exact));
    let split = plan::plan(&s, &exact, &two).unwrap();
    assert_ne!(split.chosen.strategy, Strategy::AllOnGpu);
}

/// SmolLM2 planned as the multi-GPU tests plan it: f16 cache, 32768 tokens, -ub 128 (1352 MiB on one GPU).
const SMOL_32K_F16: &[&str] = &[
    "--ram",
    "4096",
    "--ctx",
    "32768",
    "--cache-type",
    "f16",
    "--ubatch",
    "128",
];

/// Issue 16 item 10 through the CLI with the real SmolLM2: 1536 MiB holds the whole model (32768 tokens, f16
/// cache) as one GPU, but as two GPUs (`--gpus 2`) each keeps a CUDA reserve and compute buffers of its own, and
/// only part of the layers fit.
#[test]
fn the_cli_plans_two_gpus_with_a_reserve_and_compute_buffers_each() {
    let args = [&["--vram", "1536"][..], SMOL_32K_F16].concat();
    let (code, one, err) = plan_cli(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(flag(&one, "-ngl"), "31", "{one}");
    let (code, two, err) = plan_cli(&[&args[..], &["--gpus", "2"]].concat());
    assert_eq!(code, 0, "{err}");
    let ngl: u32 = flag(&two, "-ngl").parse().unwrap();
    assert!(ngl < 31, "{two}");
    assert!(
        two.contains("1024 MiB kept for the CUDA contexts (512 MiB on each of 2 GPUs"),
        "{two}"
    );
}

/// Issue 12 item 5 through the CLI with the real SmolLM2 (f16 cache, 32768 tokens, -ub 128: 1352 MiB on one GPU):
/// GPUs that each hold it get a replica each, pinned and on ports of their own; a GPU too small gets none.
#[test]
fn the_cli_plans_one_replica_per_gpu_that_holds_the_model() {
    let args = [SMOL_32K_F16, &["--port", "8080"][..]].concat();
    let (code, out, err) = plan_cli(
        &[
            &args[..],
            &["--gpu", "2048", "--gpu", "1024", "--gpu", "2048", "--json"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layout"], "replicas", "{out}");
    let servers = v["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{out}");
    for (s, (gpu, port)) in servers.iter().zip([(0, 8080), (2, 8082)]) {
        assert_eq!(s["gpus"], serde_json::json!([gpu]));
        assert_eq!(s["port"], port);
        assert_eq!(s["env"]["CUDA_VISIBLE_DEVICES"], gpu.to_string());
        assert_eq!(s["env"]["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
        let a: Vec<&str> = s["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert!(
            a.windows(2).any(|w| w == ["--port", &port.to_string()]),
            "{a:?}"
        );
        assert!(a.windows(2).any(|w| w == ["-c", "32768"]), "{a:?}");
    }
    assert_eq!(v["gpus"][1]["holds_model"], false);
    assert_eq!(v["gpus"][1]["planned_mib"], 0);
    // What provision reads from a plan is still there.
    assert_eq!(v["chosen"]["ngl"], 31);
    let (code, text, err) = plan_cli(
        &[
            &args[..],
            &["--gpu", "2048", "--gpu", "1024", "--gpu", "2048"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("GPU 1 gets no replica"), "{text}");
    assert!(
        text.contains(
            "llama-server, replica 2 of 2 on GPU 2, port 8082: CUDA_DEVICE_ORDER=PCI_BUS_ID \
             CUDA_VISIBLE_DEVICES=2 llama-server -ngl 31"
        ),
        "{text}"
    );
}

/// Two GPUs that hold SmolLM2 only together: one llama-server split by layer, never `row`; GPUs too small for
/// even that: partial offload, still split by layer.
#[test]
fn the_cli_splits_a_model_that_fits_only_the_gpus_together() {
    let args = SMOL_32K_F16;
    let (code, out, err) = plan_cli(&[args, &["--gpu", "1024", "--gpu", "1024"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("layout: one llama-server split across the 2 GPUs"),
        "{out}"
    );
    assert_eq!(flag(&out, "-ngl"), "31", "{out}");
    assert_eq!(flag(&out, "--split-mode"), "layer", "{out}");
    let ts: Vec<u32> = flag(&out, "--tensor-split")
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(ts.iter().sum::<u32>(), 31, "whole layers: {out}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("llama-server") && l.contains("row")),
        "{out}"
    );
    assert!(
        out.contains("CUDA_VISIBLE_DEVICES=0,1 llama-server"),
        "{out}"
    );
    let (code, out, err) = plan_cli(&[args, &["--gpu", "700", "--gpu", "700"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("layout: partial offload across the 2 GPUs"),
        "{out}"
    );
    let ngl: u32 = flag(&out, "-ngl").parse().unwrap();
    assert!(ngl > 0 && ngl < 31, "{out}");
    assert_eq!(flag(&out, "--split-mode"), "layer", "{out}");
}

#[test]
fn the_cli_refuses_mixing_gpu_with_vram_or_a_gpu_below_the_reserve() {
    let (code, _, err) = plan_cli(&["--gpu", "8188", "--vram", "8188", "--ram", "4096"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--vram"), "{err}");
    let (code, _, err) = plan_cli(&["--gpu", "8188", "--gpus", "2", "--ram", "4096"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = plan_cli(&["--ram", "4096"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--vram") || err.contains("--gpu"), "{err}");
    let (code, _, err) = plan_cli(&["--gpu", "8188", "--gpu", "400", "--ram", "4096"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--gpu 400 (GPU 1) is not more than --reserve 512 MiB"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
