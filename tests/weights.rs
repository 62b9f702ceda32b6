//! Weights in and out of safetensors files (src/weights.rs), on the CPU: every layout round-trips
//! in bf16 and f16, files written here by hand in each layout's conventions load into the crate's
//! layout element for element, and bad files give typed errors: one test per kind of malformed
//! file, and every file of the corpus in tests/corpus/weights/ (written by
//! `the_corpus_holds_every_generated_failure_class`; a file found to break the loader elsewhere
//! can be dropped in beside them). tests/weights_fuzz.rs tries random files.

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
    assert_eq!(
        (w.hidden(), w.ffn(), w.experts()),
        (H, F, E),
        "{what}: sizes"
    );
    let p = w.params();
    assert_eq!(to_f32(&p.router, to), want.router, "{what}: router");
    assert_eq!(to_f32(&p.gate, to), want.gate, "{what}: gate");
    assert_eq!(to_f32(&p.up, to), want.up, "{what}: up");
    assert_eq!(to_f32(&p.down, to), want.down, "{what}: down");
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
        WeightsError::Rank { name, expected: 2, .. } if name == "m.router.weight"
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

// Malformed files, one kind at a time. Every file here is small except where the kind needs
// size (a router whose experts would take terabytes). Each kind's file comes from one
// function, which both its test and the corpus use.

/// A tensor as a file's header declares it, with the bytes written for it (which need not be
/// what the declaration calls for).
#[derive(Clone)]
struct Raw {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// 8 bytes of header length, the header, the data: a file with any header at all.
fn file_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(data);
    file
}

/// A safetensors file written by hand, in order and without padding, so that the header may
/// declare anything (names twice, sizes no data backs); the data offsets follow the bytes.
fn raw_file(tensors: &[Raw]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.data);
        // Names here are ASCII without quotes or backslashes: Debug's quoting is JSON's.
        entries.push(format!(
            "{:?}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{start},{}]}}",
            t.name,
            t.dtype,
            t.shape,
            data.len()
        ));
    }
    file_with_header(&format!("{{{}}}", entries.join(",")), &data)
}

fn raw_f32(tensors: Vec<(String, Vec<usize>, Vec<u8>)>) -> Vec<Raw> {
    tensors
        .into_iter()
        .map(|(name, shape, data)| Raw {
            name,
            dtype: "F32",
            shape,
            data,
        })
        .collect()
}

const P: &str = "m.";

fn mixtral() -> Vec<Raw> {
    raw_f32(hf_file(P, ["w1", "w3", "w2"]))
}

fn megatron() -> Vec<Raw> {
    raw_f32(megatron_file(P))
}

/// The tensor of `tensors` named `m.{name}`.
fn tensor<'a>(tensors: &'a mut [Raw], name: &str) -> &'a mut Raw {
    let name = format!("{P}{name}");
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// `t` declared with `shape` and given the f32 bytes that shape calls for (none when a
/// dimension is zero, however large the others).
fn reshape(t: &mut Raw, shape: &[usize]) {
    let elements: usize = if shape.contains(&0) {
        0
    } else {
        shape.iter().product()
    };
    t.shape = shape.to_vec();
    t.data = f32_bytes((0..elements).map(|i| i as f32));
}

fn load_as<T: HalfElement>(file: &[u8], layout: WeightLayout) -> WeightsError {
    match HostMoeWeights::<T>::from_safetensors(file, P, layout) {
        Err(Error::Weights(e)) => e,
        Err(other) => panic!("{layout:?}: expected a weights error, got {other:?}"),
        Ok(w) => panic!(
            "{layout:?}: expected a weights error, got weights of H={}, F={}, E={}",
            w.hidden(),
            w.ffn(),
            w.experts()
        ),
    }
}

