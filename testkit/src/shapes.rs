//! Layer shapes for the benchmarks and examples: docs/SPEC.md's named benchmark configurations (the
//! one table that the report, the criterion benches and the examples read), and shapes given by
//! hand as `NAME:T:H:F:E:k`.
//!
//! - [`NAMED`]: docs/SPEC.md's configurations, in docs/SPEC.md's order;
//! - [`named`]: one of them by name;
//! - [`Shape`]: a name and a [`LayerConfig`]; parsed from `NAME:T:H:F:E:k` with [`str::parse`];
//! - [`parse_list`]: a comma-separated list of named configurations and `NAME:T:H:F:E:k` shapes;
//!   [`shapes_from_env`] reads one from `REMOE_BENCH_SHAPES` (the criterion benches' shapes:
//!   criterion owns their command line).

use std::fmt;
use std::str::FromStr;

use remoe_kernels::LayerConfig;

/// The form of a shape given by hand, as error messages and help texts name it.
pub const SHAPE_FORM: &str = "NAME:T:H:F:E:k";

/// One of docs/SPEC.md's benchmark configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedShape {
    /// docs/SPEC.md's id of the configuration (A, B, ..., SM30, ...).
    pub name: &'static str,
    /// Its sizes.
    pub cfg: LayerConfig,
    /// docs/SPEC.md's note on it.
    pub note: &'static str,
}

impl NamedShape {
    /// As a [`Shape`].
    pub fn shape(&self) -> Shape {
        Shape {
            name: self.name.to_string(),
            cfg: self.cfg,
        }
    }
}

const fn cfg(tokens: usize, hidden: usize, ffn: usize, experts: usize, k: usize) -> LayerConfig {
    LayerConfig {
        tokens,
        hidden,
        ffn,
        experts,
        k,
    }
}

const fn spec(name: &'static str, cfg: LayerConfig, note: &'static str) -> NamedShape {
    NamedShape { name, cfg, note }
}

/// docs/SPEC.md's benchmark configurations ("Benchmark configurations"), in its order: T, H, F, E, k.
pub const NAMED: [NamedShape; 11] = [
    spec(
        "A",
        cfg(16384, 768, 3072, 8, 1),
        "182M, the paper's default",
    ),
    spec("B", cfg(16384, 768, 384, 64, 8), "granularity G = 8"),
    spec("C", cfg(16384, 768, 3072, 64, 1), "scaling in E"),
    spec("D", cfg(16384, 1536, 6144, 8, 1), "978M"),
    spec("S", cfg(512, 768, 3072, 8, 1), "small batch, latency-bound"),
    spec(
        "SM1",
        cfg(40960, 768, 256, 128, 8),
        "SonicMoE's 1.4B family, finest",
    ),
    spec(
        "SM7",
        cfg(24576, 1536, 256, 128, 8),
        "SonicMoE's 7B family, finest",
    ),
    spec(
        "SM7b",
        cfg(24576, 1536, 1024, 32, 2),
        "SonicMoE's 7B family, coarsest",
    ),
    spec(
        "SM30",
        cfg(32768, 4096, 512, 128, 8),
        "SonicMoE's 30B family",
    ),
    spec(
        "Q3",
        cfg(16384, 2048, 768, 128, 8),
        "Qwen3-30B-A3B's MoE layer",
    ),
    spec("OL", cfg(16384, 2048, 1024, 64, 8), "OLMoE's MoE layer"),
];

/// The named configuration `name` (case-sensitive: `SM7b`).
pub fn named(name: &str) -> Option<&'static NamedShape> {
    NAMED.iter().find(|s| s.name == name)
}

/// The named configurations' names, space-separated (for messages).
pub fn named_list() -> String {
    NAMED.iter().map(|s| s.name).collect::<Vec<_>>().join(" ")
}

/// A layer shape with a name: one of [`NAMED`], or one given by hand as `NAME:T:H:F:E:k`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The name the benchmarks print and key their rows and ids by.
    pub name: String,
    /// Its sizes.
    pub cfg: LayerConfig,
}

impl fmt::Display for Shape {
    /// `NAME:T:H:F:E:k`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cfg;
        write!(
            f,
            "{}:{}:{}:{}:{}:{}",
            self.name, c.tokens, c.hidden, c.ffn, c.experts, c.k
        )
    }
}

impl FromStr for Shape {
    type Err = String;

