//! GPU systems: what one GPU can hold, read and compute, and what a node and a rack draw.
//! The published specifications are committed in `data/gpus.toml`; a site file chooses among
//! them and may override any field.

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// Weight precision of a deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bfloat16 weights.
    Bf16,
    /// FP8 weights (E4M3 with scales).
    Fp8,
    /// 4-bit floating point weights (NVFP4/MXFP4: 4 bits plus a scale per 16 or 32).
    Fp4,
}

impl Precision {
    /// Bytes per weight, scales included.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Self::Bf16 => 2.0,
            Self::Fp8 => 1.0,
            Self::Fp4 => 0.5625,
        }
    }

    /// Its name in files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::Fp4 => "fp4",
        }
    }
}

/// A GPU architecture whose efficiency factors are fitted from one measured GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// H100, H200 (fitted on ML.ENERGY's H100 rows).
    Hopper,
    /// B200, GB200, GB300 (fitted on ML.ENERGY's B200 rows).
    Blackwell,
}

/// One GPU system on offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSystem {
    /// Its name (`H100`, `GB200-NVL72`).
    pub name: String,
    /// Which fitted efficiencies apply.
    pub family: Family,
    /// HBM per GPU, GB (10^9 bytes).
    pub memory_gb: f64,
    /// Memory bandwidth per GPU, TB/s.
    pub bandwidth_tb_s: f64,
    /// Dense bf16 tensor throughput per GPU, TFLOP/s.
    pub tflops_bf16: f64,
    /// Dense FP8 tensor throughput per GPU, TFLOP/s.
    pub tflops_fp8: f64,
    /// Dense FP4 tensor throughput per GPU, TFLOP/s (0: not supported).
    pub tflops_fp4: f64,
    /// Board power per GPU, W.
    pub board_power_w: f64,
    /// GPUs per node.
    pub gpus_per_node: u32,
    /// A node's maximum power, kW (GPUs, CPUs, network, fans).
    pub node_power_kw: f64,
    /// Nodes per rack.
    pub nodes_per_rack: u32,
    /// A rack's maximum power, kW.
    pub rack_power_kw: f64,
    /// Price per GPU (any currency), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_gpu: Option<f64>,
}

impl GpuSystem {
    /// Dense tensor throughput (FLOP/s) for weights of `precision`; FP8 compute for FP4
    /// weights where FP4 is not supported (weights are widened, as Hopper runs MXFP4 models).
    pub fn flops(&self, precision: Precision) -> f64 {
        let tflops = match precision {
            Precision::Bf16 => self.tflops_bf16,
            Precision::Fp8 => self.tflops_fp8,
            Precision::Fp4 if self.tflops_fp4 > 0.0 => self.tflops_fp4,
            Precision::Fp4 => self.tflops_fp8,
        };
        tflops * 1e12
    }

    /// Memory bandwidth, bytes/s.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth_tb_s * 1e12
    }

    /// GPUs per rack.
    pub fn gpus_per_rack(&self) -> u32 {
        // Each at most `MAX_PER_NODE_OR_RACK` (checked), so the product fits.
        self.gpus_per_node * self.nodes_per_rack
    }

    /// What a node draws beyond its GPUs at full load, W.
    pub fn node_overhead_w(&self) -> f64 {
        (self.node_power_kw * 1e3 - f64::from(self.gpus_per_node) * self.board_power_w).max(0.0)
    }

    /// Checks every number; `field` prefixes the names in errors (`system[1]`).
    pub fn validate(&self, file: &str, field: &str) -> Result<(), PlanError> {
        let positive = [
            ("memory_gb", self.memory_gb),
            ("bandwidth_tb_s", self.bandwidth_tb_s),
            ("tflops_bf16", self.tflops_bf16),
            ("tflops_fp8", self.tflops_fp8),
            ("board_power_w", self.board_power_w),
            ("node_power_kw", self.node_power_kw),
            ("rack_power_kw", self.rack_power_kw),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlanError::field(
                    file,
                    format!("{field}.{name}"),
                    format!("must be a positive number, got {v}"),
                ));
            }
        }
        if !(self.tflops_fp4.is_finite() && self.tflops_fp4 >= 0.0) {
            return Err(PlanError::field(
                file,
                format!("{field}.tflops_fp4"),
                "must be 0 (unsupported) or positive",
            ));
        }
        for (name, v) in [
            ("gpus_per_node", self.gpus_per_node),
            ("nodes_per_rack", self.nodes_per_rack),
        ] {
            if !(1..=MAX_PER_NODE_OR_RACK).contains(&v) {
                return Err(PlanError::field(
                    file,
                    format!("{field}.{name}"),
                    format!("must be 1 to {MAX_PER_NODE_OR_RACK}, not {v}"),
                ));
            }
        }
        if let Some(p) = self.price_per_gpu
            && !(p.is_finite() && p >= 0.0)
        {
            return Err(PlanError::field(
                file,
                format!("{field}.price_per_gpu"),
                "must be a non-negative number",
            ));
        }
        Ok(())
    }
}

/// Most GPUs per node, and most nodes per rack, a system may have.
pub const MAX_PER_NODE_OR_RACK: u32 = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    system: Vec<GpuSystem>,
}

/// The committed catalogue (`data/gpus.toml`).
pub fn catalogue() -> Vec<GpuSystem> {
    // The file is part of the crate and checked by a test; an error here is a build defect.
    toml::from_str::<Catalogue>(include_str!("../data/gpus.toml"))
        .map(|c| c.system)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_parses_and_is_valid() {
        let c: Catalogue = toml::from_str(include_str!("../data/gpus.toml")).unwrap();
        assert_eq!(c.system.len(), 5);
        for (i, s) in c.system.iter().enumerate() {
            s.validate("gpus.toml", &format!("system[{i}]")).unwrap();
        }
        let gb200 = c.system.iter().find(|s| s.name == "GB200-NVL72").unwrap();
        assert_eq!(gb200.gpus_per_rack(), 72);
    }
}
