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

use crate::provision::{self, ctx::Ctx, step::Step};

/// Declares every provision step once: its `StepId` variant, the name users type and see, and the step object
/// that checks and applies it. The run order is the order of the lines; `ALL`, `as_str`, `finding_id`
/// (`plan.<name>`), `FromStr` and `provision::all_steps()` all follow from this one list, so adding a step is
/// one line here (beside its rule in `rules.rs` and its `Step` impl).
macro_rules! steps {
    ($($variant:ident => $name:literal, $step:expr;)*) => {
        /// A provision step: the unit `--only` selects and a doctor finding's fix names. A typed id, so a fix
        /// that names a step that does not exist does not compile.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum StepId {
            $($variant,)*
        }

        impl StepId {
            /// Every step, in the order provision runs them: the host first, then the container.
            pub const ALL: &'static [StepId] = &[$(StepId::$variant,)*];

            /// The name users type (`--only dkms`) and see in plans and reports.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(StepId::$variant => $name,)*
                }
            }

            /// The id of doctor's finding for a step `provision --check` would change when no finding of
            /// doctor's own explains it: `plan.<step>`.
            pub const fn finding_id(self) -> &'static str {
                match self {
                    $(StepId::$variant => concat!("plan.", $name),)*
                }
            }

            /// The step that checks and applies this concern.
            pub fn step(self) -> &'static dyn Step<Ctx> {
                match self {
                    $(StepId::$variant => &$step,)*
                }
            }
        }
    };
}

steps! {
    Inventory => "inventory", provision::host::Inventory;
    Container => "container", provision::ct::Create;
    Headers => "headers", provision::host::Headers;
    Nouveau => "nouveau", provision::host::Nouveau;
    Repo => "repo", provision::host::HostRepo;
    Driver => "driver", provision::host::Driver;
    Dkms => "dkms", provision::host::Dkms;
    Module => "module", provision::host::Module;
    DevicesAtBoot => "devices-at-boot", provision::host::DevicesAtBoot;
    Devices => "devices", provision::ct::Devices;
    Start => "start", provision::ct::Start;
    CtRepo => "ct-repo", provision::ct::CtRepo;
    CtLibs => "ct-libs", provision::ct::CtLibs;
    Cuda => "cuda", provision::ct::Cuda;
    Llmctl => "llmctl", provision::ct::LlmctlBinary;
    Llama => "llama", provision::ct::Llama;
    Model => "model", provision::ct::Model;
    LlamaService => "llama-service", provision::ct::LLAMA_SERVICE;
    ProxyService => "proxy-service", provision::ct::PROXY_SERVICE;
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
            StepId::ALL
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip_and_are_unique() {
        let mut names: Vec<&str> = StepId::ALL.iter().map(|s| s.as_str()).collect();
        for &s in StepId::ALL {
            assert_eq!(s.as_str().parse::<StepId>(), Ok(s));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), StepId::ALL.len());
        for s in StepId::ALL {
            assert_eq!(s.finding_id(), format!("plan.{s}"));
            // The step object a line registers is the one that answers to that id.
            assert_eq!(s.step().id(), *s);
        }
        let err = "drivers".parse::<StepId>().unwrap_err();
        assert!(
            err.contains("did you mean driver?") && err.contains("devices-at-boot"),
            "{err}"
        );
    }
}
