//! Rotated operands, the layer's expert GEMMs launched one at a time through the crate's raw
//! launchers, and the same-shape dense cuBLAS GEMMs with the floors built from them.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use remoe_kernels::{sys, Device, Error, GemmPath, HostDispatch, LayerConfig};
use remoe_testkit::rng::{seeded, Rng};
use remoe_testkit::synthetic::DeviceProblem;

use super::{cublas_err, launch_check, MAX_COPIES, ROTATION_BYTES};

/// The weight gradients' split buffers for a dispatch whose expert offsets are `eo`, with the
/// plan computed on the device as the layer's backward does.
#[allow(clippy::type_complexity)]
fn weight_grad_split(
    dev: &Device,
    eo: &CudaSlice<u32>,
    e: usize,
    h: usize,
    f: usize,
) -> Result<
    (
        sys::remoe_wgrad_split_t,
        (CudaSlice<u32>, CudaSlice<f32>, CudaSlice<u32>),
    ),
    Error,
> {
    let (mut words, mut floats, mut counters) = (0u64, 0u64, 0u64);
    // SAFETY: host arithmetic; three valid out-pointers.
    let code = unsafe {
        sys::remoe_weight_grad_split_sizes(
            e as i32,
            h as i32,
            f as i32,
            &mut words,
            &mut floats,
            &mut counters,
        )
    };
    launch_check("weight_grad_split_sizes", code)?;
    let s = dev.stream();
    let plan = s.alloc_zeros::<u32>(words as usize)?;
    let slots = s.alloc_zeros::<f32>((floats as usize).max(1))?;
    let count = s.alloc_zeros::<u32>((counters as usize).max(1))?;
    let (plan_p, eo_p) = (addr(dev, &plan), addr(dev, eo));
    // SAFETY: eo holds e + 1 offsets, plan 3e + 1 words; both on the crate's stream.
    let code = unsafe {
        sys::remoe_weight_grad_plan(
            eo_p as *const u32,
            e as i32,
            h as i32,
            f as i32,
            -1, // chunks cut for the offsets' own total, as moe_backward does
            plan_p as *mut u32,
            sys::stream_handle(s),
        )
    };
    launch_check("weight_grad_plan", code)?;
    let split = sys::remoe_wgrad_split_t {
        plan: plan_p as *const u32,
        slots: addr(dev, &slots) as *mut f32,
        counters: addr(dev, &count) as *mut u32,
    };
    Ok((split, (plan, slots, count)))
}

// ---------------------------------------------------------------------------------------------
// Rotated device buffers

/// Random bf16 values on the device, copied out to fill large buffers quickly.
pub struct Filler {
    pool: CudaSlice<bf16>,
}

const POOL_LEN: usize = 1 << 21;

impl Filler {
    pub fn new(dev: &Device) -> Result<Self, Error> {
        let mut rng = seeded(0xf111);
        let host: Vec<bf16> = (0..POOL_LEN)
            .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)))
            .collect();
        Ok(Self {
            pool: dev.stream().clone_htod(&host)?,
        })
    }

    /// `n` random values (never time on zeros).
    pub fn random(&self, dev: &Device, n: usize) -> Result<CudaSlice<bf16>, Error> {
        let s = dev.stream();
        let mut out = s.alloc_zeros::<bf16>(n.max(1))?;
        let mut off = 0;
        while off < n {
            let len = (n - off).min(POOL_LEN);
            s.memcpy_dtod(&self.pool.slice(..len), &mut out.slice_mut(off..off + len))?;
            off += len;
        }
        Ok(out)
    }
}

/// A device buffer's address (the buffers here are used on the crate's one stream only).
fn addr<T>(dev: &Device, s: &CudaSlice<T>) -> u64 {
    let (p, _guard) = s.device_ptr(dev.stream());
    p
}

/// Copies of one operand, random values.
struct Rotated {
    copies: Vec<CudaSlice<bf16>>,
    ptrs: Vec<u64>,
    len: usize,
}

impl Rotated {
    fn new(dev: &Device, fill: &Filler, len: usize, copies: usize) -> Result<Self, Error> {
        let copies = (0..copies.max(1))
            .map(|_| fill.random(dev, len))
            .collect::<Result<Vec<_>, Error>>()?;
        let ptrs = copies.iter().map(|c| addr(dev, c)).collect();
        Ok(Self { copies, ptrs, len })
    }

    /// Copy `r` (modulo the copies held).
    fn ptr(&self, r: usize) -> u64 {
        self.ptrs[r % self.ptrs.len()]
    }

    fn bytes(&self) -> usize {
        2 * self.len
    }
}

/// How many copies of an operand set of `bytes` make a rotated footprint of ROTATION_BYTES.
pub fn copies_for(bytes: usize) -> usize {
    ROTATION_BYTES.div_ceil(bytes.max(1)).clamp(2, MAX_COPIES)
}

