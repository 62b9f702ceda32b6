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
//!
//! A checkpoint is untrusted input: whatever its bytes, loading gives the weights or one of
//! these errors, never a panic or an abort. Every tensor the layer needs is found and its shape
//! and dtype checked before anything is allocated, so what the loader allocates is backed by
//! tensor data in the file (safetensors checks that each tensor's bytes match its shape), never
//! by a product of sizes that the file only declares.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView as StView};
use safetensors::SafeTensors;

use crate::device::Device;
use crate::element::HalfElement;
use crate::error::{Error, Result, WeightsError};
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

    /// The (gate, up, down) projections' names within an expert, in the Hugging Face layouts;
    /// none for Megatron, which keeps all experts in two tensors.
    fn expert_projections(self) -> &'static [&'static str] {
        match self {
            Self::Mixtral => &["w1", "w3", "w2"],
            Self::GateUpDown => &["gate_proj", "up_proj", "down_proj"],
            Self::MegatronGrouped => &[],
        }
    }

    /// Expert j's (gate, up, down) names in the Hugging Face layouts.
    fn expert_names(self, prefix: &str, j: usize) -> [String; 3] {
        let &[g, u, d] = self.expert_projections() else {
            unreachable!("only the Hugging Face layouts name experts one by one")
        };
        [g, u, d].map(|p| format!("{prefix}experts.{j}.{p}.weight"))
    }
}

/// The layer's weights on the host in the crate's layout, with the sizes they were read with.
///
/// The sizes and the buffers are private so that they cannot disagree: [`new`](Self::new)
/// checks them together, and everything after (saving above all) relies on it. To change the
/// weights, take them with [`into_params`](Self::into_params) and make new ones.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMoeWeights<T> {
    hidden: usize,
    ffn: usize,
    experts: usize,
    params: LayerParams<T>,
}

impl<T> HostMoeWeights<T> {
    /// H, the model width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// F, each expert's hidden width.
    pub fn ffn(&self) -> usize {
        self.ffn
    }

    /// E, the number of experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Wr \[H,E\], Wg and Wu \[E,H,F\], Wd \[E,F,H\].
    pub fn params(&self) -> &LayerParams<T> {
        &self.params
    }

    /// The buffers, given up (to change them, then make new weights with
    /// [`new`](Self::new)).
    pub fn into_params(self) -> LayerParams<T> {
        self.params
    }
}

