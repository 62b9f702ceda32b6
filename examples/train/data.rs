//! Real text by domain, read at run time from what the machine has without a network: Python's
//! standard library, Rust sources (cargo's registry, rustup's library sources), C and CUDA
//! headers, licence texts, Perl modules; or the directories given with `--data`, each one
//! domain named by its basename.
//!
//! Deterministic: each domain's files are listed recursively and sorted by path, identical
//! contents are kept once, then the list is shuffled with the run's seed and read in that order:
//! the first files (whole files) make the domain's held-out slice of `val_bytes`, the following
//! ones its training text, up to `cap_bytes`. Holding out whole files keeps a file's text from
//! being on both sides. Files that are not UTF-8 text (a NUL byte, invalid UTF-8) are skipped,
//! and each file contributes at most [`FILE_CAP`] bytes so that no single large file (a
//! generated header, a licence collection) makes up a domain.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use remoe_testkit::rng::{seeded, Rng};

/// The most bytes one file contributes.
pub const FILE_CAP: usize = 256 << 10;

/// Where a domain's files are and which of them count.
pub struct Source {
    pub name: String,
    pub roots: Vec<PathBuf>,
    /// File name extensions that count (no dot); empty: every file.
    pub exts: &'static [&'static str],
    /// A file name that counts besides the extensions (licences' `copyright`).
    pub file_name: Option<&'static str>,
    /// Directory names not descended into (third-party packages inside the standard library).
    pub skip_dirs: &'static [&'static str],
}

/// A domain's text.
#[derive(Debug, Clone)]
pub struct TextDomain {
    pub name: String,
    pub train: Vec<u8>,
    pub val: Vec<u8>,
    /// Distinct text files read (held-out and training).
    pub files: usize,
}

fn dirs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Python's standard library: the newest `pythonX.Y` directory holding `os.py` under the usual
/// prefixes (found by listing, without running Python), or $REMOE_PYTHON_STDLIB.
fn python_stdlib() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REMOE_PYTHON_STDLIB") {
        return Some(PathBuf::from(p));
    }
    let mut prefixes: Vec<PathBuf> = ["/usr/lib", "/usr/local/lib", "/opt/conda/lib", "/usr/lib64"]
        .iter()
        .map(PathBuf::from)
        .collect();
    // Interpreters managed per user: uv's and pyenv's.
    if let Some(h) = std::env::var_os("HOME").map(PathBuf::from) {
        for root in [h.join(".local/share/uv/python"), h.join(".pyenv/versions")] {
            prefixes.extend(dirs_in(&root).into_iter().map(|d| d.join("lib")));
        }
    }
    let mut best: Option<((u32, u32), PathBuf)> = None;
    for prefix in &prefixes {
        for d in dirs_in(prefix) {
            let Some(ver) = d
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("python"))
                .and_then(|v| v.split_once('.'))
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            else {
                continue;
            };
            if d.join("os.py").is_file() && best.as_ref().is_none_or(|(v, _)| ver > *v) {
                best = Some((ver, d));
            }
        }
    }
    best.map(|(_, d)| d)
}

/// The candidate domains of this machine (roots that do not exist are dropped later).
pub fn candidates() -> Vec<Source> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".cargo")));
    let mut rust = Vec::new();
    if let Some(c) = cargo_home {
        rust.push(c.join("registry/src"));
    }
    if let Some(h) = &home {
        for tc in dirs_in(&h.join(".rustup/toolchains")) {
            rust.push(tc.join("lib/rustlib/src/rust/library"));
        }
    }
    let mut c_headers = vec![
        PathBuf::from("/usr/include"),
        PathBuf::from("/usr/local/include"),
        PathBuf::from("/usr/local/cuda/include"),
    ];
    if let Some(c) = std::env::var_os("CUDA_HOME") {
        c_headers.push(PathBuf::from(c).join("include"));
    }
    let mut perl = vec![
        PathBuf::from("/usr/share/perl"),
        PathBuf::from("/usr/share/perl5"),
    ];
    for d in dirs_in(Path::new("/usr/lib")) {
        for e in dirs_in(&d) {
            if e.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("perl"))
            {
                perl.push(e);
            }
        }
    }
    vec![
        Source {
            name: "python".into(),
            roots: python_stdlib().into_iter().collect(),
            exts: &["py"],
            file_name: None,
            skip_dirs: &["site-packages", "dist-packages", "__pycache__"],
        },
        Source {
            name: "rust".into(),
            roots: rust,
            exts: &["rs"],
            file_name: None,
            skip_dirs: &["target"],
        },
        Source {
            name: "c-headers".into(),
            roots: c_headers,
            exts: &["h", "hpp", "cuh"],
            file_name: None,
            skip_dirs: &[],
        },
        Source {
            name: "licences".into(),
            roots: vec![
                PathBuf::from("/usr/share/common-licenses"),
                PathBuf::from("/usr/share/licenses"),
                PathBuf::from("/usr/share/doc"),
            ],
            exts: &[],
            file_name: Some("copyright"),
            skip_dirs: &[],
        },
        Source {
            name: "perl".into(),
            roots: perl,
            exts: &["pm", "pl", "pod"],
            file_name: None,
            skip_dirs: &[],
        },
    ]
}

