//! The router forward on the GPU against the CPU reference, on fresh random inputs of several
//! shapes (T = 0, 1, a prime, large; E from 1 to 512), with the outputs poisoned first; and the
//! TopK routers' softmax/top-k tail, plain and renormalised, on logits chosen directly (ties,
//! NaN and infinities where the test puts them).

mod common;

use common::{gpu_or_skip, rel_err, seed_note};
use half::{bf16, f16};
use remoe_kernels::reference::{relu_router, topk_routing_of_logits};
use remoe_kernels::router::topk_softmax;
use remoe_kernels::{
    router_forward, Device, DeviceTensor, Error, HalfElement, LayerConfig, RouterKind,
};
use remoe_testkit::rng::{fresh_seed, seeded, Rng, UniformVec};

/// Runs the GPU router on random inputs rounded to `T`, and compares with the reference on the
/// same rounded values.
fn check_router<T: HalfElement>(
    dev: &Device,
    cfg: LayerConfig,
    to: fn(f64) -> T,
    back: fn(T) -> f64,
) {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    let x: Vec<T> = rng.vec_uniform(t * h, 1.0).into_iter().map(to).collect();
    let wr: Vec<T> = rng
        .vec_uniform(h * e, 1.0 / (h as f64).sqrt())
        .into_iter()
        .map(to)
        .collect();

    let xd = DeviceTensor::from_host(dev, &x, &[t, h]).unwrap();
    let wd = DeviceTensor::from_host(dev, &wr, &[h, e]).unwrap();
    let mut logits = DeviceTensor::<f32>::zeros(dev, &[t, e]).unwrap();
    let mut gates = DeviceTensor::<f32>::zeros(dev, &[t, e]).unwrap();
    logits.poison().unwrap();
    gates.poison().unwrap();
    router_forward(dev, &cfg, &xd, &wd, &mut logits, &mut gates).unwrap();
    let got_l: Vec<f64> = logits
        .to_host()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let got_g: Vec<f64> = gates.to_host().unwrap().iter().map(|&v| v as f64).collect();

    let x64: Vec<f64> = x.iter().map(|&v| back(v)).collect();
    let wr64: Vec<f64> = wr.iter().map(|&v| back(v)).collect();
    let want = relu_router(&x64, &wr64, &cfg);
    // Same bf16 inputs, f32 accumulation against f64: well under 1e-5 relative.
    let err = rel_err(&got_l, &want.logits);
    assert!(err < 1e-5, "{cfg:?} seed {seed}: logits rel err {err:e}");
    // The gates are exactly ReLU of the kernel's own logits.
    for (i, (&g, &l)) in got_g.iter().zip(&got_l).enumerate() {
        assert_eq!(g, l.max(0.0), "{cfg:?} seed {seed}: gate {i}");
    }
}

const SHAPES: &[(usize, usize, usize)] = &[
    // (T, H, E)
    (1, 8, 1),
    (7, 16, 8),
    (1000, 768, 8),
    (997, 256, 16),
    (4096, 768, 64),
    (251, 1024, 128),
    (64, 128, 512),
    (129, 1536, 77),
];

#[test]
fn gpu_router_forward_matches_reference_bf16() {
    let Some(dev) = gpu_or_skip("gpu_router_forward_matches_reference_bf16") else {
        return;
    };
    for &(t, h, e) in SHAPES {
        check_router::<bf16>(&dev, LayerConfig::new(t, h, 8, e, 1), bf16::from_f64, |v| {
            v.to_f64()
        });
    }
}

#[test]
fn gpu_router_forward_matches_reference_f16() {
    let Some(dev) = gpu_or_skip("gpu_router_forward_matches_reference_f16") else {
        return;
    };
    for &(t, h, e) in &SHAPES[..5] {
        check_router::<f16>(&dev, LayerConfig::new(t, h, 8, e, 1), f16::from_f64, |v| {
            v.to_f64()
        });
    }
}

