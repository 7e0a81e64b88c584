//! What `llmctl provision` needs from `llmctl.toml`: the sections (their one schema is `crate::config`'s,
//! shared with every other command), the keys provision requires, and validation of the values serde cannot
//! judge (version formats, ranges, paths), with errors that name the field and the fix.

use crate::config::ConfigFile;
// The sections' one schema lives in `crate::config`; re-exported so the steps keep naming them from here.
pub use crate::config::{
    CACHE_TYPES, ContainerSection, DriverFlavor, DriverSection, FieldError, GpuLayers, HostSection,
    LlamaCppSection, ModelSection, ProxySection, ServerSection, is_exact_driver_version,
};

/// `[host]` as provision needs it: both keys required (the flag `--host` may give the target). Not a second
/// schema of the section: it is built from [`HostSection`] by [`HostSection::target_or`] and
/// [`HostSection::vmid_required`], whose errors read the same for every command.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTarget {
    /// `user@host[:port]`, an ~/.ssh/config alias, or `local`.
    pub target: String,
    pub vmid: u32,
}

/// What the provisioned proxy runs with where `[proxy]` leaves a key unset (the rule on [`ProxySection`]: a set
/// key means the same to every command, an unset one takes the default of whoever runs the proxy). The unit
/// writes these out as `--listen` and `--api-key-file`, so it shows what it does; serve-proxy's own defaults
/// (127.0.0.1:4000, no key) are for a proxy run by hand. client-config --from-host reads them from here too.
pub const PROVISIONED_LISTEN: &str = "0.0.0.0:4000";
pub const PROVISIONED_KEY_FILE: &str = "/etc/llmctl/proxy-api-key";

/// The listen address of the proxy provision installs from this `[proxy]` (client-config --from-host reads it too).
pub fn provisioned_listen(proxy: &ProxySection) -> &str {
    proxy.listen.as_deref().unwrap_or(PROVISIONED_LISTEN)
}

/// Every replica the provisioned proxy routes to, as its `--upstream` and `--peer` flags: `[proxy].upstreams`
/// listed (a `peer = true` entry is a peer), else `upstream` (they mean the same as for serve-proxy run by
/// hand), else, and with `upstreams = "fleet"`, the container's own llama-servers (one per replica); then
/// `[proxy].peers` (which a fleet fills with every other host's proxy).
pub fn provisioned_replicas(
    proxy: &ProxySection,
    servers: &[String],
) -> (Vec<String>, Vec<String>) {
    let mut peers: Vec<String> = Vec::new();
    let upstreams = match (&proxy.upstreams, &proxy.upstream) {
        (Some(crate::config::Upstreams::List(list)), _) if !list.is_empty() => {
            let mut ups = Vec::new();
            for e in list {
                match e {
                    crate::config::UpstreamEntry::Url(u) => ups.push(u.clone()),
                    crate::config::UpstreamEntry::Table(t) if t.peer == Some(true) => {
                        peers.push(t.url.clone())
                    }
                    crate::config::UpstreamEntry::Table(t) => ups.push(t.url.clone()),
                }
            }
            ups
        }
        (Some(crate::config::Upstreams::Word(_)), _) => servers.to_vec(),
        (_, Some(u)) => vec![u.clone()],
        _ => servers.to_vec(),
    };
    peers.extend(proxy.peers.iter().flatten().cloned());
    (upstreams, peers)
}

/// The URL other machines reach the proxy provision installs from this configuration at: `[proxy].url`, else
/// the static address of `[container].net0` and the port of `[proxy].listen`. `Err` says why there is none.
pub fn proxy_url(container: &ContainerSection, proxy: &ProxySection) -> Result<String, String> {
    if let Some(url) = &proxy.url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let listen: std::net::SocketAddr = provisioned_listen(proxy).parse().map_err(|_| {
        format!(
            "[proxy].listen {:?} is not IP:PORT",
            provisioned_listen(proxy)
        )
    })?;
    if listen.ip().is_loopback() {
        return Err(format!(
            "its proxy listens on {listen}, which other hosts cannot reach: set [proxy].listen to \"0.0.0.0:{}\"",
            listen.port()
        ));
    }
    let net0 = crate::client_config::from_host::parse_net0(&format!("net0: {}", container.net0));
    match net0
        .as_ref()
        .and_then(|n| crate::client_config::from_host::static_address(0, n))
    {
        Some((addr, _)) => Ok(format!("http://{addr}:{}", listen.port())),
        None => Err(format!(
            "its container has no static address ([container].net0 is {:?}): give it one (ip=192.168.1.50/24 \
             in net0), or set [proxy].url = \"http://ADDRESS:{}\" to where other hosts reach its proxy",
            container.net0,
            listen.port()
        )),
    }
}

