//! The checkpoint loader (src/weights.rs) on random files, on the CPU. A checkpoint is untrusted
//! input, so whatever its bytes, loading it in any layout must give the weights or
//! `Error::Weights`: a panic fails the case, and so does any single allocation larger than the
//! file justifies (a global allocator here records the largest request). What is generated is
//! kept small (a tensor's data at most 16 KiB), so a correct loader never needs more than a
//! few MB; a declared size larger than that comes with too few bytes, which the file format
//! itself refuses, or with a zero dimension, which leaves nothing to back the others.
//!
//! Three kinds of file: files built from a layout's tensor list with random sizes (zero and
//! huge among them), dtypes and shapes, with tensors dropped, renamed and added; valid files
//! truncated, with bytes flipped or header numbers replaced; and, as a control, valid files
//! that must load. Proptest's defaults are kept: 256 cases a test (`PROPTEST_CASES` changes it),
//! and a failing case is kept in tests/weights_fuzz.proptest-regressions to be tried first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use remoe_kernels::{Error, HalfElement, HostMoeWeights, WeightLayout};
use safetensors::tensor::Dtype;

/// Records the largest single allocation this thread asks for; the loader's bound is checked
/// per call, and proptest runs each case on the test's own thread.
struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: an allocation during the thread's teardown must not panic here.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is passed to the system allocator unchanged; recording a size touches a
// const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

const PREFIX: &str = "m.";

/// The most bytes of data a generated tensor gets; a tensor that declares more gets a few
/// bytes only, and the file is malformed.
const TENSOR_BYTES: usize = 16 << 10;

/// The loader's output holds at most as many elements as the file's tensors, each at most as
/// wide, and its parse of the header a small multiple of the header; 4x the file and a fixed
/// slack is far below the gigabytes an unchecked product of declared sizes asks for.
fn allocation_bound(file: &[u8]) -> usize {
    4 * file.len() + (256 << 10)
}

/// `from_safetensors` as `T`, checked: Ok or Err(Error::Weights(..)), within the allocation
/// bound, and when Ok, weights that save and load back bit for bit.
fn load_checked<T: HalfElement>(
    file: &[u8],
    layout: WeightLayout,
    bits: fn(T) -> u16,
) -> Option<HostMoeWeights<T>> {
    LARGEST.with(|l| l.set(0));
    let result = HostMoeWeights::<T>::from_safetensors(file, PREFIX, layout);
    let largest = LARGEST.with(Cell::get);
    assert!(
        largest <= allocation_bound(file),
        "{layout:?}: an allocation of {largest} bytes for a file of {} bytes",
        file.len()
    );
    let w = match result {
        Ok(w) => w,
        Err(Error::Weights(_)) => return None,
        Err(other) => panic!("{layout:?}: not a weights error: {other:?}"),
    };
    let (h, f, e) = (w.hidden(), w.ffn(), w.experts());
    assert!(h > 0 && f > 0 && e > 0, "{layout:?}: sizes {h}, {f}, {e}");
    let saved = w
        .to_safetensors(PREFIX, layout)
        .expect("loaded weights save");
    let back = HostMoeWeights::<T>::from_safetensors(&saved, PREFIX, layout)
        .expect("saved weights load back");
    assert_eq!(
        (back.hidden(), back.ffn(), back.experts()),
        (h, f, e),
        "{layout:?}"
    );
    let as_bits = |w: &HostMoeWeights<T>| -> [Vec<u16>; 4] {
        let p = w.params();
        [&p.router, &p.gate, &p.up, &p.down].map(|v| v.iter().map(|&x| bits(x)).collect())
    };
    // Bits, not values: random bytes hold NaNs.
    assert!(as_bits(&back) == as_bits(&w), "{layout:?}: round trip");
    Some(w)
}

/// The file in every layout, as bf16 and as f16; and layout detection, which must not panic
/// either. Whether the file loaded in `layout` (as bf16).
fn load_everywhere(file: &[u8], layout: WeightLayout) -> bool {
    let _ = WeightLayout::detect(file, PREFIX);
    for other in WeightLayout::ALL {
        let _ = load_checked::<f16>(file, other, f16::to_bits);
        if other != layout {
            let _ = load_checked::<bf16>(file, other, bf16::to_bits);
        }
    }
    load_checked::<bf16>(file, layout, bf16::to_bits).is_some()
}

