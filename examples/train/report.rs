//! What a training run records and how it is reported: the per-step log, the expert-domain
//! affinity table (the paper's Table 12), the JSON file and the PNG plots of sparsity, lambda,
//! the regulariser and the LM loss per step (the paper's Figures 3 and 4). Shared by the GPU
//! run and the CPU reference run.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::{json, Value};

/// One training step's measurements.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    pub step: usize,
    pub lr: f64,
    /// Cross-entropy of the next byte, nats.
    pub lm_loss: f64,
    /// The balance loss summed over layers (the GPU job: from each layer's routing statistics,
    /// mean over micro-batches): ReMoE's regulariser at lambda, TopK's aux loss at c.
    pub reg_loss: f64,
    /// Mean over layers of 1 - |A|/(T E) (None when not measured at this step).
    pub sparsity: Option<f64>,
    /// lambda (ReMoE; one for all layers) or c (TopK).
    pub lambda: f64,
    pub tokens_per_s: f64,
    /// The global gradient norm before clipping (None where not computed).
    pub grad_norm: Option<f64>,
    /// Device memory in use (GiB) after the step's last forward (None where not read).
    pub mem_gib: Option<f64>,
}

impl StepLog {
    pub fn to_json(self) -> Value {
        json!({
            "step": self.step, "lr": self.lr, "lm_loss": self.lm_loss, "reg_loss": self.reg_loss,
            "sparsity": self.sparsity, "lambda": self.lambda, "tokens_per_s": self.tokens_per_s,
            "grad_norm": self.grad_norm, "mem_gib": self.mem_gib,
        })
    }

    /// The inverse of [`to_json`](Self::to_json) (a checkpoint's history).
    pub fn from_json(v: &Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Some(Self {
            step: v.get("step")?.as_u64()? as usize,
            lr: f("lr")?,
            lm_loss: f("lm_loss")?,
            reg_loss: f("reg_loss")?,
            sparsity: f("sparsity"),
            lambda: f("lambda")?,
            tokens_per_s: f("tokens_per_s")?,
            grad_norm: f("grad_norm"),
            mem_gib: f("mem_gib"),
        })
    }
}

/// Routing on the held-out set by domain: tokens routed to each expert,
/// `counts[layer][expert][domain]`; the (token, expert) pairs active, `active[layer][domain]`;
/// and the held-out tokens of each domain.
#[derive(Debug, Clone, Default)]
pub struct Affinity {
    pub names: Vec<String>,
    pub counts: Vec<Vec<Vec<u64>>>,
    pub active: Vec<Vec<u64>>,
    pub domain_tokens: Vec<u64>,
}

impl Affinity {
    pub fn new(layers: usize, experts: usize, names: &[String]) -> Self {
        let d = names.len();
        Self {
            names: names.to_vec(),
            counts: vec![vec![vec![0; d]; experts]; layers],
            active: vec![vec![0; d]; layers],
            domain_tokens: vec![0; d],
        }
    }

    /// Adds one batch's routing: `mask[layer]` is the row-major \[T, E\] routing mask (nonzero:
    /// routed) of the tokens whose domains are `domains`.
    pub fn add(&mut self, domains: &[u8], mask: &[Vec<u8>]) {
        for &d in domains {
            self.domain_tokens[d as usize] += 1;
        }
        let e = self.counts.first().map_or(0, Vec::len);
        for (l, m) in mask.iter().enumerate() {
            for (row, &d) in m.chunks_exact(e).zip(domains) {
                for (x, &on) in row.iter().enumerate() {
                    if on != 0 {
                        self.counts[l][x][d as usize] += 1;
                        self.active[l][d as usize] += 1;
                    }
                }
            }
        }
    }

    /// For one expert: the fraction of its routed tokens from each domain, as if every domain
    /// had the same number of held-out tokens (each count is divided by its domain's tokens
    /// first), so that a domain's share of the corpus does not pass for specialisation. An
    /// expert that ignores domains gets 1/D everywhere.
    pub fn shares(&self, layer: usize, expert: usize) -> Vec<f64> {
        let c = &self.counts[layer][expert];
        let mut r: Vec<f64> = c
            .iter()
            .zip(&self.domain_tokens)
            .map(|(&n, &t)| n as f64 / t.max(1) as f64)
            .collect();
        let s: f64 = r.iter().sum();
        if s > 0.0 {
            r.iter_mut().for_each(|v| *v /= s);
        }
        r
    }

    /// Mean active experts per token of domain `d` in `layer` (ReMoE's dynamic allocation; k
    /// for TopK).
    pub fn active_per_token(&self, layer: usize, d: usize) -> f64 {
        self.active[layer][d] as f64 / self.domain_tokens[d].max(1) as f64
    }