/// The error `file` gives in `layout`, of the same kind as bf16 and as f16 (the parser's
/// messages may name either of two tensors that it finds at fault together).
fn refused(file: &[u8], layout: WeightLayout) -> WeightsError {
    let e = load_as::<bf16>(file, layout);
    let as_f16 = load_as::<f16>(file, layout);
    assert_eq!(
        std::mem::discriminant(&as_f16),
        std::mem::discriminant(&e),
        "{layout:?}: {as_f16:?} as f16, {e:?} as bf16"
    );
    e
}

fn megatron_zero_width_weight1() -> Vec<u8> {
    let mut t = megatron();
    reshape(tensor(&mut t, "experts.weight1"), &[H, 0]);
    // F = 0 also makes weight2 [E·F, H] = [0, H]: the shapes agree, and only F = 0 is wrong.
    reshape(tensor(&mut t, "experts.weight2"), &[0, H]);
    raw_file(&t)
}

#[test]
fn a_zero_width_megatron_weight_is_a_weights_error() {
    assert_eq!(
        refused(
            &megatron_zero_width_weight1(),
            WeightLayout::MegatronGrouped
        ),
        WeightsError::ZeroSize {
            name: "m.experts.weight1".into(),
            shape: vec![H, 0],
        }
    );
}

/// A Mixtral router of `experts` × 1 and expert 0's gate of `experts` × 1, both backed by
/// data: E = F = `experts`, H = 1, so E·H·F is `experts`² elements of which the file holds
/// none. `full_expert`: expert 0's up and down too.
fn router_without_experts_behind_it(experts: usize, full_expert: bool) -> Vec<u8> {
    let bf16_zeros = |n: usize| vec![0u8; 2 * n];
    let mut t = vec![
        Raw {
            name: format!("{P}gate.weight"),
            dtype: "F32",
            shape: vec![experts, 1],
            data: vec![0; 4 * experts],
        },
        Raw {
            name: format!("{P}experts.0.w1.weight"),
            dtype: "BF16",
            shape: vec![experts, 1],
            data: bf16_zeros(experts),
        },
    ];
    if full_expert {
        let mut up = t[1].clone();
        up.name = format!("{P}experts.0.w3.weight");
        let mut down = up.clone();
        down.name = format!("{P}experts.0.w2.weight");
        down.shape = vec![1, experts];
        t.extend([up, down]);
    }
    raw_file(&t)
}

/// The 6 MB file of issue 27: before any expert was checked, the loader reserved E·H·F = 2^40
/// elements three times over, and the process aborted.
#[test]
fn a_router_larger_than_its_experts_is_refused_before_allocating() {
    let file = router_without_experts_behind_it(1 << 20, false);
    assert_eq!(file.len() >> 20, 6, "a 6 MB file");
    assert_eq!(
        refused(&file, WeightLayout::Mixtral),
        WeightsError::Missing {
            name: "m.experts.0.w3.weight".into()
        }
    );
    assert_eq!(
        refused(
            &router_without_experts_behind_it(512, true),
            WeightLayout::Mixtral
        ),
        WeightsError::Missing {
            name: "m.experts.1.w1.weight".into()
        }
    );
}

/// Sizes and buffers are checked together when weights are made and cannot be changed apart
/// afterwards (the fields are private), so saving never meets sizes its buffers disagree with:
/// it once panicked on weights whose `ffn` was changed after loading.
#[test]
fn weights_cannot_be_resized_apart_from_their_buffers() {
    let file = raw_file(&mixtral());
    let w = HostMoeWeights::<bf16>::from_safetensors(&file, P, WeightLayout::Mixtral).unwrap();
    for layout in WeightLayout::ALL {
        let saved = w.to_safetensors(P, layout).unwrap();
        let back = HostMoeWeights::<bf16>::from_safetensors(&saved, P, layout).unwrap();
        assert_eq!(back, w, "{layout:?}");
    }

    let (h, f, e) = (w.hidden(), w.ffn(), w.experts());
    let params = w.into_params();
    assert!(matches!(
        HostMoeWeights::new(h, f + 1, e, params.clone()),
        Err(Error::LengthMismatch {
            what: "gate weight",
            ..
        })
    ));
    assert!(matches!(
        HostMoeWeights::new(h, 0, e, params.clone()),
        Err(Error::InvalidConfig(_))
    ));
    // Sizes whose product overflows are refused, not multiplied.
    assert!(matches!(
        HostMoeWeights::new(usize::MAX, 2, e, params.clone()),
        Err(Error::InvalidConfig(_))
    ));
    assert!(HostMoeWeights::new(h, f, e, params).is_ok());
}