/// A tensor as the header declares it; its data is made when the file is written.
#[derive(Debug, Clone)]
struct Declared {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// The bytes the header's dtype and shape call for, where they do not overflow.
fn declared_bytes(t: &Declared) -> Option<usize> {
    let elements = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    let bits = elements.checked_mul(t.dtype.bitsize())?;
    Some(bits.div_ceil(8))
}

/// A safetensors file holding `tensors` in order, written by hand so that its header may
/// declare anything. A tensor's data is what its shape calls for when that is at most
/// [`TENSOR_BYTES`], else 0 to 6 bytes; the values come from `seed` and include every bit
/// pattern (NaNs, infinities, subnormals).
fn write_file(tensors: &[Declared], seed: u64) -> Vec<u8> {
    let mut header = String::from("{");
    let mut data = Vec::new();
    let mut state = seed | 1;
    for (i, t) in tensors.iter().enumerate() {
        let len = match declared_bytes(t) {
            Some(n) if n <= TENSOR_BYTES => n,
            _ => (seed as usize).wrapping_add(i) % 7,
        };
        let start = data.len();
        data.extend((0..len).map(|_| {
            // xorshift64: cheap, and every byte value turns up.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        }));
        if i > 0 {
            header.push(',');
        }
        // Names are ASCII without quotes or backslashes, so Debug's quoting is JSON's.
        write!(
            header,
            "{:?}:{{\"dtype\":\"{:?}\",\"shape\":{:?},\"data_offsets\":[{start},{}]}}",
            t.name,
            t.dtype,
            t.shape,
            data.len()
        )
        .unwrap();
    }
    header.push('}');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    file
}

/// The tensors a layout stores for E, H, F (the Hugging Face layouts' first four experts at
/// most, so a large E always lacks some), every one in `dtype`. Products wrap: a declared
/// shape may be anything.
fn layout_tensors(
    layout: WeightLayout,
    (e, h, f): (usize, usize, usize),
    dtype: Dtype,
) -> Vec<Declared> {
    let t = |name: String, shape: Vec<usize>| Declared { name, dtype, shape };
    let router = match layout {
        WeightLayout::MegatronGrouped => "router",
        _ => "gate",
    };
    let mut out = vec![t(format!("{PREFIX}{router}.weight"), vec![e, h])];
    let projections = match layout {
        WeightLayout::Mixtral => ["w1", "w3", "w2"],
        WeightLayout::GateUpDown => ["gate_proj", "up_proj", "down_proj"],
        WeightLayout::MegatronGrouped => {
            let ef = e.wrapping_mul(f);
            out.push(t(
                format!("{PREFIX}experts.weight1"),
                vec![h, ef.wrapping_mul(2)],
            ));
            out.push(t(format!("{PREFIX}experts.weight2"), vec![ef, h]));
            return out;
        }
    };
    for j in 0..e.min(4) {
        for (p, shape) in projections.iter().zip([[f, h], [f, h], [h, f]]) {
            out.push(t(format!("{PREFIX}experts.{j}.{p}.weight"), shape.to_vec()));
        }
    }
    out
}

/// Mostly small, sometimes zero, sometimes large enough that only a zero beside it keeps the
/// data small, sometimes so large that products overflow.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 1usize..=4,
        2 => Just(0usize),
        1 => select(vec![5usize, 8, 16, 1000, 4096]),
        1 => select(vec![1usize << 20, 1 << 32, 1 << 62, usize::MAX / 2 + 1, usize::MAX]),
    ]
}

/// Sizes for a layout's tensors: any of [`size`]'s, or a large E and F with a small H, whose
/// router and expert tensors each hold little data while E·H·F is millions of elements (the
/// Hugging Face layouts then lack all but four experts).
fn dims() -> impl Strategy<Value = (usize, usize, usize)> {
    prop_oneof![
        3 => (size(), size(), size()),
        1 => (512usize..=2048, 1usize..=2, 512usize..=2048),
    ]
}

const READABLE: [Dtype; 3] = [Dtype::BF16, Dtype::F16, Dtype::F32];

fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![
        6 => select(READABLE.to_vec()),
        1 => select(vec![
            Dtype::BOOL,
            Dtype::F4,
            Dtype::F6_E2M3,
            Dtype::F6_E3M2,
            Dtype::U8,
            Dtype::I8,
            Dtype::F8_E5M2,
            Dtype::F8_E4M3,
            Dtype::F8_E8M0,
            Dtype::I16,
            Dtype::U16,
            Dtype::I32,
            Dtype::U32,
            Dtype::C64,
            Dtype::F64,
            Dtype::I64,
            Dtype::U64,
        ]),
    ]
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(size(), 0..=4)
}

/// Names a layer's reader might look up, and some it must ignore.
fn name() -> impl Strategy<Value = String> {
    let expert =
        prop_oneof![0usize..6, select(vec![1usize << 20, usize::MAX])].prop_map(|j| j.to_string());
    let index = prop_oneof![
        4 => expert,
        1 => select(vec!["", "01", "+1", "x", "99999999999999999999999"]).prop_map(str::to_string),
    ];
    let projection = select(vec!["w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"]);
    prop_oneof![
        2 => (index, projection).prop_map(|(j, p)| format!("{PREFIX}experts.{j}.{p}.weight")),
        1 => select(vec![
            "m.gate.weight",
            "m.router.weight",
            "m.experts.weight1",
            "m.experts.weight2",
            "m.experts.0.w1.bias",
            "other.gate.weight",
        ])
        .prop_map(str::to_string),
    ]
}

/// A change to a layout's tensor list; indices wrap around the list.
#[derive(Debug, Clone)]
enum Edit {
    Drop(Index),
    Reshape(Index, Vec<usize>),
    Retype(Index, Dtype),
    /// One tensor takes another's name: the header then names it twice.
    Rename(Index, Index),
    Add(Declared),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<Index>().prop_map(Edit::Drop),
        (any::<Index>(), shape()).prop_map(|(i, s)| Edit::Reshape(i, s)),
        (any::<Index>(), dtype()).prop_map(|(i, d)| Edit::Retype(i, d)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| Edit::Rename(i, j)),
        (name(), dtype(), shape()).prop_map(|(name, dtype, shape)| Edit::Add(Declared {
            name,
            dtype,
            shape
        })),
    ]
}