// ---------------------------------------------------------------------------------------------
// The five expert GEMMs

/// The expert GEMMs of the layer (the five launchers; the weight gradient's launcher runs twice
/// for dWg and dWu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKind {
    /// act = SiLU(x Wg) * (x Wu) with the X gather; g and u written (training).
    Up,
    /// y = act Wd (bf16 out, as the layer stores it).
    Down,
    /// da = dOut Wd^T with SwiGLU's backward (dg, du and R act out).
    DAct,
    /// dx_pair = dg Wg^T + du Wu^T.
    DX,
    /// dWd per expert (f32): the layer computes dWd^T = dOut^T (R act), dOut's rows gathered by
    /// pair, and stores it transposed; cuBLAS's same-shape GEMM is act^T dy.
    DWd,
    /// dWg = x^T dg and dWu = x^T du per expert (f32).
    DWgu,
}

impl GemmKind {
    pub const ALL: [GemmKind; 6] = [
        GemmKind::Up,
        GemmKind::Down,
        GemmKind::DAct,
        GemmKind::DX,
        GemmKind::DWd,
        GemmKind::DWgu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GemmKind::Up => "up+SwiGLU",
            GemmKind::Down => "down",
            GemmKind::DAct => "dAct",
            GemmKind::DX => "dX",
            GemmKind::DWd => "dWd",
            GemmKind::DWgu => "dWg+dWu",
        }
    }

    /// The name in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            GemmKind::Up => "up_swiglu",
            GemmKind::Down => "down",
            GemmKind::DAct => "dact",
            GemmKind::DX => "dx",
            GemmKind::DWd => "dwd",
            GemmKind::DWgu => "dwg_dwu",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// (M, N, K, calls) of the same-shape dense GEMM for `pairs` routed rows: M = |A| rows for
    /// the row GEMMs; for the weight gradients M = the weight's rows, N its columns, K = |A|.
    pub fn shape(self, cfg: &LayerConfig, pairs: usize) -> (usize, usize, usize, usize) {
        let (h, f, p) = (cfg.hidden, cfg.ffn, pairs);
        match self {
            GemmKind::Up => (p, 2 * f, h, 1),
            GemmKind::Down => (p, h, f, 1),
            GemmKind::DAct => (p, f, h, 1),
            GemmKind::DX => (p, h, 2 * f, 1),
            GemmKind::DWd => (f, h, p, 1),
            GemmKind::DWgu => (h, f, p, 2),
        }
    }

    pub fn flops(self, cfg: &LayerConfig, pairs: usize) -> f64 {
        let (m, n, k, calls) = self.shape(cfg, pairs);
        2.0 * (m * n * k * calls) as f64
    }
}

/// A cuBLAS operand as stored, row-major: its address, whether it is the transpose of the
/// operand the product needs (stored [k, m] for A, [n, k] for B), and its stored rows' length.
#[derive(Clone, Copy)]
struct Mat {
    ptr: u64,
    transposed: bool,
    ld: usize,
}

impl Mat {
    /// Stored as the product reads it.
    fn rm(ptr: u64, ld: usize) -> Self {
        Self {
            ptr,
            transposed: false,
            ld,
        }
    }
    /// Stored transposed.
    fn tr(ptr: u64, ld: usize) -> Self {
        Self {
            ptr,
            transposed: true,
            ld,
        }
    }
}

/// A cuBLAS output, row-major, with its rows' length.
#[derive(Clone, Copy)]
enum Out {
    Bf16(u64, usize),
    F32(u64, usize),
}

/// The same-shape dense GEMMs through cuBLAS (bf16 in, f32 accumulation, the output dtype the
/// layer's GEMM writes), with every input rotated, for up to `cap` routed rows. Operand layouts
/// follow the layer's: dAct and dX read the weights transposed, the weight gradients read the
/// routed rows transposed. Also the MoE-free floors (the dense forward pair, and the dense
/// training step of the same FLOPs) and the per-expert loop a Rust user would write today.
pub struct DenseGemms {
    dev: Device,
    blas: CudaBlas,
    cfg: LayerConfig,
    cap: usize,
    /// [cap, H]
    xrows: Rotated,
    /// [H, 2F]
    w1: Rotated,
    /// [cap, F]
    act: Rotated,
    /// [F, H]
    w2: Rotated,
    /// [cap, H]
    dy: Rotated,
    /// [cap, 2F]: the dX input; its halves [cap, F] are dg and du for the weight gradients.
    dgdu: Rotated,
    /// [cap, max(2F, H)] the 16-bit outputs, then [cap, H] the per-expert loop's y.
    out16: CudaSlice<bf16>,
    out32: CudaSlice<f32>,
    out16_ptr: u64,
    out32_ptr: u64,
    copies: [usize; 6],
}