#[test]
fn gpu_router_forward_with_no_tokens_is_a_no_op() {
    let Some(dev) = gpu_or_skip("gpu_router_forward_with_no_tokens_is_a_no_op") else {
        return;
    };
    let cfg = LayerConfig::new(0, 64, 8, 8, 1);
    let x = DeviceTensor::<bf16>::zeros(&dev, &[0, 64]).unwrap();
    let wr = DeviceTensor::<bf16>::zeros(&dev, &[64, 8]).unwrap();
    let mut logits = DeviceTensor::<f32>::zeros(&dev, &[0, 8]).unwrap();
    let mut gates = DeviceTensor::<f32>::zeros(&dev, &[0, 8]).unwrap();
    router_forward(&dev, &cfg, &x, &wr, &mut logits, &mut gates).unwrap();
    assert!(logits.to_host().unwrap().is_empty());
}

#[test]
fn gpu_router_forward_refuses_bad_shapes_with_typed_errors() {
    let Some(dev) = gpu_or_skip("gpu_router_forward_refuses_bad_shapes_with_typed_errors") else {
        return;
    };
    let cfg = LayerConfig::new(4, 16, 8, 8, 1);
    let x = DeviceTensor::<bf16>::zeros(&dev, &[4, 16]).unwrap();
    let wr_wrong = DeviceTensor::<bf16>::zeros(&dev, &[16, 9]).unwrap();
    let mut logits = DeviceTensor::<f32>::zeros(&dev, &[4, 8]).unwrap();
    let mut gates = DeviceTensor::<f32>::zeros(&dev, &[4, 8]).unwrap();
    let err = router_forward(&dev, &cfg, &x, &wr_wrong, &mut logits, &mut gates).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    // H not a multiple of 8: refused before any launch.
    let bad = LayerConfig::new(4, 12, 8, 8, 1);
    let x12 = DeviceTensor::<bf16>::zeros(&dev, &[4, 12]).unwrap();
    let wr12 = DeviceTensor::<bf16>::zeros(&dev, &[12, 8]).unwrap();
    let err = router_forward(&dev, &bad, &x12, &wr12, &mut logits, &mut gates).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
}

