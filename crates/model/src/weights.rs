//! Where weights live: a table of named tensors over the bytes of a GGUF file or of
//! safetensors files, so that one forward pass serves every format. Tensor names are GGUF's
//! (`blk.N.attn_q.weight`); the safetensors loader renames as it builds the table, and dims
//! are in GGUF order (contiguous dimension first), so a Hugging Face `[out, in]` Linear weight
//! has dims `[in, out]`, a matrix of `out` rows of `in` columns either way.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use gguf::{GgmlType, GgufFile};
use kernels::{Matrix, WeightType};

use crate::ModelError;
use crate::safetensors::FileBytes;

/// The files that hold a model's weights.
pub(crate) enum Storage {
    /// One GGUF file; a tensor's `shard` is its index in the file's tensor list.
    Gguf(Arc<GgufFile>),
    /// Safetensors files; a tensor's `shard` is the file's index here.
    Safetensors(Vec<FileBytes>),
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Gguf(_) => f.write_str("Storage::Gguf"),
            Storage::Safetensors(s) => write!(f, "Storage::Safetensors({} files)", s.len()),
        }
    }
}

/// A tensor in the table: its element type, dims and bytes.
#[derive(Clone, Debug)]
pub(crate) struct TensorRef {
    /// The kernels' type, or the file's type name when the kernels cannot compute with it.
    pub(crate) ty: Result<WeightType, String>,
    /// Dims, contiguous first.
    pub(crate) dims: Vec<u64>,
    pub(crate) shard: usize,
    /// Byte range inside the shard (for GGUF: inside the tensor's own data).
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// A weight matrix of `rows × cols` (or a vector, `rows == 1`) somewhere in [`Storage`].
#[derive(Clone, Debug)]
pub(crate) struct Weight {
    pub(crate) ty: WeightType,
    pub(crate) shard: usize,
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// The same matrix repacked for the CPU's fastest matmul kernel, when it has one for
    /// this type (see [`Weight::pack`]).
    pub(crate) packed: Option<Arc<kernels::PackedMatrix>>,
}

impl Weight {
    /// Repacks the matrix for the packed matmul kernels when this CPU runs one (AVX2 or
    /// AVX-512 VNNI) and the type is one they take (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K,
    /// Q5_K, Q6_K); otherwise leaves it as stored.
    pub(crate) fn pack(&mut self, storage: &Storage) -> Result<(), ModelError> {
        self.packed = kernels::PackedMatrix::pack(&storage.matrix(self)?).map(Arc::new);
        Ok(())
    }
}

impl Weight {
    /// The first `rows` rows and the rest, as two matrices over the same bytes.
    pub(crate) fn split_rows(&self, rows: usize) -> Result<(Weight, Weight), ModelError> {
        let row_bytes = self
            .ty
            .row_bytes(self.cols)
            .filter(|&b| rows <= self.rows && b * self.rows == self.len)
            .ok_or_else(|| {
                ModelError::BadConfig(format!(
                    "cannot split {} rows of a {} x {} matrix",
                    rows, self.rows, self.cols
                ))
            })?;
        let head = Weight {
            len: rows * row_bytes,
            rows,
            packed: None,
            ..self.clone()
        };
        let tail = Weight {
            start: self.start + rows * row_bytes,
            len: (self.rows - rows) * row_bytes,
            rows: self.rows - rows,
            packed: None,
            ..self.clone()
        };
        Ok((head, tail))
    }
}

impl Storage {
    /// The bytes of a range of a shard; empty when the range is not inside it (the loader
    /// checked every range, so that only happens on a bug, and the kernels then refuse the
    /// empty slice instead of reading out of bounds).
    pub(crate) fn bytes(&self, shard: usize, start: usize, len: usize) -> &[u8] {
        let whole = match self {
            Storage::Gguf(file) => file
                .tensors()
                .get(shard)
                .map_or(&[][..], |info| file.tensor_data(info)),
            Storage::Safetensors(shards) => shards.get(shard).map_or(&[][..], |s| s.bytes()),
        };
        start
            .checked_add(len)
            .and_then(|end| whole.get(start..end))
            .unwrap_or(&[])
    }

    /// `y = W·x` for `n` rows of `x`, through the packed kernel when `w` was packed.
    pub(crate) fn matmul(
        &self,
        pool: &kernels::ThreadPool,
        w: &Weight,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), ModelError> {
        match &w.packed {
            Some(p) => kernels::matmul_packed(pool, p, x, n, y)?,
            None => kernels::matmul(pool, &self.matrix(w)?, x, n, y)?,
        }
        Ok(())
    }

    /// `outs[i].1 = outs[i].0 · x` for matrices that share their input `x` (`n` rows), as
    /// [`Storage::matmul`] computes each (bit-identical): when all are packed the
    /// activations are quantised once and all products run in one pass over the pool
    /// (`kernels::matmul_packed_many`); when none is, `kernels::matmul_many` does the same
    /// for the row-wise kernels; a mix runs one product after another.
    pub(crate) fn matmul_many(
        &self,
        pool: &kernels::ThreadPool,
        outs: &mut [(&Weight, &mut [f32])],
        x: &[f32],
        n: usize,
    ) -> Result<(), ModelError> {
        let packed: Vec<&kernels::PackedMatrix> = outs
            .iter()
            .filter_map(|(w, _)| w.packed.as_deref())
            .collect();
        if packed.len() == outs.len() {
            let mut pairs: Vec<_> = packed
                .into_iter()
                .zip(outs.iter_mut())
                .map(|(p, (_, y))| (p, &mut **y))
                .collect();
            kernels::matmul_packed_many(pool, &mut pairs, x, n)?;
        } else if packed.is_empty() {
            let mut pairs = Vec::with_capacity(outs.len());
            for (w, y) in outs.iter_mut() {
                pairs.push((self.matrix(w)?, &mut **y));
            }
            kernels::matmul_many(pool, &mut pairs, x, n)?;
        } else {
            for (w, y) in outs.iter_mut() {
                self.matmul(pool, w, x, n, y)?;
            }
        }
        Ok(())
    }