impl DenseGemms {
    pub fn new(dev: &Device, fill: &Filler, cfg: LayerConfig, cap: usize) -> Result<Self, Error> {
        let (h, f, c) = (cfg.hidden, cfg.ffn, cap.max(1));
        let b = |n: usize| 2 * n;
        let (xr, w1, act, w2, dy, dgdu) = (
            b(c * h),
            b(h * 2 * f),
            b(c * f),
            b(f * h),
            b(c * h),
            b(c * 2 * f),
        );
        let copies = [
            copies_for(xr + w1),   // up
            copies_for(act + w2),  // down
            copies_for(dy + w2),   // dAct
            copies_for(dgdu + w1), // dX
            copies_for(act + dy),  // dWd
            copies_for(xr + dgdu), // dWg + dWu
        ];
        let most = |kinds: &[GemmKind]| kinds.iter().map(|k| copies[k.index()]).max().unwrap();
        use GemmKind::*;
        let out16 = dev.stream().alloc_zeros::<bf16>(c * ((2 * f).max(h) + h))?;
        let out32 = dev.stream().alloc_zeros::<f32>((c * h).max(2 * h * f))?;
        Ok(Self {
            blas: CudaBlas::new(dev.stream().clone()).map_err(cublas_err)?,
            xrows: Rotated::new(dev, fill, c * h, most(&[Up, DWgu]))?,
            w1: Rotated::new(dev, fill, h * 2 * f, most(&[Up, DX]))?,
            act: Rotated::new(dev, fill, c * f, most(&[Down, DWd]))?,
            w2: Rotated::new(dev, fill, f * h, most(&[Down, DAct]))?,
            dy: Rotated::new(dev, fill, c * h, most(&[DAct, DWd]))?,
            dgdu: Rotated::new(dev, fill, c * 2 * f, most(&[DX, DWgu]))?,
            out16_ptr: addr(dev, &out16),
            out32_ptr: addr(dev, &out32),
            out16,
            out32,
            dev: dev.clone(),
            cfg,
            cap: c,
            copies,
        })
    }

    /// The rows these buffers hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Copies of `kind`'s inputs in the rotation, and their total bytes at `rows` rows.
    pub fn rotation(&self, kind: GemmKind, rows: usize) -> (usize, usize) {
        let (h, f) = (self.cfg.hidden, self.cfg.ffn);
        let per = 2 * match kind {
            GemmKind::Up => rows * h + h * 2 * f,
            GemmKind::Down => rows * f + f * h,
            GemmKind::DAct => rows * h + f * h,
            GemmKind::DX => rows * 2 * f + h * 2 * f,
            GemmKind::DWd => rows * f + rows * h,
            GemmKind::DWgu => rows * h + rows * 2 * f,
        };
        let n = self.copies[kind.index()];
        (n, n * per)
    }