#[test]
fn no_gpu_is_a_typed_error_not_a_panic() {
    // On any machine: either a device opens, or the error says there is none.
    match Device::new(0) {
        Ok(dev) => assert!(!dev.name().unwrap().is_empty()),
        Err(e) => assert!(matches!(e, Error::NoCudaDevice(_)), "{e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The TopK tail (kernels/topk.cu) on given logits.

/// What a test's logits look like.
#[derive(Debug, Clone, Copy)]
enum Logits {
    /// Uniform in [-8, 8]: no ties in practice.
    Spread,
    /// Integers in [-2, 2]: most rows tie at the k-th place.
    Ties,
    /// Spread, with about one logit in six NaN, +Inf or -Inf, and every seventh row entirely
    /// non-finite (no gate at all).
    NonFinite,
}

fn draw_logits(kind: Logits, t: usize, e: usize, seed: u64) -> Vec<f32> {
    let mut rng = seeded(seed);
    let mut l: Vec<f32> = match kind {
        Logits::Spread | Logits::NonFinite => rng
            .vec_uniform(t * e, 8.0)
            .iter()
            .map(|&v| v as f32)
            .collect(),
        Logits::Ties => (0..t * e)
            .map(|_| rng.random_range(-2i32..=2) as f32)
            .collect(),
    };
    if let Logits::NonFinite = kind {
        const BAD: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        for (i, v) in l.iter_mut().enumerate() {
            if (i / e) % 7 == 3 || rng.random_range(0..6) == 0 {
                *v = BAD[rng.random_range(0..3)];
            }
        }
    }
    l
}

/// Runs the GPU tail of `router` on logits of `kind` (poisoned outputs) and checks it against
/// the reference's tail on the same f32 logits, per tensor and per row.
fn check_topk_tail(
    dev: &Device,
    router: RouterKind,
    (t, e, k): (usize, usize, usize),
    kind: Logits,
) {
    let seed = fresh_seed();
    let what = format!("{router:?} T {t} E {e} k {k} {kind:?} {}", seed_note(seed));
    let cfg = LayerConfig::new(t, 8, 8, e, k);
    let logits = draw_logits(kind, t, e, seed);

    let ld = DeviceTensor::from_host(dev, &logits, &[t, e]).unwrap();
    let mut probs = DeviceTensor::<f32>::zeros(dev, &[t, e]).unwrap();
    let mut gates = DeviceTensor::<f32>::zeros(dev, &[t, e]).unwrap();
    probs.poison().unwrap();
    gates.poison().unwrap();
    topk_softmax(dev, &cfg, router, &ld, &mut probs, &mut gates).unwrap();
    let got_p: Vec<f64> = probs.to_host().unwrap().iter().map(|&v| v as f64).collect();
    let got_g: Vec<f64> = gates.to_host().unwrap().iter().map(|&v| v as f64).collect();

    let normalized = router == RouterKind::TopKNormalized;
    let want = topk_routing_of_logits(logits.iter().map(|&v| v as f64).collect(), &cfg, normalized);
    assert_eq!(want.normalized, normalized);
    // Per tensor. NaN (an unwritten, poisoned element) fails rel_err.
    let err = rel_err(&got_p, &want.probs);
    assert!(err < 1e-5, "{what}: probs rel err {err:e}");
    let err = rel_err(&got_g, &want.gates);
    assert!(err < 1e-5, "{what}: gates rel err {err:e}");

    // Per row and per element: the same f32 logits rank the same way in f32 and in f64, so the
    // selection is exactly the reference's, ties and non-finite logits included; the values
    // carry only expf's and the sums' roundings (|logit - max| <= 16 here).
    let close = |g: f64, w: f64| (g - w).abs() <= 1e-5 * w.abs() + 1e-12;
    for ti in 0..t {
        let row = ti * e..(ti + 1) * e;
        let (p, g, l) = (
            &got_p[row.clone()],
            &got_g[row.clone()],
            &logits[row.clone()],
        );
        let (wp, wg, sel) = (
            &want.probs[row.clone()],
            &want.gates[row.clone()],
            &want.selected[row],
        );
        let finite = l.iter().filter(|v| v.is_finite()).count();
        let chosen: Vec<usize> = (0..e).filter(|&i| g[i] > 0.0).collect();
        let want_chosen: Vec<usize> = (0..e).filter(|&i| sel[i]).collect();
        assert_eq!(
            chosen, want_chosen,
            "{what}: token {ti}'s selection, logits {l:?}"
        );
        assert_eq!(
            chosen.len(),
            k.min(finite),
            "{what}: token {ti} selects k of its finite logits"
        );
        for i in 0..e {
            assert!(
                close(p[i], wp[i]),
                "{what}: P[{ti},{i}] {} vs {}",
                p[i],
                wp[i]
            );
            assert!(
                close(g[i], wg[i]),
                "{what}: gate[{ti},{i}] {} vs {}",
                g[i],
                wg[i]
            );
            if !l[i].is_finite() {
                assert_eq!(p[i], 0.0, "{what}: P[{ti},{i}] of a non-finite logit");
            }
        }
        let psum: f64 = p.iter().sum();
        if finite > 0 {
            assert!(
                (psum - 1.0).abs() < 1e-5,
                "{what}: token {ti}'s P sums to {psum}"
            );
        } else {
            assert_eq!(psum, 0.0, "{what}: token {ti} has no finite logit");
        }
        let gsum: f64 = g.iter().sum();
        if !normalized {
            // The selected P as they are, bit for bit.
            for &i in &chosen {
                assert_eq!(
                    g[i],
                    p[i].max(f32::MIN_POSITIVE as f64),
                    "{what}: gate[{ti},{i}] is not P"
                );
            }
        } else if finite == 0 {
            assert_eq!(
                gsum, 0.0,
                "{what}: token {ti} has no finite logit but gates"
            );
        } else {
            assert!(
                (gsum - 1.0).abs() < 1e-5,
                "{what}: token {ti}'s gates sum to {gsum}"
            );
            if k == 1 {
                // exp(0) / exp(0): the single gate is exactly 1.
                assert_eq!(g[chosen[0]], 1.0, "{what}: token {ti}'s only gate");
            }
            if chosen.len() == finite {
                // Every finite logit selected: the selection's sum is the softmax's, so the
                // renormalised gates are P bit for bit.
                for &i in &chosen {
                    assert_eq!(
                        g[i],
                        p[i].max(f32::MIN_POSITIVE as f64),
                        "{what}: gate[{ti},{i}] is not P"
                    );
                }
            }
        }
    }
}

/// (T, E, k): T = 1, a prime, a few blocks of 64, and large; E from 1 to 512, not only multiples
/// of 8 or 32; k = 1, 2, 8 and k = E.
const TOPK_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 8, 8),
    (7, 8, 2),
    (997, 7, 3),
    (997, 8, 1),
    (130, 64, 8),
    (64, 77, 77),
    (2048, 64, 2),
    (251, 128, 1),
    (129, 512, 8),
    (33, 512, 512),
];

fn topk_tail_case(test: &str, router: RouterKind, kind: Logits) {
    let Some(dev) = gpu_or_skip(test) else {
        return;
    };
    for &shape in TOPK_SHAPES {
        check_topk_tail(&dev, router, shape, kind);
    }
}

#[test]
fn gpu_topk_tail_matches_reference() {
    topk_tail_case(
        "gpu_topk_tail_matches_reference",
        RouterKind::TopK,
        Logits::Spread,
    );
}

#[test]
fn gpu_topk_tail_matches_reference_with_ties() {
    topk_tail_case(
        "gpu_topk_tail_matches_reference_with_ties",
        RouterKind::TopK,
        Logits::Ties,
    );
}

#[test]
fn gpu_topk_tail_matches_reference_with_non_finite_logits() {
    topk_tail_case(
        "gpu_topk_tail_matches_reference_with_non_finite_logits",
        RouterKind::TopK,
        Logits::NonFinite,
    );
}

#[test]
fn gpu_topk_normalized_tail_matches_reference() {
    topk_tail_case(
        "gpu_topk_normalized_tail_matches_reference",
        RouterKind::TopKNormalized,
        Logits::Spread,
    );
}

#[test]
fn gpu_topk_normalized_tail_matches_reference_with_ties() {
    topk_tail_case(
        "gpu_topk_normalized_tail_matches_reference_with_ties",
        RouterKind::TopKNormalized,
        Logits::Ties,
    );
}

#[test]
fn gpu_topk_normalized_tail_matches_reference_with_non_finite_logits() {
    topk_tail_case(
        "gpu_topk_normalized_tail_matches_reference_with_non_finite_logits",
        RouterKind::TopKNormalized,
        Logits::NonFinite,
    );
}

#[test]
fn gpu_topk_tail_with_no_tokens_is_a_no_op_and_refuses_bad_input() {
    let Some(dev) = gpu_or_skip("gpu_topk_tail_with_no_tokens_is_a_no_op_and_refuses_bad_input")
    else {
        return;
    };
    let empty = LayerConfig::new(0, 8, 8, 8, 2);
    let l = DeviceTensor::<f32>::zeros(&dev, &[0, 8]).unwrap();
    let mut p = DeviceTensor::<f32>::zeros(&dev, &[0, 8]).unwrap();
    let mut g = DeviceTensor::<f32>::zeros(&dev, &[0, 8]).unwrap();
    for router in [RouterKind::TopK, RouterKind::TopKNormalized] {
        topk_softmax(&dev, &empty, router, &l, &mut p, &mut g).unwrap();
    }
    assert!(p.to_host().unwrap().is_empty() && g.to_host().unwrap().is_empty());

    let cfg = LayerConfig::new(4, 8, 8, 8, 2);
    let l = DeviceTensor::<f32>::zeros(&dev, &[4, 8]).unwrap();
    let mut p = DeviceTensor::<f32>::zeros(&dev, &[4, 8]).unwrap();
    let mut g = DeviceTensor::<f32>::zeros(&dev, &[4, 8]).unwrap();
    // The ReLU router has no such tail.
    let err = topk_softmax(&dev, &cfg, RouterKind::Relu, &l, &mut p, &mut g).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    // Logits of the wrong shape.
    let l9 = DeviceTensor::<f32>::zeros(&dev, &[4, 9]).unwrap();
    let err =
        topk_softmax(&dev, &cfg, RouterKind::TopKNormalized, &l9, &mut p, &mut g).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    // More experts than the kernel takes.
    let big = LayerConfig::new(1, 8, 8, 513, 1);
    let lb = DeviceTensor::<f32>::zeros(&dev, &[1, 513]).unwrap();
    let mut pb = DeviceTensor::<f32>::zeros(&dev, &[1, 513]).unwrap();
    let mut gb = DeviceTensor::<f32>::zeros(&dev, &[1, 513]).unwrap();
    let err = topk_softmax(
        &dev,
        &big,
        RouterKind::TopKNormalized,
        &lb,
        &mut pb,
        &mut gb,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
}
