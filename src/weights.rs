//! The layer's weights in and out of safetensors files, in the layouts checkpoints use, converted
//! to and from the crate's layout (Wr \[H,E\], Wg and Wu \[E,H,F\], Wd \[E,F,H\]; see the crate
//! documentation).
//!
//! ## Layouts
//!
//! Names are relative to a prefix the caller gives, with its trailing dot (Mixtral:
//! `model.layers.3.block_sparse_moe.`, Qwen: `model.layers.3.mlp.`, Megatron:
//! `decoder.layers.3.mlp.`). Shapes are as stored, row-major.
//!
//! | layout | router | expert j's gate, up, down |
//! |---|---|---|
//! | [`WeightLayout::Mixtral`] | `gate.weight` \[E,H\] | `experts.{j}.w1.weight` \[F,H\], `experts.{j}.w3.weight` \[F,H\], `experts.{j}.w2.weight` \[H,F\] |
//! | [`WeightLayout::GateUpDown`] (Qwen-MoE, DeepSeek, OLMoE) | `gate.weight` \[E,H\] | `experts.{j}.gate_proj.weight` \[F,H\], `experts.{j}.up_proj.weight` \[F,H\], `experts.{j}.down_proj.weight` \[H,F\] |
//! | [`WeightLayout::MegatronGrouped`] | `router.weight` \[E,H\] | all experts in `experts.weight1` \[H, E·2F\] and `experts.weight2` \[E·F, H\] |
//!
//! The Hugging Face names are `nn.Linear` weights, [out, in]: every one is the transpose of
//! the crate's per-expert block, so loading and saving transpose on the host.
//!
//! Megatron-LM's `GroupedMLP` (megatron/core/transformer/moe/experts.py, which ReMoE's
//! implementation uses) allocates `weight1` as \[H, E·2F\] and `weight2` as \[E·F, H\] but reads
//! them through `weight1.view(E, H, -1)` and `weight2.view(E, -1, H)`: a reinterpretation of
//! the memory, not a transpose. So `weight1`'s data is E blocks of \[H, 2F\], expert by expert,
//! and within a row the first F columns are the gate and the last F the up projection (its
//! SwiGLU is `chunk(x, 2, dim=-1)`, then `silu(x\[0\]) * x\[1\]`); `weight2`'s data is E blocks of
//! \[F, H\], which is exactly Wd. Its router weight is \[E, H\] like the Hugging Face gate. These are
//! the shapes with tensor parallelism 1 (a sharded checkpoint is merged first).
//!
//! ## Dtypes
//!
//! A tensor stored as bf16, f16 or f32 is read into bf16 or f16 (the same dtype is copied bit
//! for bit; any other pair goes through f32, rounding to nearest); anything else is
//! [`WeightsError::Dtype`]. Files are written in the weights' own dtype.
//!
//! ## Errors
//!
//! Every refusal is a typed [`WeightsError`] inside [`Error::Weights`]: a missing name, a shape
//! that disagrees with the others, an unsupported dtype, a file that is not safetensors, an I/O
//! failure.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView as StView};
use safetensors::SafeTensors;

use crate::device::Device;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::moe::MoeWeights;
use crate::reference::LayerParams;
use crate::tensor::{DType, DeviceTensor};

/// Where a checkpoint keeps the layer's weights (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// Mixtral: `gate`, `experts.{j}.w1` (gate), `w3` (up), `w2` (down).
    Mixtral,
    /// Qwen-MoE, DeepSeek, OLMoE: `gate`, `experts.{j}.gate_proj`, `up_proj`, `down_proj`.
    GateUpDown,
    /// Megatron-LM's GroupedMLP: `router`, `experts.weight1` (gate|up per expert), `weight2`.
    MegatronGrouped,
}

impl WeightLayout {
    /// Every layout, in the order [`WeightLayout::detect`] tries them.
    pub const ALL: [WeightLayout; 3] = [Self::Mixtral, Self::GateUpDown, Self::MegatronGrouped];

