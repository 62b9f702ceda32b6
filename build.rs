//! Compiles kernels/*.cu with nvcc, links the CUDA runtime statically and generates the FFI
//! bindings of kernels/remoe_kernels.h.
//!
//! Where nvcc is looked for, in order: `$NVCC`; `$CUDA_HOME/bin`, `$CUDA_PATH/bin`; `PATH`;
//! `/usr/local/cuda/bin`; the project's pinned toolchain in `.toolchain/` (installed by
//! `scripts/with-cuda`). The GPU architectures come from `REMOE_CUDA_ARCHS`, a comma-separated
//! list of nvcc `-gencode` targets (default `90a`, the Hopper target that wgmma needs; for
//! example `REMOE_CUDA_ARCHS=90a,100a`).

use std::env;
use std::path::{Path, PathBuf};

/// Where `scripts/with-cuda` installs the pinned CUDA 13.0 wheels (GPU.md).
const PINNED_SITE: &str = ".toolchain/py";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "REMOE_CUDA_ARCHS",
        "LIBCLANG_PATH",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed={PINNED_SITE}");

    let nvcc = find_nvcc(&manifest).unwrap_or_else(|| {
        fail(
            "no CUDA compiler (nvcc) found: looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, \
             /usr/local/cuda/bin and .toolchain/. Fix: run the build through \
             `scripts/with-cuda cargo build` (it installs the pinned CUDA 13.0 toolchain into \
             .toolchain/ once), or set NVCC=/path/to/nvcc.",
        )
    });
    let cuda_root = nvcc
        .parent()
        .and_then(Path::parent)
        .expect("nvcc lives in <cuda>/bin")
        .to_path_buf();

    compile_kernels(&manifest, &nvcc, &cuda_root);
    link_cuda_runtime(&cuda_root);
    generate_bindings(&manifest, &out);
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        return is_file(&p).then_some(p);
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
    candidates.into_iter().find(|p| is_file(p))
}

fn cuda_archs() -> Vec<String> {
    let archs = env::var("REMOE_CUDA_ARCHS").unwrap_or_else(|_| "90a".to_string());
    let list: Vec<String> = archs
        .split(',')
        .map(|a| a.trim().trim_start_matches("sm_").to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if list.is_empty() {
        fail("REMOE_CUDA_ARCHS is empty: give targets such as `90a` or `90a,100a`");
    }
    list
}

fn compile_kernels(manifest: &Path, nvcc: &Path, cuda_root: &Path) {
    let kernel_dir = manifest.join("kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernel_dir)
        .expect("kernels/ exists")
        .map(|e| e.expect("readable kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    // cc wraps host-compiler flags for nvcc only when it finds nvcc itself, which it does
    // through $NVCC (passing the path to `.compiler()` would make it treat nvcc as gcc).
    // SAFETY (of set_var): build scripts are single-threaded at this point.
    env::set_var("NVCC", nvcc);
    let mut build = cc::Build::new();
    build
        .cuda(true)
        .cudart("static")
        // Device code is always optimised, in every cargo profile: cc's debug mode would add -G,
        // which makes kernels an order of magnitude slower. -lineinfo keeps source lines for
        // compute-sanitizer and ncu.
        .debug(false)
        .opt_level(3)
        .include(&kernel_dir)
        .include(cuda_root.join("include"))
        .files(&sources)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-lineinfo")
        .flag("--expt-relaxed-constexpr")
        // Warnings about unused variables in templates are not worth a broken build; real
        // errors still are.
        .flag("-Xcudafe=--diag_suppress=177")
        .warnings(false);
    for arch in cuda_archs() {
        let virt = arch.trim_end_matches(char::is_alphabetic);
        let suffix = &arch[virt.len()..];
        build.flag(format!(
            "-gencode=arch=compute_{virt}{suffix},code=sm_{arch}"
        ));
    }
    build.compile("remoe_kernels");
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

fn generate_bindings(manifest: &Path, out: &Path) {
    // bindgen needs libclang at build time; the pinned toolchain ships one from PyPI.
    if env::var_os("LIBCLANG_PATH").is_none() {
        let pinned = manifest.join(PINNED_SITE).join("clang/native");
        if pinned.join("libclang.so").is_file() {
            // SAFETY (of set_var): build scripts are single-threaded at this point.
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
        .generate()
        .unwrap_or_else(|e| {
            fail(&format!(
                "bindgen could not parse kernels/remoe_kernels.h ({e}). If libclang is missing, \
                 run through `scripts/with-cuda` (it installs libclang into .toolchain/) or set \
                 LIBCLANG_PATH to the folder holding libclang.so."
            ))
        });
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");
}
