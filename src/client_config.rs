//! `llmctl client-config claude|pi`: the client-side settings for Claude Code and pi.
//!
//! Claude Code talks to `serve-proxy` (Anthropic API) through the `env` block of `~/.claude/settings.json`;
//! pi talks OpenAI to llama-server directly through a provider entry in `~/.pi/agent/models.json`.
//! Without `--write` the fragment is printed; with it, it is merged into the file: other keys are kept, the
//! old file is backed up, the new one written atomically with mode 0600 (it may hold a key), and a file that
//! is not valid JSON is never overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

pub const DEFAULT_PROXY_URL: &str = "http://127.0.0.1:4000";
pub const DEFAULT_LLAMA_URL: &str = "http://127.0.0.1:11434";
pub const DEFAULT_CONTEXT: u64 = 32768;
/// pi's provider name in the guide; reusing it updates a guide-made entry instead of adding a second one.
pub const PI_PROVIDER: &str = "llama-local";
/// Claude Code's request timeout: a CPU prefill of its ~20k-token first prompt takes minutes.
const API_TIMEOUT_MS: &str = "3600000";
/// Stands in for a key when the proxy has none: Claude Code refuses to start without one.
const NO_KEY: &str = "llmctl-no-key";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Client {
    /// Claude Code (~/.claude/settings.json), through serve-proxy
    Claude,
    /// pi (~/.pi/agent/models.json), straight to llama-server
    Pi,
}

#[derive(Debug, Clone, Args)]
pub struct ClientConfigArgs {
    /// Which client to configure
    #[arg(value_enum)]
    pub client: Client,
    /// Address of `llmctl serve-proxy` (Claude Code)
    #[arg(long, value_name = "URL", default_value = DEFAULT_PROXY_URL)]
    pub proxy_url: String,
    /// Address of llama-server (pi)
    #[arg(long, value_name = "URL", default_value = DEFAULT_LLAMA_URL)]
    pub llama_url: String,
    /// Name of the environment variable holding the proxy's (or llama-server's) API key; its value is
    /// written into the settings, never taken from the command line
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Model name. Claude Code: sent as ANTHROPIC_MODEL (any name works, the proxy maps it).
    /// pi: the llama-server model id [default: the first id llama-server's /v1/models lists]
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Context window in tokens (pi)
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONTEXT)]
    pub context: u64,
    /// Merge into the settings file instead of printing
    #[arg(long)]
    pub write: bool,
    /// Settings file [default: ~/.claude/settings.json or ~/.pi/agent/models.json]
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
}

pub fn run(_global: &GlobalArgs, args: ClientConfigArgs) -> Result<Outcome> {
    let key = match &args.api_key_env {
        Some(name) => Some(std::env::var(name).map_err(|_| {
            anyhow::anyhow!(
                "environment variable {name} (from --api-key-env) is not set or not valid UTF-8"
            )
        })?),
        None => None,
    };
    let fragment = match args.client {
        Client::Claude => claude_settings(&args.proxy_url, key.as_deref(), args.model.as_deref())?,
        Client::Pi => {
            let model = match &args.model {
                Some(m) => m.clone(),
                None => discover_model(&args.llama_url)?,
            };
            pi_models(&args.llama_url, key.as_deref(), &model, args.context)?
        }
    };
    if !args.write {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string_pretty(&fragment)?)?;
        return Ok(Outcome::Success);
    }
    let path = match &args.file {
        Some(p) => p.clone(),
        None => default_file(args.client)?,
    };
    let backup = write_merged(&path, &fragment, unix_now())?;
    let mut out = std::io::stdout().lock();
    match backup {
        Some(b) => writeln!(
            out,
            "updated {} (previous version: {})",
            path.display(),
            b.display()
        )?,
        None => writeln!(out, "created {}", path.display())?,
    }
    Ok(Outcome::Success)
}

fn default_file(client: Client) -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set: pass --file PATH")?;
    let home = PathBuf::from(home);
    Ok(match client {
        Client::Claude => home.join(".claude").join("settings.json"),
        Client::Pi => home.join(".pi").join("agent").join("models.json"),
    })
}

fn check_url(url: &str, what: &str) -> Result<String> {
    let u = url.trim().trim_end_matches('/');
    if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() <= "https://".len() {
        bail!("invalid {what} {url:?}: expected http://HOST:PORT");
    }
    Ok(u.to_string())
}