    /// The layout whose router name is in `file` under `prefix` (and, for the Hugging Face
    /// layouts, whose expert 0 names are); [`WeightsError::Missing`] names the router tensor
    /// looked for when none is.
    pub fn detect(file: &[u8], prefix: &str) -> Result<Self> {
        let st = parse(file)?;
        let has = |name: String| st.tensor(&name).is_ok();
        if has(format!("{prefix}router.weight")) {
            return Ok(Self::MegatronGrouped);
        }
        if has(format!("{prefix}experts.0.w1.weight")) {
            return Ok(Self::Mixtral);
        }
        if has(format!("{prefix}experts.0.gate_proj.weight")) {
            return Ok(Self::GateUpDown);
        }
        Err(WeightsError::Missing {
            name: format!("{prefix}gate.weight or {prefix}router.weight"),
        }
        .into())
    }

    fn router_name(self, prefix: &str) -> String {
        match self {
            Self::Mixtral | Self::GateUpDown => format!("{prefix}gate.weight"),
            Self::MegatronGrouped => format!("{prefix}router.weight"),
        }
    }

    /// Expert j's (gate, up, down) names in the Hugging Face layouts.
    fn expert_names(self, prefix: &str, j: usize) -> [String; 3] {
        let [g, u, d] = match self {
            Self::Mixtral => ["w1", "w3", "w2"],
            Self::GateUpDown => ["gate_proj", "up_proj", "down_proj"],
            Self::MegatronGrouped => unreachable!("Megatron keeps all experts in two tensors"),
        };
        [g, u, d].map(|p| format!("{prefix}experts.{j}.{p}.weight"))
    }
}

/// Why a checkpoint could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsError {
    /// A tensor the layout needs is not in the file.
    Missing {
        /// The tensor's name in the file.
        name: String,
    },
    /// A tensor's stored shape disagrees with the layer's sizes, as read from the router (E, H)
    /// and the first expert tensor (F).
    Shape {
        /// The tensor's name in the file.
        name: String,
        /// The shape the layer's sizes call for.
        expected: Vec<usize>,
        /// The shape stored.
        actual: Vec<usize>,
    },
    /// A tensor stored in a dtype other than bf16, f16 or f32.
    Dtype {
        /// The tensor's name in the file.
        name: String,
        /// The dtype stored.
        dtype: String,
    },
    /// The bytes are not a safetensors file (the parser's message), or the layer has no experts.
    Format(String),
    /// Reading or writing the file failed.
    Io(String),
}

impl fmt::Display for WeightsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { name } => write!(f, "tensor {name} is not in the file"),
            Self::Shape {
                name,
                expected,
                actual,
            } => write!(
                f,
                "tensor {name}: expected shape {expected:?}, got {actual:?}"
            ),
            Self::Dtype { name, dtype } => {
                write!(
                    f,
                    "tensor {name}: dtype {dtype} (bf16, f16 or f32 expected)"
                )
            }
            Self::Format(why) => write!(f, "not a usable safetensors file: {why}"),
            Self::Io(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for WeightsError {}

impl From<WeightsError> for Error {
    fn from(e: WeightsError) -> Self {
        Error::Weights(e)
    }
}

/// The layer's weights on the host in the crate's layout, with the sizes they were read with.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMoeWeights<T> {
    /// H, the model width.
    pub hidden: usize,
    /// F, each expert's hidden width.
    pub ffn: usize,
    /// E, the number of experts.
    pub experts: usize,
    /// Wr \[H,E\], Wg and Wu \[E,H,F\], Wd \[E,F,H\].
    pub params: LayerParams<T>,
}

impl<T: HalfElement> HostMoeWeights<T> {
    /// Weights of the given sizes in the crate's layout; [`Error::LengthMismatch`] when a
    /// buffer's length is not its shape's.
    pub fn new(hidden: usize, ffn: usize, experts: usize, params: LayerParams<T>) -> Result<Self> {
        let (h, f, e) = (hidden, ffn, experts);
        for (what, want, have) in [
            ("router weight", h * e, params.router.len()),
            ("gate weight", e * h * f, params.gate.len()),
            ("up weight", e * h * f, params.up.len()),
            ("down weight", e * f * h, params.down.len()),
        ] {
            if want != have {
                return Err(Error::LengthMismatch {
                    what,
                    expected: want,
                    actual: have,
                });
            }
        }
        Ok(Self {
            hidden,
            ffn,
            experts,
            params,
        })
    }

