//! NVIDIA driver outputs: `/proc/driver/nvidia/version`, `nvidia-smi` (table header, `--query-gpu` csv, the
//! mismatch and no-driver messages).

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

/// Which kernel module flavour is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleFlavour {
    Open,
    Proprietary,
}

/// The loaded kernel module, from `/proc/driver/nvidia/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadedModule {
    /// e.g. `580.173.02` or `460.107` (older branches have two components).
    pub version: String,
    pub flavour: ModuleFlavour,
    /// The `NVRM version:` line as printed, for evidence.
    pub line: String,
}

static DRIVER_VERSION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b").expect("static regex"));

/// Parses `/proc/driver/nvidia/version`. Positions differ between the proprietary
/// (`...Kernel Module  580.173.02  ...`) and open (`...Open Kernel Module for x86_64  590.48.01  ...`) formats,
/// so the version is the first token that looks like one, not field N.
pub fn parse_proc_version(text: &str) -> Option<LoadedModule> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    let version = DRIVER_VERSION.captures(line)?.get(1)?.as_str().to_string();
    let flavour = if line.contains("Open Kernel Module") {
        ModuleFlavour::Open
    } else {
        ModuleFlavour::Proprietary
    };
    Some(LoadedModule {
        version,
        flavour,
        line: line.trim_end().to_string(),
    })
}

/// What a plain `nvidia-smi` run said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum SmiReport {
    /// The table: the driver works.
    Ok {
        driver_version: String,
        cuda_version: Option<String>,
    },
    /// `Failed to initialize NVML: Driver/library version mismatch`; `nvml_library` is the `major.minor` of the
    /// user-space library when nvidia-smi printed it (newer drivers only).
    Mismatch { nvml_library: Option<String> },
    /// `NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver...`
    NoDriver,
    /// The command does not exist.
    NotFound,
    /// Anything else (kept for evidence).
    Other,
}

static SMI_HEADER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"Driver Version:\s*(\S+)(?:\s+CUDA Version:\s*(\S+))?").expect("static regex")
});
static NVML_LIB: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"NVML library version:\s*(\S+)").expect("static regex"));

/// Classifies `nvidia-smi` output (stdout and stderr together) and its exit status.
pub fn parse_smi(output: &str, status: Option<i32>) -> SmiReport {
    if output.contains("Driver/library version mismatch") {
        let nvml_library = NVML_LIB
            .captures(output)
            .and_then(|c| c.get(1))
            .map(|m| m.as_str().to_string());
        return SmiReport::Mismatch { nvml_library };
    }
    if output.contains("couldn't communicate with the NVIDIA driver") {
        return SmiReport::NoDriver;
    }
    if let Some(c) = SMI_HEADER.captures(output) {
        return SmiReport::Ok {
            driver_version: c[1].to_string(),
            cuda_version: c.get(2).map(|m| m.as_str().to_string()),
        };
    }
    if status == Some(127) || output.contains("command not found") || output.contains("not found") {
        return SmiReport::NotFound;
    }
    SmiReport::Other
}

/// The `nvidia-smi` query every caller uses, so one parser fits.
pub const QUERY_GPU_FIELDS: &str = "name,driver_version,compute_cap,memory.total,memory.used";

/// One GPU from `nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,memory.used --format=csv,noheader[,nounits]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    pub name: String,
    pub driver_version: String,
    /// Compute capability as nvidia-smi prints it: `8.6`.
    pub compute_cap: String,
    pub memory_total_mib: Option<u64>,
    pub memory_used_mib: Option<u64>,
}

/// Parses the csv, with or without units (`32607 MiB` or `32607`). Lines that do not have five fields are an
/// error naming the line: a changed format must not read as "no GPU".
pub fn parse_query_gpu(text: &str) -> Result<Vec<Gpu>, String> {
    let mut gpus = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != 5 {
            return Err(format!(
                "unexpected nvidia-smi --query-gpu line (want 5 fields): {line}"
            ));
        }
        gpus.push(Gpu {
            name: fields[0].to_string(),
            driver_version: fields[1].to_string(),
            compute_cap: fields[2].to_string(),
            memory_total_mib: parse_mib(fields[3]),
            memory_used_mib: parse_mib(fields[4]),
        });
    }
    Ok(gpus)
}

fn parse_mib(field: &str) -> Option<u64> {
    field.trim_end_matches("MiB").trim().parse().ok()
}

/// What `llmctl status` asks nvidia-smi, with `--format=csv,nounits` (header kept): the header names each
/// column, so [`parse_readings`] does not depend on their order and reads other queries' outputs too.
pub const STATUS_QUERY: &str = "index,name,driver_version,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw,power.limit";

/// One GPU's live readings. A field nvidia-smi cannot read on this GPU (`[N/A]`, `[Not Supported]`: a GB10's
/// shared memory, an old board's power) or that the query did not ask for is None.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReading {
    pub index: Option<u32>,
    pub name: String,
    pub driver_version: Option<String>,
    pub utilization_pct: Option<f64>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub temperature_c: Option<f64>,
    pub power_draw_w: Option<f64>,
    pub power_limit_w: Option<f64>,
}

