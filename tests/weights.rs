//! Weights in and out of safetensors files (src/weights.rs), on the CPU: every layout round-trips
//! in bf16 and f16, files written here by hand in each layout's conventions load into the crate's
//! layout element for element, and bad files give typed errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use half::{bf16, f16};
use remoe_kernels::reference::LayerParams;
use remoe_kernels::{Error, HalfElement, HostMoeWeights, WeightLayout, WeightsError};
use remoe_testkit::rng::{fresh_seed, seeded, Rng, TestRng};
use safetensors::tensor::{Dtype, TensorView};

use common::seed_note;

/// A folder under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("remoe-weights-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_weights<T: HalfElement>(
    rng: &mut TestRng,
    from_f64: fn(f64) -> T,
    (h, f, e): (usize, usize, usize),
) -> HostMoeWeights<T> {
    let mut v = |n: usize| -> Vec<T> {
        (0..n)
            .map(|_| from_f64(rng.random_range(-2.0..2.0)))
            .collect()
    };
    let params = LayerParams {
        router: v(h * e),
        gate: v(e * h * f),
        up: v(e * h * f),
        down: v(e * f * h),
    };
    HostMoeWeights::new(h, f, e, params).unwrap()
}

fn round_trips<T: HalfElement + PartialEq>(from_f64: fn(f64) -> T, name: &str) {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let dir = TempDir::new(name);
    for dims in [(8, 16, 4), (24, 8, 3), (8, 8, 1)] {
        let w = random_weights(&mut rng, from_f64, dims);
        for layout in WeightLayout::ALL {
            let prefix = "model.layers.7.mlp.";
            let bytes = w.to_safetensors(prefix, layout).unwrap();
            let back = HostMoeWeights::<T>::from_safetensors(&bytes, prefix, layout).unwrap();
            assert_eq!(back, w, "{layout:?} {dims:?}, {}", seed_note(seed));
            assert_eq!(WeightLayout::detect(&bytes, prefix).unwrap(), layout);

            let path = dir.0.join(format!("{layout:?}.safetensors"));
            w.save(&path, prefix, layout).unwrap();
            let loaded = HostMoeWeights::<T>::load(&path, prefix, layout).unwrap();
            assert_eq!(
                loaded,
                w,
                "{layout:?} {dims:?} via a file, {}",
                seed_note(seed)
            );
        }
    }
}

#[test]
fn every_layout_round_trips_in_bf16() {
    round_trips::<bf16>(bf16::from_f64, "bf16");
}

#[test]
fn every_layout_round_trips_in_f16() {
    round_trips::<f16>(f16::from_f64, "f16");
}

/// Each element's value encodes its place in the crate's layout, so a file written here in a
/// checkpoint's own convention can be checked element by element after loading. The sizes keep
/// every value exact in bf16 (8 significant bits) and distinct within its tensor; the four
/// tensors differ in sign or fraction, so a swap of two of them shows too.
const H: usize = 4;
const F: usize = 8;
const E: usize = 3;

/// Wr[h][e], Wg[e][h][f], Wu[e][h][f], Wd[e][f][h].
fn wr(h: usize, e: usize) -> f32 {
    (h * E + e) as f32 + 0.5
}
fn wg(e: usize, h: usize, f: usize) -> f32 {
    (e * H * F + h * F + f) as f32
}
fn wu(e: usize, h: usize, f: usize) -> f32 {
    -((e * H * F + h * F + f) as f32) - 1.0
}
fn wd(e: usize, f: usize, h: usize) -> f32 {
    (e * F * H + f * H + h) as f32 / 128.0
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// A safetensors file of f32 tensors (name, shape, data), as a checkpoint writer makes it.
fn write_file(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None::<HashMap<String, String>>).unwrap()
}

/// The Hugging Face convention: nn.Linear weights [out, in].
fn hf_file(prefix: &str, [g, u, d]: [&str; 3]) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut t = vec![(
        format!("{prefix}gate.weight"),
        vec![E, H],
        f32_bytes((0..E).flat_map(|e| (0..H).map(move |h| wr(h, e)))),
    )];
    for j in 0..E {
        let name = |p: &str| format!("{prefix}experts.{j}.{p}.weight");
        // gate and up: [F, H], element [f][h] = W[j][h][f]; down: [H, F], element [h][f].
        t.push((
            name(g),
            vec![F, H],
            f32_bytes((0..F).flat_map(|f| (0..H).map(move |h| wg(j, h, f)))),
        ));
        t.push((
            name(u),
            vec![F, H],
            f32_bytes((0..F).flat_map(|f| (0..H).map(move |h| wu(j, h, f)))),
        ));
        t.push((
            name(d),
            vec![H, F],
            f32_bytes((0..H).flat_map(|h| (0..F).map(move |f| wd(j, f, h)))),
        ));
    }
    t
}

