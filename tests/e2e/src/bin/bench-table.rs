//! bench-table: the last step of `make bench`. Prints one table of every
//! benchmark's rows (build/bench/*.rows.json, saved by bench, bench-shim,
//! bench-pods and bench-containers in the same `make bench`) and writes it
//! to build/bench/table.md.

use anyhow::{Context, Result};
use isola_e2e::report;

/// The order the table lists benchmarks in.
const ORDER: [&str; 4] = ["bench-shim", "bench-pods", "bench", "bench-containers"];

fn main() {
    if let Err(err) = run() {
        eprintln!("bench-table: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let dir = report::dir();
    let all = report::load_all(&dir, &ORDER)?;
    anyhow::ensure!(
        !all.is_empty(),
        "no benchmark rows in {}: run `make bench`",
        dir.display()
    );
    let table = report::table(&all);
    println!("{table}");
    let path = dir.join("table.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    println!("table: {}", path.display());
    Ok(())
}