#[test]
fn a_truncated_file_is_a_weights_error() {
    for (layout, tensors) in [
        (WeightLayout::Mixtral, mixtral()),
        (WeightLayout::MegatronGrouped, megatron()),
    ] {
        let file = raw_file(&tensors);
        // Every cut: in the length, in the header, in the data.
        for len in 0..file.len() {
            assert!(
                matches!(refused(&file[..len], layout), WeightsError::Format(_)),
                "{layout:?} cut to {len} of {} bytes",
                file.len()
            );
        }
    }
}

fn expert_in_dtype(dtype: &'static str, bits: usize) -> Vec<u8> {
    let mut t = mixtral();
    let w3 = tensor(&mut t, "experts.1.w3.weight");
    w3.dtype = dtype;
    w3.data = vec![0; F * H * bits / 8];
    raw_file(&t)
}

#[test]
fn a_dtype_other_than_bf16_f16_or_f32_is_a_weights_error() {
    for (dtype, bits) in [
        ("BOOL", 8),
        ("F4", 4),
        ("F6_E2M3", 6),
        ("U8", 8),
        ("F8_E4M3", 8),
        ("F8_E5M2", 8),
        ("I16", 16),
        ("U16", 16),
        ("I32", 32),
        ("F64", 64),
        ("C64", 64),
        ("I64", 64),
    ] {
        assert!(
            matches!(
                refused(&expert_in_dtype(dtype, bits), WeightLayout::Mixtral),
                WeightsError::Dtype { name, dtype: d } if name == "m.experts.1.w3.weight" && d == dtype
            ),
            "{dtype}"
        );
    }
    // The router, which gives the sizes, is checked before any expert.
    let mut t = megatron();
    let r = tensor(&mut t, "router.weight");
    r.dtype = "I32";
    assert!(matches!(
        refused(&raw_file(&t), WeightLayout::MegatronGrouped),
        WeightsError::Dtype { name, .. } if name == "m.router.weight"
    ));
}

/// A Mixtral router of `experts` experts beside the file's three.
fn mixtral_router_of(experts: usize) -> Vec<u8> {
    let mut t = mixtral();
    reshape(tensor(&mut t, "gate.weight"), &[experts, H]);
    raw_file(&t)
}

fn megatron_columns_not_2f_per_expert() -> Vec<u8> {
    let mut t = megatron();
    // 2F·E + 2 columns: not a multiple of 2E.
    reshape(tensor(&mut t, "experts.weight1"), &[H, 2 * F * E + 2]);
    raw_file(&t)
}

#[test]
fn inconsistent_expert_counts_are_a_weights_error() {
    // More experts in the file than the router scores: they would be dropped silently.
    assert_eq!(
        refused(&mixtral_router_of(E - 1), WeightLayout::Mixtral),
        WeightsError::Inconsistent {
            name: format!("m.experts.{}.w1.weight", E - 1),
            why: format!("an expert past the {} experts of m.gate.weight", E - 1),
        }
    );
    // Fewer: the first one missing is named.
    assert_eq!(
        refused(&mixtral_router_of(E + 2), WeightLayout::Mixtral),
        WeightsError::Missing {
            name: format!("m.experts.{E}.w1.weight")
        }
    );
    // Megatron's weight1 must hold 2F columns for each of the router's experts.
    assert!(matches!(
        refused(&megatron_columns_not_2f_per_expert(), WeightLayout::MegatronGrouped),
        WeightsError::Inconsistent { name, .. } if name == "m.experts.weight1"
    ));
    // (A router of E + 1 = 4 would pass: weight1's 48 columns are 2F' for each of 4 experts
    // with F' = 6, and weight2's 24 rows are 4·F'. Megatron's shapes cannot tell them apart.)
    let mut t = megatron();
    reshape(tensor(&mut t, "router.weight"), &[E + 2, H]);
    assert!(matches!(
        refused(&raw_file(&t), WeightLayout::MegatronGrouped),
        WeightsError::Inconsistent { name, .. } if name == "m.experts.weight1"
    ));
}

