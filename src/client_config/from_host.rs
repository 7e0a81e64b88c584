//! `client-config --from-host`: where a client on this machine reaches the provisioned proxy, and with which
//! key, read from the Proxmox host itself over SSH, through the same connection code, host-key checks and flags
//! as doctor and provision ([`crate::remote`]): the container's address (`net0`'s static `ip=` in `pct config`,
//! else what the container answers to `ip -4 addr`), the proxy's port from `[proxy].listen`, and its key from
//! the key file in the container (`pct exec <vmid> -- cat FILE`: the key travels on the SSH channel's stdout,
//! never in a command line, and no temp copy is left on the host). The key goes only into the settings file;
//! it is printed only with `--show-key`. One request through the proxy then proves the address and the key
//! before anything is written.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::remote::Remote;
use crate::transport::{Cmd, Container, Transport};

/// Stands in for the key in printed settings: the key is shown only when asked for.
pub const KEY_PLACEHOLDER: &str = "<the proxy's key: --show-key prints it, --write writes it>";

/// How long the proof request may take: a tiny prompt, but llama-server may be busy with another client's
/// prefill (one slot) or still loading the model.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// An address this machine cannot route to fails here, not after the full timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy's key. `Debug` never shows it, so no `{:?}` of a struct holding one can put it in a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(key: String) -> Self {
        Secret(key)
    }

    /// The key itself, for the settings file and the request header: nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a client's address and key come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `--proxy-url`, `--llama-url`, `--api-key-env` and their defaults (this machine).
    Flags,
    /// The provisioned host, over SSH.
    Host,
}

/// The precedence, first match wins: `--from-host` (or `--host`/`--vmid`, which only mean something for it) →
/// the host; any of `--proxy-url`, `--llama-url`, `--api-key-env` → those flags, as before; an llmctl.toml with
/// a `[host]` section → the host (the machine that ran provision is the one to configure); else the flags'
/// defaults (127.0.0.1: running next to the proxy). With the host as the source, an address flag given
/// alongside still wins for what it names (a NAT or VPN address, say) and the rest comes from the host.
pub fn source(
    from_host: bool,
    names_target: bool,
    address_flags: bool,
    config_has_host: bool,
) -> Source {
    if from_host || names_target {
        Source::Host
    } else if address_flags {
        Source::Flags
    } else if config_has_host {
        Source::Host
    } else {
        Source::Flags
    }
}

/// The IPv4 setting of a container's `net0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ip4 {
    /// `ip=192.168.1.50/24`
    Static(Ipv4Addr),
    /// `ip=dhcp`
    Dhcp,
    /// `ip=manual`: configured inside the container.
    Manual,
    /// No `ip=` (or one that is not an address): only the container knows.
    Unset,
}

/// A container's `net0` line: the interface it names inside the container, and its IPv4 setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net0 {
    pub name: String,
    pub ip: Ip4,
}

/// `net0` of `pct config <vmid>` output (`net0: name=eth0,bridge=vmbr0,...,ip=dhcp,type=veth`); `None` when
/// the container has no `net0`.
pub fn parse_net0(pct_config: &str) -> Option<Net0> {
    let value = pct_config
        .lines()
        .find_map(|l| l.strip_prefix("net0:"))?
        .trim();
    let mut net = Net0 {
        // Proxmox requires name=; eth0 is what its GUI fills in.
        name: "eth0".into(),
        ip: Ip4::Unset,
    };
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("name", v)) => net.name = v.to_string(),
            Some(("ip", "dhcp")) => net.ip = Ip4::Dhcp,
            Some(("ip", "manual")) => net.ip = Ip4::Manual,
            Some(("ip", v)) => {
                let addr = v.split('/').next().unwrap_or(v);
                net.ip = addr.parse().map_or(Ip4::Unset, Ip4::Static);
            }
            _ => {}
        }
    }
    Some(net)
}