/// The key file (in the container) of the proxy provision installs from this `[proxy]`.
pub fn provisioned_key_file(proxy: &ProxySection) -> String {
    proxy.api_key_file.as_ref().map_or_else(
        || PROVISIONED_KEY_FILE.to_string(),
        |p| p.display().to_string(),
    )
}

/// Where in the container the configuration puts what provision installs: the container round of the facts
/// looks there (provision's checks read what it found, and doctor's reconcile runs those checks).
pub fn install_paths(
    llama_cpp: &LlamaCppSection,
    model: &ModelSection,
    proxy: &ProxySection,
) -> crate::host::facts::InstallPaths {
    crate::host::facts::InstallPaths {
        llama_dir: llama_cpp.install_dir.trim_end_matches('/').to_string(),
        model_dest: model.dest.clone(),
        key_file: provisioned_key_file(proxy),
    }
}

/// [`install_paths`] of a file that describes an installation (`[driver]` and `[model]`, as doctor requires to
/// judge against it); None otherwise, and when the sections do not parse (doctor reports that once it has the
/// host's facts, as it does today).
pub fn install_paths_of(file: &ConfigFile) -> Option<crate::host::facts::InstallPaths> {
    if !(file.has_section("driver") && file.has_section("model")) {
        return None;
    }
    Some(install_paths(
        &file.section_or_default().ok()?,
        &file.section::<ModelSection>().ok()??,
        &file.section_or_default().ok()?,
    ))
}

/// Everything `llmctl provision` needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvisionConfig {
    pub host: HostTarget,
    pub container: ContainerSection,
    pub driver: DriverSection,
    pub llama_cpp: LlamaCppSection,
    pub model: ModelSection,
    pub server: ServerSection,
    pub proxy: ProxySection,
}

impl ProvisionConfig {
    /// The provisioned proxy's listen address.
    pub fn proxy_listen(&self) -> &str {
        provisioned_listen(&self.proxy)
    }

    /// The port the proxy listens on, which the container's own health checks and smoke test dial on 127.0.0.1.
    /// `listen` is validated as an address; 4000 is serve-proxy's default.
    pub fn proxy_port(&self) -> u16 {
        self.proxy_listen()
            .parse::<std::net::SocketAddr>()
            .map_or(4000, |a| a.port())
    }

    /// The provisioned proxy's key file (in the container).
    pub fn proxy_key_file(&self) -> Option<String> {
        Some(provisioned_key_file(&self.proxy))
    }

    /// Where in the container this configuration puts what provision installs.
    pub fn install_paths(&self) -> crate::host::facts::InstallPaths {
        install_paths(&self.llama_cpp, &self.model, &self.proxy)
    }

    /// Reads and validates the provisioning sections; every problem is reported, not only the first.
    pub fn from_file(file: &ConfigFile) -> anyhow::Result<Self> {
        Self::from_file_and_flags(file, None)
    }

    /// The same, with `--host` over `[host].target`.
    pub fn from_file_and_flags(file: &ConfigFile, host_flag: Option<&str>) -> anyhow::Result<Self> {
        if !file.exists() {
            anyhow::bail!(
                "no {} in this directory: `llmctl init` writes a complete, commented one; or pass --config PATH (or set LLMCTL_CONFIG)",
                crate::config::DEFAULT_PATH
            );
        }
        // Its values are checked in `validate`, with every other problem.
        let host: HostSection = file.section_or_default()?;
        let host = HostTarget {
            target: host.target_or(host_flag)?,
            vmid: host.vmid_required()?,
        };
        Self::with_host(file, host)
    }

