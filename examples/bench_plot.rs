//! Draws the benchmark report's JSON (examples/bench_report.rs) as a PNG: forward and
//! forward+backward throughput per configuration and load, ReMoE against TopK and the cuBLAS
//! baselines. Needs a TrueType font: DejaVu Sans from the system (Debian: fonts-dejavu-core), or
//! the file named by REMOE_PLOT_FONT.
//!
//!   cargo run --release --example bench_plot -- bench-report.json docs/benchmarks.png

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

struct Bar {
    label: &'static str,
    key: &'static str,
    router: &'static str,
    color: RGBColor,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = args.next().unwrap_or_else(|| "bench-report.json".into());
    let output = args.next().unwrap_or_else(|| "docs/benchmarks.png".into());
    load_font()?;
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&input)?)?;
    let device = rows
        .first()
        .and_then(|r| r["device"].as_str())
        .unwrap_or("unknown device")
        .to_string();
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
    let find = |cfg: &str, load: &str, router: &str| {
        rows.iter()
            .find(|r| r["config"] == cfg && r["load"] == load && r["router"] == router)
    };

    let root = BitMapBackend::new(&output, (1400, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(450);
    let panels: [(&DrawingArea<_, _>, String, Vec<Bar>); 2] = [
        (
            &top,
            format!("Layer forward throughput (TFLOP/s, 6|A|HF) — {device}"),
            vec![
                Bar {
                    label: "ReMoE",
                    key: "forward_tflops",
                    router: "ReMoE",
                    color: RGBColor(31, 119, 180),
                },
                Bar {
                    label: "TopK",
                    key: "forward_tflops",
                    router: "TopK",
                    color: RGBColor(255, 127, 14),
                },
                Bar {
                    label: "cuBLAS dense pair (floor)",
                    key: "dense_floor_tflops",
                    router: "ReMoE",
                    color: RGBColor(44, 160, 44),
                },
                Bar {
                    label: "cuBLAS per-expert loop (GEMMs only)",
                    key: "per_expert_cublas_tflops",
                    router: "ReMoE",
                    color: RGBColor(148, 103, 189),
                },
            ],
        ),
        (
            &bottom,
            format!("Layer forward+backward throughput (TFLOP/s, 18|A|HF) — {device}"),
            vec![
                Bar {
                    label: "ReMoE",
                    key: "forward_backward_tflops",
                    router: "ReMoE",
                    color: RGBColor(31, 119, 180),
                },
                Bar {
                    label: "TopK",
                    key: "forward_backward_tflops",
                    router: "TopK",
                    color: RGBColor(255, 127, 14),
                },
            ],
        ),
    ];
    for (area, title, bars) in panels {
        let ymax = cats
            .iter()
            .flat_map(|(c, l)| bars.iter().map(move |b| (c, l, b)))
            .filter_map(|(c, l, b)| find(c, l, b.router).and_then(|r| r[b.key].as_f64()))
            .fold(0.0f64, f64::max)
            * 1.45; // headroom for the legend
        let n = cats.len();
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n as f64, 0.0..ymax.max(1.0))?;
        let cat_names: Vec<String> = cats.iter().map(|(c, l)| format!("{c} {l}")).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.26 && i < cat_names.len() {
                    cat_names[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("TFLOP/s")
            .label_style(("sans-serif", 15))
            .draw()?;
        let width = 0.8 / bars.len() as f64;
        for (bi, b) in bars.iter().enumerate() {
            let data: Vec<(usize, f64)> = cats
                .iter()
                .enumerate()
                .filter_map(|(i, (c, l))| {
                    find(c, l, b.router)
                        .and_then(|r| r[b.key].as_f64())
                        .map(|v| (i, v))
                })
                .collect();
            chart
                .draw_series(data.iter().map(|&(i, v)| {
                    let x0 = i as f64 + 0.1 + bi as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], b.color.filled())
                }))?
                .label(b.label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], b.color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    root.present()?;
    println!("wrote {output}");
    Ok(())
}