    /// Row-major C[m, n] = op(A)[m, k] op(B)[k, n] (bf16 in, f32 accumulation; C bf16 or f32),
    /// through column-major cuBLAS (C^T = op(B)^T op(A)^T).
    fn gemm(&self, (m, n, k): (usize, usize, usize), a: Mat, b: Mat, c: Out) -> Result<(), Error> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        use blas_sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
        if m == 0 || n == 0 {
            return Ok(());
        }
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (c_ptr, c_type, ldc) = match c {
            Out::Bf16(p, ld) => (p, CUDA_R_16BF, ld),
            Out::F32(p, ld) => (p, CUDA_R_32F, ld),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.dev.bind_to_thread()?;
        // SAFETY: the callers pass addresses of live buffers of this struct (or the layer's
        // weights) holding at least the elements the shapes and leading dimensions address;
        // alpha and beta are host f32 scalars (cuBLAS's default pointer mode), read during the
        // call; the handle's stream is the crate's.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(b.transposed),
                op(a.transposed),
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const c_void,
                b.ptr as *const c_void,
                CUDA_R_16BF,
                b.ld as i32,
                a.ptr as *const c_void,
                CUDA_R_16BF,
                a.ld as i32,
                (&beta) as *const f32 as *const c_void,
                c_ptr as *mut c_void,
                c_type,
                ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cublas_err)
    }

    /// One run of `kind`'s same-shape dense GEMM on `rows` routed rows (<= capacity), inputs of
    /// rotation slot `round`.
    pub fn run(&self, kind: GemmKind, rows: usize, round: usize) -> Result<(), Error> {
        assert!(rows <= self.cap, "dense buffers sized for fewer rows");
        let (h, f) = (self.cfg.hidden, self.cfg.ffn);
        let r = round % self.copies[kind.index()];
        let (o16, o32) = (self.out16_ptr, self.out32_ptr);
        let (x, w1, act) = (self.xrows.ptr(r), self.w1.ptr(r), self.act.ptr(r));
        let (w2, dy, dgdu) = (self.w2.ptr(r), self.dy.ptr(r), self.dgdu.ptr(r));
        match kind {
            // [rows, H] x [H, 2F]
            GemmKind::Up => self.gemm(
                (rows, 2 * f, h),
                Mat::rm(x, h),
                Mat::rm(w1, 2 * f),
                Out::Bf16(o16, 2 * f),
            ),
            // [rows, F] x [F, H], rounded to bf16 as the layer's y is.
            GemmKind::Down => self.gemm(
                (rows, h, f),
                Mat::rm(act, f),
                Mat::rm(w2, h),
                Out::Bf16(o16, h),
            ),
            // da = dy W2^T, W2 stored [F, H].
            GemmKind::DAct => self.gemm(
                (rows, f, h),
                Mat::rm(dy, h),
                Mat::tr(w2, h),
                Out::Bf16(o16, f),
            ),
            // dx = [dg du] W1^T, W1 stored [H, 2F].
            GemmKind::DX => self.gemm(
                (rows, h, 2 * f),
                Mat::rm(dgdu, 2 * f),
                Mat::tr(w1, 2 * f),
                Out::Bf16(o16, h),
            ),
            // dW2 = act^T dy: [F, H], K = rows.
            GemmKind::DWd => self.gemm(
                (f, h, rows),
                Mat::tr(act, f),
                Mat::rm(dy, h),
                Out::F32(o32, h),
            ),
            // dWg = x^T dg and dWu = x^T du: [H, F] each, K = rows; dg and du are the halves
            // [cap, F] of the dX input.
            GemmKind::DWgu => {
                let du = dgdu + 2 * (self.cap * f) as u64;
                let o32u = o32 + 4 * (h * f) as u64;
                self.gemm(
                    (h, f, rows),
                    Mat::tr(x, h),
                    Mat::rm(dgdu, f),
                    Out::F32(o32, f),
                )?;
                self.gemm(
                    (h, f, rows),
                    Mat::tr(x, h),
                    Mat::rm(du, f),
                    Out::F32(o32u, f),
                )
            }
        }
    }

    /// The MoE-free forward floor: the dense pair of the layer forward's FLOPs,
    /// X [rows, H] x [H, 2F], then [rows, F] x [F, H].
    pub fn floor_forward(&self, rows: usize, round: usize) -> Result<(), Error> {
        self.run(GemmKind::Up, rows, round)?;
        self.run(GemmKind::Down, rows, round)
    }

    /// The MoE-free training floor: that pair and its four backward GEMMs (dAct, dX, dW2, dW1),
    /// the same 18 rows H F FLOPs as the layer's forward+backward.
    pub fn floor_forward_backward(&self, rows: usize, round: usize) -> Result<(), Error> {
        for kind in GemmKind::ALL {
            self.run(kind, rows, round)?;
        }
        Ok(())
    }

    /// The per-expert GEMM loop a Rust user would write today, with the layer's own weights:
    /// for each expert, gate and up GEMMs on its (already permuted) rows and the down GEMM: 3 E
    /// cuBLAS calls. It leaves out the gather, the SwiGLU and the combine, so it is a lower
    /// bound of that approach. The rows rotate; the weights are the layer's (larger than L2
    /// except at S).
    pub fn per_expert_loop(
        &self,
        counts: &[u32],
        w: &DeviceProblem,
        round: usize,
    ) -> Result<(), Error> {
        let (h, f) = (self.cfg.hidden, self.cfg.ffn);
        let total: usize = counts.iter().map(|&n| n as usize).sum();
        assert!(total <= self.cap, "dense buffers sized for fewer rows");
        let (wg, wu, wd) = (
            addr(&self.dev, w.gate.cuda_slice()),
            addr(&self.dev, w.up.cuda_slice()),
            addr(&self.dev, w.down.cuda_slice()),
        );
        let a = self.xrows.ptr(round % self.copies[GemmKind::Up.index()]);
        let mut off = 0usize;
        for (e, &n) in counts.iter().enumerate() {
            let n = n as usize;
            if n == 0 {
                continue;
            }
            let we = 2 * (e * h * f) as u64;
            let a_e = a + 2 * (off * h) as u64;
            let mid = self.out16_ptr + 2 * (off * 2 * f) as u64;
            // gate and up: [n, H] x [H, F] each, into the two halves of mid's rows.
            let (a_e, wg_e, wu_e) = (Mat::rm(a_e, h), Mat::rm(wg + we, f), Mat::rm(wu + we, f));
            self.gemm((n, f, h), a_e, wg_e, Out::Bf16(mid, 2 * f))?;
            self.gemm((n, f, h), a_e, wu_e, Out::Bf16(mid + 2 * f as u64, 2 * f))?;
            // down: [n, F] (the gate half of mid) x [F, H], into y past the rows of mid.
            let y = self.out16_ptr + 2 * (self.cap * (2 * f).max(h) + off * h) as u64;
            self.gemm(
                (n, h, f),
                Mat::rm(mid, 2 * f),
                Mat::rm(wd + we, h),
                Out::Bf16(y, h),
            )?;
            off += n;
        }
        Ok(())
    }
}