/// `{"env": {...}}` for Claude Code's settings.json.
pub fn claude_settings(proxy_url: &str, key: Option<&str>, model: Option<&str>) -> Result<Value> {
    let base = check_url(proxy_url, "--proxy-url")?;
    let base = base.strip_suffix("/v1").unwrap_or(&base).to_string();
    let mut env = Map::new();
    env.insert("ANTHROPIC_BASE_URL".into(), json!(base));
    // AUTH_TOKEN (sent as Authorization: Bearer, which the proxy accepts) rather than ANTHROPIC_API_KEY:
    // Claude Code asks to approve a custom API key interactively, not a token.
    env.insert("ANTHROPIC_AUTH_TOKEN".into(), json!(key.unwrap_or(NO_KEY)));
    if let Some(m) = model {
        for k in [
            "ANTHROPIC_MODEL",
            "ANTHROPIC_SMALL_FAST_MODEL",
            "ANTHROPIC_DEFAULT_HAIKU_MODEL",
        ] {
            env.insert(k.into(), json!(m));
        }
    }
    env.insert(
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
        json!("1"),
    );
    env.insert("DISABLE_TELEMETRY".into(), json!("1"));
    env.insert("API_TIMEOUT_MS".into(), json!(API_TIMEOUT_MS));
    Ok(json!({ "env": env }))
}

/// `{"providers": {"llama-local": {...}}}` for pi's models.json (shape from the guide, Part 7).
pub fn pi_models(llama_url: &str, key: Option<&str>, model: &str, context: u64) -> Result<Value> {
    let base = check_url(llama_url, "--llama-url")?;
    let base = if base.ends_with("/v1") {
        base
    } else {
        format!("{base}/v1")
    };
    if context < 1024 {
        bail!(
            "--context {context} is too small: give the model's context window in tokens (e.g. 32768)"
        );
    }
    let name = model.rsplit('/').next().unwrap_or(model);
    Ok(json!({
        "providers": {
            PI_PROVIDER: {
                "baseUrl": base,
                "api": "openai-completions",
                "apiKey": key.unwrap_or("sk-dummy"),
                // llama.cpp knows neither the developer role nor reasoning_effort.
                "compat": {"supportsDeveloperRole": false, "supportsReasoningEffort": false},
                "models": [{
                    "id": model,
                    "name": format!("{name} (llmctl)"),
                    "reasoning": false,
                    "input": ["text"],
                    "contextWindow": context,
                    "maxTokens": (context / 4).min(8192),
                    "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
                }],
            }
        }
    }))
}