fn apply(tensors: &mut Vec<Declared>, edit: &Edit) {
    if let Edit::Add(t) = edit {
        tensors.push(t.clone());
        return;
    }
    if tensors.is_empty() {
        return;
    }
    let n = tensors.len();
    match edit {
        Edit::Drop(i) => {
            tensors.remove(i.index(n));
        }
        Edit::Reshape(i, s) => tensors[i.index(n)].shape = s.clone(),
        Edit::Retype(i, d) => tensors[i.index(n)].dtype = *d,
        Edit::Rename(i, j) => tensors[i.index(n)].name = tensors[j.index(n)].name.clone(),
        Edit::Add(_) => unreachable!("handled above"),
    }
}

fn layout() -> impl Strategy<Value = WeightLayout> {
    select(WeightLayout::ALL.to_vec())
}

/// Sizes with which a layout's file is valid and small.
fn small_dims() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..=4, 1usize..=6, 1usize..=6)
}

/// A change to a file's bytes.
#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(Index),
    /// XOR a byte with a nonzero mask.
    Flip(Index, u8),
    /// A new header length, whatever the header is.
    HeaderLength(u64),
    Append(Vec<u8>),
    /// The header's i-th run of digits replaced by a number, the header length kept right:
    /// a parseable header whose shapes and offsets disagree with each other or the data.
    Number(Index, u64),
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..=20,
        select(vec![
            255u64,
            256,
            4096,
            1 << 20,
            1 << 31,
            1 << 32,
            1 << 62,
            u64::MAX,
            100_000_001,
        ]),
        any::<u64>(),
    ]
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        1 => any::<Index>().prop_map(ByteEdit::Truncate),
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| ByteEdit::Flip(i, m)),
        1 => interesting_u64().prop_map(ByteEdit::HeaderLength),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(ByteEdit::Append),
        3 => (any::<Index>(), interesting_u64()).prop_map(|(i, v)| ByteEdit::Number(i, v)),
    ]
}