/// A `--data DIR` domain: every text file under DIR, named by DIR's basename.
pub fn from_dir(dir: &Path) -> Source {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    Source {
        name,
        roots: vec![dir.to_path_buf()],
        exts: &[],
        file_name: None,
        skip_dirs: &[],
    }
}

/// Whether `path` counts for `src`. Under /usr/share/doc only `copyright` files count (the rest
/// of it is changelogs and READMEs, not licences), elsewhere in the licence roots every file.
fn counts(src: &Source, path: &Path, root: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if src.file_name == Some(name) {
        return true;
    }
    if src.file_name.is_some() && root.ends_with("doc") {
        return false;
    }
    if src.exts.is_empty() {
        return true;
    }
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| src.exts.contains(&e))
}

/// Every file under `root` that counts (a root may be a symbolic link; links to directories
/// below it are not followed, which keeps cycles out).
fn walk(src: &Source, root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            let skip = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| src.skip_dirs.contains(&n));
            if !skip {
                walk(src, root, &path, out);
            }
        } else if (ft.is_file() || (ft.is_symlink() && path.is_file())) && counts(src, &path, root)
        {
            out.push(path);
        }
    }
}

/// The file's text if it is UTF-8 without NUL bytes, cut to [`FILE_CAP`] bytes.
fn read_text(path: &Path) -> Option<Vec<u8>> {
    let mut bytes = std::fs::read(path).ok()?;
    if bytes.is_empty() || bytes.contains(&0) || std::str::from_utf8(&bytes).is_err() {
        return None;
    }
    bytes.truncate(FILE_CAP);
    Some(bytes)
}

/// Reads a domain: sorted, deduplicated, seeded-shuffled files; `val_bytes` of whole files held
/// out first, then up to `cap_bytes` of training text. Each file ends with a newline.
pub fn load(src: &Source, cap_bytes: usize, val_bytes: usize, seed: u64) -> TextDomain {
    let mut paths = Vec::new();
    for root in &src.roots {
        if root.is_dir() {
            walk(src, root, root, &mut paths);
        }
    }
    paths.sort();
    paths.dedup();
    // Seeded Fisher-Yates over the sorted list: the same seed, the same files in the same order.
    let mut h = DefaultHasher::new();
    src.name.hash(&mut h);
    let mut rng = seeded(seed ^ h.finish());
    for i in (1..paths.len()).rev() {
        let j = rng.random_range(0..=i);
        paths.swap(i, j);
    }
    let mut seen = HashSet::new();
    let mut d = TextDomain {
        name: src.name.clone(),
        train: Vec::new(),
        val: Vec::new(),
        files: 0,
    };
    for p in &paths {
        if d.train.len() >= cap_bytes {
            break;
        }
        let Some(mut text) = read_text(p) else {
            continue;
        };
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        if !seen.insert(h.finish()) {
            continue;
        }
        d.files += 1;
        if text.last() != Some(&b'\n') {
            text.push(b'\n');
        }
        let side = if d.val.len() < val_bytes {
            &mut d.val
        } else {
            &mut d.train
        };
        side.extend_from_slice(&text);
    }
    d.val.truncate(val_bytes);
    d.train.truncate(cap_bytes);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_read_deterministically_with_whole_files_held_out() {
        let dir = std::env::temp_dir().join(format!("remoe-train-data-{}", std::process::id()));
        let sub = dir.join("docs");
        std::fs::create_dir_all(sub.join("inner")).unwrap();
        for i in 0..20 {
            std::fs::write(
                sub.join(format!("f{i:02}.txt")),
                format!("file {i}\n").repeat(50),
            )
            .unwrap();
        }
        // A duplicate, a binary file and a file in a subdirectory.
        std::fs::write(sub.join("dup.txt"), "file 3\n".repeat(50)).unwrap();
        std::fs::write(sub.join("bin.dat"), [1u8, 0, 2]).unwrap();
        std::fs::write(sub.join("inner/deep.txt"), "deep\n".repeat(50)).unwrap();
        let src = from_dir(&sub);
        assert_eq!(src.name, "docs");
        let a = load(&src, 1 << 20, 700, 5);
        let b = load(&src, 1 << 20, 700, 5);
        assert_eq!((&a.train, &a.val), (&b.train, &b.val));
        // 21 distinct text files: 20 plus the deep one; the duplicate and the binary skipped.
        assert_eq!(a.files, 21);
        assert_eq!(a.val.len(), 700);
        // Every held-out line is absent from the training text (whole files held out).
        let train = String::from_utf8(a.train.clone()).unwrap();
        let val = String::from_utf8(a.val.clone()).unwrap();
        for line in val.lines().filter(|l| l.len() > 4) {
            assert!(!train.contains(&format!("{line}\n")), "{line}");
        }
        let c = load(&src, 1 << 20, 700, 6);
        assert_ne!(a.val, c.val, "another seed, another order");
        let capped = load(&src, 1000, 700, 5);
        assert_eq!(capped.train.len(), 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
