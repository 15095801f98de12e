//! Dequantisation of a file quantised by llama.cpp itself (Gemma 3 270M, Q4_K_M: Q4_K, Q6_K,
//! Q5_0, Q8_0 and F32 tensors) against gguf-py, llama.cpp's Python reference.
//!
//! The golden file `golden/gemma3-270m-q4_k_m-dequant.json` (written by
//! `scripts/golden/gguf_dequant.py`) holds, for the first tensor of each type, 512 values at
//! the start and 512 at a middle offset, two checksums of the whole tensor's f32 bit patterns
//! (wrapping u64 sums, plain and weighted by position) and its f64 sum and sum of squares.
//! Our dequantisation evaluates the same f32 expressions in the same order as gguf-py, so
//! values and bit checksums must agree exactly; the f64 sums differ only in summation order
//! (numpy sums pairwise), hence a small tolerance there.
//!
//! The model comes from `scripts/fetch-test-models` (into `$SOUVERAIN_MODELS` or
//! `~/.cache/souverain/models`), or from `SOUVERAIN_TEST_GEMMA`. Without it the tests skip
//! with a note, unless `SOUVERAIN_REQUIRE_MODEL` is set (as `scripts/test` does).

use kernels::{Matrix, ThreadPool, WeightType, dequantize_row, matmul, vec_dot_f32_reference};
use serde_json::Value;
use souverain_model::gguf::{GgmlType, GgufFile};

fn open() -> Option<GgufFile> {
    let path = testkit::gemma_test_model()?;
    Some(GgufFile::open(&path).expect("open the Gemma test model"))
}

fn golden() -> Value {
    serde_json::from_str(include_str!("../golden/gemma3-270m-q4_k_m-dequant.json"))
        .expect("golden JSON")
}

fn weight_type(ty: GgmlType) -> WeightType {
    match ty {
        GgmlType::F32 => WeightType::F32,
        GgmlType::Q8_0 => WeightType::Q8_0,
        GgmlType::Q5_0 => WeightType::Q5_0,
        GgmlType::Q4_K => WeightType::Q4_K,
        GgmlType::Q6_K => WeightType::Q6_K,
        other => panic!("the golden file has an unexpected type {other}"),
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn u64_field(t: &Value, key: &str) -> u64 {
    t[key].as_str().expect(key).parse().expect(key)
}

#[test]
fn dequantisation_matches_gguf_py_on_gemma() {
    let Some(file) = open() else { return };
    let golden = golden();
    let tensors = golden["tensors"].as_array().expect("tensors");
    let mut types_seen = Vec::new();
    for t in tensors {
        let name = t["name"].as_str().expect("name");
        let info = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            info.ggml_type.to_string().to_ascii_uppercase(),
            t["type"].as_str().expect("type").to_ascii_uppercase(),
            "{name}: type"
        );
        let ty = weight_type(info.ggml_type);
        let dims: Vec<u64> = t["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(info.dims, dims, "{name}: dims");
        let n: usize = t["n_elements"].as_u64().unwrap() as usize;
        let row_len = dims[0] as usize;
        let row_bytes = ty.row_bytes(row_len).expect("whole blocks per row");
        let data = file.tensor_data(info);
        assert_eq!(data.len(), n / row_len * row_bytes, "{name}: byte size");

        let first_want = floats(&t["first"]);
        let mid_at = t["middle_offset"].as_u64().unwrap() as usize;
        let mid_want = floats(&t["middle"]);
        let (mut first, mut mid) = (Vec::new(), Vec::new());
        let (mut bits_sum, mut bits_weighted) = (0u64, 0u64);
        let (mut sum, mut sum_sq) = (0f64, 0f64);
        let mut row = vec![0f32; row_len];
        for (r, src) in data.chunks_exact(row_bytes).enumerate() {
            dequantize_row(ty, src, &mut row).expect("dequantize");
            for (j, &v) in row.iter().enumerate() {
                let pos = r * row_len + j;
                let bits = u64::from(v.to_bits());
                bits_sum = bits_sum.wrapping_add(bits);
                bits_weighted = bits_weighted.wrapping_add(bits.wrapping_mul(pos as u64 + 1));
                sum += f64::from(v);
                sum_sq += f64::from(v) * f64::from(v);
                if pos < first_want.len() {
                    first.push(v);
                }
                if (mid_at..mid_at + mid_want.len()).contains(&pos) {
                    mid.push(v);
                }
            }
        }
        for (what, got, want) in [("first", &first, &first_want), ("middle", &mid, &mid_want)] {
            assert_eq!(got.len(), want.len(), "{name} {what}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(g, w, "{name} ({ty:?}) {what}[{i}]");
            }
        }
        assert_eq!(
            bits_sum,
            u64_field(t, "bits_sum_u64"),
            "{name}: bit checksum"
        );
        assert_eq!(
            bits_weighted,
            u64_field(t, "bits_weighted_sum_u64"),
            "{name}: positional checksum"
        );
        // Summation order differs (numpy is pairwise): allow 1e-9 of √(n·Σx²) ≥ Σ|x|.
        let scale = (n as f64 * sum_sq).sqrt();
        let want_sum = t["sum_f64"].as_f64().unwrap();
        let want_sq = t["sum_squares_f64"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-9 * scale,
            "{name}: sum {sum} vs {want_sum}"
        );
        assert!(
            (sum_sq - want_sq).abs() <= 1e-9 * want_sq,
            "{name}: Σx² {sum_sq} vs {want_sq}"
        );
        types_seen.push(ty);
    }
    for ty in [
        WeightType::Q4_K,
        WeightType::Q6_K,
        WeightType::Q5_0,
        WeightType::Q8_0,
        WeightType::F32,
    ] {
        assert!(types_seen.contains(&ty), "golden covers {ty:?}");
    }
}

/// The quantised matmul on real llama.cpp-quantised rows (Q4_K, Q6_K, Q5_0, Q8_0) agrees
/// with the f32 dot of the dequantised rows within the activation-quantisation bound
/// (0.6·amax/127·Σ|w| per activation block, plus 1e-5 of Σ|w·x| for f32 accumulation).
#[test]
fn matmul_on_gemma_rows_is_close_to_f32_reference() {
    let Some(file) = open() else { return };
    let pool = ThreadPool::new(2);
    for name in [
        "blk.0.attn_output.weight",
        "blk.0.ffn_down.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_v.weight",
    ] {
        let info = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let ty = weight_type(info.ggml_type);
        let cols = info.dims[0] as usize;
        let rows = 16usize;
        let row_bytes = ty.row_bytes(cols).unwrap();
        let data = &file.tensor_data(info)[..rows * row_bytes];
        let w = Matrix::new(ty, data, rows, cols).expect("matrix");
        // Deterministic activation-like input.
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let mut y = vec![0f32; rows];
        matmul(&pool, &w, &x, 1, &mut y).expect("matmul");
        let bl = ty.block_len().max(32);
        for (r, &got) in y.iter().enumerate() {
            let want = vec_dot_f32_reference(ty, w.row(r), &x).unwrap();
            let mut wr = vec![0f32; cols];
            dequantize_row(ty, w.row(r), &mut wr).unwrap();
            let mut bound = 1e-5 * wr.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>();
            for (wb, xb) in wr.chunks(bl).zip(x.chunks(bl)) {
                let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                bound += 0.6 * d * wb.iter().map(|v| v.abs()).sum::<f32>();
            }
            assert!(
                (got - want).abs() <= bound,
                "{name} ({ty:?}) row {r}: {got} vs {want} (bound {bound})"
            );
        }
    }
}
