//! llama.cpp on the container: the build's `CMakeCache.txt` and the llama-server systemd unit.

use std::collections::BTreeMap;

use serde::Serialize;

/// `CMakeCache.txt` entries: `KEY:TYPE=VALUE` → KEY → VALUE.
pub fn parse_cmake_cache(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("//"))
        .filter_map(|l| {
            let (lhs, value) = l.split_once('=')?;
            let key = lhs.split_once(':').map_or(lhs, |(k, _)| k);
            Some((key.trim().to_string(), value.trim().to_string()))
        })
        .collect()
}

/// One `CMAKE_CUDA_ARCHITECTURES` entry: `89`, `86-real`, `75-virtual`, `120a-real`, or `native`/`all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum CudaArch {
    /// SASS and/or PTX for one architecture.
    Arch {
        number: u32,
        /// `120a`: architecture-specific features; its PTX does not run on other architectures.
        specific: bool,
        real: bool,
        virt: bool,
    },
    /// `native`, `all`, `all-major`: decided at build time.
    Symbolic(String),
}

/// Splits `CMAKE_CUDA_ARCHITECTURES` (`;`- or `,`-separated) into entries; unknown words are kept symbolic.
pub fn parse_cuda_architectures(value: &str) -> Vec<CudaArch> {
    value
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let (num, suffix) = match entry.split_once('-') {
                Some((n, s)) => (n, Some(s)),
                None => (entry, None),
            };
            let (digits, specific) = match num.strip_suffix(['a', 'f']) {
                Some(d) => (d, true),
                None => (num, false),
            };
            match digits.parse::<u32>() {
                Ok(number) => CudaArch::Arch {
                    number,
                    specific,
                    real: suffix != Some("virtual"),
                    virt: suffix != Some("real"),
                },
                Err(_) => CudaArch::Symbolic(entry.to_string()),
            }
        })
        .collect()
}

/// How well a build's architectures fit a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ArchFit {
    /// Native code for this GPU.
    Exact,
    /// Only PTX of an older architecture: the driver JIT-compiles it at start (works, slow first start).
    PtxOnly,
    /// Nothing runs on it: "no kernel image is available for execution on the device".
    None,
    /// `native`/`all`: cannot tell from the cache.
    Unknown,
}

pub fn arch_fit(archs: &[CudaArch], gpu_arch: u32) -> ArchFit {
    let mut fit = ArchFit::None;
    for a in archs {
        match a {
            CudaArch::Arch { number, real, .. } if *number == gpu_arch && *real => {
                return ArchFit::Exact;
            }
            // A PTX-only entry for the same number is JIT-compiled like an older one.
            CudaArch::Arch {
                number,
                specific: false,
                virt: true,
                ..
            } if *number <= gpu_arch => fit = ArchFit::PtxOnly,
            CudaArch::Symbolic(_) if fit == ArchFit::None => fit = ArchFit::Unknown,
            _ => {}
        }
    }
    fit
}

/// What the llama-server unit runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerCommand {
    pub argv: Vec<String>,
    /// `-c` / `--ctx-size`.
    pub ctx_size: Option<u64>,
    /// `-np` / `--parallel`: the context is split between slots.
    pub parallel: Option<u64>,
    pub port: Option<u16>,
    pub model: Option<String>,
}

impl ServerCommand {
    /// The build directory the binary lives in (`/opt/llama.cpp/build` for `/opt/llama.cpp/build/bin/llama-server`).
    pub fn build_dir(&self) -> Option<&str> {
        self.argv.first()?.rsplit_once("/bin/").map(|(dir, _)| dir)
    }

    fn flag(&self, names: &[&str]) -> Option<&str> {
        let mut it = self.argv.iter();
        while let Some(arg) = it.next() {
            for name in names {
                if arg == name {
                    return it.next().map(String::as_str);
                }
                if let Some(v) = arg.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                    return Some(v);
                }
            }
        }
        None
    }
}