impl<T: HalfElement> HostMoeWeights<T> {
    /// Weights of the given sizes in the crate's layout; [`Error::InvalidConfig`] when a size is
    /// zero or their product overflows, [`Error::LengthMismatch`] when a buffer's length is not
    /// its shape's.
    pub fn new(hidden: usize, ffn: usize, experts: usize, params: LayerParams<T>) -> Result<Self> {
        let (h, f, e) = (hidden, ffn, experts);
        if h == 0 || f == 0 || e == 0 {
            return Err(Error::InvalidConfig(format!(
                "layer weights need H, F and E of at least 1, got H={h}, F={f}, E={e}"
            )));
        }
        let (Some(he), Some(ehf)) = (h.checked_mul(e), elements(&[e, h, f])) else {
            return Err(Error::InvalidConfig(format!(
                "layer weights of H={h}, F={f}, E={e} have more elements than memory can hold"
            )));
        };
        for (what, want, have) in [
            ("router weight", he, params.router.len()),
            ("gate weight", ehf, params.gate.len()),
            ("up weight", ehf, params.up.len()),
            ("down weight", ehf, params.down.len()),
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
    /// checkpoint, memory-map it and pass the map: only this layer's tensors are copied). Any
    /// file the layer cannot be read from is [`Error::Weights`] (see the module documentation).
    pub fn from_safetensors(file: &[u8], prefix: &str, layout: WeightLayout) -> Result<Self> {
        let st = parse(file)?;
        let router_name = layout.router_name(prefix);
        let (router, [e, h]) = sizing(&st, &router_name)?;
        match layout {
            WeightLayout::Mixtral | WeightLayout::GateUpDown => {
                let [g0, _, _] = layout.expert_names(prefix, 0);
                let (_, [f, _]) = sizing(&st, &g0)?;
                // Every expert is checked before anything is allocated: E and F each come from
                // one tensor's data, but E·H·F is backed by the file only once all E experts
                // are there.
                for j in 0..e {
                    let [gn, un, dn] = layout.expert_names(prefix, j);
                    shaped(&st, &gn, [f, h])?;
                    shaped(&st, &un, [f, h])?;
                    shaped(&st, &dn, [h, f])?;
                }
                no_experts_past(&st, prefix, layout, e, &router_name)?;
                let n = layer_elements(e, h, f)?;
                let (mut gate, mut up, mut down) = (
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                for j in 0..e {
                    let [gn, un, dn] = layout.expert_names(prefix, j);
                    gate.extend(transpose::<T>(&gn, &shaped(&st, &gn, [f, h])?, f, h)?);
                    up.extend(transpose::<T>(&un, &shaped(&st, &un, [f, h])?, f, h)?);
                    down.extend(transpose::<T>(&dn, &shaped(&st, &dn, [h, f])?, h, f)?);
                }
                let wr = transpose::<T>(&router_name, &router, e, h)?;
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
                let (w1, [h1, cols]) = sizing(&st, &n1)?;
                if h1 != h {
                    return Err(WeightsError::Shape {
                        name: n1,
                        expected: vec![h, cols],
                        actual: vec![h1, cols],
                    }
                    .into());
                }
                // E ≤ the router's elements and cols ≥ 1, so neither 2E nor E·F overflows;
                // checked all the same, as everything sized from a header is.
                let two_e = e.checked_mul(2).ok_or_else(|| too_many(&router_name))?;
                if cols % two_e != 0 {
                    return Err(WeightsError::Inconsistent {
                        name: n1,
                        why: format!(
                            "its {cols} columns are not 2F for each of the {e} experts of \
                             {router_name}"
                        ),
                    }
                    .into());
                }
                let f = cols / two_e;
                let ef = e.checked_mul(f).ok_or_else(|| too_many(&n1))?;
                let w2 = shaped(&st, &n2, [ef, h])?;
                let n = layer_elements(e, h, f)?;
                let fused = convert::<T>(&n1, &w1)?;
                let mut gate = Vec::with_capacity(n);
                let mut up = Vec::with_capacity(n);
                // Row (e, h) of the [E, H, 2F] view is its gate row then its up row.
                for row in fused.chunks_exact(2 * f) {
                    gate.extend_from_slice(&row[..f]);
                    up.extend_from_slice(&row[f..]);
                }
                let down = convert::<T>(&n2, &w2)?;
                let wr = transpose::<T>(&router_name, &router, e, h)?;
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
        // The fields are public, so the gate may be any tensor by now.
        let &[e, h, f] = self.gate.shape() else {
            return Err(Error::InvalidConfig(format!(
                "the gate weight must be [E, H, F], got shape {:?}",
                self.gate.shape()
            )));
        };
        HostMoeWeights::new(
            h,
            f,
            e,
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

/// A 2-D tensor whose dimensions give the layer's sizes: present, of a dtype the layer reads,
/// and with no zero dimension (a zero would make every other size free of any bytes in the
/// file, and F = 0 leaves nothing to split Megatron's rows by).
fn sizing<'a>(st: &SafeTensors<'a>, name: &str) -> Result<(StView<'a>, [usize; 2])> {
    let t = get(st, name)?;
    let &[a, b] = t.shape() else {
        return Err(WeightsError::Rank {
            name: name.to_string(),
            expected: 2,
            actual: t.shape().to_vec(),
        }
        .into());
    };
    if a == 0 || b == 0 {
        return Err(WeightsError::ZeroSize {
            name: name.to_string(),
            shape: t.shape().to_vec(),
        }
        .into());
    }
    readable_dtype(name, &t)?;
    Ok((t, [a, b]))
}

/// A tensor that must have the shape the layer's sizes call for, in a dtype the layer reads.
fn shaped<'a>(st: &SafeTensors<'a>, name: &str, expected: [usize; 2]) -> Result<StView<'a>> {
    let t = get(st, name)?;
    if t.shape() != expected {
        return Err(WeightsError::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: t.shape().to_vec(),
        }
        .into());
    }
    readable_dtype(name, &t)?;
    Ok(t)
}

/// In the Hugging Face layouts E is the router's: a file that also holds an expert past it
/// (a router cut short, or two layers' files merged) would otherwise load with those experts
/// silently dropped.
fn no_experts_past(
    st: &SafeTensors,
    prefix: &str,
    layout: WeightLayout,
    e: usize,
    router_name: &str,
) -> Result<()> {
    let stem = format!("{prefix}experts.");
    let past = |name: &str| -> bool {
        let Some((index, rest)) = name
            .strip_prefix(&stem)
            .and_then(|rest| rest.split_once('.'))
        else {
            return false;
        };
        let is_projection = layout
            .expert_projections()
            .iter()
            .any(|p| rest.strip_prefix(p) == Some(".weight"));
        // An index too large for usize is past E too.
        is_projection
            && !index.is_empty()
            && index.bytes().all(|b| b.is_ascii_digit())
            && index.parse::<usize>().map_or(true, |j| j >= e)
    };
    // The smallest such name, so that the error is the same whatever the header's order.
    match st.names().into_iter().filter(|n| past(n)).min() {
        Some(name) => Err(WeightsError::Inconsistent {
            name: name.to_string(),
            why: format!("an expert past the {e} experts of {router_name}"),
        }
        .into()),
        None => Ok(()),
    }
}

/// E·H·F, which the checks before it have backed with bytes in the file.
fn layer_elements(e: usize, h: usize, f: usize) -> Result<usize> {
    elements(&[e, h, f]).ok_or_else(|| {
        WeightsError::Format(format!(
            "a layer of E={e}, H={h}, F={f} has more elements than memory can hold"
        ))
        .into()
    })
}

fn elements(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

fn too_many(name: &str) -> Error {
    WeightsError::Format(format!("the sizes read from {name} overflow")).into()
}

fn readable_dtype(name: &str, t: &StView) -> Result<()> {
    match t.dtype() {
        StDtype::BF16 | StDtype::F16 | StDtype::F32 => Ok(()),
        other => Err(WeightsError::Dtype {
            name: name.to_string(),
            dtype: format!("{other:?}"),
        }
        .into()),
    }
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
