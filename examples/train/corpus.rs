//! A byte-level corpus with every byte labelled by its domain, and the fallback corpus of five
//! clearly distinct domains generated deterministically from a seed (the real-text corpus is
//! assembled in examples/train/data.rs). Distinct domains
//! (different alphabets, lengths and structure) are what makes expert specialisation measurable:
//! the paper's Table 12 reports, per expert, where its routed tokens come from.
//!
//! A corpus is a stream of samples, each one line ending in '\n' (the newline belongs to its
//! sample's domain). The domain of each sample is drawn uniformly at random, so a training
//! window mixes domains at unpredictable boundaries; nothing in the text names the domain.

use remoe_testkit::rng::{seeded, Rng, TestRng};

/// The generated corpus's domains, in label order.
pub const DOMAINS: [&str; 5] = ["arithmetic", "code", "english", "dna", "json"];

/// The bytes, each byte's domain label (an index into `names`) and the domains' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    pub bytes: Vec<u8>,
    pub domains: Vec<u8>,
    pub names: Vec<String>,
}

/// One batch of training windows, row-major \[batch, seq\].
#[derive(Debug, Clone)]
pub struct Batch {
    /// The input bytes.
    pub inputs: Vec<u32>,
    /// The next byte of each input position.
    pub targets: Vec<u32>,
    /// The domain of each input position: the domain of the token whose hidden state is routed.
    pub domains: Vec<u8>,
}

fn below(rng: &mut TestRng, n: usize) -> usize {
    rng.random_range(0..n)
}

fn pick<'a>(rng: &mut TestRng, words: &[&'a str]) -> &'a str {
    words[below(rng, words.len())]
}

/// "a op b=c" expressions, several per line: digits and `+-*= ` only; the result is right, so a
/// model can learn carries.
fn arithmetic(rng: &mut TestRng, out: &mut String) {
    let n = 2 + below(rng, 4);
    for i in 0..n {
        let (a, b) = (below(rng, 1000) as i64, below(rng, 100) as i64);
        let (op, c) = match below(rng, 3) {
            0 => ('+', a + b),
            1 => ('-', a - b),
            _ => ('*', a * b),
        };
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&format!("{a}{op}{b}={c}"));
    }
}

/// A Rust-like function: keywords, braces, semicolons, short identifiers.
fn code(rng: &mut TestRng, out: &mut String) {
    const NAMES: &[&str] = &["f", "g", "sum", "step", "mix", "fold", "scan", "norm"];
    const VARS: &[&str] = &["x", "y", "z", "acc", "i", "n", "tmp"];
    const OPS: &[&str] = &["+", "-", "*", "^", "&"];
    let (a, b) = (pick(rng, VARS), pick(rng, VARS));
    out.push_str(&format!(
        "fn {}{}({a}: u32, {b}: u32) -> u32 {{ ",
        pick(rng, NAMES),
        below(rng, 10)
    ));
    for _ in 0..1 + below(rng, 3) {
        let v = pick(rng, VARS);
        match below(rng, 3) {
            0 => out.push_str(&format!(
                "let {v} = {a} {} {}; ",
                pick(rng, OPS),
                below(rng, 64)
            )),
            1 => out.push_str(&format!(
                "if {a} > {b} {{ return {a} {} {b}; }} ",
                pick(rng, OPS)
            )),
            _ => out.push_str(&format!(
                "for {v} in 0..{} {{ {a} += {v}; }} ",
                1 + below(rng, 16)
            )),
        }
    }
    out.push_str(&format!("{a} {} {b} }}", pick(rng, OPS)));
}

/// Sentences from a small grammar: determiner, optional adjective, noun, verb, object, optional
/// prepositional phrase.
fn english(rng: &mut TestRng, out: &mut String) {
    const DET: &[&str] = &["the", "a", "every", "some", "that"];
    const ADJ: &[&str] = &["quick", "small", "old", "green", "quiet", "bright", "heavy"];
    const NOUN: &[&str] = &[
        "cat", "dog", "river", "teacher", "garden", "machine", "letter", "city", "bird",
    ];
    const VERB: &[&str] = &[
        "sees",
        "finds",
        "follows",
        "paints",
        "remembers",
        "carries",
        "likes",
    ];
    const PREP: &[&str] = &["near", "under", "behind", "across", "with"];
    let phrase = |rng: &mut TestRng, s: &mut String| {
        s.push_str(pick(rng, DET));
        s.push(' ');
        if below(rng, 2) == 0 {
            s.push_str(pick(rng, ADJ));
            s.push(' ');
        }
        s.push_str(pick(rng, NOUN));
    };
    for i in 0..1 + below(rng, 3) {
        let mut s = String::new();
        phrase(rng, &mut s);
        s.push(' ');
        s.push_str(pick(rng, VERB));
        s.push(' ');
        phrase(rng, &mut s);
        if below(rng, 2) == 0 {
            s.push(' ');
            s.push_str(pick(rng, PREP));
            s.push(' ');
            phrase(rng, &mut s);
        }
        s.push('.');
        // Capitalise the sentence's first letter.
        let first = s[..1].to_uppercase();
        s.replace_range(..1, &first);
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&s);
    }
}