/// Finds `ExecStart=` in a systemd unit (continuation lines joined) and reads llama-server's flags.
pub fn parse_server_unit(unit: &str) -> Option<ServerCommand> {
    let mut joined = String::new();
    let mut lines = unit.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("ExecStart=") else {
            continue;
        };
        let mut cur = rest.to_string();
        while let Some(stripped) = cur.trim_end().strip_suffix('\\') {
            cur = format!("{stripped} {}", lines.next().unwrap_or(""));
        }
        joined = cur;
    }
    // systemd prefixes (`-`, `@`, `+`, `!`) change how it runs, not what.
    let joined = joined.trim().trim_start_matches(['-', '@', '+', '!']);
    let argv = split_words(joined);
    if argv.is_empty() {
        return None;
    }
    let mut cmd = ServerCommand {
        argv,
        ctx_size: None,
        parallel: None,
        port: None,
        model: None,
    };
    cmd.ctx_size = cmd.flag(&["-c", "--ctx-size"]).and_then(|v| v.parse().ok());
    cmd.parallel = cmd
        .flag(&["-np", "--parallel"])
        .and_then(|v| v.parse().ok());
    cmd.port = cmd.flag(&["--port"]).and_then(|v| v.parse().ok());
    cmd.model = cmd.flag(&["-m", "--model"]).map(str::to_string);
    Some(cmd)
}

/// Splits a command line on whitespace, honouring single and double quotes (as systemd does).
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for ch in s.chars() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(ch);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUIDE_UNIT: &str = "[Unit]\nDescription=LLM Inference Server (llama.cpp)\nAfter=network.target\n[Service]\nType=simple\nUser=root\nExecStart=/opt/llm/llama.cpp/build/bin/llama-server \\\n-m /mnt/models/gemma-4-26B-A4B-it-UD-Q4_K_XL.gguf \\\n-t 11 \\\n-c 32768 \\\n--batch-size 512 \\\n-ngl 0 \\\n-fa on \\\n--reasoning off \\\n--host 0.0.0.0 \\\n--port 11434\nRestart=always\n";

    #[test]
    fn guide_unit() {
        let cmd = parse_server_unit(GUIDE_UNIT).unwrap();
        assert_eq!(cmd.ctx_size, Some(32768));
        assert_eq!(cmd.port, Some(11434));
        assert_eq!(
            cmd.model.as_deref(),
            Some("/mnt/models/gemma-4-26B-A4B-it-UD-Q4_K_XL.gguf")
        );
        assert_eq!(cmd.build_dir(), Some("/opt/llm/llama.cpp/build"));
        assert_eq!(cmd.parallel, None);
    }

    #[test]
    fn ctx_size_forms() {
        let c = parse_server_unit("ExecStart=/opt/llama.cpp/build/bin/llama-server --ctx-size=8192 -np 2 -m '/m/a b.gguf'\n").unwrap();
        assert_eq!(c.ctx_size, Some(8192));
        assert_eq!(c.parallel, Some(2));
        assert_eq!(c.model.as_deref(), Some("/m/a b.gguf"));
        assert_eq!(parse_server_unit("[Service]\nType=simple\n"), None);
        assert_eq!(
            parse_server_unit("ExecStart=-/x/bin/llama-server\n")
                .unwrap()
                .ctx_size,
            None
        );
    }

    #[test]
    fn cmake_cache() {
        let m = parse_cmake_cache(
            "# comment\n//Help text\nCMAKE_CUDA_ARCHITECTURES:STRING=89\nGGML_CUDA:BOOL=ON\nCMAKE_BUILD_TYPE:STRING=Release\n",
        );
        assert_eq!(m["CMAKE_CUDA_ARCHITECTURES"], "89");
        assert_eq!(m["GGML_CUDA"], "ON");
    }

    #[test]
    fn arch_fits() {
        let a = parse_cuda_architectures("89");
        assert_eq!(arch_fit(&a, 89), ArchFit::Exact);
        assert_eq!(arch_fit(&a, 86), ArchFit::None);
        assert_eq!(arch_fit(&a, 120), ArchFit::PtxOnly);
        let default =
            parse_cuda_architectures("75-virtual;80-virtual;86-real;89-real;90-virtual;120a-real");
        assert_eq!(arch_fit(&default, 86), ArchFit::Exact);
        assert_eq!(arch_fit(&default, 120), ArchFit::Exact);
        assert_eq!(arch_fit(&default, 87), ArchFit::PtxOnly);
        assert_eq!(
            arch_fit(&parse_cuda_architectures("120a-real"), 121),
            ArchFit::None
        );
        assert_eq!(
            arch_fit(&parse_cuda_architectures("native"), 86),
            ArchFit::Unknown
        );
        assert_eq!(
            arch_fit(&parse_cuda_architectures("86;89"), 89),
            ArchFit::Exact
        );
    }
}