/// Parses `nvidia-smi --query-gpu=... --format=csv[,nounits]` (with its header): values with units (`26.47 W`,
/// `2082 MiB`, `10 %`) or without. A row whose column count differs from the header's is an error naming it:
/// a changed format must not read as "no GPU" or as wrong numbers.
pub fn parse_readings(text: &str) -> Result<Vec<GpuReading>, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let header = lines.next().ok_or("nvidia-smi printed nothing")?;
    // `utilization.gpu [%]` → `utilization.gpu`; nvidia-smi separates columns with ", ".
    let columns: Vec<&str> = header
        .split(", ")
        .map(|c| c.split(" [").next().unwrap_or(c).trim())
        .collect();
    if !columns.contains(&"name") {
        return Err(format!(
            "not an nvidia-smi --query-gpu csv header (no `name` column): {header}"
        ));
    }
    let mut gpus = Vec::new();
    for line in lines {
        let values: Vec<&str> = line.split(", ").map(str::trim).collect();
        if values.len() != columns.len() {
            return Err(format!(
                "unexpected nvidia-smi --query-gpu line (want {} fields like the header): {line}",
                columns.len()
            ));
        }
        let get = |col: &str| {
            columns
                .iter()
                .position(|c| *c == col)
                .map(|i| values[i])
                .filter(|v| !v.starts_with('['))
        };
        let number =
            |col: &str| get(col).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
        let whole =
            |col: &str| get(col).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
        gpus.push(GpuReading {
            index: whole("index").and_then(|i| u32::try_from(i).ok()),
            name: get("name").unwrap_or_default().to_string(),
            driver_version: get("driver_version").map(str::to_string),
            utilization_pct: number("utilization.gpu"),
            memory_used_mib: whole("memory.used"),
            memory_total_mib: whole("memory.total"),
            temperature_c: number("temperature.gpu"),
            power_draw_w: number("power.draw"),
            power_limit_w: number("power.limit"),
        });
    }
    Ok(gpus)
}

/// `major.minor` of a driver version: what `NVML library version:` prints.
pub fn major_minor(version: &str) -> &str {
    match version.match_indices('.').nth(1) {
        Some((i, _)) => &version[..i],
        None => version,
    }
}