    pub(crate) fn matrix(&self, w: &Weight) -> Result<Matrix<'_>, ModelError> {
        Ok(Matrix::new(
            w.ty,
            self.bytes(w.shard, w.start, w.len),
            w.rows,
            w.cols,
        )?)
    }
}

/// The named tensors of a model over their storage.
#[derive(Debug)]
pub(crate) struct Tensors {
    pub(crate) storage: Storage,
    pub(crate) index: HashMap<String, TensorRef>,
}

impl Tensors {
    /// The table of a GGUF file (names and dims as the file has them).
    pub(crate) fn from_gguf(file: Arc<GgufFile>) -> Self {
        let index = file
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let r = TensorRef {
                    ty: kernel_type(info.ggml_type),
                    dims: info.dims.clone(),
                    shard: i,
                    start: 0,
                    len: file.tensor_data(info).len(),
                };
                (info.name.clone(), r)
            })
            .collect();
        Tensors {
            storage: Storage::Gguf(file),
            index,
        }
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<(&TensorRef, WeightType), ModelError> {
        let r = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let ty =
            r.ty.clone()
                .map_err(|ggml_type| ModelError::UnsupportedTensorType {
                    name: name.to_owned(),
                    ggml_type,
                })?;
        Ok((r, ty))
    }

    /// A `rows × cols` matrix (GGUF dims `[cols, rows]`), checked against the kernels.
    pub(crate) fn weight(&self, name: &str, dims: [u64; 2]) -> Result<Weight, ModelError> {
        let (r, ty) = self.get(name)?;
        if r.dims != dims {
            return Err(ModelError::BadShape {
                name: name.to_owned(),
                expected: dims.to_vec(),
                found: r.dims.clone(),
            });
        }
        self.checked(Weight {
            ty,
            shard: r.shard,
            start: r.start,
            len: r.len,
            rows: dims[1] as usize,
            cols: dims[0] as usize,
            packed: None,
        })
    }

    /// The `n` matrices of a 3-D tensor of dims `[cols, rows, n]` (stacked experts).
    pub(crate) fn stacked(&self, name: &str, dims: [u64; 3]) -> Result<Vec<Weight>, ModelError> {
        let (r, ty) = self.get(name)?;
        if r.dims != dims {
            return Err(ModelError::BadShape {
                name: name.to_owned(),
                expected: dims.to_vec(),
                found: r.dims.clone(),
            });
        }
        let (cols, rows, n) = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
        let each = ty
            .row_bytes(cols)
            .and_then(|b| b.checked_mul(rows))
            .filter(|&b| b.checked_mul(n) == Some(r.len))
            .ok_or_else(|| ModelError::BadShape {
                name: name.to_owned(),
                expected: dims.to_vec(),
                found: r.dims.clone(),
            })?;
        (0..n)
            .map(|e| {
                self.checked(Weight {
                    ty,
                    shard: r.shard,
                    start: r.start + e * each,
                    len: each,
                    rows,
                    cols,
                    packed: None,
                })
            })
            .collect()
    }

    fn checked(&self, w: Weight) -> Result<Weight, ModelError> {
        // Once here, so that the forward pass cannot fail on a shape or a short buffer.
        self.storage.matrix(&w)?;
        Ok(w)
    }

    /// A vector of `len` values, converted to f32.
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let (r, ty) = self.get(name)?;
        if r.dims != [len as u64] {
            return Err(ModelError::BadShape {
                name: name.to_owned(),
                expected: vec![len as u64],
                found: r.dims.clone(),
            });
        }
        let mut out = vec![0.0; len];
        kernels::dequantize_row(ty, self.storage.bytes(r.shard, r.start, r.len), &mut out)?;
        Ok(out)
    }

    /// Touches one byte per page of a tensor, so that the first forward pass does not stall
    /// on page faults; this is the work the load progress bar shows.
    pub(crate) fn prefault(&self, name: &str) {
        if let Some(r) = self.index.get(name) {
            let mut acc = 0u8;
            for chunk in self.storage.bytes(r.shard, r.start, r.len).chunks(4096) {
                acc ^= chunk[0];
            }
            std::hint::black_box(acc);
        }
    }
}

/// The kernels' type for a GGUF tensor type, or its name when unsupported.
fn kernel_type(ty: GgmlType) -> Result<WeightType, String> {
    Ok(match ty {
        GgmlType::F32 => WeightType::F32,
        GgmlType::F16 => WeightType::F16,
        GgmlType::BF16 => WeightType::BF16,
        GgmlType::Q4_0 => WeightType::Q4_0,
        GgmlType::Q4_1 => WeightType::Q4_1,
        GgmlType::Q8_0 => WeightType::Q8_0,
        GgmlType::Q5_0 => WeightType::Q5_0,
        GgmlType::Q5_1 => WeightType::Q5_1,
        GgmlType::Q2_K => WeightType::Q2_K,
        GgmlType::Q3_K => WeightType::Q3_K,
        GgmlType::Q4_K => WeightType::Q4_K,
        GgmlType::Q5_K => WeightType::Q5_K,
        GgmlType::Q6_K => WeightType::Q6_K,
        other => return Err(other.to_string()),
    })
}
