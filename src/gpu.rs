//! NVIDIA GPU generations: which kernel-module flavour and driver branch can drive a GPU, which CUDA toolkit can
//! build for it, and the `CMAKE_CUDA_ARCHITECTURES` list for a host's GPUs.
//!
//! Pure rules from `../shared/reference/gpu-generations.md` (cited per function as "ref §N"); no I/O. The inputs are
//! what `nvidia-smi --query-gpu=name,compute_cap` prints (or, without a driver, what a caller derived from `lspci`).

use std::fmt;

use crate::pve::nvidia::ModuleFlavour;

/// A compute capability: `8.6` is `{ major: 8, minor: 6 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComputeCap {
    pub major: u32,
    pub minor: u32,
}

impl ComputeCap {
    /// Parses nvidia-smi's `compute_cap` field (`8.6`, `12.0`). `None` for anything else: a caller must not
    /// read an unparsable value as "old GPU" or "new GPU".
    pub fn parse(text: &str) -> Option<ComputeCap> {
        let (major, minor) = text.trim().split_once('.')?;
        let major = major.parse().ok()?;
        let minor: u32 = minor.parse().ok()?;
        (minor < 10).then_some(ComputeCap { major, minor })
    }

    /// The number CMake's `CUDA_ARCHITECTURES` and nvcc's `sm_XX` use: `8.6` → `86`, `12.0` → `120` (ref §3).
    pub fn arch(self) -> u32 {
        self.major * 10 + self.minor
    }
}

