//! The two implementations of the expert GEMMs (src/gemm.rs) against each other.
//!
//! The reference checks in gpu_forward and gpu_backward run on whichever path the context
//! chooses; the GPU suite runs them twice on a Hopper GPU, once as they are (the Hopper path)
//! and once with `REMOE_GEMM_PATH=mma-sync`. Here the paths meet directly: on the same inputs
//! they must give bitwise-identical outputs and gradients (both add the same k16 products in the
//! same order), over shapes that stress the tiling: one token, a prime T, sizes that are not
//! multiples of the tiles, experts with no tokens, one expert taking every token, and the down
//! projection's split-K at small batches (both paths cut K into the same ranges).

mod common;

use common::*;
use half::bf16;
use remoe_kernels::{
    moe_backward, moe_forward, Coefficient, Device, DeviceTensor, GemmPath, LayerConfig,
    MoeContext, MoeGrads, RouterKind,
};
use remoe_testkit::rng::{fresh_seed, seeded, Rng};

/// The layer output and every gradient of one forward + backward on `path`, as raw bits: the
/// second of two runs on one context, with its workspace, the output and the gradients poisoned
/// (NaN) in between, so that an element neither path writes cannot pass as equal on both.
fn run_layer(
    dev: &Device,
    path: GemmPath,
    kind: RouterKind,
    cfg: LayerConfig,
    d: &DeviceProblem,
    dout: &DeviceTensor<bf16>,
) -> Vec<(&'static str, Vec<u32>)> {
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let mut ctx = MoeContext::<bf16>::for_training(dev);
    ctx.set_gemm_path(path).unwrap();
    assert_eq!(ctx.gemm_path().unwrap(), path);
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h]).unwrap();
    let mut dx = DeviceTensor::<bf16>::zeros(dev, &[t, h]).unwrap();
    let mut dwr = DeviceTensor::<f32>::zeros(dev, &[h, e]).unwrap();
    let mut dwg = DeviceTensor::<f32>::zeros(dev, &[e, h, f]).unwrap();
    let mut dwu = DeviceTensor::<f32>::zeros(dev, &[e, h, f]).unwrap();
    let mut dwd = DeviceTensor::<f32>::zeros(dev, &[e, f, h]).unwrap();
    let coeff = 1e-3;
    for warm in [true, false] {
        if !warm {
            ctx.poison_workspace().unwrap();
            for t in [&mut dwr, &mut dwg, &mut dwu, &mut dwd] {
                t.poison().unwrap();
            }
            out.poison().unwrap();
            dx.poison().unwrap();
        }
        moe_forward(
            &mut ctx,
            &cfg,
            kind,
            Coefficient::Fixed(coeff),
            &d.x,
            &d.weights(),
            &mut out,
        )
        .unwrap();
        moe_backward(
            &mut ctx,
            Coefficient::Fixed(coeff),
            &d.x,
            &d.weights(),
            dout,
            MoeGrads {
                dx: &mut dx,
                router: &mut dwr,
                gate: &mut dwg,
                up: &mut dwu,
                down: &mut dwd,
            },
            false,
        )
        .unwrap();
    }
    let half_bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits() as u32).collect::<Vec<_>>();
    let f32_bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    vec![
        ("out", half_bits(out.to_host().unwrap())),
        // After the backward the act buffer holds R act (the dAct GEMM's, dWd's operand).
        ("R act", half_bits(ctx.gated_act_to_host().unwrap())),
        ("y", half_bits(ctx.expert_out_to_host().unwrap())),
        ("dX", half_bits(dx.to_host().unwrap())),
        ("dWr", f32_bits(dwr.to_host().unwrap())),
        ("dWg", f32_bits(dwg.to_host().unwrap())),
        ("dWu", f32_bits(dwu.to_host().unwrap())),
        ("dWd", f32_bits(dwd.to_host().unwrap())),
    ]
}

/// The layer (ReMoE and TopK, forward and every gradient) on the Hopper path and on the mma.sync
/// path gives the same bits at one shape. Each shape is its own test so that a failure names it
/// and compute-sanitizer runs each in a process of its own (scripts/run-suite.sh).
fn both_gemm_paths_agree(test: &str, c: LayerConfig, density: &[f64]) {
    let Some(dev) = gpu_or_skip(test) else {
        return;
    };
    if !GemmPath::Hopper.supported_on(&dev).unwrap() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: this device has no Hopper path"
        );
        return;
    }
    for kind in [RouterKind::Relu, RouterKind::TopK] {
        let seed = fresh_seed();
        let what = format!("{test}: {kind:?} {c:?} density {density:?} seed {seed}");
        let p = problem_with_density(c, density, seed);
        let d = DeviceProblem::upload(&dev, &p).unwrap();
        let mut rng = seeded(seed ^ 0xd0);
        let dout_host: Vec<f64> = (0..c.tokens * c.hidden)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let dout =
            DeviceTensor::from_host(&dev, &to_bf16(&dout_host), &[c.tokens, c.hidden]).unwrap();
        let hopper = run_layer(&dev, GemmPath::Hopper, kind, c, &d, &dout);
        let mma = run_layer(&dev, GemmPath::MmaSync, kind, c, &d, &dout);
        for ((name, a), (_, b)) in hopper.iter().zip(&mma) {
            assert_eq!(a.len(), b.len(), "{what}: {name} lengths differ");
            let first = a.iter().zip(b).position(|(x, y)| x != y);
            assert!(
                first.is_none(),
                "{what}: {name} differs between the Hopper and mma.sync paths at element {}",
                first.unwrap_or(0)
            );
        }
    }
}