fn mixtral_router_shaped(shape: &[usize]) -> Vec<u8> {
    let mut t = mixtral();
    reshape(tensor(&mut t, "gate.weight"), shape);
    raw_file(&t)
}

fn mixtral_zero_ffn() -> Vec<u8> {
    let mut t = mixtral();
    for j in 0..E {
        reshape(tensor(&mut t, &format!("experts.{j}.w1.weight")), &[0, H]);
        reshape(tensor(&mut t, &format!("experts.{j}.w3.weight")), &[0, H]);
        reshape(tensor(&mut t, &format!("experts.{j}.w2.weight")), &[H, 0]);
    }
    raw_file(&t)
}

/// A zero anywhere lets a header declare any other size with no bytes behind it (a router of
/// 2^62 × 0 is a valid empty tensor), and the layer needs H, F, E ≥ 1 anyway.
#[test]
fn a_zero_size_is_a_weights_error() {
    let zero = |file: &[u8], layout, name: &str, shape: &[usize]| {
        assert_eq!(
            refused(file, layout),
            WeightsError::ZeroSize {
                name: name.into(),
                shape: shape.to_vec(),
            }
        );
    };
    zero(
        &mixtral_router_shaped(&[0, H]),
        WeightLayout::Mixtral,
        "m.gate.weight",
        &[0, H],
    );
    zero(
        &mixtral_router_shaped(&[1 << 62, 0]),
        WeightLayout::Mixtral,
        "m.gate.weight",
        &[1 << 62, 0],
    );
    zero(
        &mixtral_zero_ffn(),
        WeightLayout::Mixtral,
        "m.experts.0.w1.weight",
        &[0, H],
    );
    let mut t = megatron();
    reshape(tensor(&mut t, "router.weight"), &[usize::MAX, 0]);
    zero(
        &raw_file(&t),
        WeightLayout::MegatronGrouped,
        "m.router.weight",
        &[usize::MAX, 0],
    );
}

#[test]
fn a_tensor_of_the_wrong_rank_is_a_weights_error() {
    for shape in [vec![], vec![E * H], vec![E, H, 1], vec![1, E, H, 1]] {
        assert_eq!(
            refused(&mixtral_router_shaped(&shape), WeightLayout::Mixtral),
            WeightsError::Rank {
                name: "m.gate.weight".into(),
                expected: 2,
                actual: shape.clone(),
            }
        );
    }
    let mut t = megatron();
    reshape(tensor(&mut t, "experts.weight1"), &[H * E * 2 * F]);
    assert!(matches!(
        refused(&raw_file(&t), WeightLayout::MegatronGrouped),
        WeightsError::Rank { name, .. } if name == "m.experts.weight1"
    ));
    // A tensor whose shape is known from the others is a shape error.
    let mut t = mixtral();
    reshape(tensor(&mut t, "experts.1.w2.weight"), &[H, F, 1]);
    assert_eq!(
        refused(&raw_file(&t), WeightLayout::Mixtral),
        WeightsError::Shape {
            name: "m.experts.1.w2.weight".into(),
            expected: vec![H, F],
            actual: vec![H, F, 1],
        }
    );
}

fn mixtral_expert_reshaped(name: &str, shape: &[usize]) -> Vec<u8> {
    let mut t = mixtral();
    reshape(tensor(&mut t, name), shape);
    raw_file(&t)
}