/// Megatron's GroupedMLP: weight1 [H, E*2F] holding [E][H][gate F | up F], weight2 [E*F, H].
fn megatron_file(prefix: &str) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let w1 = (0..E).flat_map(|e| {
        (0..H).flat_map(move |h| {
            (0..F)
                .map(move |f| wg(e, h, f))
                .chain((0..F).map(move |f| wu(e, h, f)))
        })
    });
    let w2 = (0..E).flat_map(|e| (0..F).flat_map(move |f| (0..H).map(move |h| wd(e, f, h))));
    vec![
        (
            format!("{prefix}router.weight"),
            vec![E, H],
            f32_bytes((0..E).flat_map(|e| (0..H).map(move |h| wr(h, e)))),
        ),
        (
            format!("{prefix}experts.weight1"),
            vec![H, E * 2 * F],
            f32_bytes(w1),
        ),
        (
            format!("{prefix}experts.weight2"),
            vec![E * F, H],
            f32_bytes(w2),
        ),
    ]
}

fn expected_params() -> LayerParams<f32> {
    LayerParams {
        router: (0..H).flat_map(|h| (0..E).map(move |e| wr(h, e))).collect(),
        gate: (0..E)
            .flat_map(|e| (0..H).flat_map(move |h| (0..F).map(move |f| wg(e, h, f))))
            .collect(),
        up: (0..E)
            .flat_map(|e| (0..H).flat_map(move |h| (0..F).map(move |f| wu(e, h, f))))
            .collect(),
        down: (0..E)
            .flat_map(|e| (0..F).flat_map(move |f| (0..H).map(move |h| wd(e, f, h))))
            .collect(),
    }
}

fn to_f32<T: Copy>(v: &[T], f: fn(T) -> f32) -> Vec<f32> {
    v.iter().map(|&x| f(x)).collect()
}

fn check_loaded<T: HalfElement>(w: &HostMoeWeights<T>, to: fn(T) -> f32, what: &str) {
    let want = expected_params();
    assert_eq!((w.hidden, w.ffn, w.experts), (H, F, E), "{what}: sizes");
    assert_eq!(to_f32(&w.params.router, to), want.router, "{what}: router");
    assert_eq!(to_f32(&w.params.gate, to), want.gate, "{what}: gate");
    assert_eq!(to_f32(&w.params.up, to), want.up, "{what}: up");
    assert_eq!(to_f32(&w.params.down, to), want.down, "{what}: down");
}

