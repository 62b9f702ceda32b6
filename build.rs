//! Compiles kernels/*.cu with nvcc into one static library (a fat binary: SASS for each GPU target
//! plus portable PTX), links the CUDA runtime statically and generates the FFI bindings of
//! kernels/remoe_kernels.h.
//!
//! Where nvcc is looked for, in order: `$NVCC`; `$CUDA_HOME/bin`, `$CUDA_PATH/bin`; `PATH`;
//! `/usr/local/cuda/bin`; the project's pinned toolchain in `.toolchain/` (installed by
//! `scripts/with-cuda`). A toolkit too old for a requested target is a build error that says so.
//!
//! GPU targets: `REMOE_CUDA_ARCHS`, a comma-separated list. `80`, `90a`, `sm_100a` (SASS for that
//! chip) or `compute_80` (PTX for that virtual architecture, compiled by the driver on newer
//! chips). Default [`DEFAULT_TARGETS`]: SASS for Ampere (sm_80, also running on sm_86/sm_89) and
//! Hopper (sm_90a, the only target with the wgmma kernels), and compute_80 PTX for every later
//! chip (sm_90a PTX would not be forward-compatible).
//!
//! With `DOCS_RS` set (docs.rs has no CUDA compiler), nothing is compiled: the bindings come from
//! the pre-generated copy in `src/sys_bindings.rs`, which CI keeps equal to bindgen's output.
//!
//! What makes cargo run this script again: a change under kernels/, to the nvcc binary in use,
//! to src/sys_bindings.rs, or to one of [`TRACKED_ENV`]. `PATH` is deliberately not tracked:
//! `cargo build` and `scripts/with-cuda cargo build` (which prepends the pinned nvcc to PATH)
//! resolve the same compiler here and share one build. To switch to another CUDA installation,
//! set `NVCC` or `CUDA_HOME` (tracked), or `cargo clean`. A rerun recompiles the kernels only
//! when their fingerprint (compile command, targets, every file under kernels/) changed.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Where `scripts/with-cuda` installs the pinned CUDA 13.0 wheels (GPU.md).
const PINNED_SITE: &str = ".toolchain/py";
/// bindgen's output for kernels/remoe_kernels.h, kept in the repository for docs.rs.
const PREGENERATED_BINDINGS: &str = "src/sys_bindings.rs";
/// The GPU targets when `REMOE_CUDA_ARCHS` is not set.
const DEFAULT_TARGETS: &str = "80,90a,compute_80";
/// The environment variables whose change reruns this script.
const TRACKED_ENV: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "REMOE_CUDA_ARCHS",
    "LIBCLANG_PATH",
    "DOCS_RS",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for var in TRACKED_ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");

    let targets = cuda_targets();
    // For the safe layer's check that the device can run what was built (Device::new).
    let list: Vec<String> = targets.iter().map(Target::to_string).collect();
    println!("cargo:rustc-env=REMOE_CUDA_TARGETS={}", list.join(","));

    // docs.rs builds from this copy; other builds compare it with bindgen's output.
    println!("cargo:rerun-if-changed={PREGENERATED_BINDINGS}");
    if env::var_os("DOCS_RS").is_some() {
        // docs.rs: no nvcc, no libclang. Documentation needs the Rust items only.
        std::fs::copy(
            manifest.join(PREGENERATED_BINDINGS),
            out.join("bindings.rs"),
        )
        .expect("copy the pre-generated bindings");
        return;
    }

    let nvcc = find_nvcc(&manifest).unwrap_or_else(|| {
        fail(
            "no CUDA compiler (nvcc) found: looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, \
             /usr/local/cuda/bin and .toolchain/. Fix: run the build through \
             `scripts/with-cuda cargo build` (it installs the pinned CUDA 13.0 toolchain into \
             .toolchain/ once), or set NVCC=/path/to/nvcc.",
        )
    });
    // A reinstalled or upgraded toolkit at the same place rebuilds the kernels.
    println!("cargo:rerun-if-changed={}", nvcc.display());
    let version = nvcc_version(&nvcc);
    check_targets(&targets, version, &nvcc);
    let cuda_root = nvcc
        .parent()
        .and_then(Path::parent)
        .expect("nvcc lives in <cuda>/bin")
        .to_path_buf();

    compile_kernels(&manifest, &nvcc, &cuda_root, &targets);
    link_cuda_runtime(&cuda_root);
    generate_bindings(&manifest, &out);
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        if !p.is_file() {
            fail(&format!("NVCC={} is not a file", p.display()));
        }
        return Some(p);
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            candidates.push(PathBuf::from(root).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(manifest.join(PINNED_SITE).join("nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

/// The CUDA release of `nvcc` (`release 13.0` in `nvcc --version`), as (major, minor).
fn nvcc_version(nvcc: &Path) -> (u32, u32) {
    let output = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            fail(&format!(
                "could not run `{} --version`: {e}",
                nvcc.display()
            ))
        });
    let text = String::from_utf8_lossy(&output.stdout);
    parse_release(&text).unwrap_or_else(|| {
        fail(&format!(
            "could not read the CUDA release from `{} --version` (exit {}): {text}",
            nvcc.display(),
            output.status
        ))
    })
}

fn parse_release(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("release ").nth(1)?;
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = number.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// One nvcc code target: SASS for a real architecture or PTX for a virtual one.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    /// `90` of sm_90a.
    number: u32,
    /// "", "a" (architecture-specific) or "f" (family-specific).
    suffix: String,
    ptx: bool,
}

impl Target {
    fn parse(entry: &str) -> Result<Self, String> {
        let (ptx, rest) = if let Some(r) = entry.strip_prefix("compute_") {
            (true, r)
        } else {
            (false, entry.strip_prefix("sm_").unwrap_or(entry))
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let suffix = &rest[digits.len()..];
        if digits.len() < 2 || !matches!(suffix, "" | "a" | "f") {
            return Err(format!(
                "`{entry}` is not a GPU target: expected e.g. `80`, `90a`, `sm_100a` (SASS) or \
                 `compute_80` (PTX)"
            ));
        }
        Ok(Self {
            number: digits
                .parse()
                .map_err(|_| format!("`{entry}`: bad number"))?,
            suffix: suffix.to_string(),
            ptx,
        })
    }

    fn gencode(&self) -> String {
        let virt = format!("compute_{}{}", self.number, self.suffix);
        if self.ptx {
            format!("-gencode=arch={virt},code={virt}")
        } else {
            format!(
                "-gencode=arch={virt},code=sm_{}{}",
                self.number, self.suffix
            )
        }
    }

    /// The first CUDA release whose nvcc knows this target, where known.
    fn min_cuda(&self) -> Option<(u32, u32)> {
        if self.suffix == "f" {
            return Some((12, 9));
        }
        let plain = match self.number {
            75 => (10, 0),
            80 => (11, 0),
            86 => (11, 1),
            87 => (11, 4),
            89 | 90 => (11, 8),
            100 | 101 | 120 => (12, 8),
            103 | 121 => (12, 9),
            110 => (13, 0),
            _ => return None,
        };
        if self.suffix == "a" {
            // The arch-specific feature sets arrived with CUDA 12.0 (sm_90a).
            return Some(plain.max((12, 0)));
        }
        Some(plain)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.ptx { "compute" } else { "sm" };
        write!(f, "{kind}_{}{}", self.number, self.suffix)
    }
}

fn cuda_targets() -> Vec<Target> {
    let spec = env::var("REMOE_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_TARGETS.to_string());
    let mut list = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match Target::parse(entry) {
            Ok(t) if !list.contains(&t) => list.push(t),
            Ok(_) => {}
            Err(e) => fail(&format!("REMOE_CUDA_ARCHS={spec:?}: {e}")),
        }
    }
    if list.is_empty() {
        fail("REMOE_CUDA_ARCHS is empty: give targets such as `90a` or `80,90a,compute_80`");
    }
    list
}

fn check_targets(targets: &[Target], version: (u32, u32), nvcc: &Path) {
    let too_new: Vec<String> = targets
        .iter()
        .filter_map(|t| {
            let need = t.min_cuda()?;
            (version < need).then(|| format!("{t} needs CUDA >= {}.{}", need.0, need.1))
        })
        .collect();
    if !too_new.is_empty() {
        fail(&format!(
            "{} is CUDA {}.{}, too old for the requested GPU targets: {}. Fix: point NVCC (or \
             CUDA_HOME) at a newer toolkit (the project's pinned CUDA 13.0, which \
             `scripts/with-cuda` installs where no nvcc is found, is \
             .toolchain/py/nvidia/cu13/bin/nvcc), or choose other targets with \
             REMOE_CUDA_ARCHS (default {DEFAULT_TARGETS}).",
            nvcc.display(),
            version.0,
            version.1,
            too_new.join("; ")
        ));
    }
}

fn compile_kernels(manifest: &Path, nvcc: &Path, cuda_root: &Path, targets: &[Target]) {
    let kernel_dir = manifest.join("kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernel_dir)
        .expect("kernels/ exists")
        .map(|e| e.expect("readable kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    // cc wraps host-compiler flags for nvcc only when it finds nvcc itself, which it does
    // through $NVCC (passing the path to `.compiler()` would make it treat nvcc as gcc).
    // (set_var: no other thread exists yet.)
    env::set_var("NVCC", nvcc);
    let mut base = cc::Build::new();
    base.cuda(true)
        .cudart("static")
        // Device code is always optimised, in every cargo profile: cc's debug mode would add -G,
        // which makes kernels an order of magnitude slower. -lineinfo keeps source lines for
        // compute-sanitizer and ncu.
        .debug(false)
        .opt_level(3)
        .include(&kernel_dir)
        .include(cuda_root.join("include"))
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-lineinfo")
        .flag("--expt-relaxed-constexpr")
        // Warnings about unused variables in templates are not worth a broken build; real
        // errors still are.
        .flag("-Xcudafe=--diag_suppress=177")
        .warnings(false);
    for t in targets {
        base.flag(t.gencode());
    }

    // This script also reruns for reasons that leave the kernels as they were (the bindings'
    // copy, an environment variable, a touched file): then the library of the last run is kept.
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let stamp = out.join("remoe_kernels.fingerprint");
    let fingerprint = kernel_fingerprint(&base, &kernel_dir, targets);
    let mut library = out.join("libremoe_kernels.a");
    let unchanged = std::fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint);
    if !(unchanged && library.is_file()) {
        // Each .cu is compiled on its own (one file per cc build): cc compiles a build of several
        // CUDA files as relocatable device code (--device-c), and with it ptxas ignores
        // setmaxnreg and serialises wgmma ("extern calls"), which costs the Hopper kernels half
        // their speed. No kernel calls device code in another file, so whole-program compilation
        // per file loses nothing, and the objects need no device link. The files compile in
        // parallel.
        let _ = std::fs::remove_file(&stamp);
        let objects = compile_in_parallel(&base, &sources);
        // `base` has no files, so the archive gets no device-link step.
        library = base.create_archive("remoe_kernels", &objects);
        std::fs::write(&stamp, &fingerprint).expect("write the kernels' fingerprint");
    }
    cc::emit_link_directives(&base, &library);
}

/// Everything the kernel library depends on: the compiler and its arguments (flags, host
/// compiler, and the flags cc took from the environment), the targets, and the content of every
/// file under kernels/.
fn kernel_fingerprint(base: &cc::Build, kernel_dir: &Path, targets: &[Target]) -> String {
    use std::hash::{Hash, Hasher};
    let tool = base.get_compiler();
    let mut text = format!("{:?} {:?}\n{targets:?}\n", tool.path(), tool.args());
    let mut files: Vec<PathBuf> = std::fs::read_dir(kernel_dir)
        .expect("kernels/ exists")
        .map(|e| e.expect("readable kernels/ entry").path())
        .collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        text += &format!("{} {} {:016x}\n", f.display(), bytes.len(), h.finish());
    }
    text
}

/// Compiles each source with its own copy of `base`, as many at once as cargo's jobserver
/// allows (this script holds one job token; more are taken from cargo while they are free).
fn compile_in_parallel(base: &cc::Build, sources: &[PathBuf]) -> Vec<PathBuf> {
    let jobs: usize = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let workers = jobs.clamp(1, sources.len().max(1));
    // SAFETY: the jobserver's file descriptors are inherited from cargo and used only here.
    let client = unsafe { jobserver::Client::from_env() };
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<PathBuf, String>>>> =
        Mutex::new(vec![None; sources.len()]);
    std::thread::scope(|scope| {
        for worker in 0..workers {
            let (next, results, client) = (&next, &results, client.as_ref());
            scope.spawn(move || loop {
                // Worker 0 runs on this script's own token; the others wait for a free one.
                let _token = if worker == 0 {
                    None
                } else {
                    match wait_for_token(client, next, sources.len()) {
                        Some(token) => token,
                        None => break,
                    }
                };
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= sources.len() {
                    break;
                }
                let result = base
                    .clone()
                    .file(&sources[i])
                    .try_compile_intermediates()
                    .map(|mut objs| objs.remove(0))
                    .map_err(|e| format!("{}: {e}", sources[i].display()));
                results.lock().unwrap()[i] = Some(result);
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| match r.expect("every source was compiled") {
            Ok(obj) => obj,
            Err(e) => fail(&format!("nvcc failed on {e}")),
        })
        .collect()
}

/// A job token for one more compile (`Some(None)`: no jobserver, run anyway), or `None` when
/// the work ran out while waiting.
fn wait_for_token(
    client: Option<&jobserver::Client>,
    next: &AtomicUsize,
    total: usize,
) -> Option<Option<jobserver::Acquired>> {
    let Some(client) = client else {
        return Some(None);
    };
    loop {
        if next.load(Ordering::SeqCst) >= total {
            return None;
        }
        match client.try_acquire() {
            Ok(Some(token)) => return Some(Some(token)),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
            // No non-blocking acquire on this platform: stay with one compile at a time.
            Err(_) => return None,
        }
    }
}

fn link_cuda_runtime(cuda_root: &Path) {
    // cc prints `-l cudart_static`; it needs the directory that holds it. System installs use
    // lib64 (or targets/<arch>/lib), the PyPI wheels use lib.
    for dir in [
        "lib64",
        "lib",
        "targets/x86_64-linux/lib",
        "targets/sbsa-linux/lib",
    ] {
        let d = cuda_root.join(dir);
        if d.join("libcudart_static.a").is_file() {
            println!("cargo:rustc-link-search=native={}", d.display());
        }
    }
    // cudart_static's own dependencies.
    for lib in ["dl", "rt", "pthread", "stdc++"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}

/// Shows each header comment verbatim in rustdoc: its opening phrase (up to the first `:` or
/// `.`) as the summary, then the whole comment as preformatted text (no markdown: `[t, h]` shapes
/// are not links, and indented lines are not doctests).
#[derive(Debug)]
struct HeaderComments;

impl bindgen::callbacks::ParseCallbacks for HeaderComments {
    fn process_comment(&self, comment: &str) -> Option<String> {
        // Clang merges adjacent comments into one, leaving `/` and `/*` where they met.
        let lines: Vec<&str> = comment
            .lines()
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .filter(|l| l.trim() != "/")
            .map(|l| l.strip_prefix("/* ").unwrap_or(l))
            .collect();
        let flat = lines.join(" ");
        let chars: Vec<char> = flat.chars().collect();
        let mut depth = 0i32;
        let end = (0..chars.len())
            .find(|&i| {
                match chars[i] {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
                    && matches!(chars[i], ':' | '.')
                    && chars.get(i + 1).is_none_or(|c| c.is_whitespace())
            })
            .unwrap_or(chars.len());
        let summary: String = chars[..end]
            .iter()
            .flat_map(|&c| {
                let escape = "\\`*_[]<>#|".contains(c);
                escape.then_some('\\').into_iter().chain([c])
            })
            .collect();
        Some(format!(
            "{}.\n\n```text\n{}\n```",
            summary.split_whitespace().collect::<Vec<_>>().join(" "),
            lines.join("\n")
        ))
    }
}

fn generate_bindings(manifest: &Path, out: &Path) {
    // bindgen needs libclang at build time; the pinned toolchain ships one from PyPI.
    if env::var_os("LIBCLANG_PATH").is_none() {
        let pinned = manifest.join(PINNED_SITE).join("clang/native");
        if pinned.join("libclang.so").is_file() {
            // (set_var: the compile threads have ended; no other thread exists.)
            env::set_var("LIBCLANG_PATH", pinned);
        }
    }
    let header = manifest.join("kernels/remoe_kernels.h");
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_function("remoe_.*")
        .allowlist_type("remoe_.*")
        .allowlist_var("REMOE_.*")
        .layout_tests(false)
        // The header's plain /* */ comments become the launchers' documentation (src/sys.rs).
        .clang_arg("-fparse-all-comments")
        .parse_callbacks(Box::new(HeaderComments))
        // The same text whether or not rustfmt is installed: the copy in src/ must compare equal.
        .formatter(bindgen::Formatter::Prettyplease)
        .generate()
        .unwrap_or_else(|e| {
            fail(&format!(
                "bindgen could not parse kernels/remoe_kernels.h ({e}). If libclang is missing, \
                 run through `scripts/with-cuda` (it installs libclang into .toolchain/) or set \
                 LIBCLANG_PATH to the folder holding libclang.so."
            ))
        })
        .to_string();
    std::fs::write(out.join("bindings.rs"), &bindings).expect("write bindings.rs");
    let copy = std::fs::read_to_string(manifest.join(PREGENERATED_BINDINGS)).unwrap_or_default();
    if copy != bindings {
        println!(
            "cargo:warning={PREGENERATED_BINDINGS} differs from bindgen's output for \
             kernels/remoe_kernels.h (docs.rs builds from that copy): run scripts/update-bindings"
        );
    }
}