impl fmt::Display for ComputeCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The GPU architecture generations of ref §1, oldest first (the order is used: `>= Turing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Generation {
    Kepler,
    Maxwell,
    Pascal,
    Volta,
    Turing,
    Ampere,
    AdaLovelace,
    Hopper,
    Blackwell,
}

impl Generation {
    /// The name NVIDIA uses (and `nvidia-smi -q` prints as "Product Architecture", ref §4).
    pub fn name(self) -> &'static str {
        match self {
            Generation::Kepler => "Kepler",
            Generation::Maxwell => "Maxwell",
            Generation::Pascal => "Pascal",
            Generation::Volta => "Volta",
            Generation::Turing => "Turing",
            Generation::Ampere => "Ampere",
            Generation::AdaLovelace => "Ada Lovelace",
            Generation::Hopper => "Hopper",
            Generation::Blackwell => "Blackwell",
        }
    }

    /// Before Turing: no GPU System Processor, so no open module, and no CUDA 13 (ref §0.1, §0.4).
    pub fn is_pre_turing(self) -> bool {
        self < Generation::Turing
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Compute capability → generation (ref §1 table; fixture `compute-capability.table.txt`). 11.0 (Jetson Thor)
/// sits between the two Blackwell families in the fixture and is Blackwell too (*derived*). `None` for
/// capabilities the table does not know (older than Kepler, newer than 12.x): the caller reports "unknown GPU"
/// rather than guessing.
pub fn generation(cc: ComputeCap) -> Option<Generation> {
    Some(match (cc.major, cc.minor) {
        (3, _) => Generation::Kepler,
        (5, _) => Generation::Maxwell,
        (6, _) => Generation::Pascal,
        (7, 0..=4) => Generation::Volta,
        (7, _) => Generation::Turing,
        (8, 9) => Generation::AdaLovelace,
        (8, _) => Generation::Ampere,
        (9, _) => Generation::Hopper,
        (10..=12, _) => Generation::Blackwell,
        _ => return None,
    })
}

/// One GPU as the rules need it: its name (for messages, and for GH200, which the compute capability alone does
/// not tell apart from H100) and its compute capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuModel {
    /// nvidia-smi's index (the `N` of `/dev/nvidiaN`), for messages.
    pub index: usize,
    pub name: String,
    pub compute_cap: ComputeCap,
}

impl GpuModel {
    /// From one `nvidia-smi --query-gpu` row and its position; `None` when the compute capability does not parse.
    pub fn from_query(index: usize, gpu: &crate::pve::nvidia::Gpu) -> Option<GpuModel> {
        Some(GpuModel {
            index,
            name: gpu.name.clone(),
            compute_cap: ComputeCap::parse(&gpu.compute_cap)?,
        })
    }

    pub fn generation(&self) -> Option<Generation> {
        generation(self.compute_cap)
    }

    /// `GPU 1 (NVIDIA GeForce GTX 1080, Pascal, compute capability 6.1)`: how messages name a GPU.
    pub fn describe(&self) -> String {
        let generation = self
            .generation()
            .map_or("unknown generation", Generation::name);
        format!(
            "GPU {} ({}, {generation}, compute capability {})",
            self.index, self.name, self.compute_cap
        )
    }

    /// Grace Hopper needs the open module although it is compute capability 9.0 like H100 (ref §1, "GH200:
    /// required").
    fn is_grace_hopper(&self) -> bool {
        self.name.contains("GH200")
    }
}

/// The kernel-module flavours that can drive this GPU (ref §0.1, §1 "open module"/"proprietary" columns): the
/// open module needs the GSP (Turing, sm_75, and later); Blackwell and GH200 need the open module.
pub fn flavours(gpu: &GpuModel) -> &'static [ModuleFlavour] {
    const OPEN: &[ModuleFlavour] = &[ModuleFlavour::Open];
    const PROPRIETARY: &[ModuleFlavour] = &[ModuleFlavour::Proprietary];
    const EITHER: &[ModuleFlavour] = &[ModuleFlavour::Open, ModuleFlavour::Proprietary];
    match gpu.generation() {
        Some(g) if g.is_pre_turing() => PROPRIETARY,
        Some(Generation::Blackwell) => OPEN,
        Some(Generation::Hopper) if gpu.is_grace_hopper() => OPEN,
        Some(_) => EITHER,
        // Unknown: newer than the table is likelier than older, and new GPUs need the open module (ref §0.1).
        None if gpu.compute_cap.major > 12 => OPEN,
        None => PROPRIETARY,
    }
}

/// The newest driver branch that still drives this generation; `None` means every current branch does (ref §0.2,
/// §1 "newest branch"): Kepler ends at the 470 legacy branch, Maxwell/Pascal/Volta at the 580 legacy branch (later
/// branches load and "ignore this GPU", ref §2).
pub fn newest_branch(generation: Generation) -> Option<u32> {
    match generation {
        Generation::Kepler => Some(470),
        Generation::Maxwell | Generation::Pascal | Generation::Volta => Some(580),
        _ => None,
    }
}

/// The oldest driver branch that drives this generation; `None` when no floor matters here: Blackwell needs ≥ 570
/// (ref §0.2, §1).
pub fn oldest_branch(generation: Generation) -> Option<u32> {
    (generation == Generation::Blackwell).then_some(570)
}

/// Whether CUDA 13 can build for this GPU: CUDA 13 removed offline compilation below sm_75 (ref §0.4, §3).
pub fn cuda13_supports(cc: ComputeCap) -> bool {
    cc >= ComputeCap { major: 7, minor: 5 }
}

/// The newest CUDA toolkit major version that builds for every GPU present: 12 while any GPU is older than sm_75
/// (ref §3: 12.9 is the last for Maxwell/Pascal/Volta), 11 with a Kepler GPU (CUDA 12 dropped sm_35/sm_37),
/// `None` when no GPU limits it.
pub fn newest_cuda_major(gpus: &[GpuModel]) -> Option<u32> {
    gpus.iter()
        .filter_map(|g| match g.generation() {
            Some(Generation::Kepler) => Some(11),
            _ if !cuda13_supports(g.compute_cap) => Some(12),
            _ => None,
        })
        .min()
}

/// The oldest CUDA toolkit `(major, minor)` that knows this GPU's architecture: Blackwell sm_100/sm_120 need 12.8,
/// sm_103/sm_121 need 12.9 (ref §0.4, §3). `None` when any toolkit in use today does.
pub fn oldest_cuda(cc: ComputeCap) -> Option<(u32, u32)> {
    match generation(cc) {
        Some(Generation::Blackwell) if cc.minor == 0 => Some((12, 8)),
        Some(Generation::Blackwell) => Some((12, 9)),
        _ => None,
    }
}

/// What one host can run: the flavour and the branch range that drive all its GPUs (ref §1 "Mixed-host decision").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverChoice {
    /// The flavour to use: open where every GPU takes it (the installer default since R560), else proprietary.
    pub flavour: ModuleFlavour,
    /// Newest branch allowed (`None`: any current branch).
    pub newest_branch: Option<u32>,
    /// Oldest branch allowed (`None`: no floor).
    pub oldest_branch: Option<u32>,
}

impl fmt::Display for DriverChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} module", flavour_name(self.flavour))?;
        match (self.oldest_branch, self.newest_branch) {
            (Some(lo), Some(hi)) => write!(f, " with a driver branch from {lo} to {hi}"),
            (Some(lo), None) => write!(f, " with driver branch {lo} or newer"),
            (None, Some(hi)) => write!(
                f,
                " with driver branch {hi} or older (the {hi}.xx legacy branch)"
            ),
            (None, None) => write!(f, " with any current driver branch"),
        }
    }
}

fn flavour_name(flavour: ModuleFlavour) -> &'static str {
    match flavour {
        ModuleFlavour::Open => "open",
        ModuleFlavour::Proprietary => "proprietary",
    }
}

/// The flavour and branch range that drive every GPU in `gpus`, or `None` when no single driver can (one
/// `nvidia.ko` per kernel: a pre-Turing GPU beside a Blackwell GPU, ref §0.3).
pub fn host_driver_choice(gpus: &[GpuModel]) -> Option<DriverChoice> {
    let takes = |f: ModuleFlavour| gpus.iter().all(|g| flavours(g).contains(&f));
    let flavour = if takes(ModuleFlavour::Open) {
        ModuleFlavour::Open
    } else if takes(ModuleFlavour::Proprietary) {
        ModuleFlavour::Proprietary
    } else {
        return None;
    };
    let generations: Vec<Generation> = gpus.iter().filter_map(GpuModel::generation).collect();
    let newest = generations.iter().filter_map(|g| newest_branch(*g)).min();
    let oldest = generations.iter().filter_map(|g| oldest_branch(*g)).max();
    if let (Some(lo), Some(hi)) = (oldest, newest)
        && lo > hi
    {
        return None;
    }
    Some(DriverChoice {
        flavour,
        newest_branch: newest,
        oldest_branch: oldest,
    })
}

/// Why a configured driver cannot run on this host: each GPU it would not drive, and what would drive them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverRefusal {
    /// The configured branch and flavour.
    pub branch: u32,
    pub flavour: ModuleFlavour,
    /// One line per GPU the configured driver would not drive, naming the GPU and why.
    pub problems: Vec<String>,
    /// What drives every GPU present; `None` when no single driver can (ref §0.3).
    pub works: Option<DriverChoice>,
}

impl fmt::Display for DriverRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "driver branch {} with the {} module cannot drive every GPU on this host: {}",
            self.branch,
            flavour_name(self.flavour),
            self.problems.join("; ")
        )?;
        match &self.works {
            Some(choice) => write!(f, "; use {choice}"),
            None => write!(
                f,
                "; no single driver drives all of them (one nvidia.ko per kernel): remove or stop passing through \
                 the older GPU, or choose the open module and leave the pre-Turing GPU unused"
            ),
        }
    }
}

impl std::error::Error for DriverRefusal {}

/// Whether driver `branch` (e.g. `595`) with `flavour` drives every GPU in `gpus`; the error names each GPU it
/// would not drive and the branch/flavour that would (ref §0, §2 for what happens otherwise: the open module on
/// Pascal fails to load with the GSP message; a branch after 580 "will ignore this GPU"; the proprietary module
/// on Blackwell fails `RmInitAdapter`).
pub fn check_driver(
    gpus: &[GpuModel],
    branch: u32,
    flavour: ModuleFlavour,
) -> Result<(), DriverRefusal> {
    let problems: Vec<String> = gpus
        .iter()
        .filter_map(|gpu| gpu_problem(gpu, branch, flavour))
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(DriverRefusal {
        branch,
        flavour,
        problems,
        works: host_driver_choice(gpus),
    })
}

/// Why `branch`/`flavour` does not drive `gpu`, or `None` when it does.
fn gpu_problem(gpu: &GpuModel, branch: u32, flavour: ModuleFlavour) -> Option<String> {
    let mut reasons = Vec::new();
    if !flavours(gpu).contains(&flavour) {
        reasons.push(match flavour {
            ModuleFlavour::Open => {
                "the open module needs a Turing (sm_75) or newer GPU (it requires the GPU System Processor)"
            }
            ModuleFlavour::Proprietary => "it needs the open module",
        });
    }
    let generation = gpu.generation();
    let newest = generation.and_then(newest_branch);
    let oldest = generation.and_then(oldest_branch);
    let too_new = newest.filter(|hi| branch > *hi).map(|hi| {
        format!("driver branches after {hi} ignore it (it is supported through the {hi}.xx legacy branch)")
    });
    let too_old = oldest
        .filter(|lo| branch < *lo)
        .map(|lo| format!("it needs driver branch {lo} or newer"));
    let mut text: Vec<String> = reasons.into_iter().map(str::to_string).collect();
    text.extend(too_new);
    text.extend(too_old);
    (!text.is_empty()).then(|| format!("{}: {}", gpu.describe(), text.join(", and ")))
}

/// The explicit `CMAKE_CUDA_ARCHITECTURES` value for these GPUs: every GPU's compute capability without the dot,
/// deduplicated, in ascending order, joined with `;` (ref §0.5, §3 "Explicit": `61;86`). llama.cpp itself rewrites
/// `120`/`121` to `120a`/`121a`. Empty when there are no GPUs (the caller must not build with an empty list).
pub fn cuda_architectures(gpus: &[GpuModel]) -> String {
    let mut archs: Vec<u32> = gpus.iter().map(|g| g.compute_cap.arch()).collect();
    archs.sort_unstable();
    archs.dedup();
    archs
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(text: &str) -> ComputeCap {
        ComputeCap::parse(text).unwrap()
    }

    fn gpu(index: usize, name: &str, compute_cap: &str) -> GpuModel {
        GpuModel {
            index,
            name: name.into(),
            compute_cap: cc(compute_cap),
        }
    }

    #[test]
    fn parses_compute_cap_and_rejects_garbage() {
        assert_eq!(cc("8.6"), ComputeCap { major: 8, minor: 6 });
        assert_eq!(cc(" 12.0 ").arch(), 120);
        assert_eq!(cc("6.1").to_string(), "6.1");
        for bad in ["", "86", "8.", "x.6", "8.10", "[N/A]"] {
            assert_eq!(ComputeCap::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_row_of_the_compute_capability_fixture_maps_to_its_generation() {
        // fixture compute-capability.table.txt + gpu-generations.md §1.
        let rows = [
            ("3.5", Generation::Kepler),
            ("5.2", Generation::Maxwell),
            ("6.0", Generation::Pascal),
            ("6.1", Generation::Pascal),
            ("7.0", Generation::Volta),
            ("7.5", Generation::Turing),
            ("8.0", Generation::Ampere),
            ("8.6", Generation::Ampere),
            ("8.7", Generation::Ampere),
            ("8.9", Generation::AdaLovelace),
            ("9.0", Generation::Hopper),
            ("10.0", Generation::Blackwell),
            ("10.3", Generation::Blackwell),
            ("11.0", Generation::Blackwell),
            ("12.0", Generation::Blackwell),
            ("12.1", Generation::Blackwell),
        ];
        for (text, want) in rows {
            assert_eq!(generation(cc(text)), Some(want), "{text}");
        }
        assert_eq!(generation(cc("2.1")), None);
        assert_eq!(generation(cc("13.0")), None);
        assert_eq!(Generation::AdaLovelace.to_string(), "Ada Lovelace");
    }

    #[test]
    fn from_a_query_gpu_row() {
        let rows = crate::pve::nvidia::parse_query_gpu(
            "Tesla P40, 580.173.02, 6.1, 23040 MiB, 0 MiB\nNVIDIA GeForce RTX 3090, 580.173.02, [N/A], 24576 MiB, 0 MiB\n",
        )
        .unwrap();
        assert_eq!(
            GpuModel::from_query(0, &rows[0]),
            Some(gpu(0, "Tesla P40", "6.1"))
        );
        assert_eq!(GpuModel::from_query(1, &rows[1]), None);
    }

    #[test]
    fn open_module_needs_turing_and_blackwell_needs_open() {
        use ModuleFlavour::{Open, Proprietary};
        assert_eq!(flavours(&gpu(0, "Tesla P40", "6.1")), [Proprietary]);
        assert_eq!(flavours(&gpu(0, "TITAN V", "7.0")), [Proprietary]);
        assert_eq!(flavours(&gpu(0, "Tesla T4", "7.5")), [Open, Proprietary]);
        assert_eq!(flavours(&gpu(0, "NVIDIA H100", "9.0")), [Open, Proprietary]);
        assert_eq!(flavours(&gpu(0, "NVIDIA GH200 480GB", "9.0")), [Open]);
        assert_eq!(flavours(&gpu(0, "NVIDIA GeForce RTX 5090", "12.0")), [Open]);
    }

    #[test]
    fn branch_limits_per_generation() {
        assert_eq!(newest_branch(Generation::Kepler), Some(470));
        for g in [Generation::Maxwell, Generation::Pascal, Generation::Volta] {
            assert_eq!(newest_branch(g), Some(580), "{g}");
            assert_eq!(oldest_branch(g), None, "{g}");
        }
        assert_eq!(newest_branch(Generation::Turing), None);
        assert_eq!(newest_branch(Generation::Blackwell), None);
        assert_eq!(oldest_branch(Generation::Blackwell), Some(570));
    }

    #[test]
    fn cuda_13_stops_below_sm_75() {
        assert!(!cuda13_supports(cc("7.0")));
        assert!(cuda13_supports(cc("7.5")));
        assert!(cuda13_supports(cc("12.0")));
        let ampere = gpu(0, "RTX 3090", "8.6");
        let pascal = gpu(1, "Tesla P40", "6.1");
        let kepler = gpu(2, "Tesla K80", "3.7");
        assert_eq!(newest_cuda_major(std::slice::from_ref(&ampere)), None);
        assert_eq!(
            newest_cuda_major(&[ampere.clone(), pascal.clone()]),
            Some(12)
        );
        assert_eq!(newest_cuda_major(&[ampere, pascal, kepler]), Some(11));
        assert_eq!(oldest_cuda(cc("12.0")), Some((12, 8)));
        assert_eq!(oldest_cuda(cc("10.3")), Some((12, 9)));
        assert_eq!(oldest_cuda(cc("12.1")), Some((12, 9)));
        assert_eq!(oldest_cuda(cc("8.9")), None);
    }

    #[test]
    fn mixed_hosts_follow_the_reference_decision_table() {
        use ModuleFlavour::{Open, Proprietary};
        let pascal = gpu(0, "Tesla P40", "6.1");
        let ampere = gpu(1, "NVIDIA GeForce RTX 3090", "8.6");
        let ada = gpu(2, "NVIDIA L4", "8.9");
        let blackwell = gpu(3, "NVIDIA GeForce RTX 5090", "12.0");
        let choice = |gpus: &[GpuModel]| host_driver_choice(gpus);
        assert_eq!(
            choice(std::slice::from_ref(&pascal)),
            Some(DriverChoice {
                flavour: Proprietary,
                newest_branch: Some(580),
                oldest_branch: None
            })
        );
        assert_eq!(
            choice(&[pascal.clone(), ampere.clone()]).map(|c| (c.flavour, c.newest_branch)),
            Some((Proprietary, Some(580)))
        );
        assert_eq!(
            choice(&[ampere.clone(), ada.clone()]).map(|c| (c.flavour, c.newest_branch)),
            Some((Open, None))
        );
        assert_eq!(
            choice(&[ada, blackwell.clone()]),
            Some(DriverChoice {
                flavour: Open,
                newest_branch: None,
                oldest_branch: Some(570)
            })
        );
        assert_eq!(choice(&[pascal, blackwell]), None);
    }

    #[test]
    fn pascal_with_the_open_595_driver_is_refused_naming_the_gpu_and_what_works() {
        let gpus = [
            gpu(0, "NVIDIA GeForce RTX 3090", "8.6"),
            gpu(1, "Tesla P40", "6.1"),
        ];
        let err = check_driver(&gpus, 595, ModuleFlavour::Open).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("GPU 1 (Tesla P40, Pascal, compute capability 6.1)"),
            "{text}"
        );
        assert!(text.contains("open module needs a Turing"), "{text}");
        assert!(text.contains("after 580 ignore it"), "{text}");
        assert!(
            text.ends_with("use the proprietary module with driver branch 580 or older (the 580.xx legacy branch)"),
            "{text}"
        );
        assert_eq!(check_driver(&gpus, 580, ModuleFlavour::Proprietary), Ok(()));
        // Open 580 still cannot load on the P40; proprietary 595 ignores it.
        assert!(check_driver(&gpus, 580, ModuleFlavour::Open).is_err());
        assert!(check_driver(&gpus, 595, ModuleFlavour::Proprietary).is_err());
    }

    #[test]
    fn blackwell_refuses_proprietary_and_old_branches() {
        let gpus = [gpu(0, "NVIDIA GeForce RTX 5090", "12.0")];
        assert_eq!(check_driver(&gpus, 595, ModuleFlavour::Open), Ok(()));
        let err = check_driver(&gpus, 550, ModuleFlavour::Proprietary).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("it needs the open module, and it needs driver branch 570 or newer"),
            "{text}"
        );
        assert!(
            text.ends_with("use the open module with driver branch 570 or newer"),
            "{text}"
        );
    }

    #[test]
    fn no_single_driver_for_pascal_beside_blackwell() {
        let gpus = [
            gpu(0, "Tesla P40", "6.1"),
            gpu(1, "NVIDIA GeForce RTX 5090", "12.0"),
        ];
        let err = check_driver(&gpus, 595, ModuleFlavour::Open).unwrap_err();
        assert_eq!(err.works, None);
        assert!(
            err.to_string()
                .contains("no single driver drives all of them")
        );
        assert!(check_driver(&gpus, 580, ModuleFlavour::Proprietary).is_err());
    }

    #[test]
    fn cuda_architectures_is_the_sorted_union() {
        let gpus = [
            gpu(0, "RTX 3090", "8.6"),
            gpu(1, "Tesla P40", "6.1"),
            gpu(2, "RTX 3090", "8.6"),
            gpu(3, "RTX 5090", "12.0"),
        ];
        assert_eq!(cuda_architectures(&gpus), "61;86;120");
        assert_eq!(cuda_architectures(&gpus[..1]), "86");
        assert_eq!(cuda_architectures(&[]), "");
    }
}