/// The layer's expert GEMMs launched one at a time through the crate's raw launchers
/// (`remoe_kernels::sys`, the functions the layer itself calls) on a real routing (the
/// offsets and pair tokens of a layer forward), with every input rotated. Each launch has the
/// arguments the layer gives it (src/moe.rs, src/experts.rs): the up projection writes g and
/// u (a training forward); dWd reads dOut's rows through the pairs and R act, and stores its
/// tiles transposed, where the Hopper path copies the rows into pair order first
/// ([`GemmPath::copies_pair_ordered_rows`]: the copy is part of the dWd row) as the layer does; the
/// Hopper path's dWg/dWu read X's rows gathered in pair order (timed apart,
/// [`GroupedGemms::gather_x`]), the mma.sync path's gather in their loads.
pub struct GroupedGemms {
    dev: Device,
    cfg: LayerConfig,
    pub pairs: usize,
    tiles: i32,
    _routing: [CudaSlice<u32>; 3],
    _pair_gate: CudaSlice<f32>,
    pair_token: u64,
    pair_gate: u64,
    expert_offsets: u64,
    tile_offsets: u64,
    /// [T, H]
    x: Rotated,
    /// [E, H, F] each
    wg: Rotated,
    wu: Rotated,
    /// [E, F, H]
    wd: Rotated,
    /// [P, F]: act (down) or R act (dWd).
    act: Rotated,
    /// [2P F]: g then u.
    gu: Rotated,
    /// [2P F]: dg then du.
    dgdu: Rotated,
    /// [P, H]: X's rows in pair order.
    xrows: Rotated,
    _outs16: Vec<CudaSlice<bf16>>,
    outs32: Vec<CudaSlice<f32>>,
    act_o: u64,
    gu_o: u64,
    y_o: u64,
    row_dots_o: u64,
    dgdu_o: u64,
    dxp_o: u64,
    xrows_o: u64,
    dwd_o: u64,
    dwg_o: u64,
    dwu_o: u64,
    /// Copies of the inputs per kind, and for the X gather (last).
    copies: [usize; 7],
    footprint: [usize; 7],
    /// The weight gradients' fixed-order split, as the layer runs it: the plan for this
    /// dispatch (computed once), slots and counters.
    split: sys::remoe_wgrad_split_t,
    _split_bufs: (CudaSlice<u32>, CudaSlice<f32>, CudaSlice<u32>),
    /// The row GEMMs' tile counter: zeroed once, left zero by every launch (the layer's
    /// contexts own one each).
    sched: u64,
    _sched: CudaSlice<u32>,
}

const GATHER: usize = 6;

