//! The benchmark report: the ReMoE layer against the TopK dispatch layer and cuBLAS at SPEC's
//! configurations A, B, C, D, S, uniform and skewed loads. Prints a table (median time,
//! TFLOP/s, fraction of the dense cuBLAS floor, measured density, device) and the ReMoE/TopK
//! throughput ratio per configuration (the paper's claim: within 3%), and writes every row as
//! JSON. Draw the plot from the JSON with examples/bench_plot.rs.
//!
//!   scripts/with-cuda cargo run --release --example bench_report -- [--json PATH] [CONFIG...]

#[path = "../benches/support/mod.rs"]
mod support;

use remoe_kernels::{Device, RouterKind};
use support::{measure, router_name, Load, Row, CONFIGS};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut json_path = String::from("bench-report.json");
    let mut wanted = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--json" {
            json_path = args.next().expect("--json needs a path");
        } else {
            wanted.push(a);
        }
    }
    let dev = Device::new(0)?;
    let device = dev.name()?;
    println!("device: {device}");
    println!(
        "{:<3} {:<8} {:<6} {:>7} {:>7} {:>8} {:>6} {:>9} {:>6} {:>9} {:>7} {:>9}",
        "cfg",
        "load",
        "router",
        "density",
        "|A|",
        "fwd ms",
        "TF/s",
        "f+b ms",
        "TF/s",
        "floor ms",
        "of flr",
        "loop ms"
    );
    let mut rows: Vec<Row> = Vec::new();
    for (name, cfg) in CONFIGS {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        for load in [Load::Uniform, Load::Skewed] {
            for r in measure(&dev, name, cfg, load, 20)? {
                println!(
                    "{:<3} {:<8} {:<6} {:>7.4} {:>7} {:>8.4} {:>6.0} {:>9.4} {:>6.0} {:>9.4} {:>7.2} {:>9.4}",
                    r.config,
                    r.load.name(),
                    router_name(r.router),
                    r.density,
                    r.pairs,
                    r.fwd_ms,
                    r.fwd_tflops(),
                    r.fwd_bwd_ms,
                    r.fwd_bwd_tflops(),
                    r.dense_floor_ms,
                    r.floor_fraction(),
                    r.per_expert_ms,
                );
                rows.push(r);
            }
        }
    }

    // The paper's claim: ReMoE's throughput (tokens per second, T / time) within 3% of TopK's
    // at the same mean k.
    println!("\nReMoE / TopK throughput (tokens/s ratio; > 1: ReMoE faster)");
    println!(
        "{:<3} {:<8} {:>9} {:>13}",
        "cfg", "load", "forward", "fwd+bwd"
    );
    for pair in rows.chunks(2) {
        let (re, tk) = (&pair[0], &pair[1]);
        assert!(re.router == RouterKind::Relu && tk.router == RouterKind::TopK);
        println!(
            "{:<3} {:<8} {:>+8.1}% {:>+12.1}%",
            re.config,
            re.load.name(),
            (tk.fwd_ms / re.fwd_ms - 1.0) * 100.0,
            (tk.fwd_bwd_ms / re.fwd_bwd_ms - 1.0) * 100.0
        );
    }

    let json: Vec<serde_json::Value> = rows.iter().map(|r| r.json(&device)).collect();
    let text = serde_json::to_string_pretty(&json).expect("rows serialise");
    std::fs::write(&json_path, text)?;
    println!("\nwrote {} rows to {json_path}", rows.len());
    Ok(())
}