/// A gene-like string: ATG, random codons, a stop codon. Upper-case ACGT only.
fn dna(rng: &mut TestRng, out: &mut String) {
    const BASES: [char; 4] = ['A', 'C', 'G', 'T'];
    const STOPS: &[&str] = &["TAA", "TAG", "TGA"];
    out.push_str("ATG");
    for _ in 0..3 * (8 + below(rng, 20)) {
        out.push(BASES[below(rng, 4)]);
    }
    out.push_str(pick(rng, STOPS));
}

/// A JSON record with fixed keys in a fixed order and varying values.
fn json(rng: &mut TestRng, out: &mut String) {
    const NAMES: &[&str] = &["ana", "bo", "chen", "dara", "eli", "fatma", "gus", "hana"];
    const CITIES: &[&str] = &["oslo", "lima", "pune", "kyiv", "doha", "rome"];
    const TAGS: &[&str] = &["red", "blue", "admin", "new", "vip", "beta"];
    let tags: Vec<String> = (0..below(rng, 4))
        .map(|_| format!("\"{}\"", pick(rng, TAGS)))
        .collect();
    out.push_str(&format!(
        "{{\"id\":{},\"name\":\"{}\",\"age\":{},\"city\":\"{}\",\"active\":{},\"tags\":[{}]}}",
        below(rng, 100_000),
        pick(rng, NAMES),
        18 + below(rng, 70),
        pick(rng, CITIES),
        below(rng, 2) == 0,
        tags.join(",")
    ));
}

/// Appends one sample of domain `d` (without its newline).
fn sample(d: usize, rng: &mut TestRng, out: &mut String) {
    match d {
        0 => arithmetic(rng, out),
        1 => code(rng, out),
        2 => english(rng, out),
        3 => dna(rng, out),
        _ => json(rng, out),
    }
}

impl Corpus {
    /// At least `min_bytes` bytes of samples from `seed` (the same seed, the same corpus).
    pub fn generate(seed: u64, min_bytes: usize) -> Self {
        let mut rng = seeded(seed);
        let mut bytes = Vec::with_capacity(min_bytes + 512);
        let mut domains = Vec::with_capacity(min_bytes + 512);
        let mut line = String::new();
        while bytes.len() < min_bytes {
            let d = below(&mut rng, DOMAINS.len());
            line.clear();
            sample(d, &mut rng, &mut line);
            line.push('\n');
            bytes.extend_from_slice(line.as_bytes());
            domains.resize(bytes.len(), d as u8);
        }
        Self {
            bytes,
            domains,
            names: DOMAINS.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// The concatenation of `parts`, part i labelled domain i (named `names[i]`).
    pub fn from_parts(names: Vec<String>, parts: &[&[u8]]) -> Self {
        assert_eq!(names.len(), parts.len());
        assert!(
            names.len() <= usize::from(u8::MAX) + 1,
            "at most 256 domains"
        );
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut domains = Vec::with_capacity(bytes.capacity());
        for (d, p) in parts.iter().enumerate() {
            bytes.extend_from_slice(p);
            domains.resize(bytes.len(), d as u8);
        }
        Self {
            bytes,
            domains,
            names,
        }
    }

    /// The number of bytes of each domain.
    pub fn domain_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.names.len()];
        for &d in &self.domains {
            c[d as usize] += 1;
        }
        c
    }

    /// `batch` windows of `seq` bytes starting at random offsets drawn from `rng`.
    pub fn random_batch(&self, rng: &mut TestRng, batch: usize, seq: usize) -> Batch {
        let span = self.bytes.len() - seq - 1;
        let starts: Vec<usize> = (0..batch).map(|_| below(rng, span)).collect();
        self.batch_at(&starts, seq)
    }