    /// Reads the layer under `prefix` from the bytes of a safetensors file (for a large
    /// checkpoint, memory-map it and pass the map: only this layer's tensors are copied).
    pub fn from_safetensors(file: &[u8], prefix: &str, layout: WeightLayout) -> Result<Self> {
        let st = parse(file)?;
        let router_name = layout.router_name(prefix);
        let router = get(&st, &router_name)?;
        let [e, h] = dims2(&router_name, &router)?;
        let wr = transpose::<T>(&router_name, &router, e, h)?;
        match layout {
            WeightLayout::Mixtral | WeightLayout::GateUpDown => {
                if e == 0 {
                    return Err(
                        WeightsError::Format(format!("{router_name} has no experts")).into(),
                    );
                }
                let [g0, _, _] = layout.expert_names(prefix, 0);
                let [f, _] = dims2(&g0, &get(&st, &g0)?)?;
                let (mut gate, mut up, mut down) = (
                    Vec::with_capacity(e * h * f),
                    Vec::with_capacity(e * h * f),
                    Vec::with_capacity(e * f * h),
                );
                for j in 0..e {
                    let [gn, un, dn] = layout.expert_names(prefix, j);
                    let (g, u, d) = (get(&st, &gn)?, get(&st, &un)?, get(&st, &dn)?);
                    expect_shape(&gn, &g, &[f, h])?;
                    expect_shape(&un, &u, &[f, h])?;
                    expect_shape(&dn, &d, &[h, f])?;
                    gate.extend(transpose::<T>(&gn, &g, f, h)?);
                    up.extend(transpose::<T>(&un, &u, f, h)?);
                    down.extend(transpose::<T>(&dn, &d, h, f)?);
                }
                Self::new(
                    h,
                    f,
                    e,
                    LayerParams {
                        router: wr,
                        gate,
                        up,
                        down,
                    },
                )
            }
            WeightLayout::MegatronGrouped => {
                let n1 = format!("{prefix}experts.weight1");
                let n2 = format!("{prefix}experts.weight2");
                let (w1, w2) = (get(&st, &n1)?, get(&st, &n2)?);
                let [h1, cols] = dims2(&n1, &w1)?;
                if e == 0 || h1 != h || cols % (2 * e) != 0 {
                    return Err(WeightsError::Shape {
                        name: n1,
                        expected: vec![h, 2 * e.max(1)],
                        actual: w1.shape().to_vec(),
                    }
                    .into());
                }
                let f = cols / (2 * e);
                expect_shape(&n2, &w2, &[e * f, h])?;
                let fused = convert::<T>(&n1, &w1)?;
                let mut gate = Vec::with_capacity(e * h * f);
                let mut up = Vec::with_capacity(e * h * f);
                // Row (e, h) of the [E, H, 2F] view is its gate row then its up row.
                for row in fused.chunks_exact(2 * f) {
                    gate.extend_from_slice(&row[..f]);
                    up.extend_from_slice(&row[f..]);
                }
                let down = convert::<T>(&n2, &w2)?;
                Self::new(
                    h,
                    f,
                    e,
                    LayerParams {
                        router: wr,
                        gate,
                        up,
                        down,
                    },
                )
            }
        }
    }