#[test]
fn an_expert_whose_hidden_or_ffn_disagrees_is_a_weights_error() {
    for (name, shape, expected) in [
        ("experts.0.w1.weight", [F, H + 1], [F, H]),
        ("experts.1.w1.weight", [F / 2, H], [F, H]),
        ("experts.2.w2.weight", [H, F / 2], [H, F]),
        ("experts.2.w3.weight", [F, 2 * H], [F, H]),
    ] {
        assert_eq!(
            refused(
                &mixtral_expert_reshaped(name, &shape),
                WeightLayout::Mixtral
            ),
            WeightsError::Shape {
                name: format!("{P}{name}"),
                expected: expected.to_vec(),
                actual: shape.to_vec(),
            }
        );
    }
    let mut t = megatron();
    reshape(tensor(&mut t, "experts.weight2"), &[E * F, H + 1]);
    assert!(matches!(
        refused(&raw_file(&t), WeightLayout::MegatronGrouped),
        WeightsError::Shape { name, .. } if name == "m.experts.weight2"
    ));
}

/// Files whose header or framing is wrong, whatever their tensors: (corpus name, bytes).
fn broken_framing() -> Vec<(&'static str, Vec<u8>)> {
    let valid = raw_file(&mixtral());
    let with_length = |n: u64| {
        let mut f = valid.clone();
        f[..8].copy_from_slice(&n.to_le_bytes());
        f
    };
    let mut trailing = valid.clone();
    trailing.extend_from_slice(b"tail");
    let mut not_utf8 = valid.clone();
    not_utf8[9] = 0xff;
    // The router declared twice, the second time over other bytes: one of the two is left
    // out of the data the offsets cover.
    let mut twice = mixtral();
    let mut again = twice[0].clone();
    again.data = f32_bytes((0..E * H).map(|i| -(i as f32)));
    twice.push(again);
    // Two tensors over the same bytes.
    let overlap = file_with_header(
        &format!(
            "{{\"{P}gate.weight\":{{\"dtype\":\"F32\",\"shape\":[{E},{H}],\"data_offsets\":[0,{n}]}},\
             \"{P}experts.0.w1.weight\":{{\"dtype\":\"F32\",\"shape\":[{E},{H}],\"data_offsets\":[0,{n}]}}}}",
            n = 4 * E * H
        ),
        &[0; 4 * E * H],
    );
    vec![
        ("empty", Vec::new()),
        ("not-safetensors", b"not a safetensors file".to_vec()),
        ("header-length-past-end", with_length(valid.len() as u64)),
        ("header-length-u64-max", with_length(u64::MAX)),
        ("header-length-over-100-mb", with_length(100_000_001)),
        (
            "header-not-json",
            file_with_header("{\"m.gate.weight\": [", &[]),
        ),
        ("header-not-utf8", not_utf8),
        ("no-tensors", file_with_header("{}", &[])),
        ("bytes-after-the-data", trailing),
        ("name-declared-twice", raw_file(&twice)),
        ("data-offsets-overlap", overlap),
        (
            "shape-overflows-usize",
            raw_file(&[Raw {
                name: format!("{P}gate.weight"),
                dtype: "F32",
                shape: vec![1 << 32, 1 << 32],
                data: Vec::new(),
            }]),
        ),
        ("truncated-data", valid[..valid.len() - 3].to_vec()),
    ]
}

#[test]
fn a_header_that_misstates_the_file_is_a_weights_error() {
    for (what, file) in broken_framing() {
        for layout in WeightLayout::ALL {
            let e = refused(&file, layout);
            let expected_missing = what == "no-tensors";
            assert!(
                if expected_missing {
                    matches!(e, WeightsError::Missing { .. })
                } else {
                    matches!(e, WeightsError::Format(_))
                },
                "{what} as {layout:?}: {e:?}"
            );
        }
    }
}