fn apply_bytes(file: &mut Vec<u8>, edit: &ByteEdit) {
    match edit {
        ByteEdit::Truncate(i) => file.truncate(i.index(file.len().max(1))),
        ByteEdit::Flip(i, mask) => {
            if !file.is_empty() {
                let at = i.index(file.len());
                file[at] ^= mask;
            }
        }
        ByteEdit::HeaderLength(n) => {
            if file.len() >= 8 {
                file[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
        ByteEdit::Append(bytes) => file.extend_from_slice(bytes),
        ByteEdit::Number(i, value) => {
            let Some(n) = file
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
            else {
                return;
            };
            let Some(header) = file.get(8..8usize.saturating_add(n)) else {
                return;
            };
            let mut runs = Vec::new();
            let mut k = 0;
            while k < header.len() {
                if header[k].is_ascii_digit() {
                    let start = k;
                    while k < header.len() && header[k].is_ascii_digit() {
                        k += 1;
                    }
                    runs.push(start..k);
                } else {
                    k += 1;
                }
            }
            if runs.is_empty() {
                return;
            }
            let run = runs[i.index(runs.len())].clone();
            let digits = value.to_string();
            let new_len = n - run.len() + digits.len();
            file.splice(8 + run.start..8 + run.end, digits.bytes());
            file[..8].copy_from_slice(&(new_len as u64).to_le_bytes());
        }
    }
}

proptest! {
    /// A layout's tensors with random sizes (zero, huge, overflowing) and dtypes, then dropped,
    /// reshaped, retyped, renamed to each other's names, or joined by other tensors.
    #[test]
    fn random_tensor_lists_load_or_give_a_weights_error(
        layout in layout(),
        dims in dims(),
        file_dtype in dtype(),
        edits in prop::collection::vec(edit(), 0..4),
        seed in any::<u64>(),
    ) {
        let mut tensors = layout_tensors(layout, dims, file_dtype);
        for e in &edits {
            apply(&mut tensors, e);
        }
        load_everywhere(&write_file(&tensors, seed), layout);
    }

    /// Valid files, truncated, with bytes flipped, with a new header length, with bytes
    /// appended, or with numbers of the header replaced.
    #[test]
    fn damaged_valid_files_load_or_give_a_weights_error(
        layout in layout(),
        dims in small_dims(),
        file_dtype in select(READABLE.to_vec()),
        edits in prop::collection::vec(byte_edit(), 1..4),
        seed in any::<u64>(),
    ) {
        let mut file = write_file(&layout_tensors(layout, dims, file_dtype), seed);
        for e in &edits {
            apply_bytes(&mut file, e);
        }
        load_everywhere(&file, layout);
    }

    /// The control: without damage the same files load, with the sizes they were written with.
    #[test]
    fn valid_files_load_with_their_sizes(
        layout in layout(),
        (e, h, f) in small_dims(),
        file_dtype in select(READABLE.to_vec()),
        seed in any::<u64>(),
    ) {
        let file = write_file(&layout_tensors(layout, (e, h, f), file_dtype), seed);
        prop_assert!(load_everywhere(&file, layout), "{layout:?} {:?} did not load", (e, h, f));
        let w = load_checked::<f16>(&file, layout, f16::to_bits).unwrap();
        prop_assert_eq!((w.experts(), w.hidden(), w.ffn()), (e, h, f));
    }
}

/// The checked-in corpus of malformed files (tests/corpus/weights/, see tests/weights.rs),
/// under the same allocation bound.
#[test]
fn the_corpus_loads_within_the_allocation_bound() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/weights");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus folder") {
        let path = entry.unwrap().path();
        let file = std::fs::read(&path).unwrap();
        for layout in WeightLayout::ALL {
            assert!(
                load_checked::<bf16>(&file, layout, bf16::to_bits).is_none(),
                "{} loaded as {layout:?}",
                path.display()
            );
        }
        count += 1;
    }
    assert!(count > 0, "no files in {}", dir.display());
}