    /// The provisioning sections for a host and container already chosen (doctor's `--host`/`--vmid`, or the
    /// container it picked).
    pub fn with_host(file: &ConfigFile, host: HostTarget) -> anyhow::Result<Self> {
        let name = file.name();
        let required = |section: &str| {
            anyhow::anyhow!(
                "{name}: section [{section}] is missing; `llmctl init` writes a complete, commented file"
            )
        };
        let cfg = ProvisionConfig {
            host,
            container: file.section_or_default()?,
            driver: file
                .section::<DriverSection>()?
                .ok_or_else(|| required("driver"))?,
            llama_cpp: file.section_or_default()?,
            model: file
                .section::<ModelSection>()?
                .ok_or_else(|| required("model"))?,
            server: file.section_or_default()?,
            proxy: file.section_or_default()?,
        };
        file.report(&cfg.validate())?;
        Ok(cfg)
    }

    /// Checks what serde cannot: formats, ranges, paths. Each section's own rules are its schema's (the same
    /// for every command that reads it); what is left here is what provision's choices add.
    pub fn validate(&self) -> Vec<FieldError> {
        // [host] on the resolved values: the same checks doctor's side makes of the file.
        let host = HostSection {
            target: Some(self.host.target.clone()),
            vmid: Some(self.host.vmid),
        };
        let mut errors: Vec<FieldError> = [
            host.check(),
            self.container.check(),
            self.driver.check(),
            self.llama_cpp.check(),
            self.model.check(),
            self.server.check(),
            self.proxy.check(),
        ]
        .concat();
        // The provisioned proxy takes its replicas as --upstream flags: a weight or model per replica has no flag.
        if self.proxy.upstreams.as_ref().is_some_and(|u| u.is_fleet()) {
            if self.proxy.peers.is_none() {
                errors.push(FieldError {
                    field: "[proxy].upstreams".into(),
                    problem: "is \"fleet\" but this is one host: \"fleet\" routes across the hosts of [[hosts]] \
                              or [cluster]; list the URLs instead, or remove the key"
                        .into(),
                });
            }
            if self.proxy.upstream.is_some() {
                errors.push(FieldError {
                    field: "[proxy].upstream".into(),
                    problem: "is set beside upstreams = \"fleet\": keep one".into(),
                });
            }
        }
        let listed = self.proxy.upstreams.as_ref().map_or(&[][..], |u| u.list());
        for (i, e) in listed.iter().enumerate() {
            if let crate::config::UpstreamEntry::Table(t) = e
                && (t.weight.is_some() || t.model.is_some())
            {
                errors.push(FieldError {
                    field: format!("[proxy].upstreams[{i}]"),
                    problem: "sets weight or model, which the provisioned proxy cannot take yet; give the URL \
                              alone (\"http://...\")"
                        .into(),
                });
            }
        }
        // A bad `listen` is reported by the proxy's own check; this one is about the provisioned default too.
        if self
            .proxy_listen()
            .parse::<std::net::SocketAddr>()
            .map(|a| a.port())
            == Ok(self.server.port)
        {
            errors.push(FieldError {
                field: "[proxy].listen".into(),
                problem: format!("uses port {}, the same as [server].port", self.server.port),
            });
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisioned_replicas_are_the_local_servers_then_the_peers() {
        let servers = vec![
            "http://127.0.0.1:8080".to_string(),
            "http://127.0.0.1:8081".into(),
        ];
        let proxy = |text: &str| -> ProxySection {
            ConfigFile::parse(text, None)
                .unwrap()
                .section_or_default()
                .unwrap()
        };
        let fleet = proxy("[proxy]\nupstreams = \"fleet\"\npeers = [\"http://10.0.0.2:4000\"]\n");
        assert_eq!(
            provisioned_replicas(&fleet, &servers),
            (servers.clone(), vec!["http://10.0.0.2:4000".to_string()])
        );
        let listed = proxy(
            "[proxy]\nupstreams = [\"http://x:1\", { url = \"http://y:4000\", peer = true }]\n",
        );
        assert_eq!(
            provisioned_replicas(&listed, &servers),
            (
                vec!["http://x:1".to_string()],
                vec!["http://y:4000".to_string()]
            )
        );
        assert_eq!(
            provisioned_replicas(&proxy(""), &servers),
            (servers, vec![])
        );
    }

    #[test]
    fn a_proxys_url_for_its_peers_is_set_or_from_a_static_net0() {
        let c = |net0: &str| ContainerSection {
            net0: net0.into(),
            ..ContainerSection::default()
        };
        let p = ProxySection::default();
        assert_eq!(
            proxy_url(
                &c("name=eth0,bridge=vmbr0,ip=192.168.1.50/24,gw=192.168.1.1"),
                &p
            )
            .unwrap(),
            "http://192.168.1.50:4000"
        );
        let e = proxy_url(&c("name=eth0,bridge=vmbr0,ip=dhcp"), &p).unwrap_err();
        assert!(
            e.contains("no static address") && e.contains("[proxy].url"),
            "{e}"
        );
        let set = ProxySection {
            url: Some("http://llm2.lan:4000/".into()),
            ..ProxySection::default()
        };
        assert_eq!(
            proxy_url(&c("ip=dhcp"), &set).unwrap(),
            "http://llm2.lan:4000"
        );
        let local = ProxySection {
            listen: Some("127.0.0.1:4000".into()),
            ..ProxySection::default()
        };
        let e = proxy_url(&c("ip=10.0.0.5/24"), &local).unwrap_err();
        assert!(e.contains("0.0.0.0:4000"), "{e}");
    }

    #[test]
    fn fleet_upstreams_on_one_host_or_beside_upstream_are_refused() {
        let with = |line: &str| INIT.replacen("[proxy]\n", &format!("[proxy]\n{line}\n"), 1);
        let e = parse(&with("upstreams = \"fleet\"")).unwrap_err();
        assert!(format!("{e:#}").contains("this is one host"), "{e:#}");
        let e = parse(&with("upstreams = \"fleets\"")).unwrap_err();
        assert!(format!("{e:#}").contains("nor \"fleet\""), "{e:#}");
    }

    const INIT: &str = include_str!("../../templates/llmctl.toml");

    fn parse(text: &str) -> anyhow::Result<ProvisionConfig> {
        ProvisionConfig::from_file(&ConfigFile::parse(text, None)?)
    }

    #[test]
    fn the_init_file_is_valid() {
        let cfg = parse(INIT).expect("llmctl init must write a valid file");
        assert_eq!(cfg.host.vmid, 103);
        assert_eq!(cfg.driver.version, "595.71.05");
        assert_eq!(cfg.driver.flavor, DriverFlavor::Open);
        assert_eq!(cfg.server.context, 32768);
        assert_eq!(cfg.server.gpu_layers, GpuLayers::Auto);
        assert_eq!(cfg.proxy_listen(), "0.0.0.0:4000");
    }

    #[test]
    fn driver_versions_must_be_exact() {
        assert!(is_exact_driver_version("595.71.05"));
        assert!(is_exact_driver_version("460.107"));
        for bad in [
            "595",
            "595.",
            "595.71.05-1",
            "v595.71.05",
            "59.71.05",
            "595.71.05.1",
            "",
        ] {
            assert!(!is_exact_driver_version(bad), "{bad}");
        }
    }

    #[test]
    fn every_bad_value_is_named_with_its_field() {
        let text = INIT
            .replace("version = \"595.71.05\"", "version = \"595\"")
            .replace("vmid = 103", "vmid = 7")
            .replace("cache_type_k = \"q4_0\"", "cache_type_k = \"q3\"")
            .replace("ubatch = 128", "ubatch = 4096")
            .replace("listen = \"0.0.0.0:4000\"", "listen = \"0.0.0.0:11434\"");
        let err = parse(&text).unwrap_err().to_string();
        for field in [
            "[driver].version: \"595\" is not an exact driver version",
            "[host].vmid: 7 is not a Proxmox guest id",
            "[server].cache_type_k: \"q3\" is not a llama.cpp cache type",
            "[server].ubatch: ubatch (4096) must be between 1 and batch (512)",
            "[proxy].listen: uses port 11434, the same as [server].port",
        ] {
            assert!(err.contains(field), "missing {field:?} in:\n{err}");
        }
    }

    #[test]
    fn typos_and_wrong_types_are_errors_naming_the_section() {
        let err = parse(&INIT.replace("context = 32768", "contxt = 32768"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[server]: unknown key `contxt`; did you mean `context`?"),
            "{err}"
        );
        let err = parse(&INIT.replace("gpu_layers = \"auto\"", "gpu_layers = \"most\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected \"auto\" or a number of layers"),
            "{err}"
        );
        let err = parse(&INIT.replace("flavor = \"open\"", "flavor = \"closed\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[driver].flavor") && err.contains("closed"),
            "{err}"
        );
    }

    #[test]
    fn missing_sections_point_at_init() {
        let err = parse("[host]\ntarget = \"local\"\nvmid = 103\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("section [driver] is missing") && err.contains("llmctl init"),
            "{err}"
        );
    }

    #[test]
    fn gpu_layers_accepts_numbers() {
        let cfg = parse(&INIT.replace("gpu_layers = \"auto\"", "gpu_layers = 12")).unwrap();
        assert_eq!(cfg.server.gpu_layers, GpuLayers::Count(12));
    }

    /// doctor, status, logs and client-config read `[host]` through `remote::HostArgs`; provision through
    /// `ProvisionConfig`. The same file and flags must name the same host and container, with the same errors.
    #[test]
    fn host_reads_the_same_for_doctor_and_provision() {
        use crate::remote::{HostArgs, SshArgs};
        let flags = |host: Option<&str>, vmid: Option<u32>| HostArgs {
            host: host.map(str::to_string).into_iter().collect(),
            vmid,
            ssh: SshArgs::default(),
        };
        let file = ConfigFile::parse(INIT, None).unwrap();
        let doctor = flags(None, None).resolve_with(&file).unwrap();
        let provision = ProvisionConfig::from_file(&file).unwrap();
        assert_eq!(doctor.host, provision.host.target);
        assert_eq!(doctor.vmid, Some(provision.host.vmid));
        assert_eq!((doctor.host.as_str(), doctor.vmid), ("root@pve", Some(103)));

        // --host wins over the file for both.
        let doctor = flags(Some("local"), None).resolve_with(&file).unwrap();
        let provision = ProvisionConfig::from_file_and_flags(&file, Some("local")).unwrap();
        assert_eq!(doctor.host, "local");
        assert_eq!(provision.host.target, "local");

        // No target anywhere: one wording.
        let no_target =
            ConfigFile::parse(&INIT.replace("target = \"root@pve\"\n", ""), None).unwrap();
        let d = flags(None, None)
            .resolve_with(&no_target)
            .unwrap_err()
            .to_string();
        let p = ProvisionConfig::from_file(&no_target)
            .unwrap_err()
            .to_string();
        assert_eq!(d, p);
        assert!(d.starts_with("no host given: pass --host"), "{d}");

        // A bad value: the same words from both sides.
        let bad = ConfigFile::parse(&INIT.replace("vmid = 103", "vmid = 7"), None).unwrap();
        let d = flags(None, None)
            .resolve_with(&bad)
            .unwrap_err()
            .to_string();
        let p = ProvisionConfig::from_file(&bad).unwrap_err().to_string();
        let line = "[host].vmid: 7 is not a Proxmox guest id (100 to 999999999)";
        assert!(d.contains(line) && p.contains(line), "{d}\n{p}");

        // No vmid: doctor finds the GPU container itself; provision needs to know which one to create or use.
        let no_vmid = ConfigFile::parse(&INIT.replace("vmid = 103\n", ""), None).unwrap();
        assert_eq!(flags(None, None).resolve_with(&no_vmid).unwrap().vmid, None);
        let p = ProvisionConfig::from_file(&no_vmid)
            .unwrap_err()
            .to_string();
        assert!(p.starts_with("no container given: set [host] vmid"), "{p}");

        // A typo is an error for both, not a default for one of them.
        let typo = ConfigFile::parse(&INIT.replace("vmid = 103", "vmdi = 103"), None).unwrap();
        let d = flags(None, None)
            .resolve_with(&typo)
            .unwrap_err()
            .to_string();
        let p = ProvisionConfig::from_file(&typo).unwrap_err().to_string();
        assert_eq!(d, p);
        assert!(
            d.contains("unknown key `vmdi`; did you mean `vmid`?"),
            "{d}"
        );
    }

    /// serve-proxy, the unit provision renders and client-config --from-host read one `[proxy]`: a key set in
    /// the file means the same to each; where unset, serve-proxy by hand keeps its own default and the unit
    /// writes the provisioned one out.
    #[test]
    fn proxy_reads_the_same_for_serve_proxy_provision_and_client_config() {
        use crate::proxy::config::{Overrides, resolve};
        let serve_proxy = |cfg: &ProvisionConfig| {
            resolve(&Overrides::default(), &cfg.proxy, &|_| None, &|_| {
                Ok("key".to_string())
            })
            .unwrap()
        };
        let argv_after = |argv: &[String], flag: &str| {
            argv.iter()
                .position(|a| a == flag)
                .map(|i| argv[i + 1].clone())
        };

        // Set in the file: one meaning.
        let cfg = parse(&INIT.replace(
            "listen = \"0.0.0.0:4000\"",
            "listen = \"0.0.0.0:5000\"\nupstream = \"http://127.0.0.1:8080\"",
        ))
        .unwrap();
        let argv =
            super::super::units::proxy_argv(&cfg, &super::super::units::Layout::of_config(&cfg));
        assert_eq!(serve_proxy(&cfg).listen.to_string(), "0.0.0.0:5000");
        assert_eq!(
            argv_after(&argv, "--listen").as_deref(),
            Some("0.0.0.0:5000")
        );
        assert_eq!(provisioned_listen(&cfg.proxy), "0.0.0.0:5000");
        assert_eq!(serve_proxy(&cfg).upstream, "http://127.0.0.1:8080");
        assert_eq!(
            argv_after(&argv, "--upstream").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            provisioned_key_file(&cfg.proxy),
            "/etc/llmctl/proxy-api-key"
        );

        // Unset: serve-proxy by hand is local and open; the unit says what it does instead.
        let cfg = parse(
            &INIT
                .replace("listen = \"0.0.0.0:4000\"\n", "")
                .replace("api_key_file = \"/etc/llmctl/proxy-api-key\"\n", ""),
        )
        .unwrap();
        assert_eq!(cfg.proxy, ProxySection::default());
        let argv =
            super::super::units::proxy_argv(&cfg, &super::super::units::Layout::of_config(&cfg));
        assert_eq!(
            serve_proxy(&cfg).listen.to_string(),
            crate::proxy::config::DEFAULT_LISTEN
        );
        assert_eq!(serve_proxy(&cfg).api_key, None);
        assert_eq!(
            argv_after(&argv, "--listen").as_deref(),
            Some(PROVISIONED_LISTEN)
        );
        assert!(argv.iter().any(|a| a == "--api-key-file"), "{argv:?}");
        assert_eq!(
            argv_after(&argv, "--upstream").as_deref(),
            Some("http://127.0.0.1:11434")
        );
        // client-config --from-host dials what the unit listens on.
        assert_eq!(provisioned_listen(&cfg.proxy), PROVISIONED_LISTEN);
        assert_eq!(provisioned_key_file(&cfg.proxy), PROVISIONED_KEY_FILE);

        // A bad value: the words serve-proxy uses for its file ([`ProxySection::check`]).
        let err = parse(&INIT.replace("listen = \"0.0.0.0:4000\"", "listen = \"localhost\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[proxy].listen: \"localhost\" is not an address like \"127.0.0.1:4000\""),
            "{err}"
        );
    }
}
