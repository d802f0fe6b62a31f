//! The results of a run: rows, the Markdown tables and the JSON written beside them.

use std::fmt::Write;

use serde_json::{Value, json};

use crate::measure::{Role, Samples, Variant};

/// S1 for one variant, against the floor measured in the same run.
#[derive(Debug)]
pub(crate) struct AcquireRelease {
    pub(crate) store: String,
    pub(crate) variant: String,
    pub(crate) role: Role,
    pub(crate) cycles: usize,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) floor: String,
    pub(crate) p50_ratio: f64,
    pub(crate) p99_ratio: f64,
    /// The bound on `p50_ratio`, when it sets one.
    pub(crate) target: Option<f64>,
}

/// S4 for one store: release→next-holder hand-off against one round trip.
#[derive(Debug)]
pub(crate) struct Handoff {
    pub(crate) store: String,
    pub(crate) handoffs: usize,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) round_trip: String,
    pub(crate) round_trip_p50_us: f64,
    pub(crate) ratio: f64,
    pub(crate) target: Option<f64>,
}

/// Server-side operations per S1 cycle, as the server counts them.
#[derive(Debug)]
pub(crate) struct OpCount {
    pub(crate) store: String,
    pub(crate) variant: String,
    pub(crate) role: Role,
    /// What was counted, e.g. `client requests (total_reads_processed)`.
    pub(crate) unit: &'static str,
    pub(crate) per_cycle: f64,
    /// What the code expects per cycle; `--quick` fails when they differ.
    pub(crate) expected: f64,
    /// A breakdown, e.g. commands by name.
    pub(crate) detail: String,
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) acquire_release: Vec<AcquireRelease>,
    pub(crate) handoffs: Vec<Handoff>,
    pub(crate) op_counts: Vec<OpCount>,
}

impl Report {
    /// Adds the S1 rows of `variants`, each compared to `variants[floor]`;
    /// `target` gives each library variant's bound on its p50 ratio.
    pub(crate) fn add_acquire_release(
        &mut self,
        store: &str,
        variants: &[Variant],
        mut samples: Vec<Samples>,
        floor: usize,
        target: impl Fn(&Variant) -> Option<f64>,
    ) {
        let floor_p50 = samples[floor].percentile(50.0);
        let floor_p99 = samples[floor].percentile(99.0);
        for (variant, samples) in variants.iter().zip(&mut samples) {
            let p50 = samples.percentile(50.0);
            let p99 = samples.percentile(99.0);
            self.acquire_release.push(AcquireRelease {
                store: store.to_owned(),
                variant: variant.label.clone(),
                role: variant.role,
                cycles: samples.len(),
                p50_us: p50,
                p99_us: p99,
                floor: variants[floor].label.clone(),
                p50_ratio: p50 / floor_p50,
                p99_ratio: p99 / floor_p99,
                target: match variant.role {
                    Role::Library => target(variant),
                    Role::Floor => None,
                },
            });
        }
    }

    /// Adds one S4 row.
    pub(crate) fn add_handoff(
        &mut self,
        store: &str,
        round_trip: &Variant,
        (mut handoffs, mut round_trips): (Samples, Samples),
        target: Option<f64>,
    ) {
        let p50 = handoffs.percentile(50.0);
        let round_trip_p50 = round_trips.percentile(50.0);
        self.handoffs.push(Handoff {
            store: store.to_owned(),
            handoffs: handoffs.len(),
            p50_us: p50,
            p99_us: handoffs.percentile(99.0),
            round_trip: round_trip.label.clone(),
            round_trip_p50_us: round_trip_p50,
            ratio: p50 / round_trip_p50,
            target,
        });
    }

    /// The op counts that differ from what the code expects, one line each.
    pub(crate) fn unexpected_op_counts(&self) -> Vec<String> {
        self.op_counts
            .iter()
            .filter(|count| (count.per_cycle - count.expected).abs() > 1e-9)
            .map(|count| {
                format!(
                    "{} {}: {} {} per cycle, expected {} ({})",
                    count.store,
                    count.variant,
                    count.per_cycle,
                    count.unit,
                    count.expected,
                    count.detail
                )
            })
            .collect()
    }

    /// The tables, in Markdown.
    pub(crate) fn markdown(&self, header: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{header}\n");
        out.push_str(
            "### S1 uncontended acquire+release\n\n\
             | store | variant | cycles | p50 µs | p99 µs | p50 × floor | p99 × floor | target (p50) |\n\
             |---|---|---:|---:|---:|---:|---:|---|\n",
        );
        for row in &self.acquire_release {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
                row.store,
                row.variant,
                row.cycles,
                row.p50_us,
                row.p99_us,
                row.p50_ratio,
                row.p99_ratio,
                verdict(row.p50_ratio, row.target),
            );
        }
        out.push_str(
            "\n### S4 release→next-holder hand-off\n\n\
             | store | hand-offs | p50 µs | p99 µs | round trip | round trip p50 µs | p50 × round trip | target |\n\
             |---|---:|---:|---:|---|---:|---:|---|\n",
        );
        for row in &self.handoffs {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.1} | {} |",
                row.store,
                row.handoffs,
                row.p50_us,
                row.p99_us,
                row.round_trip,
                row.round_trip_p50_us,
                row.ratio,
                verdict(row.ratio, row.target),
            );
        }
        out.push_str(
            "\n### Server operations per S1 cycle\n\n\
             | store | variant | counted | per cycle | expected | breakdown |\n\
             |---|---|---|---:|---:|---|\n",
        );
        for row in &self.op_counts {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                row.store, row.variant, row.unit, row.per_cycle, row.expected, row.detail
            );
        }
        out
    }

    /// The same numbers as JSON.
    pub(crate) fn json(&self, mode: &str, notes: &[&str]) -> Value {
        let s1: Vec<Value> = self
            .acquire_release
            .iter()
            .map(|row| {
                json!({
                    "store": row.store, "variant": row.variant, "role": row.role.as_str(),
                    "cycles": row.cycles, "p50_us": row.p50_us, "p99_us": row.p99_us,
                    "floor": row.floor, "p50_ratio": row.p50_ratio, "p99_ratio": row.p99_ratio,
                    "target_p50_ratio": row.target,
                    "met": row.target.map(|t| row.p50_ratio <= t),
                })
            })
            .collect();
        let s4: Vec<Value> = self
            .handoffs
            .iter()
            .map(|row| {
                json!({
                    "store": row.store, "handoffs": row.handoffs, "p50_us": row.p50_us,
                    "p99_us": row.p99_us, "round_trip": row.round_trip,
                    "round_trip_p50_us": row.round_trip_p50_us, "ratio": row.ratio,
                    "target_ratio": row.target, "met": row.target.map(|t| row.ratio <= t),
                })
            })
            .collect();
        let ops: Vec<Value> = self
            .op_counts
            .iter()
            .map(|row| {
                json!({
                    "store": row.store, "variant": row.variant, "role": row.role.as_str(),
                    "unit": row.unit, "per_cycle": row.per_cycle, "expected": row.expected,
                    "detail": row.detail,
                })
            })
            .collect();
        json!({
            "mode": mode,
            "notes": notes,
            "s1_acquire_release": s1,
            "s4_handoff": s4,
            "server_ops_per_cycle": ops,
        })
    }
}

fn verdict(ratio: f64, target: Option<f64>) -> String {
    match target {
        Some(bound) if ratio <= bound => format!("≤ {bound}×: met"),
        Some(bound) => format!("≤ {bound}×: **not met**"),
        None => "—".to_owned(),
    }
}
