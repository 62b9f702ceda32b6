//! Draws the benchmark report's JSON (examples/bench_report.rs) as a PNG: forward and
//! forward+backward throughput per configuration and load, ReMoE against TopK on each GEMM path
//! and the cuBLAS baselines; and, when the report timed them, each expert GEMM's speed relative
//! to the same-shape dense cuBLAS GEMM. Reads the current report (an object with `layer` and
//! `gemms`) and the earlier one (an array of layer rows, one GEMM path); the report's FAILED
//! rows are named on stdout, not drawn. Needs a TrueType font: DejaVu Sans from the system
//! (Debian: fonts-dejavu-core), or the file named by REMOE_PLOT_FONT.
//!
//!   cargo run --release --example bench_plot -- bench-report.json docs/benchmarks.png

use std::path::PathBuf;

use clap::Parser;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::var("REMOE_PLOT_FONT").ok().or_else(|| {
        FONT_CANDIDATES
            .iter()
            .find(|p| std::path::Path::new(p).is_file())
            .map(|p| p.to_string())
    });
    let path =
        path.ok_or("no TrueType font found: install fonts-dejavu-core or set REMOE_PLOT_FONT")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(&path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| format!("{path} is not a usable font"))?;
    Ok(())
}

/// One bar series: its legend, colour and a value per category (None: not measured).
struct Series {
    label: String,
    color: RGBColor,
    values: Vec<Option<f64>>,
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const LIGHT_BLUE: RGBColor = RGBColor(120, 170, 215);
const LIGHT_ORANGE: RGBColor = RGBColor(255, 187, 120);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const TAB: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    cats: &[String],
    series: &[Series],
    hline: Option<(f64, &str)>,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let series: Vec<&Series> = series
        .iter()
        .filter(|s| s.values.iter().any(Option::is_some))
        .collect();
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .chain(hline.map(|h| h.0))
        .fold(0.0f64, f64::max);
    // Headroom for the legend in the upper right.
    let entries = series.len() + hline.is_some() as usize;
    let ymax = (top * (1.2 + 0.09 * entries as f64)).max(1e-3);
    let n = cats.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 && i < cats.len() {
                cats[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .label_style(("sans-serif", 15))
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (bi, s) in series.iter().enumerate() {
        let color = s.color;
        chart
            .draw_series(s.values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let x0 = i as f64 + 0.1 + bi as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.95, v)],
                    color.filled(),
                ))
            }))?
            .label(s.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    if let Some((y, label)) = hline {
        chart
            .draw_series(LineSeries::new(
                [(0.0, y), (n as f64, y)],
                BLACK.stroke_width(2),
            ))?
            .label(label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

/// Draws the benchmark report's JSON (examples/bench_report.rs) as a PNG.
#[derive(Parser)]
#[command(name = "bench_plot")]
struct Args {
    /// The report's JSON.
    #[arg(default_value = "bench-report.json")]
    input: PathBuf,
    /// The PNG to write.
    #[arg(default_value = "docs/benchmarks.png")]
    output: PathBuf,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args { input, output } = Args::parse();
    load_font()?;
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&input)?)?;
    let array = |v: &Value| v.as_array().cloned().unwrap_or_default();
    // The earlier report is an array of layer rows; the current one an object.
    let (rows, gemms) = match &doc {
        Value::Array(a) => (a.clone(), Vec::new()),
        _ => (array(&doc["layer"]), array(&doc["gemms"])),
    };
    // A part of a configuration that failed is a row with "status": "FAILED" (no figures): not
    // drawn, only named.
    let (failed, rows): (Vec<Value>, Vec<Value>) =
        rows.into_iter().partition(|r| r["status"] == "FAILED");
    for f in &failed {
        let s = |k: &str| f[k].as_str().unwrap_or("-").to_string();
        println!(
            "not drawn: {} {} {}: FAILED [{}]: {}",
            s("config"),
            s("load"),
            s("path"),
            s("stage"),
            s("error")
        );
    }
    let device = doc["device"]
        .as_str()
        .or_else(|| rows.first().and_then(|r| r["device"].as_str()))
        .unwrap_or("unknown device")
        .to_string();
    // GEMM paths in report order (none in the earlier report: one unnamed path).
    let mut paths: Vec<Option<String>> = Vec::new();
    for r in &rows {
        let p = r["path"].as_str().map(str::to_string);
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    // Categories in report order: "A uniform", "A skewed", ...
    let mut cats: Vec<(String, String)> = Vec::new();
    for r in &rows {
        let c = (
            r["config"].as_str().unwrap_or("?").to_string(),
            r["load"].as_str().unwrap_or("?").to_string(),
        );
        if !cats.contains(&c) {
            cats.push(c);
        }
    }
    let find = |cfg: &str, load: &str, router: &str, path: &Option<String>| {
        rows.iter().find(|r| {
            r["config"] == cfg
                && r["load"] == load
                && r["router"] == router
                && r["path"].as_str() == path.as_deref()
        })
    };
    let layer_series =
        |label: String, color, key: &str, router: &str, path: &Option<String>| Series {
            label,
            color,
            values: cats
                .iter()
                .map(|(c, l)| find(c, l, router, path).and_then(|r| r[key].as_f64()))
                .collect(),
        };
    let named = |base: &str, path: &Option<String>| match path {
        Some(p) if paths.len() > 1 || p != "mma-sync" => format!("{base} ({p})"),
        _ => base.to_string(),
    };
    let first = paths.first().cloned().unwrap_or(None);
    let mut fwd = Vec::new();
    let mut fwd_bwd = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let (re, tk) = if i == 0 {
            (BLUE, ORANGE)
        } else {
            (LIGHT_BLUE, LIGHT_ORANGE)
        };
        for (out, key) in [
            (&mut fwd, "forward_tflops"),
            (&mut fwd_bwd, "forward_backward_tflops"),
        ] {
            out.push(layer_series(named("ReMoE", p), re, key, "ReMoE", p));
            out.push(layer_series(named("TopK", p), tk, key, "TopK", p));
        }
    }
    fwd.push(layer_series(
        "cuBLAS dense pair (floor)".into(),
        GREEN,
        "dense_floor_tflops",
        "ReMoE",
        &first,
    ));
    fwd.push(layer_series(
        "cuBLAS per-expert loop (GEMMs only)".into(),
        PURPLE,
        "per_expert_cublas_tflops",
        "ReMoE",
        &first,
    ));
    fwd_bwd.push(layer_series(
        "cuBLAS dense training step (floor)".into(),
        GREEN,
        "dense_floor_forward_backward_tflops",
        "ReMoE",
        &first,
    ));
    let cat_names: Vec<String> = cats.iter().map(|(c, l)| format!("{c} {l}")).collect();

    let panels = if gemms.is_empty() { 2 } else { 3 };
    let root = BitMapBackend::new(&output, (1400, 450 * panels)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels as usize, 1));
    draw_panel(
        &areas[0],
        &format!("Layer forward throughput (TFLOP/s, 6|A|HF) — {device}"),
        "TFLOP/s",
        &cat_names,
        &fwd,
        None,
    )?;
    draw_panel(
        &areas[1],
        &format!("Layer forward+backward throughput (TFLOP/s, 18|A|HF) — {device}"),
        "TFLOP/s",
        &cat_names,
        &fwd_bwd,
        None,
    )?;
    if !gemms.is_empty() {
        // One path: Hopper where it was timed.
        let gemm_path = gemms
            .iter()
            .find_map(|g| g["paths"].get("hopper").map(|_| "hopper"))
            .unwrap_or("mma-sync");
        let mut configs: Vec<String> = Vec::new();
        let mut kinds: Vec<(String, String)> = Vec::new();
        for g in &gemms {
            let c = g["config"].as_str().unwrap_or("?").to_string();
            if !configs.contains(&c) {
                configs.push(c);
            }
            if g["flops"].as_f64().unwrap_or(0.0) > 0.0 {
                let k = (
                    g["gemm"].as_str().unwrap_or("?").to_string(),
                    g["name"].as_str().unwrap_or("?").to_string(),
                );
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        let series: Vec<Series> = kinds
            .iter()
            .enumerate()
            .map(|(i, (key, name))| Series {
                label: name.clone(),
                color: TAB[i % TAB.len()],
                values: configs
                    .iter()
                    .map(|c| {
                        gemms
                            .iter()
                            .find(|g| g["config"] == c.as_str() && g["gemm"] == key.as_str())
                            .and_then(|g| g["paths"][gemm_path]["cublas_over_ours"].as_f64())
                    })
                    .collect(),
            })
            .collect();
        let target = doc["targets"]["gemm_cublas_over_ours"]
            .as_f64()
            .unwrap_or(0.8);
        draw_panel(
            &areas[2],
            &format!(
                "Expert GEMMs ({gemm_path} path): same-shape dense cuBLAS time / ours — {device}"
            ),
            "cuBLAS time / ours",
            &configs,
            &series,
            Some((target, "target")),
        )?;
    }
    root.present()?;
    println!("wrote {}", output.display());
    Ok(())
}