#[test]
fn every_missing_tensor_is_named_in_a_weights_error() {
    for (layout, tensors) in [
        (WeightLayout::Mixtral, mixtral()),
        (
            WeightLayout::GateUpDown,
            raw_f32(hf_file(P, ["gate_proj", "up_proj", "down_proj"])),
        ),
        (WeightLayout::MegatronGrouped, megatron()),
    ] {
        assert!(HostMoeWeights::<bf16>::from_safetensors(&raw_file(&tensors), P, layout).is_ok());
        for i in 0..tensors.len() {
            let mut t = tensors.clone();
            let gone = t.remove(i);
            assert_eq!(
                refused(&raw_file(&t), layout),
                WeightsError::Missing { name: gone.name },
                "{layout:?}"
            );
        }
    }
}

/// Every kind of malformed file above, named for its kind: the corpus's generated part.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("megatron-weight1-zero-width", megatron_zero_width_weight1()),
        (
            "mixtral-router-without-experts-behind-it",
            router_without_experts_behind_it(512, true),
        ),
        ("mixtral-expert-dtype-i32", expert_in_dtype("I32", 32)),
        ("mixtral-expert-dtype-f4", expert_in_dtype("F4", 4)),
        ("mixtral-experts-past-the-router", mixtral_router_of(E - 1)),
        ("mixtral-experts-missing", mixtral_router_of(E + 2)),
        (
            "megatron-weight1-columns-not-2f-per-expert",
            megatron_columns_not_2f_per_expert(),
        ),
        (
            "mixtral-router-zero-experts",
            mixtral_router_shaped(&[0, H]),
        ),
        (
            "mixtral-router-zero-hidden-huge-experts",
            mixtral_router_shaped(&[1 << 62, 0]),
        ),
        ("mixtral-experts-zero-ffn", mixtral_zero_ffn()),
        ("mixtral-router-rank-0", mixtral_router_shaped(&[])),
        ("mixtral-router-rank-3", mixtral_router_shaped(&[E, H, 1])),
        (
            "mixtral-expert-hidden-mismatch",
            mixtral_expert_reshaped("experts.0.w1.weight", &[F, H + 1]),
        ),
        (
            "mixtral-expert-ffn-mismatch",
            mixtral_expert_reshaped("experts.1.w1.weight", &[F / 2, H]),
        ),
    ];
    files.extend(broken_framing());
    files
        .into_iter()
        .map(|(name, bytes)| (format!("{name}.safetensors"), bytes))
        .collect()
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/weights")
}

/// The corpus is checked in so that it stays put while the generator changes; with
/// `REMOE_WRITE_CORPUS=1` this test writes it instead of comparing.
#[test]
fn the_corpus_holds_every_generated_failure_class() {
    let dir = corpus_dir();
    let write = std::env::var("REMOE_WRITE_CORPUS").as_deref() == Ok("1");
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in corpus() {
        assert!(bytes.len() <= 8 << 10, "{name}: {} bytes", bytes.len());
        let path = dir.join(&name);
        if write {
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let kept = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (REMOE_WRITE_CORPUS=1 writes the corpus)",
                    path.display()
                )
            });
            assert!(
                kept == bytes,
                "{name} differs from its generator (REMOE_WRITE_CORPUS=1 rewrites it)"
            );
        }
    }
}

#[test]
fn every_file_in_the_corpus_is_a_weights_error() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("the corpus folder")
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= corpus().len(), "{files:?}");
    for path in files {
        let file = std::fs::read(&path).unwrap();
        for layout in WeightLayout::ALL {
            // Also through `load`, the path a checkpoint takes.
            assert!(
                matches!(
                    HostMoeWeights::<bf16>::load(&path, P, layout),
                    Err(Error::Weights(_))
                ),
                "{} as {layout:?}",
                path.display()
            );
            refused(&file, layout);
        }
        match WeightLayout::detect(&file, P) {
            Ok(_) | Err(Error::Weights(_)) => {}
            Err(other) => panic!("{}: detect gave {other:?}", path.display()),
        }
    }
}