    /// [`from_safetensors`](Self::from_safetensors) on the file at `path` (read whole).
    pub fn load(path: impl AsRef<Path>, prefix: &str, layout: WeightLayout) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| WeightsError::Io(format!("reading {}: {e}", path.display())))?;
        Self::from_safetensors(&bytes, prefix, layout)
    }

    /// The tensors of `layout` under `prefix`, named and shaped as that layout stores them, in
    /// the weights' dtype: (name, shape, little-endian bytes).
    pub fn to_named_tensors(
        &self,
        prefix: &str,
        layout: WeightLayout,
    ) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        let (h, f, e) = (self.hidden, self.ffn, self.experts);
        let p = &self.params;
        // Safetensors data is little-endian whatever the host's order.
        let bytes = |v: Vec<T>| -> Vec<u8> {
            v.into_iter()
                .flat_map(|x| bytemuck::cast::<T, u16>(x).to_le_bytes())
                .collect()
        };
        let mut out = vec![(
            layout.router_name(prefix),
            vec![e, h],
            bytes(transpose_host(&p.router, h, e)),
        )];
        match layout {
            WeightLayout::Mixtral | WeightLayout::GateUpDown => {
                let (hf, fh) = (h * f, f * h);
                for j in 0..e {
                    let [gn, un, dn] = layout.expert_names(prefix, j);
                    let g = &p.gate[j * hf..(j + 1) * hf];
                    let u = &p.up[j * hf..(j + 1) * hf];
                    let d = &p.down[j * fh..(j + 1) * fh];
                    out.push((gn, vec![f, h], bytes(transpose_host(g, h, f))));
                    out.push((un, vec![f, h], bytes(transpose_host(u, h, f))));
                    out.push((dn, vec![h, f], bytes(transpose_host(d, f, h))));
                }
            }
            WeightLayout::MegatronGrouped => {
                let mut fused = Vec::with_capacity(2 * e * h * f);
                for (g, u) in p.gate.chunks_exact(f).zip(p.up.chunks_exact(f)) {
                    fused.extend_from_slice(g);
                    fused.extend_from_slice(u);
                }
                out.push((
                    format!("{prefix}experts.weight1"),
                    vec![h, e * 2 * f],
                    bytes(fused),
                ));
                out.push((
                    format!("{prefix}experts.weight2"),
                    vec![e * f, h],
                    bytes(p.down.clone()),
                ));
            }
        }
        out
    }

    /// The layer as the bytes of a safetensors file in `layout` under `prefix`.
    pub fn to_safetensors(&self, prefix: &str, layout: WeightLayout) -> Result<Vec<u8>> {
        let named = self.to_named_tensors(prefix, layout);
        let dtype = st_dtype::<T>();
        let views = named
            .iter()
            .map(|(name, shape, data)| {
                StView::new(dtype, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| WeightsError::Format(e.to_string()))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(safetensors::serialize(views, Some(meta))
            .map_err(|e| WeightsError::Format(e.to_string()))?)
    }

    /// Writes [`to_safetensors`](Self::to_safetensors) to `path`.
    pub fn save(&self, path: impl AsRef<Path>, prefix: &str, layout: WeightLayout) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors(prefix, layout)?;
        std::fs::write(path, bytes)
            .map_err(|e| WeightsError::Io(format!("writing {}: {e}", path.display())).into())
    }

    /// Copies the weights to the device.
    pub fn to_device(&self, dev: &Device) -> Result<DeviceMoeWeights<T>> {
        let (h, f, e) = (self.hidden, self.ffn, self.experts);
        let p = &self.params;
        Ok(DeviceMoeWeights {
            router: DeviceTensor::from_host(dev, &p.router, &[h, e])?,
            gate: DeviceTensor::from_host(dev, &p.gate, &[e, h, f])?,
            up: DeviceTensor::from_host(dev, &p.up, &[e, h, f])?,
            down: DeviceTensor::from_host(dev, &p.down, &[e, f, h])?,
        })
    }
}

/// The layer's weights owned on the device, in the crate's layout.
#[derive(Debug)]
pub struct DeviceMoeWeights<T: HalfElement> {
    /// Wr \[H,E\].
    pub router: DeviceTensor<T>,
    /// Wg \[E,H,F\].
    pub gate: DeviceTensor<T>,
    /// Wu \[E,H,F\].
    pub up: DeviceTensor<T>,
    /// Wd \[E,F,H\].
    pub down: DeviceTensor<T>,
}

