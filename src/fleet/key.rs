//! The one proxy key of a fleet whose proxies are peers (`[proxy] upstreams = "fleet"`): a proxy sends a peer
//! its own key, so every proxy of the fleet must hold the same one, and a client configured for one host's
//! proxy is then configured for all of them.
//!
//! The fleet's key is the one the first host (in inventory order) that has one holds; with none yet, a new
//! random one. `provision` over the fleet reads it once, before its hosts run, and each host's key step then
//! wants that key (compared by its sha256 in the container's facts, so the key itself is read from one host
//! only and written to the others over the SSH channel, never in argv or a log).

use anyhow::Result;

use super::Member;
use crate::client_config::from_host::Secret;
use crate::config::{HostSection, ProxySection};
use crate::provision::ctx::SharedKey;
use crate::transport::{Cmd, SshOptions, Transport, container::Container};

/// Whether any member's proxy has peers (its configuration says `upstreams = "fleet"` or lists `peers`).
pub fn wanted(members: &[Member]) -> bool {
    members.iter().any(|m| {
        m.config
            .section_or_default::<ProxySection>()
            .is_ok_and(|p| p.peers.is_some())
    })
}

/// The fleet's key: the first member's (that is reached and has a readable, non-empty key), else a new one.
/// A member that cannot be reached is passed over here: its own run reports it.
pub fn shared(members: &[Member], ssh: &SshOptions) -> Result<SharedKey> {
    for m in members.iter().filter(|m| m.skip.is_none()) {
        if let Some(key) = read(m, ssh) {
            return Ok(SharedKey::of(key));
        }
    }
    Ok(SharedKey::of(Secret::new(
        crate::provision::ct::new_api_key()?,
    )))
}

/// The key a fleet's hosts already hold (the first host's that has one), as doctor judges one host against it:
/// its hash only. None when none has one yet (provision would make one, and every host would change).
pub fn held(members: &[Member], ssh: &SshOptions) -> Option<SharedKey> {
    members
        .iter()
        .filter(|m| m.skip.is_none())
        .find_map(|m| read(m, ssh))
        .map(|k| SharedKey {
            value: None,
            ..SharedKey::of(k)
        })
}

/// doctor's view of the fleet's key, from the facts it gathered (no extra round trip): the sha256 of the key
/// file of the first host (in order) whose container has one, as provision would read it. `facts[i]` is the
/// i-th member's, None where it was not examined.
pub fn shared_hash(facts: &[Option<&crate::host::facts::HostFacts>]) -> Option<SharedKey> {
    facts.iter().flatten().find_map(|f| {
        let installed = f.inside()?.installed.as_ref()?;
        let (_, size) = installed.key_file?;
        let sha256 = installed.key_sha256.clone().filter(|_| size > 0)?;
        Some(SharedKey {
            sha256,
            value: None,
        })
    })
}

/// The key in a member's container, when it has one.
fn read(member: &Member, ssh: &SshOptions) -> Option<Secret> {
    let host: HostSection = member.config.section_or_default().ok()?;
    let proxy: ProxySection = member.config.section_or_default().ok()?;
    let vmid = host.vmid?;
    let target = host.target_or(None).ok()?;
    let transport = crate::transport::connect(&target, ssh).ok()?;
    let ct = Container::new(transport.as_ref(), vmid);
    let path = crate::provision::config::provisioned_key_file(&proxy);
    let out = ct.run(&Cmd::new(["cat", "--", path.as_str()])).ok()?;
    if !out.success() {
        return None;
    }
    // serve-proxy reads the file's first line: so does this.
    let key = out.stdout.lines().next().unwrap_or("").trim().to_string();
    (!key.is_empty()).then(|| Secret::new(key))
}
