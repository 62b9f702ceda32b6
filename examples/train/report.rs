//! What a training run records and how it is reported: the per-step log, the expert-domain
//! affinity table (the paper's Table 12), the JSON file and the PNG plots of sparsity, lambda,
//! the regulariser and the LM loss per step (the paper's Figures 3 and 4). Shared by the GPU
//! run and the CPU reference run.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::{json, Value};

use super::corpus::DOMAINS;

/// One training step's measurements.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    pub step: usize,
    pub lr: f64,
    /// Cross-entropy of the next byte, nats.
    pub lm_loss: f64,
    /// The balance loss in the graph, summed over layers: ReMoE's regulariser at its lambda,
    /// TopK's aux loss at its c.
    pub reg_loss: f64,
    /// Mean over layers of 1 - |A|/(T E) (None when not measured at this step).
    pub sparsity: Option<f64>,
    /// Mean over layers of lambda (ReMoE) or c (TopK).
    pub lambda: f64,
    pub tokens_per_s: f64,
}

/// Tokens routed to each expert by domain on the held-out set: `counts[layer][expert][domain]`,
/// and the held-out tokens of each domain.
#[derive(Debug, Clone, Default)]
pub struct Affinity {
    pub counts: Vec<Vec<[u64; DOMAINS.len()]>>,
    pub domain_tokens: [u64; DOMAINS.len()],
}

impl Affinity {
    pub fn new(layers: usize, experts: usize) -> Self {
        Self {
            counts: vec![vec![[0; DOMAINS.len()]; experts]; layers],
            domain_tokens: [0; DOMAINS.len()],
        }
    }

    /// For one expert: the fraction of its routed tokens from each domain, as if every domain
    /// had the same number of held-out tokens (each count is divided by its domain's tokens
    /// first), so that a domain's share of the corpus does not pass for specialisation. An
    /// expert that ignores domains gets 1/D everywhere.
    pub fn shares(&self, layer: usize, expert: usize) -> [f64; DOMAINS.len()] {
        let c = &self.counts[layer][expert];
        let mut r = [0.0; DOMAINS.len()];
        for d in 0..DOMAINS.len() {
            r[d] = c[d] as f64 / self.domain_tokens[d].max(1) as f64;
        }
        let s: f64 = r.iter().sum();
        if s > 0.0 {
            r.iter_mut().for_each(|v| *v /= s);
        }
        r
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

    /// The table, one block per layer: experts as rows, domains as columns (percent).
    pub fn table(&self) -> String {
        let mut s = String::new();
        for l in 0..self.counts.len() {
            s.push_str(&format!("  layer {l}: share of each expert's tokens by domain (%, domains weighted equally)\n    expert"));
            for d in DOMAINS {
                s.push_str(&format!(" {d:>10}"));
            }
            s.push_str("   tokens\n");
            for e in 0..self.counts[l].len() {
                s.push_str(&format!("    {e:>6}"));
                for v in self.shares(l, e) {
                    s.push_str(&format!(" {:>10.1}", 100.0 * v));
                }
                s.push_str(&format!(" {:>8}\n", self.counts[l][e].iter().sum::<u64>()));
            }
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let shares: Vec<Vec<Vec<f64>>> = (0..self.counts.len())
            .map(|l| {
                (0..self.counts[l].len())
                    .map(|e| self.shares(l, e).to_vec())
                    .collect()
            })
            .collect();
        json!({
            "domains": DOMAINS,
            "domain_tokens": self.domain_tokens,
            "counts": self.counts,
            "shares": shares,
            "specialisation": self.specialisation(),
        })
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunLog {
    pub name: String,
    pub steps: Vec<StepLog>,
    pub val_loss: f64,
    pub wall_s: f64,
    pub tokens: usize,
    pub affinity: Affinity,
    /// The MoE layers' share of a training step's time, and how it was measured.
    pub moe_share: Option<(f64, String)>,
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
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                json!({
                    "step": s.step, "lr": s.lr, "lm_loss": s.lm_loss, "reg_loss": s.reg_loss,
                    "sparsity": s.sparsity, "lambda": s.lambda, "tokens_per_s": s.tokens_per_s,
                })
            })
            .collect();
        let half = self.steps.len() / 2;
        let settled = settled_step(&self.steps, target, 0.01);
        json!({
            "name": self.name,
            "val_loss": self.val_loss,
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
        })
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
        "lambda (mean over layers)",
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

/// Writes `log.json`, `training.png` and `affinity.txt` under `dir` and prints the summary.
pub fn write_all(
    dir: &Path,
    config: Value,
    remoe: &RunLog,
    topk: Option<&RunLog>,
    target: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let doc = json!({
        "config": config,
        "remoe": remoe.to_json(target),
        "topk": topk.map(|t| t.to_json(target)),
    });
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
    println!(
        "{}: validation loss {:.4} nats/byte; wall {:.1} s, {:.0} tokens/s; specialisation {:.3} (1/D = {:.3})",
        log.name,
        log.val_loss,
        log.wall_s,
        log.tokens as f64 / log.wall_s,
        log.affinity.specialisation(),
        1.0 / DOMAINS.len() as f64
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