/// Merges `fragment` into `existing` one level below the top: `env` keys for Claude Code, provider entries
/// for pi. Everything else in the file is kept as it was.
pub fn merge(existing: Value, fragment: &Value) -> Result<Value> {
    let Value::Object(mut doc) = existing else {
        bail!("the settings file holds JSON that is not an object; fix or move it, then retry");
    };
    let Some(frag) = fragment.as_object() else {
        return Ok(Value::Object(doc));
    };
    for (section, entries) in frag {
        let slot = doc
            .entry(section.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(target) = slot else {
            bail!(
                "\"{section}\" in the settings file is not an object; fix or move it, then retry"
            );
        };
        if let Some(entries) = entries.as_object() {
            for (k, v) in entries {
                target.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(Value::Object(doc))
}

/// Merges into `path`; returns the backup's path when a file existed. Never touches a file that is not
/// valid JSON.
pub fn write_merged(path: &Path, fragment: &Value, now: u64) -> Result<Option<PathBuf>> {
    let existing = match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let doc = match &existing {
        Some(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Value::Object(Map::new()),
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not valid JSON ({e}); it was left unchanged: fix it, or move it away and run again",
                path.display()
            )
        })?,
        None => Value::Object(Map::new()),
    };
    let merged =
        merge(doc, fragment).with_context(|| format!("cannot merge into {}", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let backup = match &existing {
        Some(bytes) => {
            // Two runs in one second must not clobber the first backup.
            let mut b = PathBuf::from(format!("{}.bak.{now}", path.display()));
            let mut n = 0;
            while b.exists() {
                n += 1;
                b = PathBuf::from(format!("{}.bak.{now}.{n}", path.display()));
            }
            write_private(&b, bytes)
                .with_context(|| format!("cannot write the backup {}", b.display()))?;
            Some(b)
        }
        None => None,
    };
    let mut text = serde_json::to_vec_pretty(&merged)?;
    text.push(b'\n');
    let tmp = dir.join(format!(
        ".{}.llmctl-tmp.{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("settings"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(backup)
}

/// Creates `path` with mode 0600 from the start (no window where the key is world-readable) and syncs it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The first model llama-server lists, for pi's model id.
fn discover_model(llama_url: &str) -> Result<String> {
    let base = check_url(llama_url, "--llama-url")?;
    let base = base.strip_suffix("/v1").unwrap_or(&base).to_string();
    let url = format!("{base}/v1/models");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let models: Value = rt
        .block_on(async {
            reqwest::Client::builder()
                .no_proxy()
                .timeout(std::time::Duration::from_secs(10))
                .build()?
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json::<Value>()
                .await
        })
        .map_err(|e| anyhow::anyhow!("cannot list the models at {url} ({e}); pass --model NAME"))?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{url} lists no model; pass --model NAME"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claude_env_block() {
        let v = claude_settings("http://127.0.0.1:4000/", Some("sk-1"), Some("local")).unwrap();
        let env = &v["env"];
        assert_eq!(env["ANTHROPIC_BASE_URL"], "http://127.0.0.1:4000");
        assert_eq!(env["ANTHROPIC_AUTH_TOKEN"], "sk-1");
        assert_eq!(env["ANTHROPIC_MODEL"], "local");
        assert_eq!(env["ANTHROPIC_SMALL_FAST_MODEL"], "local");
        assert_eq!(env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1");
        assert_eq!(env["DISABLE_TELEMETRY"], "1");
        assert_eq!(env["API_TIMEOUT_MS"], API_TIMEOUT_MS);
        let v = claude_settings("http://h:1/v1", None, None).unwrap();
        assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], "http://h:1");
        assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], NO_KEY);
        assert!(v["env"].get("ANTHROPIC_MODEL").is_none());
        assert!(claude_settings("127.0.0.1:4000", None, None).is_err());
    }

    #[test]
    fn pi_provider_entry_has_the_guide_shape() {
        let v = pi_models("http://10.0.0.3:11434", None, "/models/gemma.gguf", 32768).unwrap();
        let p = &v["providers"][PI_PROVIDER];
        assert_eq!(p["baseUrl"], "http://10.0.0.3:11434/v1");
        assert_eq!(p["api"], "openai-completions");
        assert_eq!(
            p["compat"],
            json!({"supportsDeveloperRole": false, "supportsReasoningEffort": false})
        );
        assert_eq!(p["models"][0]["id"], "/models/gemma.gguf");
        assert_eq!(p["models"][0]["name"], "gemma.gguf (llmctl)");
        assert_eq!(p["models"][0]["contextWindow"], 32768);
        assert_eq!(p["models"][0]["maxTokens"], 8192);
        assert!(pi_models("http://h:1", None, "m", 10).is_err());
    }

    #[test]
    fn merge_keeps_other_keys() {
        let existing = json!({"theme": "dark", "env": {"FOO": "bar", "DISABLE_TELEMETRY": "0"},
                              "permissions": {"allow": ["Read"]}});
        let merged = merge(
            existing,
            &claude_settings(DEFAULT_PROXY_URL, None, None).unwrap(),
        )
        .unwrap();
        assert_eq!(merged["theme"], "dark");
        assert_eq!(merged["permissions"]["allow"][0], "Read");
        assert_eq!(merged["env"]["FOO"], "bar");
        assert_eq!(merged["env"]["DISABLE_TELEMETRY"], "1");
        assert_eq!(merged["env"]["ANTHROPIC_BASE_URL"], DEFAULT_PROXY_URL);

        let pi = json!({"providers": {"other": {"baseUrl": "x"}}, "defaultModel": "m"});
        let merged = merge(pi, &pi_models(DEFAULT_LLAMA_URL, None, "m", 8192).unwrap()).unwrap();
        assert_eq!(merged["providers"]["other"]["baseUrl"], "x");
        assert_eq!(
            merged["providers"][PI_PROVIDER]["models"][0]["maxTokens"],
            2048
        );
        assert_eq!(merged["defaultModel"], "m");

        assert!(merge(json!([1]), &json!({})).is_err());
        assert!(merge(json!({"env": "x"}), &json!({"env": {"A": "1"}})).is_err());
    }

    #[test]
    fn write_merges_backs_up_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("settings.json");
        let frag = claude_settings(DEFAULT_PROXY_URL, Some("k"), None).unwrap();
        // First write: no backup, file created 0600.
        assert_eq!(write_merged(&path, &frag, 1).unwrap(), None);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Someone adds a key; a second write keeps it and backs up the previous file.
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["model"] = json!("opus");
        std::fs::write(&path, v.to_string()).unwrap();
        let before = std::fs::read(&path).unwrap();
        let backup = write_merged(&path, &frag, 2).unwrap().unwrap();
        assert_eq!(backup, dir.path().join("sub").join("settings.json.bak.2"));
        assert_eq!(std::fs::read(&backup).unwrap(), before);
        let after: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(after["model"], "opus");
        assert_eq!(after["env"]["ANTHROPIC_AUTH_TOKEN"], "k");
        // No temp files left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn invalid_json_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.json");
        std::fs::write(&path, "{ \"env\": { oops").unwrap();
        let err = write_merged(&path, &json!({"env": {}}), 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not valid JSON") && err.contains("left unchanged"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ \"env\": { oops");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