    /// The mean over layers and experts (with any routed token) of an expert's largest domain
    /// share: 1/D for no specialisation, 1 when every expert serves one domain.
    pub fn specialisation(&self) -> f64 {
        let mut sum = 0.0;
        let mut n = 0;
        for (l, layer) in self.counts.iter().enumerate() {
            for (e, c) in layer.iter().enumerate() {
                if c.iter().sum::<u64>() > 0 {
                    sum += self.shares(l, e).iter().cloned().fold(0.0, f64::max);
                    n += 1;
                }
            }
        }
        sum / n.max(1) as f64
    }

    /// The table, one block per layer: experts as rows, domains as columns (percent), then the
    /// active experts per token by domain.
    pub fn table(&self) -> String {
        let w = self.names.iter().map(String::len).max().unwrap_or(0).max(8);
        let mut s = String::new();
        for l in 0..self.counts.len() {
            s.push_str(&format!("  layer {l}: share of each expert's tokens by domain (%, domains weighted equally)\n    expert"));
            for d in &self.names {
                s.push_str(&format!(" {d:>w$}"));
            }
            s.push_str("   tokens\n");
            for e in 0..self.counts[l].len() {
                s.push_str(&format!("    {e:>6}"));
                for v in self.shares(l, e) {
                    s.push_str(&format!(" {:>w$.1}", 100.0 * v));
                }
                s.push_str(&format!(" {:>8}\n", self.counts[l][e].iter().sum::<u64>()));
            }
            s.push_str("    active");
            for d in 0..self.names.len() {
                s.push_str(&format!(" {:>w$.3}", self.active_per_token(l, d)));
            }
            s.push_str("   (experts per token)\n");
        }
        s
    }

    /// Active experts per token by domain, averaged over layers.
    pub fn active_by_domain(&self) -> Vec<f64> {
        let layers = self.counts.len().max(1) as f64;
        (0..self.names.len())
            .map(|d| {
                (0..self.counts.len())
                    .map(|l| self.active_per_token(l, d))
                    .sum::<f64>()
                    / layers
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let shares: Vec<Vec<Vec<f64>>> = (0..self.counts.len())
            .map(|l| {
                (0..self.counts[l].len())
                    .map(|e| self.shares(l, e))
                    .collect()
            })
            .collect();
        let active: Vec<Vec<f64>> = (0..self.counts.len())
            .map(|l| {
                (0..self.names.len())
                    .map(|d| self.active_per_token(l, d))
                    .collect()
            })
            .collect();
        json!({
            "domains": self.names,
            "domain_tokens": self.domain_tokens,
            "counts": self.counts,
            "shares": shares,
            "specialisation": self.specialisation(),
            "active_experts_per_token": active,
            "active_experts_per_token_mean_over_layers": self.active_by_domain(),
        })
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunLog {
    pub name: String,
    pub steps: Vec<StepLog>,
    /// Mean next-byte cross-entropy over the held-out tokens (nats/byte).
    pub val_loss: f64,
    /// The same per domain (tokens labelled by the domain of the input byte).
    pub val_by_domain: Vec<f64>,
    /// Training wall time (the steps only).
    pub wall_s: f64,
    pub tokens: usize,
    pub affinity: Affinity,
    /// The MoE layers' share of a training step's time, and how it was measured.
    pub moe_share: Option<(f64, String)>,
    /// Anything else the run reports (device memory, reference checks, samples): merged into
    /// its JSON object.
    pub extra: Value,
}

/// Mean and standard deviation of the measured sparsities from step `from` on.
pub fn sparsity_stats(steps: &[StepLog], from: usize) -> Option<(f64, f64)> {
    let v: Vec<f64> = steps
        .iter()
        .filter(|s| s.step >= from)
        .filter_map(|s| s.sparsity)
        .collect();
    if v.is_empty() {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    Some((m, var.sqrt()))
}

/// The first step from which the measured sparsity stays within `tol` of `target` to the end
/// (the start of the paper's stage III), if any.
pub fn settled_step(steps: &[StepLog], target: f64, tol: f64) -> Option<usize> {
    let measured: Vec<(usize, f64)> = steps
        .iter()
        .filter_map(|s| s.sparsity.map(|v| (s.step, v)))
        .collect();
    let mut first = None;
    for &(step, v) in measured.iter().rev() {
        if (v - target).abs() > tol {
            break;
        }
        first = Some(step);
    }
    first
}

impl RunLog {
    pub fn to_json(&self, target: f64) -> Value {
        let steps: Vec<Value> = self.steps.iter().map(|s| s.to_json()).collect();
        let half = self.steps.len() / 2;
        let settled = settled_step(&self.steps, target, 0.01);
        let by_domain: serde_json::Map<String, Value> = self
            .affinity
            .names
            .iter()
            .zip(&self.val_by_domain)
            .map(|(n, v)| (n.clone(), json!(v)))
            .collect();
        let mut doc = json!({
            "name": self.name,
            "val_loss": self.val_loss,
            "val_loss_by_domain": by_domain,
            "wall_s": self.wall_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens as f64 / self.wall_s,
            "moe_share_of_step": self.moe_share.as_ref().map(|(v, _)| *v),
            "moe_share_method": self.moe_share.as_ref().map(|(_, m)| m.clone()),
            "target_sparsity": target,
            "sparsity_second_half": sparsity_stats(&self.steps, half)
                .map(|(m, s)| json!({"mean": m, "std": s})),
            "settled_within_0.01_from_step": settled,
            "affinity": self.affinity.to_json(),
            "steps": steps,
        });
        if let (Some(d), Some(e)) = (doc.as_object_mut(), self.extra.as_object()) {
            d.extend(e.clone());
        }
        doc
    }
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a TrueType font for plotters (as examples/bench_plot.rs does): DejaVu Sans from
/// the system or the file named by REMOE_PLOT_FONT.
pub fn load_font() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::var("REMOE_PLOT_FONT").ok().or_else(|| {
        FONT_CANDIDATES
            .iter()
            .find(|p| Path::new(p).is_file())
            .map(|p| p.to_string())
    });
    let path =
        path.ok_or("no TrueType font found: install fonts-dejavu-core or set REMOE_PLOT_FONT")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(&path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| format!("{path} is not a usable font"))?;
    Ok(())
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);

/// One curve of a panel.
struct Curve<'a> {
    label: &'a str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn panel(
    area: &Area,
    title: &str,
    curves: &[Curve],
    log_y: bool,
    hline: Option<(f64, &str)>,
) -> Result<(), Box<dyn std::error::Error>> {
    let pts = || curves.iter().flat_map(|c| c.points.iter());
    let x_max = pts().map(|p| p.0).fold(1.0, f64::max);
    let ys: Vec<f64> = pts()
        .map(|p| p.1)
        .chain(hline.map(|h| h.0))
        .filter(|y| y.is_finite() && (!log_y || *y > 0.0))
        .collect();
    if ys.is_empty() {
        return Ok(());
    }
    let (mut lo, mut hi) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
    if hi <= lo {
        hi = lo + 1.0;
    }
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70);
    if log_y {
        lo /= 1.5;
        hi *= 1.5;
        let mut chart = builder.build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(("sans-serif", 14))
            .draw()?;
        for c in curves {
            let color = c.color;
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied().filter(|p| p.1 > 0.0),
                    color.stroke_width(2),
                ))?
                .label(c.label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    } else {
        let pad = 0.05 * (hi - lo);
        let mut chart = builder.build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 14))
            .draw()?;
        for c in curves {
            let color = c.color;
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(c.label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2))
                });
        }
        if let Some((y, label)) = hline {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, y), (x_max, y)],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))?
                .label(label)
                .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    Ok(())
}

