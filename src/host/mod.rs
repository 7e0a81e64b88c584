//! The host model both `doctor` and `provision` stand on: the facts gathered from a Proxmox host and its GPU
//! container ([`facts`]), the rules that judge one concern each ([`rules`]), and the typed names that tie a
//! doctor finding to the provision step that fixes it ([`StepId`]).
//!
//! A rule that decides whether something on the host is right lives here once; doctor's report and provision's
//! plan call the same function, so the two commands cannot disagree about it.

pub mod facts;
pub mod rules;

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A provision step: the unit `--only` selects and a doctor finding's fix names. A typed id, so a fix that names
/// a step that does not exist does not compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepId {
    Inventory,
    Container,
    Headers,
    Nouveau,
    Repo,
    Driver,
    Dkms,
    Module,
    DevicesAtBoot,
    Devices,
    Start,
    CtRepo,
    CtLibs,
    Cuda,
    Llmctl,
    Llama,
    Model,
    LlamaService,
    ProxyService,
}

impl StepId {
    /// Every step, in the order provision runs them: the host first, then the container.
    pub const ALL: [StepId; 19] = [
        StepId::Inventory,
        StepId::Container,
        StepId::Headers,
        StepId::Nouveau,
        StepId::Repo,
        StepId::Driver,
        StepId::Dkms,
        StepId::Module,
        StepId::DevicesAtBoot,
        StepId::Devices,
        StepId::Start,
        StepId::CtRepo,
        StepId::CtLibs,
        StepId::Cuda,
        StepId::Llmctl,
        StepId::Llama,
        StepId::Model,
        StepId::LlamaService,
        StepId::ProxyService,
    ];

    /// The name users type (`--only dkms`) and see in plans and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            StepId::Inventory => "inventory",
            StepId::Container => "container",
            StepId::Headers => "headers",
            StepId::Nouveau => "nouveau",
            StepId::Repo => "repo",
            StepId::Driver => "driver",
            StepId::Dkms => "dkms",
            StepId::Module => "module",
            StepId::DevicesAtBoot => "devices-at-boot",
            StepId::Devices => "devices",
            StepId::Start => "start",
            StepId::CtRepo => "ct-repo",
            StepId::CtLibs => "ct-libs",
            StepId::Cuda => "cuda",
            StepId::Llmctl => "llmctl",
            StepId::Llama => "llama",
            StepId::Model => "model",
            StepId::LlamaService => "llama-service",
            StepId::ProxyService => "proxy-service",
        }
    }
}

impl StepId {
    /// The id of doctor's finding for a step `provision --check` would change when no finding of doctor's own
    /// explains it: `plan.<step>`.
    pub const fn finding_id(self) -> &'static str {
        match self {
            StepId::Inventory => "plan.inventory",
            StepId::Container => "plan.container",
            StepId::Headers => "plan.headers",
            StepId::Nouveau => "plan.nouveau",
            StepId::Repo => "plan.repo",
            StepId::Driver => "plan.driver",
            StepId::Dkms => "plan.dkms",
            StepId::Module => "plan.module",
            StepId::DevicesAtBoot => "plan.devices-at-boot",
            StepId::Devices => "plan.devices",
            StepId::Start => "plan.start",
            StepId::CtRepo => "plan.ct-repo",
            StepId::CtLibs => "plan.ct-libs",
            StepId::Cuda => "plan.cuda",
            StepId::Llmctl => "plan.llmctl",
            StepId::Llama => "plan.llama",
            StepId::Model => "plan.model",
            StepId::LlamaService => "plan.llama-service",
            StepId::ProxyService => "plan.proxy-service",
        }
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for StepId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl FromStr for StepId {
    type Err = String;

    /// A step by its name; an unknown name is an error listing them all (and the nearest, for a typo).
    fn from_str(name: &str) -> Result<StepId, String> {
        let name = name.trim();
        if let Some(id) = StepId::ALL.iter().find(|s| s.as_str() == name) {
            return Ok(*id);
        }
        let nearest = StepId::ALL
            .iter()
            .map(|s| (crate::config::edit_distance(name, s.as_str()), s))
            .min_by_key(|(d, _)| *d)
            .filter(|(d, _)| *d <= 3)
            .map(|(_, s)| format!(" (did you mean {s}?)"))
            .unwrap_or_default();
        Err(format!(
            "no such step{nearest}; the steps are {}",
            StepId::ALL.map(StepId::as_str).join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip_and_are_unique() {
        let mut names: Vec<&str> = StepId::ALL.iter().map(|s| s.as_str()).collect();
        for s in StepId::ALL {
            assert_eq!(s.as_str().parse::<StepId>(), Ok(s));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), StepId::ALL.len());
        let err = "drivers".parse::<StepId>().unwrap_err();
        assert!(
            err.contains("did you mean driver?") && err.contains("devices-at-boot"),
            "{err}"
        );
    }
}