    /// Parses `NAME:T:H:F:E:k`: NAME of letters, digits, `_`, `-` and `.` and not one of the
    /// named configurations' (pass those by name), then five whole numbers that make a layer
    /// the GPU kernels take (T >= 1, H and F multiples of 8, 1 <= k <= E). The error says what
    /// is wrong and names the expected form.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| {
            Err(format!(
                "expected {SHAPE_FORM} (e.g. X1:16384:768:3072:8:1): {why}"
            ))
        };
        let fields: Vec<&str> = s.split(':').collect();
        if fields.len() != 6 {
            return bad(format!(
                "'{s}' has {} field(s) separated by ':', not 6",
                fields.len()
            ));
        }
        let name = fields[0];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return bad(format!(
                "the name '{name}' must be non-empty, of letters, digits, '_', '-' and '.'"
            ));
        }
        if named(name).is_some() {
            return bad(format!(
                "'{name}' is a named configuration (one of {}): choose another name, or ask for \
                 it by name",
                named_list()
            ));
        }
        let mut v = [0usize; 5];
        for (i, (what, text)) in ["T", "H", "F", "E", "k"]
            .iter()
            .zip(&fields[1..])
            .enumerate()
        {
            v[i] = match text.parse::<usize>() {
                Ok(n) => n,
                Err(_) => return bad(format!("{what} = '{text}' is not a whole number")),
            };
        }
        let cfg = cfg(v[0], v[1], v[2], v[3], v[4]);
        if cfg.tokens == 0 {
            return bad("T must be at least 1".into());
        }
        if let Err(e) = cfg.validate_for_gpu() {
            return bad(e.to_string());
        }
        Ok(Shape {
            name: name.to_string(),
            cfg,
        })
    }
}

/// Every named configuration, as shapes.
pub fn named_shapes() -> Vec<Shape> {
    NAMED.iter().map(NamedShape::shape).collect()
}

/// A comma-separated list whose entries are each a named configuration's name (`A`, `SM7b`) or
/// a shape `NAME:T:H:F:E:k`; spaces around entries are ignored, and a name may appear once.
pub fn parse_list(s: &str) -> Result<Vec<Shape>, String> {
    let mut out: Vec<Shape> = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let shape = if entry.contains(':') {
            entry.parse::<Shape>()?
        } else {
            match named(entry) {
                Some(n) => n.shape(),
                None => {
                    return Err(format!(
                        "'{entry}' is neither a named configuration ({}) nor a shape \
                         {SHAPE_FORM}",
                        named_list()
                    ))
                }
            }
        };
        if out.iter().any(|o| o.name == shape.name) {
            return Err(format!("'{}' appears twice", shape.name));
        }
        out.push(shape);
    }
    if out.is_empty() {
        return Err(format!(
            "no shapes: expected a comma-separated list of named configurations ({}) and \
             {SHAPE_FORM} shapes",
            named_list()
        ));
    }
    Ok(out)
}

/// The environment variable that picks the criterion benches' shapes: a [`parse_list`] list;
/// unset or empty, every named configuration.
pub const SHAPES_ENV: &str = "REMOE_BENCH_SHAPES";

/// The shapes [`SHAPES_ENV`] asks for: every named configuration when it is unset or empty; an
/// error naming the variable and the expected form when it is malformed.
pub fn shapes_from_env() -> Result<Vec<Shape>, String> {
    match std::env::var(SHAPES_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            parse_list(&v).map_err(|e| format!("{SHAPES_ENV}={v}: {e}"))
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(named_shapes()),
        Err(e) => Err(format!("{SHAPES_ENV}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_matches_spec() {
        let sm30 = named("SM30").unwrap().cfg;
        assert_eq!(sm30, LayerConfig::new(32768, 4096, 512, 128, 8));
        assert_eq!(named("SM7b").unwrap().cfg.k, 2);
        assert!(named("sm7b").is_none());
        for s in &NAMED {
            s.cfg.validate_for_gpu().unwrap();
        }
    }

    #[test]
    fn shapes_parse_and_print() {
        let s: Shape = "X1:1024:64:128:16:2".parse().unwrap();
        assert_eq!(s.cfg, LayerConfig::new(1024, 64, 128, 16, 2));
        assert_eq!(s.to_string(), "X1:1024:64:128:16:2");
        for bad in [
            "X1:1024:64:128:16",
            "X1:1024:64:128:16:2:3",
            ":1024:64:128:16:2",
            "X/1:1024:64:128:16:2",
            "A:16384:768:3072:8:1",
            "X1:1024:64:12x:16:2",
            "X1:0:64:128:16:2",
            "X1:1024:60:128:16:2",
            "X1:1024:64:128:16:17",
        ] {
            let e = bad.parse::<Shape>().unwrap_err();
            assert!(e.starts_with("expected NAME:T:H:F:E:k"), "{bad}: {e}");
        }
    }

    #[test]
    fn lists_mix_names_and_shapes() {
        let l = parse_list("A, SM7b,X1:1024:64:128:16:2").unwrap();
        let names: Vec<&str> = l.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["A", "SM7b", "X1"]);
        assert!(parse_list("A,A").is_err());
        assert!(parse_list("Z").is_err());
        assert!(parse_list("").is_err());
    }
}