/// Files in each checkpoint's own convention (f32, as a converter might leave them) load into
/// the crate's layout element for element, as bf16 and as f16; saved back in that layout they
/// hold the same elements at the same places.
#[test]
fn checkpoint_conventions_load_into_the_crate_layout() {
    let prefix = "model.layers.0.block_sparse_moe.";
    let files = [
        (WeightLayout::Mixtral, hf_file(prefix, ["w1", "w3", "w2"])),
        (
            WeightLayout::GateUpDown,
            hf_file(prefix, ["gate_proj", "up_proj", "down_proj"]),
        ),
        (WeightLayout::MegatronGrouped, megatron_file(prefix)),
    ];
    for (layout, tensors) in files {
        let bytes = write_file(&tensors);
        let b = HostMoeWeights::<bf16>::from_safetensors(&bytes, prefix, layout).unwrap();
        check_loaded(&b, bf16::to_f32, &format!("{layout:?} as bf16"));
        let h = HostMoeWeights::<f16>::from_safetensors(&bytes, prefix, layout).unwrap();
        check_loaded(&h, f16::to_f32, &format!("{layout:?} as f16"));

        // Saved back: the same names, shapes and elements as the hand-written file.
        let saved = b.to_safetensors(prefix, layout).unwrap();
        let st = safetensors::SafeTensors::deserialize(&saved).unwrap();
        assert_eq!(st.len(), tensors.len(), "{layout:?}: tensor count");
        for (name, shape, data) in &tensors {
            let t = st.tensor(name).unwrap();
            assert_eq!(t.dtype(), Dtype::BF16, "{name}");
            assert_eq!(t.shape(), &shape[..], "{name}");
            let got: Vec<f32> = t
                .data()
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect();
            let want: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }
}

fn weights_error(r: remoe_kernels::Result<HostMoeWeights<bf16>>) -> WeightsError {
    match r {
        Err(Error::Weights(e)) => e,
        other => panic!("expected a weights error, got {other:?}"),
    }
}

#[test]
fn bad_files_give_typed_errors() {
    let p = "m.";
    let load = |t: &[(String, Vec<usize>, Vec<u8>)], layout| {
        HostMoeWeights::<bf16>::from_safetensors(&write_file(t), p, layout)
    };

    // A missing expert tensor, and a missing router.
    let mut t = hf_file(p, ["w1", "w3", "w2"]);
    t.retain(|(n, _, _)| n != "m.experts.2.w3.weight");
    assert_eq!(
        weights_error(load(&t, WeightLayout::Mixtral)),
        WeightsError::Missing {
            name: "m.experts.2.w3.weight".into()
        }
    );
    assert!(matches!(
        weights_error(load(&hf_file(p, ["w1", "w3", "w2"]), WeightLayout::MegatronGrouped)),
        WeightsError::Missing { name } if name == "m.router.weight"
    ));
    // The wrong names for the layout asked for.
    assert!(matches!(
        weights_error(load(&hf_file(p, ["w1", "w3", "w2"]), WeightLayout::GateUpDown)),
        WeightsError::Missing { name } if name == "m.experts.0.gate_proj.weight"
    ));

    // A down projection stored the crate's way round ([F, H] instead of nn.Linear's [H, F]).
    let mut t = hf_file(p, ["w1", "w3", "w2"]);
    let d = t
        .iter_mut()
        .find(|(n, _, _)| n == "m.experts.1.w2.weight")
        .unwrap();
    d.1 = vec![F, H];
    assert_eq!(
        weights_error(load(&t, WeightLayout::Mixtral)),
        WeightsError::Shape {
            name: "m.experts.1.w2.weight".into(),
            expected: vec![H, F],
            actual: vec![F, H],
        }
    );

    // Megatron: weight1's columns not 2F per expert, weight2 of another F, a 3-D router.
    let mut t = megatron_file(p);
    t[1].1 = vec![2 * H, E * F];
    assert!(matches!(
        weights_error(load(&t, WeightLayout::MegatronGrouped)),
        WeightsError::Shape { name, .. } if name == "m.experts.weight1"
    ));
    let mut t = megatron_file(p);
    t[2].1 = vec![E * F / 2, 2 * H];
    assert_eq!(
        weights_error(load(&t, WeightLayout::MegatronGrouped)),
        WeightsError::Shape {
            name: "m.experts.weight2".into(),
            expected: vec![E * F, H],
            actual: vec![E * F / 2, 2 * H],
        }
    );
    let mut t = megatron_file(p);
    t[0].1 = vec![E, H, 1];
    assert!(matches!(
        weights_error(load(&t, WeightLayout::MegatronGrouped)),
        WeightsError::Shape { name, .. } if name == "m.router.weight"
    ));

    // A dtype the layer cannot take.
    let mut t = megatron_file(p);
    let bytes = {
        let views: Vec<(String, TensorView)> = t
            .iter_mut()
            .map(|(n, s, d)| {
                let dtype = if n.ends_with("weight2") {
                    Dtype::I32
                } else {
                    Dtype::F32
                };
                (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap())
            })
            .collect();
        safetensors::serialize(views, None::<HashMap<String, String>>).unwrap()
    };
    assert!(matches!(
        weights_error(HostMoeWeights::from_safetensors(&bytes, p, WeightLayout::MegatronGrouped)),
        WeightsError::Dtype { name, .. } if name == "m.experts.weight2"
    ));

    // Not a safetensors file; no file at all; nothing to detect.
    assert!(matches!(
        weights_error(HostMoeWeights::from_safetensors(
            b"not a file",
            p,
            WeightLayout::Mixtral
        )),
        WeightsError::Format(_)
    ));
    let dir = TempDir::new("errors");
    assert!(matches!(
        weights_error(HostMoeWeights::load(
            dir.0.join("absent.safetensors"),
            p,
            WeightLayout::Mixtral
        )),
        WeightsError::Io(_)
    ));
    let empty = write_file(&[]);
    assert!(matches!(
        WeightLayout::detect(&empty, p),
        Err(Error::Weights(WeightsError::Missing { .. }))
    ));

    // Host weights whose buffers are not their sizes' are refused when made.
    let params = LayerParams {
        router: vec![bf16::ZERO; H * E],
        gate: vec![bf16::ZERO; E * H * F],
        up: vec![bf16::ZERO; E * H * F - 1],
        down: vec![bf16::ZERO; E * F * H],
    };
    assert!(matches!(
        HostMoeWeights::new(H, F, E, params),
        Err(Error::LengthMismatch {
            what: "up weight",
            ..
        })
    ));
}