#[test]
fn both_gemm_paths_agree_on_one_token() {
    both_gemm_paths_agree(
        "both_gemm_paths_agree_on_one_token",
        LayerConfig::new(1, 64, 128, 4, 1),
        &uniform_density(4, 0.5),
    );
}

/// Ragged widths (H 200, F 328) and two experts with no tokens.
#[test]
fn both_gemm_paths_agree_on_ragged_widths_and_empty_experts() {
    both_gemm_paths_agree(
        "both_gemm_paths_agree_on_ragged_widths_and_empty_experts",
        LayerConfig::new(257, 200, 328, 5, 2),
        &[0.9, 0.0, 0.3, 0.0, 0.7],
    );
}

#[test]
fn both_gemm_paths_agree_when_one_expert_takes_every_token() {
    both_gemm_paths_agree(
        "both_gemm_paths_agree_when_one_expert_takes_every_token",
        LayerConfig::new(300, 72, 136, 3, 1),
        &[0.0, 1.0, 0.0],
    );
}

/// Hot experts whose weight gradients are reduced in fixed-order chunks (9 and 2 of them here):
/// the chunks' partial sums, and the order they are added in, are the same on both paths.
#[test]
fn both_gemm_paths_agree_on_split_weight_gradients() {
    both_gemm_paths_agree(
        "both_gemm_paths_agree_on_split_weight_gradients",
        LayerConfig::new(5003, 72, 136, 4, 1),
        &[1.0, 0.05, 0.0, 0.3],
    );
}

#[test]
fn both_gemm_paths_agree_on_skewed_loads() {
    both_gemm_paths_agree(
        "both_gemm_paths_agree_on_skewed_loads",
        LayerConfig::new(1031, 136, 264, 16, 2),
        &skewed_density(16, 2.0),
    );
}

/// A shape the size of a real layer's. Under racecheck, a quarter of its tokens (one or two
/// row tiles per expert, every column tile and K block as before): the full size ran past the
/// sanitizer pass's time in two sessions, and each path runs twice (the warm-up before the
/// poisoning). The hazards racecheck looks for are between the threads of a CTA, which run the
/// same code at either size.
#[test]
fn both_gemm_paths_agree_at_a_real_layer_size() {
    let tokens = if sanitizer_tool().as_deref() == Some("racecheck") {
        1024
    } else {
        4096
    };
    both_gemm_paths_agree(
        "both_gemm_paths_agree_at_a_real_layer_size",
        LayerConfig::new(tokens, 768, 1024, 8, 1),
        &uniform_density(8, 1.0 / 8.0),
    );
}

/// Fine-grained experts on either side of the F at which the Hopper weight gradients stop
/// gathering dOut's rows (dWd) and X's (dWg, dWu) in their mainloop and read a pair-order copy
/// instead (512: gemm.rs's HOPPER_WG_GATHER_MAX_FFN), with a ragged last block of pairs per
/// expert.
#[test]
fn both_gemm_paths_agree_either_side_of_the_weight_gradients_gather_threshold() {
    for f in [512, 520] {
        both_gemm_paths_agree(
            "both_gemm_paths_agree_either_side_of_the_weight_gradients_gather_threshold",
            LayerConfig::new(2039, 256, f, 32, 4),
            &uniform_density(32, 4.0 / 32.0),
        );
    }
}

/// Few pairs and a long F: the down projection splits K into 4 uneven ranges (33 K blocks, the
/// last one partial), and the planes are summed.
#[test]
fn both_gemm_paths_agree_on_a_split_k_down_projection() {
    both_gemm_paths_agree(
        "both_gemm_paths_agree_on_a_split_k_down_projection",
        LayerConfig::new(97, 136, 2056, 6, 1),
        &uniform_density(6, 0.2),
    );
}

/// Decode at config S's shape.
#[test]
fn both_gemm_paths_agree_at_decode() {
    both_gemm_paths_agree(
        "both_gemm_paths_agree_at_decode",
        LayerConfig::new(8, 768, 3072, 8, 1),
        &uniform_density(8, 1.0 / 8.0),
    );
}

#[test]
fn a_hopper_gpu_defaults_to_the_hopper_path() {
    let Some(dev) = gpu_or_skip("a_hopper_gpu_defaults_to_the_hopper_path") else {
        return;
    };
    let (major, minor) = dev.context().compute_capability().unwrap();
    let forced = std::env::var("REMOE_GEMM_PATH").ok();
    let mut ctx = MoeContext::<bf16>::new(&dev);
    let path = ctx.gemm_path().unwrap();
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "device {major}.{minor}, REMOE_GEMM_PATH {forced:?}: expert GEMMs on {}",
        path.name()
    );
    match forced.as_deref() {
        Some("mma-sync") | Some("mma") => assert_eq!(path, GemmPath::MmaSync),
        Some("hopper") => assert_eq!(path, GemmPath::Hopper),
        _ if (major, minor) == (9, 0) => assert_eq!(
            path,
            GemmPath::Hopper,
            "a 9.0 device must run the Hopper path (is sm_90a in REMOE_CUDA_ARCHS?)"
        ),
        _ => assert_eq!(path, GemmPath::MmaSync),
    }
    // The portable path can always be forced, and the setting sticks.
    ctx.set_gemm_path(GemmPath::MmaSync).unwrap();
    assert_eq!(ctx.gemm_path().unwrap(), GemmPath::MmaSync);
}
