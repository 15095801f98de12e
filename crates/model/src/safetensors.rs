//! The safetensors format, read in one place for every loader (the Llama family's
//! directories in `hf.rs`, the BERT encoder in `bert.rs`): memory-map a file, then list its
//! tensors with their kernel type, shape and byte range, every range checked to lie in the
//! file. Loaders only rename and look up.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use kernels::WeightType;

/// The bytes of one safetensors file: memory-mapped, or held in memory.
pub(crate) enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps the file at `path` (an empty file is read instead, since mapping it fails on some
    /// platforms; the parser then reports it as truncated).
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(FileBytes::Owned(Vec::new()));
        }
        Ok(FileBytes::Mapped(map_file(&file)?))
    }

    /// The whole file.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileBytes({} bytes)", self.bytes().len())
    }
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and lives as long as the model; as for GGUF files, the
    // documented contract is that weight files are not modified or truncated while a model
    // is loaded from them (a truncated file would fault on access, not corrupt memory safety
    // of other data: every range was checked against the length at open).
    unsafe { memmap2::Mmap::map(file) }
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The name as stored.
    pub(crate) name: String,
    /// The kernels' type, or the file's type name when the kernels cannot compute with it
    /// (such as BERT's I64 `position_ids` buffer); a loader reports it only if it needs the
    /// tensor.
    pub(crate) ty: Result<WeightType, String>,
    /// Shape, outermost dimension first (safetensors order).
    pub(crate) shape: Vec<usize>,
    /// Bytes inside the file, checked to lie in it.
    pub(crate) bytes: Range<usize>,
}

/// The tensors of the safetensors file `bytes`, in header order; the error is the reason
/// the file is not a valid one.
pub(crate) fn entries(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let (header_len, meta) = ::safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("invalid safetensors file: {e}"))?;
    let data_start = 8usize
        .checked_add(header_len)
        .ok_or_else(|| "header length overflows".to_owned())?;
    meta.tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            let range = data_start
                .checked_add(s)
                .zip(data_start.checked_add(e))
                .filter(|&(a, b)| a <= b && b <= bytes.len())
                .map(|(a, b)| a..b)
                .ok_or_else(|| format!("tensor {name:?} lies outside the file"))?;
            Ok(Entry {
                ty: weight_type(info.dtype),
                shape: info.shape.clone(),
                bytes: range,
                name,
            })
        })
        .collect()
}

fn weight_type(dtype: ::safetensors::Dtype) -> Result<WeightType, String> {
    match dtype {
        ::safetensors::Dtype::F32 => Ok(WeightType::F32),
        ::safetensors::Dtype::F16 => Ok(WeightType::F16),
        ::safetensors::Dtype::BF16 => Ok(WeightType::BF16),
        other => Err(format!("{other:?}")),
    }
}