impl GroupedGemms {
    pub fn new(
        dev: &Device,
        fill: &Filler,
        cfg: LayerConfig,
        dispatch: &HostDispatch,
    ) -> Result<Self, Error> {
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        let p = dispatch.tokens.len();
        assert_eq!(dispatch.offsets.len(), e + 1);
        let tile = sys::REMOE_GEMM_TILE_ROWS as usize;
        let mut tile_offsets = vec![0u32; e + 1];
        for i in 0..e {
            let n = (dispatch.offsets[i + 1] - dispatch.offsets[i]) as usize;
            tile_offsets[i + 1] = tile_offsets[i] + n.div_ceil(tile) as u32;
        }
        let s = dev.stream();
        let routing = [
            s.clone_htod(&dispatch.tokens)?,
            s.clone_htod(&dispatch.offsets)?,
            s.clone_htod(&tile_offsets)?,
        ];
        let b = |n: usize| 2 * n;
        let (xb, wb, actb, gub, xrb) = (b(t * h), b(e * h * f), b(p * f), b(2 * p * f), b(p * h));
        let footprint = [
            xb + 2 * wb,       // up: x, Wg, Wu
            actb + wb,         // down: act, Wd
            xb + wb + gub,     // dAct: dOut (X's shape), Wd, g, u
            gub + 2 * wb,      // dX: dg, du, Wg, Wu
            xb + actb,         // dWd: dOut (X's shape, gathered), R act
            xrb.max(xb) + gub, // dWg+dWu: X rows (or X), dg, du
            xb,                // the gather: X
        ];
        let copies = footprint.map(copies_for);
        let most = |idx: &[usize]| idx.iter().map(|&i| copies[i]).max().unwrap();
        let (split, split_bufs) = weight_grad_split(dev, &routing[1], e, h, f)?;
        let sched = s.alloc_zeros::<u32>(2)?;
        let outs16 = vec![
            s.alloc_zeros::<bf16>((p * f).max(1))?,
            s.alloc_zeros::<bf16>((2 * p * f).max(1))?,
            s.alloc_zeros::<bf16>((2 * p * f).max(1))?,
            s.alloc_zeros::<bf16>((p * h).max(1))?,
            s.alloc_zeros::<bf16>((p * h).max(1))?,
            s.alloc_zeros::<bf16>((p * h).max(1))?,
        ];
        // The pairs' gates, for the dAct GEMM's epilogue (any value does: 0.5).
        let pair_gate = s.clone_htod(&vec![0.5f32; p.max(1)])?;
        let outs32 = vec![
            s.alloc_zeros::<f32>((p * f.div_ceil(32)).max(1))?,
            s.alloc_zeros::<f32>(e * f * h)?,
            s.alloc_zeros::<f32>(e * h * f)?,
            s.alloc_zeros::<f32>(e * h * f)?,
        ];
        Ok(Self {
            pair_token: addr(dev, &routing[0]),
            expert_offsets: addr(dev, &routing[1]),
            tile_offsets: addr(dev, &routing[2]),
            _routing: routing,
            pair_gate: addr(dev, &pair_gate),
            _pair_gate: pair_gate,
            x: Rotated::new(dev, fill, t * h, most(&[0, 2, 4, 5, GATHER]))?,
            wg: Rotated::new(dev, fill, e * h * f, most(&[0, 3]))?,
            wu: Rotated::new(dev, fill, e * h * f, most(&[0, 3]))?,
            wd: Rotated::new(dev, fill, e * f * h, most(&[1, 2]))?,
            act: Rotated::new(dev, fill, p * f, most(&[1, 4]))?,
            gu: Rotated::new(dev, fill, 2 * p * f, copies[2])?,
            dgdu: Rotated::new(dev, fill, 2 * p * f, most(&[3, 5]))?,
            xrows: Rotated::new(dev, fill, p * h, copies[5])?,
            act_o: addr(dev, &outs16[0]),
            gu_o: addr(dev, &outs16[1]),
            dgdu_o: addr(dev, &outs16[2]),
            dxp_o: addr(dev, &outs16[3]),
            xrows_o: addr(dev, &outs16[4]),
            y_o: addr(dev, &outs16[5]),
            row_dots_o: addr(dev, &outs32[0]),
            dwd_o: addr(dev, &outs32[1]),
            dwg_o: addr(dev, &outs32[2]),
            dwu_o: addr(dev, &outs32[3]),
            _outs16: outs16,
            outs32,
            dev: dev.clone(),
            cfg,
            pairs: p,
            tiles: tile_offsets[e] as i32,
            copies,
            footprint,
            split,
            _split_bufs: split_bufs,
            sched: addr(dev, &sched),
            _sched: sched,
        })
    }

    /// Copies of `kind`'s inputs in the rotation, and their total bytes.
    pub fn rotation(&self, kind: GemmKind) -> (usize, usize) {
        let i = kind.index();
        (self.copies[i], self.copies[i] * self.footprint[i])
    }

    /// Copies of the X gather's input, and their total bytes.
    pub fn gather_rotation(&self) -> (usize, usize) {
        (
            self.copies[GATHER],
            self.copies[GATHER] * self.footprint[GATHER],
        )
    }

    /// One launch of `kind` on `path`, inputs of rotation slot `round`.
    pub fn run(&self, kind: GemmKind, path: GemmPath, round: usize) -> Result<(), Error> {
        self.launch(kind, path, false, round)
    }

    /// The Hopper dWg and dWu reading X through the pair rows inside their mainloop (the
    /// mma.sync path's way, and the layer's on Hopper where F <= 512), instead of X's rows
    /// gathered once before them (`gather_x`, the layer's way on Hopper above 512): timed
    /// beside the other way so that the threshold (gemm.rs, HOPPER_WG_GATHER_MAX_FFN) can be
    /// re-measured.
    pub fn dwgu_hopper_gathering(&self, round: usize) -> Result<(), Error> {
        self.launch(GemmKind::DWgu, GemmPath::Hopper, true, round)
    }