fn series(log: &RunLog, f: impl Fn(&StepLog) -> Option<f64>) -> Vec<(f64, f64)> {
    log.steps
        .iter()
        .filter_map(|s| f(s).map(|v| (s.step as f64, v)))
        .collect()
}

/// `training.png`: sparsity with its target, lambda and the regulariser (log scale) of the
/// ReMoE run, and both runs' LM loss; each a panel of one 2x2 figure.
pub fn plot(
    path: &Path,
    remoe: &RunLog,
    topk: Option<&RunLog>,
    target: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (1600, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let one = |label, points| {
        vec![Curve {
            label,
            color: BLUE,
            points,
        }]
    };
    panel(
        &panels[0],
        "sparsity (mean over layers)",
        &one("ReMoE", series(remoe, |s| s.sparsity)),
        false,
        Some((target, "target 1 - k/E")),
    )?;
    panel(
        &panels[1],
        "lambda (one for all layers)",
        &one("ReMoE", series(remoe, |s| Some(s.lambda))),
        true,
        None,
    )?;
    panel(
        &panels[2],
        "regulariser (sum over layers)",
        &one("ReMoE", series(remoe, |s| Some(s.reg_loss))),
        true,
        None,
    )?;
    let mut loss = one("ReMoE", series(remoe, |s| Some(s.lm_loss)));
    if let Some(t) = topk {
        loss.push(Curve {
            label: "TopK",
            color: ORANGE,
            points: series(t, |s| Some(s.lm_loss)),
        });
    }
    panel(&panels[3], "LM loss (nats/byte)", &loss, false, None)?;
    root.present()?;
    Ok(())
}

/// Writes `log.json` (`config`, both runs, and the keys of `more` at the top level),
/// `training.png` and `affinity.txt` under `dir` and prints the affinity tables.
pub fn write_all(
    dir: &Path,
    config: Value,
    remoe: &RunLog,
    topk: Option<&RunLog>,
    target: f64,
    more: Value,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut doc = json!({
        "config": config,
        "remoe": remoe.to_json(target),
        "topk": topk.map(|t| t.to_json(target)),
    });
    if let (Some(d), Some(m)) = (doc.as_object_mut(), more.as_object()) {
        d.extend(m.clone());
    }
    std::fs::write(dir.join("log.json"), serde_json::to_string_pretty(&doc)?)?;
    let mut text = format!(
        "{} expert-domain affinity (held-out set)\n{}",
        remoe.name,
        remoe.affinity.table()
    );
    if let Some(t) = topk {
        text.push_str(&format!(
            "{} expert-domain affinity (held-out set)\n{}",
            t.name,
            t.affinity.table()
        ));
    }
    std::fs::write(dir.join("affinity.txt"), &text)?;
    println!("{text}");
    match load_font() {
        Ok(()) => {
            plot(&dir.join("training.png"), remoe, topk, target)?;
            println!("wrote {}", dir.join("training.png").display());
        }
        Err(e) => println!("no plot: {e}"),
    }
    println!(
        "wrote {} and {}",
        dir.join("log.json").display(),
        dir.join("affinity.txt").display()
    );
    Ok(())
}

/// Prints a run's summary lines.
pub fn summarise(log: &RunLog, target: Option<f64>) {
    let speed = if log.tokens > 0 {
        format!(
            "wall {:.1} s, {:.0} tokens/s",
            log.wall_s,
            log.tokens as f64 / log.wall_s
        )
    } else {
        "no steps trained here".to_string()
    };
    println!(
        "{}: validation loss {:.4} nats/byte; {speed}; specialisation {:.3} (1/D = {:.3})",
        log.name,
        log.val_loss,
        log.affinity.specialisation(),
        1.0 / log.affinity.names.len().max(1) as f64
    );
    let names = &log.affinity.names;
    let per = |v: &[f64], prec: usize| -> String {
        names
            .iter()
            .zip(v)
            .map(|(n, x)| format!("{n} {x:.prec$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !log.val_by_domain.is_empty() {
        println!(
            "  validation loss by domain: {}",
            per(&log.val_by_domain, 4)
        );
    }
    println!(
        "  active experts per token by domain (mean over layers): {}",
        per(&log.affinity.active_by_domain(), 3)
    );
    if let Some(target) = target {
        let half = log.steps.len() / 2;
        if let Some((m, s)) = sparsity_stats(&log.steps, half) {
            println!(
                "  sparsity over the second half: mean {m:.4} (target {target:.4}, off by {:.4}), std {s:.4}",
                (m - target).abs()
            );
        }
        match settled_step(&log.steps, target, 0.01) {
            Some(s) => println!("  sparsity within 0.01 of the target from step {s} on"),
            None => println!("  sparsity not within 0.01 of the target at the end"),
        }
    }
    if let Some((share, how)) = &log.moe_share {
        println!(
            "  MoE layers' share of the step time: {:.1}% ({how})",
            100.0 * share
        );
    }
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_counts_routes_and_active_experts_by_domain() {
        let names = vec!["a".to_string(), "b".to_string()];
        let mut aff = Affinity::new(1, 2, &names);
        // Three tokens: a routed to expert 0; b to both; b to none.
        aff.add(&[0, 1, 1], &[vec![1, 0, 1, 1, 0, 0]]);
        assert_eq!(aff.domain_tokens, vec![1, 2]);
        assert_eq!(aff.counts[0], vec![vec![1, 1], vec![0, 1]]);
        assert_eq!(aff.active_per_token(0, 0), 1.0);
        assert_eq!(aff.active_per_token(0, 1), 1.0);
        // Expert 0: 1 of 1 a-token, 1 of 2 b-tokens: shares 2/3, 1/3.
        let s = aff.shares(0, 0);
        assert!((s[0] - 2.0 / 3.0).abs() < 1e-12 && (s[1] - 1.0 / 3.0).abs() < 1e-12);
        assert!(aff.table().contains("active"));
    }

    #[test]
    fn step_logs_round_trip_through_json() {
        let s = StepLog {
            step: 3,
            lr: 1e-4,
            lm_loss: 2.5,
            reg_loss: 1e-3,
            sparsity: None,
            lambda: 1e-8,
            tokens_per_s: 1e5,
            grad_norm: Some(0.7),
            mem_gib: None,
        };
        let t = StepLog::from_json(&s.to_json()).unwrap();
        assert_eq!(format!("{s:?}"), format!("{t:?}"));
        assert_eq!(mean_std(&[1.0, 3.0]), (2.0, 2f64.sqrt()));
    }
}