/// `ip -o -4 addr show scope global` output: (interface, address) in the order printed, e.g.
/// `2: eth0    inet 192.168.1.50/24 brd 192.168.1.255 scope global dynamic eth0\       valid_lft ...`.
pub fn parse_ip_addr(out: &str) -> Vec<(String, Ipv4Addr)> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let _index = words.next()?;
            // `eth0@if12` in some iproute2 versions: the peer's index is not part of the name.
            let name = words.next()?.split('@').next()?.to_string();
            if words.next()? != "inet" {
                return None;
            }
            let addr = words.next()?.split('/').next()?.parse().ok()?;
            Some((name, addr))
        })
        .collect()
}

/// The address in `net0`'s static `ip=`, with where it came from (for messages).
pub fn static_address(vmid: u32, net0: &Net0) -> Option<(Ipv4Addr, String)> {
    match net0.ip {
        Ip4::Static(a) => Some((a, format!("net0's static ip= in `pct config {vmid}`"))),
        _ => None,
    }
}

/// The container's own answer, when `net0` has no static address: the address of `net0`'s interface; else the
/// only global address it has. Several and none on `net0`'s interface: which one a laptop reaches is a guess,
/// so it is an error that lists them.
pub fn address_from_ct(
    vmid: u32,
    net0: &Net0,
    addrs: &[(String, Ipv4Addr)],
) -> std::result::Result<(Ipv4Addr, String), String> {
    if let Some((_, a)) = addrs.iter().find(|(n, _)| *n == net0.name) {
        return Ok((*a, format!("{} in CT {vmid}, from `ip -4 addr`", net0.name)));
    }
    match addrs {
        [(name, a)] => Ok((*a, format!("{name} in CT {vmid}, from `ip -4 addr`"))),
        [] => Err(format!(
            "CT {vmid} has no IPv4 address (net0: {}, {}): check its network (`pct exec {vmid} -- ip addr`), or \
             pass --proxy-url http://ADDRESS:PORT",
            net0.name,
            describe_ip(&net0.ip)
        )),
        many => Err(format!(
            "CT {vmid} has several IPv4 addresses and none on {} (net0): {}; pass --proxy-url \
             http://ADDRESS:PORT with the one this machine reaches",
            net0.name,
            many.iter()
                .map(|(n, a)| format!("{a} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn describe_ip(ip: &Ip4) -> &'static str {
    match ip {
        Ip4::Static(_) => "a static ip=",
        Ip4::Dhcp => "ip=dhcp: no lease yet?",
        Ip4::Manual => "ip=manual",
        Ip4::Unset => "no ip=",
    }
}

/// The base URL of a service that listens on `ip:port` in a container reached at `ct`: all interfaces → the
/// container's address; one address → that address; loopback → nothing outside the container reaches it, an
/// error that names the setting (`field`) and the fix.
pub fn service_url(
    ip: IpAddr,
    port: u16,
    ct: Ipv4Addr,
    field: &str,
) -> std::result::Result<String, String> {
    if ip.is_loopback() {
        return Err(format!(
            "{field} is {}: it answers only inside the container; set it to {} and run `llmctl provision`",
            SocketAddr::new(ip, port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ));
    }
    let host = if ip.is_unspecified() {
        IpAddr::V4(ct)
    } else {
        ip
    };
    Ok(format!("http://{}", SocketAddr::new(host, port)))
}

/// The proxy's URL from `[proxy].listen` (an `address:port`, validated by provision).
pub fn proxy_url(listen: &str, ct: Ipv4Addr) -> Result<String> {
    let addr: SocketAddr = listen.parse().map_err(|_| {
        anyhow::anyhow!("[proxy].listen {listen:?} is not an address:port, e.g. \"0.0.0.0:4000\"")
    })?;
    service_url(addr.ip(), addr.port(), ct, "[proxy].listen").map_err(anyhow::Error::msg)
}

/// llama-server's URL from `[server].host` and `.port`; an error message when it cannot be reached from here.
pub fn llama_url(host: &str, port: u16, ct: Ipv4Addr) -> std::result::Result<String, String> {
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("[server].host {host:?} is not an IP address"))?;
    service_url(ip, port, ct, "[server].host:port")
}

/// What the host told us.
#[derive(Debug)]
pub struct Found {
    /// The container: `--vmid` / `[host] vmid`, else the one doctor would pick.
    pub vmid: u32,
    /// The container's address, as a machine on its network reaches it.
    pub addr: Ipv4Addr,
    /// Where the address came from, for messages.
    pub addr_source: String,
    /// The proxy's key, when asked for.
    pub key: Option<Secret>,
}

/// Reads the container's address and (with `key_file`) the proxy's key from the host: `pveversion` (a readable
/// error for a host that is not Proxmox), `pct config`, `ip -4 addr` in the container when net0 has no static
/// address, and `cat FILE` in the container. Without a vmid, the container is the one doctor picks (the only
/// one with NVIDIA devices, else the only one), from doctor's own probes.
pub fn read(remote: &Remote, key_file: Option<&str>) -> Result<Found> {
    let host = remote.connect()?;
    crate::transport::ensure_proxmox(host.as_ref())?;
    let vmid = match remote.vmid {
        Some(v) => v,
        None => crate::host::facts::gather(host.as_ref(), None)?
            .vmid
            .with_context(|| {
                format!(
                    "{} has no container: pass --vmid N, or set [host] vmid in llmctl.toml",
                    host.describe()
                )
            })?,
    };
    let ct = Container::new(host.as_ref(), vmid);
    let config = ct.config()?;
    let net0 = parse_net0(&config).with_context(|| {
        format!(
            "CT {vmid} on {} has no network interface (no net0 in `pct config {vmid}`): add one \
             (`pct set {vmid} --net0 name=eth0,bridge=vmbr0,ip=dhcp`), or pass --proxy-url",
            host.describe()
        )
    })?;
    let (addr, addr_source) = match static_address(vmid, &net0) {
        Some(found) => found,
        None => {
            let out = ct.run(&Cmd::new([
                "ip", "-o", "-4", "addr", "show", "scope", "global",
            ]))?;
            if !out.success() {
                bail!(
                    "cannot ask CT {vmid} for its address (`ip -4 addr` in it failed: {}): start it (`pct start \
                     {vmid}`, or `llmctl provision`), or pass --proxy-url",
                    out.stderr.trim()
                );
            }
            address_from_ct(vmid, &net0, &parse_ip_addr(&out.stdout)).map_err(anyhow::Error::msg)?
        }
    };
    let key = match key_file {
        Some(path) => Some(read_key(&ct, vmid, path)?),
        None => None,
    };
    Ok(Found {
        vmid,
        addr,
        addr_source,
        key,
    })
}

fn read_key(ct: &Container<'_>, vmid: u32, path: &str) -> Result<Secret> {
    let out = ct.run(&Cmd::new(["cat", "--", path]))?;
    if !out.success() {
        bail!(
            "cannot read the proxy's key {path} in CT {vmid}: {}; `llmctl provision` creates it (or set \
             [proxy].api_key_file to the file the proxy uses)",
            out.stderr.trim()
        );
    }
    // serve-proxy reads the first line of the file: so does this.
    let key = out.stdout.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        bail!(
            "the proxy's key file {path} in CT {vmid} is empty: remove it and run `llmctl provision` to make a new key"
        );
    }
    Ok(Secret::new(key))
}

/// The request that proves a client's settings work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Claude Code, Codex: one message through the proxy (`POST /v1/messages`), with the key.
    Proxy,
    /// pi: one chat completion straight from llama-server (`POST /v1/chat/completions`).
    Llama,
}

/// Why the proof request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection: refused, unreachable, no route, connect timeout.
    Connect(String),
    /// Connected, but no answer in time.
    Timeout,
    /// An HTTP error status and the start of its body.
    Status(u16, String),
    Other(String),
}

/// What a failure is explained with: the address tried and where it and the key came from.
#[derive(Debug, Clone)]
pub struct Hint<'a> {
    pub url: &'a str,
    pub addr: &'a str,
    pub addr_source: &'a str,
    pub key_source: &'a str,
}

/// The message for a failed proof request: what failed, with the address tried, and the fix.
pub fn explain(f: &Failure, c: &Hint<'_>) -> String {
    let url = c.url;
    match f {
        Failure::Connect(detail) => format!(
            "cannot reach {url} from this machine ({detail}). The address tried, {}, is {}. Check that this \
             machine routes to it (same LAN or a VPN; `ping {}`), that the service runs (`llmctl doctor`) and \
             that no firewall drops the port; or pass --proxy-url (pi: --llama-url) with an address that \
             reaches it",
            c.addr, c.addr_source, c.addr
        ),
        Failure::Timeout => format!(
            "{url} took the connection but sent no answer within {} s: llama-server may be loading the model or \
             busy with another client's long prompt; try again, and see `llmctl doctor`",
            CHECK_TIMEOUT.as_secs()
        ),
        Failure::Status(401 | 403, _) => format!(
            "{url} refused the key ({}): the proxy runs with another key. Restart it so it reads the key file \
             again (`systemctl restart llmctl-proxy` in the container, or `llmctl provision`)",
            c.key_source
        ),
        Failure::Status(code @ 500..=599, body) => format!(
            "{url} answered {code}: {}. The proxy is up but llama-server did not answer; `llmctl doctor` says why",
            first_line(body)
        ),
        Failure::Status(code, body) => format!("{url} answered {code}: {}", first_line(body)),
        Failure::Other(detail) => format!("the request to {url} failed: {detail}"),
    }
}

fn first_line(body: &str) -> String {
    let line = body.trim().lines().next().unwrap_or("(empty body)");
    line.chars().take(300).collect()
}

/// Sends the proof request: the smallest real one (a one-token answer). Returns the endpoint it reached and
/// how long it took.
pub fn check(
    probe: Probe,
    base: &str,
    key: Option<&Secret>,
    model: Option<&str>,
) -> std::result::Result<(String, Duration), (String, Failure)> {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    let (url, body) = match probe {
        Probe::Proxy => (
            format!("{base}/v1/messages"),
            serde_json::json!({
                // Any name: the proxy maps it ([proxy].model) or llama-server serves its one model.
                "model": model.unwrap_or("llmctl-check"),
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "Say OK."}],
            }),
        ),
        Probe::Llama => (
            format!("{base}/v1/chat/completions"),
            serde_json::json!({
                "model": model.unwrap_or("llmctl-check"),
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "Say OK."}],
            }),
        ),
    };
    let started = Instant::now();
    let result = send(&url, &body, key);
    match result {
        Ok(()) => Ok((url, started.elapsed())),
        Err(f) => Err((url, f)),
    }
}