    /// Checks the experiment's way before it is timed: dWg and dWu from the Hopper GEMMs
    /// gathering X's rows in their mainloop must be the mma.sync path's bits (which gathers the
    /// same X the same way; the paths' contract), each run on outputs poisoned with NaN. Returns
    /// the number of elements that differ, with the first one described.
    pub fn check_dwgu_hopper_gathering(&mut self) -> Result<(usize, String), Error> {
        let mut outs = Vec::new();
        for (path, gathers) in [(GemmPath::MmaSync, false), (GemmPath::Hopper, true)] {
            let s = self.dev.stream();
            let nan = vec![f32::NAN; self.outs32[2].len()];
            s.memcpy_htod(&nan, &mut self.outs32[2])?;
            s.memcpy_htod(&nan, &mut self.outs32[3])?;
            self.launch(GemmKind::DWgu, path, gathers, 0)?;
            let g = s.clone_dtoh(&self.outs32[2])?;
            let u = s.clone_dtoh(&self.outs32[3])?;
            outs.push((g, u));
        }
        let (mut differ, mut first) = (0, String::new());
        for (name, a, b) in [
            ("dWg", &outs[0].0, &outs[1].0),
            ("dWu", &outs[0].1, &outs[1].1),
        ] {
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                if x.to_bits() != y.to_bits() {
                    if differ == 0 {
                        first = format!("{name}[{i}]: mma.sync {x:e}, Hopper gathering {y:e}");
                    }
                    differ += 1;
                }
            }
        }
        Ok((differ, first))
    }

    /// `hopper_gathers`: on the Hopper path, dWg/dWu gather X's rows in their mainloop.
    fn launch(
        &self,
        kind: GemmKind,
        path: GemmPath,
        hopper_gathers: bool,
        round: usize,
    ) -> Result<(), Error> {
        let (t, h, f, e) = (
            self.cfg.tokens as i32,
            self.cfg.hidden as i32,
            self.cfg.ffn as i32,
            self.cfg.experts as i32,
        );
        let r = round % self.copies[kind.index()];
        let hopper = path == GemmPath::Hopper;
        let (pt, eo, to, sc, tiles) = (
            self.pair_token as *const u32,
            self.expert_offsets as *const u32,
            self.tile_offsets as *const u32,
            self.sched as *mut u32,
            self.tiles,
        );
        let pairs = self.pairs as i32;
        let half = 2 * (self.pairs * self.cfg.ffn) as u64; // bytes of one [P, F] half
        let c = |p: u64| p as *const u16;
        let m = |p: u64| p as *mut u16;
        // The raw launchers launch into the context current on this thread.
        self.dev.bind_to_thread()?;
        let s = sys::stream_handle(self.dev.stream());
        // SAFETY: every pointer is a live buffer of this struct holding what the header
        // (kernels/remoe_kernels.h) says the launcher reads or writes for this configuration and
        // |A| = self.pairs: x [T, H]; Wg, Wu [E, H, F]; Wd [E, F, H]; act, g, u, dg, du
        // [|A|, F]; X rows, dx_pair, y [|A|, H]; pair gates [|A|] f32; dR's
        // group sums [|A|, ceil(F / 32)] f32; the weight gradients [E, H, F] / [E, F, H] f32
        // (the dAct GEMM and dWd read X as their dOut, the same shape). The routing (pair tokens < T, expert offsets, tile offsets
        // of 128-row tiles, `tiles` their total) is a layer forward's, as the layer passes it;
        // H and F are multiples of 8 (the layer's own check) and every buffer is a separate
        // cudarc allocation (256-byte aligned, no overlap); the tile counter [2] is zero between
        // launches, which all go to this device's one stream. The Hopper launchers run only where
        // GemmPath::Hopper is supported (the caller's paths come from `available_paths`).
        let (what, code) = unsafe {
            match kind {
                GemmKind::Up => {
                    let (x, wg, wu) = (c(self.x.ptr(r)), c(self.wg.ptr(r)), c(self.wu.ptr(r)));
                    let (act, g, u) = (m(self.act_o), m(self.gu_o), m(self.gu_o + half));
                    let launch = if hopper {
                        sys::remoe_hopper_expert_up_swiglu_bf16
                    } else {
                        sys::remoe_expert_up_swiglu_bf16
                    };
                    (
                        "expert_up_swiglu",
                        launch(x, pt, wg, wu, act, g, u, eo, to, sc, tiles, e, h, f, s),
                    )
                }
                GemmKind::Down => {
                    let launch = if hopper {
                        sys::remoe_hopper_expert_down_bf16
                    } else {
                        sys::remoe_expert_down_bf16
                    };
                    let (act, wd) = (c(self.act.ptr(r)), c(self.wd.ptr(r)));
                    // One K range, as the layer runs it at these sizes: y written directly,
                    // no partial sums.
                    let (y, partials) = (m(self.y_o), std::ptr::null_mut());
                    (
                        "expert_down",
                        launch(
                            act, wd, y, partials, eo, to, sc, tiles, e, h, f, 1, pairs, s,
                        ),
                    )
                }
                GemmKind::DAct => {
                    let launch = if hopper {
                        sys::remoe_hopper_expert_dact_bf16
                    } else {
                        sys::remoe_expert_dact_bf16
                    };
                    let (dout, wd) = (c(self.x.ptr(r)), c(self.wd.ptr(r)));
                    let pg = self.pair_gate as *const f32;
                    let (g, u) = (c(self.gu.ptr(r)), c(self.gu.ptr(r) + half));
                    let (dg, du) = (m(self.dgdu_o), m(self.dgdu_o + half));
                    let (act, dots) = (m(self.act_o), self.row_dots_o as *mut f32);
                    (
                        "expert_dact",
                        launch(
                            dout, pt, pg, wd, g, u, dg, du, act, dots, eo, to, sc, tiles, e, h, f,
                            s,
                        ),
                    )
                }
                GemmKind::DX => {
                    let launch = if hopper {
                        sys::remoe_hopper_expert_dx_bf16
                    } else {
                        sys::remoe_expert_dx_bf16
                    };
                    let (dg, du) = (c(self.dgdu.ptr(r)), c(self.dgdu.ptr(r) + half));
                    let (wg, wu) = (c(self.wg.ptr(r)), c(self.wu.ptr(r)));
                    let dxp = m(self.dxp_o);
                    (
                        "expert_dx",
                        launch(dg, du, wg, wu, dxp, eo, to, sc, tiles, e, h, f, s),
                    )
                }
                GemmKind::DWd | GemmKind::DWgu => {
                    let launch = if hopper {
                        sys::remoe_hopper_expert_weight_grad_bf16
                    } else {
                        sys::remoe_expert_weight_grad_bf16
                    };
                    let null = std::ptr::null::<u32>();
                    let sp = &self.split as *const sys::remoe_wgrad_split_t;
                    let store = |out: u64, transposed: bool| sys::remoe_wgrad_store_t {
                        out: out as *mut f32,
                        accumulate: 0,
                        transposed: transposed as i32,
                    };
                    if kind == GemmKind::DWd {
                        // dWd^T = dOut^T (R act): dOut's rows (X standing in, as for dAct)
                        // through the pairs, or, where the layer copies them first (Hopper,
                        // F > 512), copied into pair order here as the layer does.
                        let act_r = c(self.act.ptr(r));
                        let out = store(self.dwd_o, true);
                        let (a, gather, a_rows) = if path.copies_pair_ordered_rows(self.cfg.ffn) {
                            self.gather_rows(self.x.ptr(r))?;
                            (c(self.xrows_o), null, pairs)
                        } else {
                            (c(self.x.ptr(r)), pt, t)
                        };
                        (
                            "dWd",
                            launch(a, gather, act_r, out, eo, a_rows, pairs, e, h, f, sp, s),
                        )
                    } else {
                        let (dg, du) = (c(self.dgdu.ptr(r)), c(self.dgdu.ptr(r) + half));
                        // Hopper: X's rows in pair order (unless `hopper_gathers`); mma.sync:
                        // X gathered by pair token.
                        let (a, gather, a_rows) = if hopper && !hopper_gathers {
                            (c(self.xrows.ptr(r)), null, pairs)
                        } else {
                            (c(self.x.ptr(r)), pt, t)
                        };
                        let (og, ou) = (store(self.dwg_o, false), store(self.dwu_o, false));
                        let code = launch(a, gather, dg, og, eo, a_rows, pairs, e, h, f, sp, s);
                        if code != 0 {
                            ("dWg", code)
                        } else {
                            (
                                "dWu",
                                launch(a, gather, du, ou, eo, a_rows, pairs, e, h, f, sp, s),
                            )
                        }
                    }
                }
            }
        };
        launch_check(what, code)
    }

    /// The Hopper path's preparation of dWg/dWu: X's rows gathered into pair order.
    pub fn gather_x(&self, round: usize) -> Result<(), Error> {
        self.gather_rows(self.x.ptr(round % self.copies[GATHER]))
    }

    /// Rows `src` [T, H] (a rotated copy of x, or of x standing in for dOut) gathered into pair
    /// order, into the X-rows output, as the layer's backward copies them on the Hopper path.
    fn gather_rows(&self, src: u64) -> Result<(), Error> {
        self.dev.bind_to_thread()?;
        let s = sys::stream_handle(self.dev.stream());
        // |A| as the kernel reads it: expert_offsets[E] on the device.
        let count = (self.expert_offsets as *const u32).wrapping_add(self.cfg.experts);
        // SAFETY: src is a rotated copy of x [T, H], pair tokens [|A|] each < T, X rows out
        // [|A|, H], h % 8 == 0; count points at expert_offsets[E] = |A| ([E + 1] offsets); all
        // live buffers of this struct.
        let code = unsafe {
            sys::remoe_gather_rows_16(
                src as *const u16,
                self.pair_token as *const u32,
                self.xrows_o as *mut u16,
                count,
                self.pairs as i32,
                self.cfg.hidden as i32,
                s,
            )
        };
        launch_check("gather_rows", code)
    }
}
