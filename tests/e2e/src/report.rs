//! The benchmarks' common table. Each benchmark binary saves its rows
//! (every sample, not only the median) to `build/bench/<bench>.rows.json`;
//! `bench-table`, the last step of `make bench`, prints all of them as one
//! table: for each row the median and the min-max of isola's samples, of
//! what it is compared with (runc, QEMU, the host, or isola booting cold),
//! the ratio of the medians and the goal.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One measured quantity, isola's samples against another's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub what: String,
    /// ms, MiB, MiB/s...
    pub unit: String,
    /// What isola ran as (`isola`, `isola template`, `isola-vmm`).
    pub label: String,
    pub samples: Vec<f64>,
    /// The other side: its name and samples (none for a figure isola alone
    /// has, such as the memory the 10th idle container adds).
    pub against: Option<(String, Vec<f64>)>,
    /// The goal, as the issue states it (`ratio <= 1.2`, `<= 25 MiB`).
    pub goal: String,
}

impl Row {
    pub fn new(what: &str, unit: &str, label: &str, samples: &[f64]) -> Row {
        Row {
            what: what.to_string(),
            unit: unit.to_string(),
            label: label.to_string(),
            samples: samples.to_vec(),
            against: None,
            goal: String::new(),
        }
    }

    pub fn against(mut self, label: &str, samples: &[f64]) -> Row {
        self.against = Some((label.to_string(), samples.to_vec()));
        self
    }

    pub fn goal(mut self, goal: &str) -> Row {
        self.goal = goal.to_string();
        self
    }

    /// isola's median over the other's (`None` without another side or
    /// when the other's median is zero).
    pub fn ratio(&self) -> Option<f64> {
        let (_, other) = self.against.as_ref()?;
        let (a, b) = (Stats::of(&self.samples)?.median, Stats::of(other)?.median);
        (b != 0.0).then(|| a / b)
    }
}

/// Median, minimum and maximum of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    /// `None` for no samples. The median of an even count is the upper
    /// middle one, as [`crate::median`] takes it.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some(Stats {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }

    fn cell(&self, unit: &str) -> String {
        let p = if unit == "ms" { 0 } else { 1 };
        if self.n == 1 {
            format!("{:.p$}", self.median)
        } else {
            format!(
                "{:.p$} ({:.p$}-{:.p$}, n={})",
                self.median, self.min, self.max, self.n
            )
        }
    }
}

/// Where the rows go: the project's `build/bench`.
pub fn dir() -> PathBuf {
    crate::project_dir().join("build/bench")
}

/// Saves `bench`'s rows (replacing what an earlier run saved).
pub fn save(bench: &str, host: &str, rows: &[Row]) -> Result<PathBuf> {
    let dir = dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{bench}.rows.json"));
    let saved = Saved {
        bench: bench.to_string(),
        host: host.to_string(),
        rows: rows.to_vec(),
    };
    std::fs::write(&path, serde_json::to_vec_pretty(&saved)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// One benchmark's saved rows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Saved {
    pub bench: String,
    /// The KVM host it ran on (native or emulated).
    pub host: String,
    pub rows: Vec<Row>,
}

/// Every `*.rows.json` in `dir`, in the order `order` names benchmarks
/// (others after, by name).
pub fn load_all(dir: &Path, order: &[&str]) -> Result<Vec<Saved>> {
    let mut all = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let is_rows = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".rows.json"));
        if !is_rows {
            continue;
        }
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let saved: Saved = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a benchmark's rows", path.display()))?;
        all.push(saved);
    }
    let rank = |s: &Saved| {
        order
            .iter()
            .position(|o| *o == s.bench)
            .unwrap_or(order.len())
    };
    all.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.bench.cmp(&b.bench)));
    Ok(all)
}

/// The one table, in Markdown.
pub fn table(all: &[Saved]) -> String {
    let mut out = String::new();
    out.push_str(
        "| bench | what | isola: median (min-max, n) | compared with: median (min-max, n) | ratio | goal |\n",
    );
    out.push_str("|---|---|---|---|---|---|\n");
    for saved in all {
        for row in &saved.rows {
            let mine = Stats::of(&row.samples)
                .map(|s| format!("{}: {}", row.label, s.cell(&row.unit)))
                .unwrap_or_else(|| format!("{}: no samples", row.label));
            let other = match &row.against {
                Some((label, samples)) => Stats::of(samples)
                    .map(|s| format!("{label}: {}", s.cell(&row.unit)))
                    .unwrap_or_else(|| format!("{label}: no samples")),
                None => "-".to_string(),
            };
            let ratio = row
                .ratio()
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".to_string());
            let goal = if row.goal.is_empty() { "-" } else { &row.goal };
            out.push_str(&format!(
                "| {} | {} ({}) | {mine} | {other} | {ratio} | {goal} |\n",
                saved.bench, row.what, row.unit
            ));
        }
    }
    let hosts: std::collections::BTreeSet<&str> = all.iter().map(|s| s.host.as_str()).collect();
    out.push_str(&format!(
        "\nKVM host: {}. Ratios are of medians measured side by side in one run.\n",
        hosts.into_iter().collect::<Vec<_>>().join(", ")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_median_min_max() {
        let s = Stats::of(&[5.0, 1.0, 3.0, f64::NAN, 9.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (5.0, 1.0, 9.0, 4));
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[2.0]).unwrap().median, 2.0);
    }

    #[test]
    fn ratio_is_of_medians() {
        let row =
            Row::new("x", "ms", "isola", &[10.0, 30.0, 20.0]).against("runc", &[10.0, 5.0, 40.0]);
        assert_eq!(row.ratio(), Some(2.0));
        assert_eq!(Row::new("x", "ms", "isola", &[1.0]).ratio(), None);
        assert_eq!(
            Row::new("x", "ms", "isola", &[1.0])
                .against("runc", &[0.0])
                .ratio(),
            None
        );
    }

    #[test]
    fn rows_round_trip_and_print_in_order() {
        let dir = std::env::temp_dir().join(format!("isola-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (bench, what) in [("zeta", "z"), ("shim", "ctr run"), ("pods", "pod start")] {
            let saved = Saved {
                bench: bench.into(),
                host: "emulated".into(),
                rows: vec![Row::new(what, "ms", "isola", &[3.0, 1.0, 2.0])
                    .against("runc", &[1.0, 1.0, 1.0])
                    .goal("ratio <= 1.2")],
            };
            std::fs::write(
                dir.join(format!("{bench}.rows.json")),
                serde_json::to_vec(&saved).unwrap(),
            )
            .unwrap();
        }
        std::fs::write(dir.join("shim.json"), b"{}").unwrap();
        let all = load_all(&dir, &["shim", "pods"]).unwrap();
        let names: Vec<&str> = all.iter().map(|s| s.bench.as_str()).collect();
        assert_eq!(names, ["shim", "pods", "zeta"]);
        let text = table(&all);
        assert!(text.contains(
            "| shim | ctr run (ms) | isola: 2 (1-3, n=3) | runc: 1 (1-1, n=3) | 2.00 | ratio <= 1.2 |"
        ), "{text}");
        assert!(text.contains("KVM host: emulated."), "{text}");
        std::fs::write(dir.join("bad.rows.json"), b"nope").unwrap();
        let err = load_all(&dir, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("bad.rows.json"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