fn send(
    url: &str,
    body: &serde_json::Value,
    key: Option<&Secret>,
) -> std::result::Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CHECK_TIMEOUT)
            .build()
            .map_err(|e| Failure::Other(e.to_string()))?;
        let mut req = client
            .post(url)
            .header("anthropic-version", "2023-06-01")
            .json(body);
        if let Some(k) = key {
            // As Claude Code sends ANTHROPIC_AUTH_TOKEN and Codex its bearer token.
            req = req.bearer_auth(k.expose());
        }
        let resp = req.send().await.map_err(|e| classify(&e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| classify(&e))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::Status(status.as_u16(), text))
        }
    })
}

fn classify(e: &reqwest::Error) -> Failure {
    // The innermost cause says it best ("Connection refused (os error 111)"); reqwest's own text is generic.
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if e.is_connect() {
        Failure::Connect(detail)
    } else if e.is_timeout() {
        Failure::Timeout
    } else {
        Failure::Other(detail)
    }
}

/// The settings as printed without `--write`: the key replaced by [`KEY_PLACEHOLDER`] unless `--show-key`.
pub fn redact(text: &str, key: Option<&Secret>) -> String {
    match key {
        Some(k) if !k.expose().is_empty() => text.replace(k.expose(), KEY_PLACEHOLDER),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pct config 103` of a CT made with the Proxmox GUI's defaults (keys sorted, as pct prints them).
    const PCT_CONFIG_STATIC: &str = "arch: amd64\ncores: 12\nfeatures: nesting=1\nhostname: llm-server\n\
        memory: 40000\nnet0: name=eth0,bridge=vmbr0,firewall=1,gw=192.168.1.1,hwaddr=BC:24:11:F0:15:BA,\
        ip=192.168.1.50/24,type=veth\nostype: debian\nrootfs: local-lvm:vm-103-disk-0,size=120G\nswap: 0\n";

    #[test]
    fn net0_is_parsed_from_pct_config() {
        assert_eq!(
            parse_net0(PCT_CONFIG_STATIC),
            Some(Net0 {
                name: "eth0".into(),
                ip: Ip4::Static(Ipv4Addr::new(192, 168, 1, 50))
            })
        );
        let dhcp = "hostname: x\nnet0: name=eth1,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,ip6=auto,type=veth\n";
        assert_eq!(
            parse_net0(dhcp),
            Some(Net0 {
                name: "eth1".into(),
                ip: Ip4::Dhcp
            })
        );
        // The sim's (and a hand-made CT's) net0 without ip=; manual; an ip6-only static address.
        let none = "net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:F0:15:BA,type=veth\n";
        assert_eq!(parse_net0(none).unwrap().ip, Ip4::Unset);
        assert_eq!(
            parse_net0("net0: name=eth0,ip=manual\n").unwrap().ip,
            Ip4::Manual
        );
        assert_eq!(
            parse_net0("net0: name=eth0,ip6=fd00::5/64\n").unwrap().ip,
            Ip4::Unset
        );
        // net1's address is not net0's; no net0 at all is None.
        assert_eq!(parse_net0("net1: name=eth1,ip=10.0.0.9/24\n"), None);
        assert_eq!(parse_net0("arch: amd64\n"), None);
    }

    #[test]
    fn ip_addr_output_is_parsed() {
        // Debian 12's iproute2 in a CT (the sim's container answers the same), a DHCP lease, a second link.
        let out = "2: eth0    inet 192.168.1.77/24 brd 192.168.1.255 scope global dynamic eth0\\       valid_lft 86118sec preferred_lft 86118sec\n\
                   3: eth1@if9    inet 10.10.0.2/30 scope global eth1\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(
            parse_ip_addr(out),
            [
                ("eth0".to_string(), Ipv4Addr::new(192, 168, 1, 77)),
                ("eth1".to_string(), Ipv4Addr::new(10, 10, 0, 2)),
            ]
        );
        assert!(parse_ip_addr("").is_empty());
        assert!(parse_ip_addr("garbage\n2: eth0 inet6 fd00::1/64\n").is_empty());
    }

    #[test]
    fn the_address_is_net0s_static_ip_else_the_containers_answer_for_net0() {
        let stat = parse_net0(PCT_CONFIG_STATIC).unwrap();
        let (a, why) = static_address(103, &stat).unwrap();
        assert_eq!(a, Ipv4Addr::new(192, 168, 1, 50));
        assert!(why.contains("pct config 103"), "{why}");
        let dhcp = Net0 {
            name: "eth0".into(),
            ip: Ip4::Dhcp,
        };
        assert_eq!(static_address(103, &dhcp), None);
        let two = [
            ("eth1".to_string(), Ipv4Addr::new(10, 0, 0, 2)),
            ("eth0".to_string(), Ipv4Addr::new(192, 168, 1, 77)),
        ];
        let (a, why) = address_from_ct(103, &dhcp, &two).unwrap();
        assert_eq!(a, Ipv4Addr::new(192, 168, 1, 77), "net0's interface wins");
        assert!(why.starts_with("eth0 in CT 103"), "{why}");
        // The only address, on another name: taken. Several, none on net0: an error listing them.
        let one = [("ens18".to_string(), Ipv4Addr::new(10, 1, 1, 1))];
        assert_eq!(
            address_from_ct(103, &dhcp, &one).unwrap().0,
            Ipv4Addr::new(10, 1, 1, 1)
        );
        let other = Net0 {
            name: "eth5".into(),
            ip: Ip4::Dhcp,
        };
        let e = address_from_ct(103, &other, &two).unwrap_err();
        assert!(
            e.contains("10.0.0.2 (eth1)") && e.contains("--proxy-url"),
            "{e}"
        );
        let e = address_from_ct(103, &dhcp, &[]).unwrap_err();
        assert!(e.contains("no IPv4 address") && e.contains("lease"), "{e}");
    }

    #[test]
    fn the_url_follows_the_listen_address() {
        let ct = Ipv4Addr::new(192, 168, 1, 50);
        assert_eq!(
            proxy_url("0.0.0.0:4000", ct).unwrap(),
            "http://192.168.1.50:4000"
        );
        assert_eq!(
            proxy_url("[::]:4100", ct).unwrap(),
            "http://192.168.1.50:4100"
        );
        assert_eq!(
            proxy_url("10.9.8.7:4000", ct).unwrap(),
            "http://10.9.8.7:4000",
            "a proxy bound to one address is reached there"
        );
        let e = proxy_url("127.0.0.1:4000", ct).unwrap_err().to_string();
        assert!(
            e.contains("[proxy].listen is 127.0.0.1:4000")
                && e.contains("0.0.0.0:4000")
                && e.contains("llmctl provision"),
            "{e}"
        );
        assert!(proxy_url(":4000", ct).is_err());
        assert_eq!(
            llama_url("0.0.0.0", 11434, ct).unwrap(),
            "http://192.168.1.50:11434"
        );
        assert!(
            llama_url("127.0.0.1", 8080, ct)
                .unwrap_err()
                .contains("[server].host")
        );
        assert!(llama_url("localhost", 8080, ct).is_err());
    }

    #[test]
    fn precedence_of_the_sources() {
        use Source::*;
        // (--from-host, --host/--vmid, an address flag, [host] in llmctl.toml)
        assert_eq!(source(true, false, true, false), Host);
        assert_eq!(source(false, true, false, false), Host);
        assert_eq!(source(false, false, true, true), Flags);
        assert_eq!(source(false, false, false, true), Host);
        assert_eq!(source(false, false, false, false), Flags);
    }

    #[test]
    fn failures_name_the_address_and_the_fix() {
        let c = Hint {
            url: "http://192.168.1.50:4000/v1/messages",
            addr: "192.168.1.50",
            addr_source: "eth0 in CT 103, from `ip -4 addr`",
            key_source: "/etc/llmctl/proxy-api-key in CT 103",
        };
        let m = explain(
            &Failure::Connect("No route to host (os error 113)".into()),
            &c,
        );
        assert!(
            m.starts_with(
                "cannot reach http://192.168.1.50:4000/v1/messages from this machine (No route"
            ) && m.contains("The address tried, 192.168.1.50, is eth0 in CT 103, from")
                && m.contains("--proxy-url"),
            "{m}"
        );
        let m = explain(&Failure::Status(401, "{\"type\":\"error\"}".into()), &c);
        assert!(
            m.contains("refused the key (/etc/llmctl/proxy-api-key in CT 103)")
                && m.contains("restart"),
            "{m}"
        );
        let m = explain(&Failure::Status(502, "upstream down\nmore".into()), &c);
        assert!(
            m.contains("answered 502: upstream down.") && m.contains("llmctl doctor"),
            "{m}"
        );
        assert!(explain(&Failure::Timeout, &c).contains("120 s"));
    }

    #[test]
    fn the_key_is_redacted_unless_asked_for() {
        let k = Secret::new("0123abcd".into());
        assert_eq!(format!("{k:?}"), "Secret(<redacted>)");
        let text = "{\"ANTHROPIC_AUTH_TOKEN\": \"0123abcd\"}";
        let r = redact(text, Some(&k));
        assert!(
            !r.contains("0123abcd") && r.contains(KEY_PLACEHOLDER),
            "{r}"
        );
        assert_eq!(redact(text, None), text);
    }
}
