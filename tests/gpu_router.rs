//! The router forward on the GPU against the CPU reference, on fresh random inputs of several
//! shapes (T = 0, 1, a prime, large; E from 1 to 512), with the outputs poisoned first.

mod common;

use common::{gpu_or_skip, rel_err};
use half::{bf16, f16};
use remoe_kernels::reference::relu_router;
use remoe_kernels::{router_forward, Device, DeviceTensor, Error, HalfElement, LayerConfig};
use remoe_testkit::rng::{fresh_seed, seeded, UniformVec};

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