/// The driver branch: `595` of `595.71.05`.
pub fn branch(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pve::{fixture, fixture_body};

    #[test]
    fn proc_version_proprietary_from_fixture() {
        let m =
            parse_proc_version(&fixture_body(&fixture("proc-driver-nvidia-version.txt"))).unwrap();
        assert_eq!(m.version, "580.173.02");
        assert_eq!(m.flavour, ModuleFlavour::Proprietary);
        assert!(
            m.line
                .starts_with("NVRM version: NVIDIA UNIX x86_64 Kernel Module")
        );
    }

    #[test]
    fn proc_version_open_format_is_not_field_8() {
        let m = parse_proc_version(
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  590.48.01  Release Build  (dvs-builder@U16-I2-C03-12-4)  Mon Dec  1 2025\nGCC version:  gcc version 12.2.0\n",
        )
        .unwrap();
        assert_eq!(m.version, "590.48.01");
        assert_eq!(m.flavour, ModuleFlavour::Open);
    }

    #[test]
    fn proc_version_two_components() {
        let m = parse_proc_version(
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  460.107  Thu Sep 30 00:00:00 UTC 2021\n",
        )
        .unwrap();
        assert_eq!(m.version, "460.107");
        assert_eq!(parse_proc_version(""), None);
        assert_eq!(
            parse_proc_version("cat: /proc/driver/nvidia/version: No such file or directory"),
            None
        );
    }

    #[test]
    fn smi_tables() {
        assert_eq!(
            parse_smi(&fixture("nvidia-smi.table.595.txt"), Some(0)),
            SmiReport::Ok {
                driver_version: "595.71.05".into(),
                cuda_version: Some("13.2".into())
            }
        );
        assert_eq!(
            parse_smi(&fixture("nvidia-smi.table.550.txt"), Some(0)),
            SmiReport::Ok {
                driver_version: "550.54.14".into(),
                cuda_version: Some("12.4".into())
            }
        );
    }

    #[test]
    fn smi_mismatch_variants() {
        for (name, lib) in [
            ("nvidia-smi.mismatch.txt", Some("570.124")),
            ("nvidia-smi.mismatch.2.txt", Some("580.178")),
            ("nvidia-smi.mismatch.3.txt", Some("550.144")),
            ("nvidia-smi.mismatch.old-format.txt", None),
        ] {
            let body = fixture_body(&fixture(name));
            assert_eq!(
                parse_smi(&body, Some(18)),
                SmiReport::Mismatch {
                    nvml_library: lib.map(String::from)
                },
                "{name}"
            );
        }
    }

    #[test]
    fn smi_no_driver_and_missing() {
        assert_eq!(
            parse_smi(&fixture_body(&fixture("nvidia-smi.no-driver.txt")), Some(9)),
            SmiReport::NoDriver
        );
        assert_eq!(
            parse_smi("sh: 1: nvidia-smi: not found\n", Some(127)),
            SmiReport::NotFound
        );
        assert_eq!(parse_smi("something else", Some(3)), SmiReport::Other);
    }

    #[test]
    fn query_gpu_with_and_without_units() {
        let with_units = "NVIDIA GeForce RTX 5090, 595.71.05, 12.0, 32607 MiB, 14 MiB\nNVIDIA GeForce RTX 3060, 550.54.14, 8.6, 12288 MiB, 9 MiB\n";
        let gpus = parse_query_gpu(with_units).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].memory_total_mib, Some(32607));
        assert_eq!(gpus[0].compute_cap, "12.0");
        assert_eq!(gpus[1].compute_cap, "8.6");
        let nounits = parse_query_gpu("NVIDIA GeForce RTX 3060, 550.54.14, 8.6, 12288, 9").unwrap();
        assert_eq!(nounits[0].memory_used_mib, Some(9));
        assert_eq!(nounits[0].driver_version, "550.54.14");
        assert!(
            parse_query_gpu("garbage line")
                .unwrap_err()
                .contains("garbage line")
        );
        assert_eq!(parse_query_gpu("\n").unwrap(), vec![]);
    }

    #[test]
    fn query_gpu_fixture_comment_examples() {
        // The fixture documents the derived lines in comments; parse them as nvidia-smi would print them.
        let text = fixture("nvidia-smi.query-gpu.csv.txt");
        let lines: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# NVIDIA"))
            .map(|l| format!("NVIDIA{}\n", l.split("  ").next().unwrap_or(l)))
            .collect();
        let gpus = parse_query_gpu(&lines).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].compute_cap, "12.0");
    }

    #[test]
    fn version_helpers() {
        assert_eq!(major_minor("570.124.06"), "570.124");
        assert_eq!(major_minor("460.107"), "460.107");
        assert_eq!(branch("595.71.05"), Some(595));
    }

    #[test]
    fn readings_from_real_query_outputs() {
        let gb10 =
            parse_readings(&fixture_body(&fixture("nvidia-smi.query-gpu.gb10.txt"))).unwrap();
        assert_eq!(
            gb10,
            [GpuReading {
                index: None,
                name: "NVIDIA GB10".into(),
                driver_version: Some("580.173.02".into()),
                utilization_pct: Some(0.0),
                memory_used_mib: None,
                memory_total_mib: None,
                temperature_c: Some(39.0),
                power_draw_w: Some(5.04),
                power_limit_w: None,
            }]
        );
        let pro = parse_readings(&fixture_body(&fixture(
            "nvidia-smi.query-gpu.rtx-pro-6000.txt",
        )))
        .unwrap();
        assert_eq!(pro.len(), 1);
        assert_eq!(
            pro[0].name,
            "NVIDIA RTX PRO 6000 Blackwell Workstation Edition"
        );
        assert_eq!(
            (
                pro[0].utilization_pct,
                pro[0].temperature_c,
                pro[0].power_draw_w,
                pro[0].power_limit_w
            ),
            (Some(10.0), Some(29.0), Some(26.47), Some(600.0))
        );
        assert_eq!(
            (pro[0].memory_used_mib, pro[0].memory_total_mib),
            (Some(2082), Some(97887))
        );
        let old =
            parse_readings(&fixture_body(&fixture("nvidia-smi.query-gpu.rtx-2060.txt"))).unwrap();
        assert_eq!(
            (
                old[0].memory_used_mib,
                old[0].memory_total_mib,
                old[0].utilization_pct
            ),
            (Some(682), Some(5934), Some(20.0))
        );
        assert_eq!(old[0].power_draw_w, None, "not asked for");
        let nounits =
            parse_readings(&fixture_body(&fixture("nvidia-smi.query-gpu.nounits.txt"))).unwrap();
        assert_eq!(nounits.len(), 2);
        assert_eq!(
            (
                nounits[1].utilization_pct,
                nounits[1].power_draw_w,
                nounits[1].power_limit_w
            ),
            (Some(98.0), Some(212.56), Some(212.5))
        );
    }

    #[test]
    fn readings_refuse_what_they_cannot_read() {
        assert!(parse_readings("").is_err());
        let err = parse_readings("NVIDIA GeForce RTX 4090, 0, 14").unwrap_err();
        assert!(err.contains("no `name` column"), "{err}");
        let err =
            parse_readings("index, name, power.draw [W]\n0, RTX, 1.0 W, extra\n").unwrap_err();
        assert!(err.contains("want 3 fields"), "{err}");
        let na = parse_readings("index, name, power.draw [W]\n0, Tesla P100, [Not Supported]\n")
            .unwrap();
        assert_eq!((na[0].index, na[0].power_draw_w), (Some(0), None));
    }
}
