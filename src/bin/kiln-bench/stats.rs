//! Figures over several runs (min / median / max, and the 99th percentile
//! once there are [`P99_MIN_SAMPLES`] of them) and the markdown tables they
//! are printed in.

use std::fmt::Write as _;
use std::time::Duration;

/// Samples needed before a figure shows its 99th percentile: with fewer,
/// p99 is just the maximum again.
pub const P99_MIN_SAMPLES: usize = 20;

/// The samples of one figure, in the order they were taken.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    /// No samples yet.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds one sample.
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    /// Adds a duration, in milliseconds.
    pub fn push_ms(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1000.0);
    }

    /// Each sample mapped through `f` (e.g. times to throughputs).
    pub fn map(&self, f: &dyn Fn(f64) -> f64) -> Samples {
        Samples(self.0.iter().map(|v| f(*v)).collect())
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The smallest sample.
    pub fn min(&self) -> Option<f64> {
        self.sorted().first().copied()
    }

    /// The largest sample.
    pub fn max(&self) -> Option<f64> {
        self.sorted().last().copied()
    }

    /// The median (the mean of the middle two for an even count).
    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// The 99th percentile (nearest rank), from [`P99_MIN_SAMPLES`] samples
    /// on.
    pub fn p99(&self) -> Option<f64> {
        let v = self.sorted();
        if v.len() < P99_MIN_SAMPLES {
            return None;
        }
        let rank = (v.len() as f64 * 0.99).ceil() as usize;
        v.get(rank.max(1) - 1).copied()
    }

    /// `min / median / max`, each written by `fmt`, followed by
    /// `(p99 …)` when there are enough samples for one.
    pub fn show(&self, fmt: impl Fn(f64) -> String) -> String {
        let (Some(lo), Some(mid), Some(hi)) = (self.min(), self.median(), self.max()) else {
            return "n/a".into();
        };
        let mut out = format!("{} / {} / {}", fmt(lo), fmt(mid), fmt(hi));
        if let Some(p) = self.p99() {
            let _ = write!(out, " (p99 {})", fmt(p));
        }
        out
    }

    /// Milliseconds, whole.
    pub fn ms(&self) -> String {
        self.show(|v| format!("{v:.0}"))
    }

    /// Ratios, two decimals.
    pub fn ratio(&self) -> String {
        self.show(|v| format!("{v:.2}"))
    }

    /// One decimal.
    pub fn one(&self) -> String {
        self.show(|v| format!("{v:.1}"))
    }
}

/// Elementwise `a / b` of two equally long sample lists (runs paired in
/// order: each ratio is taken within one run).
pub fn ratios(a: &Samples, b: &Samples) -> Samples {
    Samples(
        a.0.iter()
            .zip(&b.0)
            .filter(|(_, d)| **d > 0.0)
            .map(|(n, d)| n / d)
            .collect(),
    )
}

/// A markdown table.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are left empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as markdown, columns padded for reading as plain text.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let cell = |row: &Vec<String>, i: usize| row.get(i).cloned().unwrap_or_default();
        let widths: Vec<usize> = (0..cols)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .chain([self.header[i].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let mut out = String::new();
        let line = |out: &mut String, cells: Vec<String>| {
            out.push('|');
            for (i, c) in cells.iter().enumerate() {
                let _ = write!(out, " {c:<w$} |", w = widths[i]);
            }
            out.push('\n');
        };
        line(&mut out, self.header.clone());
        line(&mut out, widths.iter().map(|w| "-".repeat(*w)).collect());
        for r in &self.rows {
            line(&mut out, (0..cols).map(|i| cell(r, i)).collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let mut s = Samples::new();
        for v in [5.0, 1.0, 3.0] {
            s.push(v);
        }
        assert_eq!(
            (s.min(), s.median(), s.max()),
            (Some(1.0), Some(3.0), Some(5.0))
        );
        s.push(4.0);
        assert_eq!(s.median(), Some(3.5));
        assert_eq!(Samples::new().ms(), "n/a");
    }

    #[test]
    fn p99_only_from_twenty_samples_on() {
        let mut s = Samples::new();
        for v in 1..=19 {
            s.push(f64::from(v));
        }
        assert_eq!(s.p99(), None);
        assert_eq!(s.ms(), "1 / 10 / 19");
        for v in 20..=201 {
            s.push(f64::from(v));
        }
        // Nearest rank: the 199th of 201.
        assert_eq!(s.p99(), Some(199.0));
        assert_eq!(s.ms(), "1 / 101 / 201 (p99 199)");
    }

    #[test]
    fn ratios_pair_runs_in_order() {
        let (mut a, mut b) = (Samples::new(), Samples::new());
        for (x, y) in [(2.0, 1.0), (9.0, 3.0)] {
            a.push(x);
            b.push(y);
        }
        assert_eq!(ratios(&a, &b).0, vec![2.0, 3.0]);
    }

    #[test]
    fn table_pads_columns() {
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["long cell".into(), "x".into()]);
        let text = t.render();
        assert!(text.starts_with("| a         | bb  |\n"), "{text}");
        assert!(text.contains("| long cell | x   |"), "{text}");
    }
}