impl<T: HalfElement> DeviceMoeWeights<T> {
    /// The borrowed form the layer's functions take.
    pub fn weights(&self) -> MoeWeights<'_, T> {
        MoeWeights {
            router: &self.router,
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }

    /// Copies the weights back (waits for the stream), e.g. to save them after training.
    pub fn to_host(&self) -> Result<HostMoeWeights<T>> {
        let [e, h, f] = self.gate.shape() else {
            unreachable!("the gate weight is [E, H, F]")
        };
        HostMoeWeights::new(
            *h,
            *f,
            *e,
            LayerParams {
                router: self.router.to_host()?,
                gate: self.gate.to_host()?,
                up: self.up.to_host()?,
                down: self.down.to_host()?,
            },
        )
    }
}

fn parse(file: &[u8]) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(file).map_err(|e| WeightsError::Format(e.to_string()).into())
}

fn get<'a>(st: &SafeTensors<'a>, name: &str) -> Result<StView<'a>> {
    st.tensor(name).map_err(|_| {
        WeightsError::Missing {
            name: name.to_string(),
        }
        .into()
    })
}

fn dims2(name: &str, t: &StView) -> Result<[usize; 2]> {
    match *t.shape() {
        [a, b] => Ok([a, b]),
        _ => Err(WeightsError::Shape {
            name: name.to_string(),
            expected: vec![0, 0],
            actual: t.shape().to_vec(),
        }
        .into()),
    }
}

fn expect_shape(name: &str, t: &StView, expected: &[usize]) -> Result<()> {
    if t.shape() != expected {
        return Err(WeightsError::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: t.shape().to_vec(),
        }
        .into());
    }
    Ok(())
}

fn st_dtype<T: HalfElement>() -> StDtype {
    match T::DTYPE {
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        _ => unreachable!("HalfElement is bf16 or f16"),
    }
}

fn half_from_f32<T: HalfElement>(v: f32) -> T {
    let bits = match T::DTYPE {
        DType::BF16 => bf16::from_f32(v).to_bits(),
        DType::F16 => f16::from_f32(v).to_bits(),
        _ => unreachable!("HalfElement is bf16 or f16"),
    };
    bytemuck::cast(bits)
}

/// The stored tensor's elements as `T`, in storage order.
fn convert<T: HalfElement>(name: &str, t: &StView) -> Result<Vec<T>> {
    let data = t.data();
    let u16s = || {
        data.chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let out = match t.dtype() {
        d if d == st_dtype::<T>() => u16s().map(bytemuck::cast).collect(),
        StDtype::BF16 => u16s()
            .map(|b| half_from_f32(bf16::from_bits(b).to_f32()))
            .collect(),
        StDtype::F16 => u16s()
            .map(|b| half_from_f32(f16::from_bits(b).to_f32()))
            .collect(),
        StDtype::F32 => data
            .chunks_exact(4)
            .map(|b| half_from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        other => {
            return Err(WeightsError::Dtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            }
            .into())
        }
    };
    Ok(out)
}

/// The stored [rows, cols] tensor transposed into [cols, rows], as `T`.
fn transpose<T: HalfElement>(name: &str, t: &StView, rows: usize, cols: usize) -> Result<Vec<T>> {
    Ok(transpose_host(&convert::<T>(name, t)?, rows, cols))
}

/// `a` [rows, cols] row-major, transposed into [cols, rows].
fn transpose_host<T: Copy>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    debug_assert_eq!(a.len(), rows * cols);
    let mut out = Vec::with_capacity(a.len());
    for c in 0..cols {
        out.extend((0..rows).map(|r| a[r * cols + c]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_host_moves_element_r_c_to_c_r() {
        let a: Vec<u32> = (0..6).collect(); // [[0,1,2],[3,4,5]]
        assert_eq!(transpose_host(&a, 2, 3), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(transpose_host(&transpose_host(&a, 2, 3), 3, 2), a);
    }
}