    /// Windows of `seq` bytes (and their next bytes) at `starts`.
    pub fn batch_at(&self, starts: &[usize], seq: usize) -> Batch {
        let n = starts.len() * seq;
        let mut b = Batch {
            inputs: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
            domains: Vec::with_capacity(n),
        };
        for &s in starts {
            b.inputs
                .extend(self.bytes[s..s + seq].iter().map(|&v| u32::from(v)));
            b.targets
                .extend(self.bytes[s + 1..s + seq + 1].iter().map(|&v| u32::from(v)));
            b.domains.extend_from_slice(&self.domains[s..s + seq]);
        }
        b
    }

    /// Consecutive non-overlapping windows covering the corpus from the start, `batch` per
    /// batch, at most `max_batches` batches: a fixed held-out set.
    pub fn sequential_batches(&self, batch: usize, seq: usize, max_batches: usize) -> Vec<Batch> {
        let windows = (self.bytes.len() - 1) / seq;
        let starts: Vec<usize> = (0..windows).map(|w| w * seq).collect();
        starts
            .chunks_exact(batch)
            .take(max_batches)
            .map(|c| self.batch_at(c, seq))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_corpus_other_seed_other_corpus() {
        let a = Corpus::generate(7, 20_000);
        assert_eq!(a, Corpus::generate(7, 20_000));
        assert_ne!(a.bytes, Corpus::generate(8, 20_000).bytes);
        assert!(a.bytes.len() >= 20_000);
        assert_eq!(a.bytes.len(), a.domains.len());
    }

    #[test]
    fn every_domain_present_in_fair_shares() {
        let c = Corpus::generate(1, 200_000);
        let counts = c.domain_counts();
        for (d, &n) in counts.iter().enumerate() {
            // Samples are drawn uniformly; their lengths differ by domain (20 to 130 bytes).
            let share = n as f64 / c.bytes.len() as f64;
            assert!(share > 0.08 && share < 0.4, "{}: {share}", DOMAINS[d]);
        }
    }

    #[test]
    fn each_line_has_one_label_and_its_domains_alphabet() {
        let c = Corpus::generate(3, 50_000);
        assert!(c.bytes.is_ascii());
        let mut start = 0;
        for (i, &b) in c.bytes.iter().enumerate() {
            if b != b'\n' {
                continue;
            }
            let d = c.domains[start];
            assert!(c.domains[start..=i].iter().all(|&x| x == d), "mixed line");
            let line = &c.bytes[start..i];
            let ok = |f: fn(u8) -> bool| line.iter().all(|&x| f(x));
            match DOMAINS[d as usize] {
                "arithmetic" => assert!(ok(|x| b"0123456789+-*= ".contains(&x))),
                "dna" => assert!(ok(|x| b"ACGT".contains(&x)) && line.starts_with(b"ATG")),
                "json" => assert!(line.starts_with(b"{\"id\":") && line.ends_with(b"]}")),
                "code" => assert!(line.starts_with(b"fn ") && line.ends_with(b"}")),
                "english" => assert!(line.ends_with(b".") && line[0].is_ascii_uppercase()),
                other => panic!("unknown domain {other}"),
            }
            start = i + 1;
        }
    }

    #[test]
    fn arithmetic_results_are_right() {
        let mut rng = seeded(5);
        for _ in 0..200 {
            let mut s = String::new();
            arithmetic(&mut rng, &mut s);
            for expr in s.split(' ') {
                let (lhs, rhs) = expr.split_once('=').unwrap();
                let pos = lhs[1..].find(['+', '-', '*']).unwrap() + 1;
                let a: i64 = lhs[..pos].parse().unwrap();
                let b: i64 = lhs[pos + 1..].parse().unwrap();
                let want = match &lhs[pos..pos + 1] {
                    "+" => a + b,
                    "-" => a - b,
                    _ => a * b,
                };
                assert_eq!(rhs.parse::<i64>().unwrap(), want, "{expr}");
            }
        }
    }

    #[test]
    fn batches_shift_targets_by_one_and_carry_labels() {
        let c = Corpus::generate(11, 10_000);
        let mut rng = seeded(2);
        let b = c.random_batch(&mut rng, 4, 64);
        assert_eq!(b.inputs.len(), 4 * 64);
        assert_eq!(b.targets.len(), 4 * 64);
        assert_eq!(b.domains.len(), 4 * 64);
        for row in 0..4 {
            let r = row * 64;
            assert_eq!(b.inputs[r + 1..r + 64], b.targets[r..r + 63]);
        }
        let held = c.sequential_batches(4, 64, 3);
        assert_eq!(held.len(), 3);
        assert_eq!(held[0].inputs[0], u32::from(c.bytes[0]));
        assert_eq!(held[1].inputs[0], u32::from(c.bytes[4 * 64]));
        assert_eq!(held[0].domains[..64], c.domains[..64]);
    }
}
