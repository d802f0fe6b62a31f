//! The results of a run: rows, the Markdown tables and the JSON written beside them.

use std::fmt::Write;

use serde_json::{Value, json};

use crate::measure::{Result, Role, Samples, Variant};

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

/// An S1 target between two variants of one store rather than to its floor, e.g.
/// issue 4's Redlock over 5 nodes within 1.5× of single-node Redis at p50.
#[derive(Debug)]
pub(crate) struct Relative {
    pub(crate) store: String,
    pub(crate) variant: String,
    /// The variant compared with.
    pub(crate) against: String,
    /// `variant`'s p50 as a multiple of `against`'s.
    pub(crate) p50_ratio: f64,
    pub(crate) bound: f64,
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

/// S2: many clients, each on a name of its own.
#[derive(Debug)]
pub(crate) struct Distinct {
    pub(crate) store: String,
    pub(crate) clients: usize,
    pub(crate) cycles: usize,
    pub(crate) seconds: f64,
    pub(crate) per_second: f64,
    pub(crate) p99_us: f64,
}

/// S3: one hot lock, `contenders` clients, each holding it `hold_ms` per grant.
#[derive(Debug)]
pub(crate) struct HotLock {
    pub(crate) store: String,
    pub(crate) contenders: usize,
    pub(crate) hold_ms: u64,
    pub(crate) grants: usize,
    pub(crate) seconds: f64,
    pub(crate) per_second: f64,
    /// Jain's index over the grants of each contender: 1 is perfectly even.
    pub(crate) jain: f64,
    pub(crate) p99_wait_us: f64,
    pub(crate) max_wait_us: f64,
    /// Waits that ended without a grant.
    pub(crate) timeouts: usize,
}

/// S5: many locks held at once, renewed by the watchdog.
#[derive(Debug)]
pub(crate) struct HeldMany {
    pub(crate) store: String,
    pub(crate) locks: usize,
    pub(crate) held_s: f64,
    pub(crate) ttl_s: f64,
    /// Renewal requests per second as the server counts them, and what was counted.
    pub(crate) renewals_per_second: Option<f64>,
    pub(crate) counted: String,
    pub(crate) bytes_per_lock: f64,
    pub(crate) lost: usize,
}

/// S7: the holder's process killed, time until the next client is granted.
#[derive(Debug)]
pub(crate) struct Takeover {
    pub(crate) store: String,
    pub(crate) runs: usize,
    pub(crate) p50_ms: f64,
    pub(crate) max_ms: f64,
    /// What bounds it: the lease TTL or the session timeout, and its length.
    pub(crate) bound: String,
    pub(crate) bound_ms: f64,
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) acquire_release: Vec<AcquireRelease>,
    pub(crate) relative: Vec<Relative>,
    pub(crate) handoffs: Vec<Handoff>,
    pub(crate) op_counts: Vec<OpCount>,
    pub(crate) distinct: Vec<Distinct>,
    pub(crate) hot_lock: Vec<HotLock>,
    pub(crate) held_many: Vec<HeldMany>,
    pub(crate) takeovers: Vec<Takeover>,
    /// What a run left out or measured differently from the issue, one line each.
    pub(crate) notes: Vec<String>,
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
                    Role::Floor | Role::Peer => None,
                },
            });
        }
    }

    /// Holds the S1 p50 of `variant` to `bound` times that of `against`, both rows of
    /// `store` added before by [`Report::add_acquire_release`].
    pub(crate) fn add_relative_target(
        &mut self,
        store: &str,
        variant: &str,
        against: &str,
        bound: f64,
    ) -> Result<()> {
        let p50 = |label: &str| {
            self.acquire_release
                .iter()
                .find(|row| row.store == store && row.variant == label)
                .map(|row| row.p50_us)
                .ok_or_else(|| format!("no S1 row `{label}` for {store}"))
        };
        let p50_ratio = p50(variant)? / p50(against)?;
        self.relative.push(Relative {
            store: store.to_owned(),
            variant: variant.to_owned(),
            against: against.to_owned(),
            p50_ratio,
            bound,
        });
        Ok(())
    }

    /// Adds one S4 row.
    pub(crate) fn add_handoff(
        &mut self,
        store: &str,
        round_trip: &Variant,
        (mut handoffs, mut round_trips, mut warm): (Samples, Samples, Samples),
        target: Option<f64>,
    ) {
        let p50 = handoffs.percentile(50.0);
        let round_trip_p50 = round_trips.percentile(50.0);
        self.handoffs.push(Handoff {
            store: store.to_owned(),
            handoffs: handoffs.len(),
            p50_us: p50,
            p99_us: handoffs.percentile(99.0),
            round_trip: format!(
                "{} after the same {} ms idle pause (warm: {:.0} µs, so {:.1}×)",
                round_trip.label,
                crate::library::WAITER_SETTLES.as_millis(),
                warm.percentile(50.0),
                p50 / warm.percentile(50.0)
            ),
            round_trip_p50_us: round_trip_p50,
            ratio: p50 / round_trip_p50,
            target,
        });
    }

    /// Every target of issue 9 that this run measured, one line each: what was
    /// measured and whether it was met.
    pub(crate) fn targets(&self) -> Vec<(String, bool)> {
        let mut lines = Vec::new();
        for row in &self.acquire_release {
            if let Some(bound) = row.target {
                lines.push((
                    format!(
                        "S1 {} / {}: p50 {:.2}× {} (target ≤ {bound}×)",
                        row.store, row.variant, row.p50_ratio, row.floor
                    ),
                    row.p50_ratio <= bound,
                ));
            }
        }
        for row in &self.relative {
            lines.push((
                format!(
                    "S1 {} / {}: p50 {:.2}× {} (target ≤ {}×)",
                    row.store, row.variant, row.p50_ratio, row.against, row.bound
                ),
                row.p50_ratio <= row.bound,
            ));
        }
        for row in &self.handoffs {
            if let Some(bound) = row.target {
                lines.push((
                    format!(
                        "S4 {}: hand-off p50 {:.1}× {} (target ≤ {bound}×)",
                        row.store, row.ratio, row.round_trip
                    ),
                    row.ratio <= bound,
                ));
            }
        }
        for row in self.hot_lock.iter().filter(|row| row.contenders == 8) {
            lines.push((
                format!(
                    "S3 {}: Jain fairness {:.3} with 8 contenders, hold {} ms (target ≥ 0.9)",
                    row.store, row.jain, row.hold_ms
                ),
                row.jain >= 0.9,
            ));
        }
        for row in &self.held_many {
            lines.push((
                format!(
                    "S5 {}: {} of {} locks lost, {:.0} B of client memory per held lock \
                     (target 0 lost, ≤ 1024 B)",
                    row.store, row.lost, row.locks, row.bytes_per_lock
                ),
                row.lost == 0 && row.bytes_per_lock <= 1024.0,
            ));
        }
        lines
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
        let targets = self.targets();
        if !targets.is_empty() {
            out.push_str("### Targets\n\n");
            for (line, met) in &targets {
                let verdict = if *met { "met" } else { "**not met**" };
                let _ = writeln!(out, "- {line}: {verdict}");
            }
            out.push('\n');
        }
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
        if !self.distinct.is_empty() {
            out.push_str(
                "\n### S2 clients on distinct names (fencelock)\n\n\
                 | store | clients | cycles | s | acquire+release /s | p99 µs |\n\
                 |---|---:|---:|---:|---:|---:|\n",
            );
            for row in &self.distinct {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {:.1} | {:.0} | {:.0} |",
                    row.store, row.clients, row.cycles, row.seconds, row.per_second, row.p99_us
                );
            }
        }
        if !self.hot_lock.is_empty() {
            out.push_str(
                "\n### S3 one hot lock (fencelock)\n\n\
                 | store | contenders | hold ms | grants | grants /s | Jain | p99 wait ms | max wait ms | timeouts |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            );
            for row in &self.hot_lock {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.0} | {:.3} | {:.1} | {:.1} | {} |",
                    row.store,
                    row.contenders,
                    row.hold_ms,
                    row.grants,
                    row.per_second,
                    row.jain,
                    row.p99_wait_us / 1000.0,
                    row.max_wait_us / 1000.0,
                    row.timeouts,
                );
            }
        }
        if !self.held_many.is_empty() {
            out.push_str(
                "\n### S5 many locks held, renewed by the watchdog (fencelock)\n\n\
                 | store | locks | held s | TTL s | renewal requests /s | counted | client bytes per lock | lost |\n\
                 |---|---:|---:|---:|---:|---|---:|---:|\n",
            );
            for row in &self.held_many {
                let renewals = row
                    .renewals_per_second
                    .map_or_else(|| "—".to_owned(), |rate| format!("{rate:.1}"));
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {} | {} | {:.0} | {} |",
                    row.store,
                    row.locks,
                    row.held_s,
                    row.ttl_s,
                    renewals,
                    row.counted,
                    row.bytes_per_lock,
                    row.lost,
                );
            }
        }
        if !self.takeovers.is_empty() {
            out.push_str(
                "\n### S7 holder process killed → next holder granted (fencelock)\n\n\
                 | store | runs | p50 ms | max ms | bounded by | bound ms | p50 × bound |\n\
                 |---|---:|---:|---:|---|---:|---:|\n",
            );
            for row in &self.takeovers {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.2} |",
                    row.store,
                    row.runs,
                    row.p50_ms,
                    row.max_ms,
                    row.bound,
                    row.bound_ms,
                    row.p50_ms / row.bound_ms,
                );
            }
        }
        if !self.notes.is_empty() {
            out.push_str("\n### Notes\n\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
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
        let s2: Vec<Value> = self
            .distinct
            .iter()
            .map(|row| {
                json!({
                    "store": row.store, "clients": row.clients, "cycles": row.cycles,
                    "seconds": row.seconds, "per_second": row.per_second, "p99_us": row.p99_us,
                })
            })
            .collect();
        let s3: Vec<Value> = self
            .hot_lock
            .iter()
            .map(|row| {
                json!({
                    "store": row.store, "contenders": row.contenders, "hold_ms": row.hold_ms,
                    "grants": row.grants, "seconds": row.seconds, "per_second": row.per_second,
                    "jain": row.jain, "p99_wait_us": row.p99_wait_us,
                    "max_wait_us": row.max_wait_us, "timeouts": row.timeouts,
                })
            })
            .collect();
        let s5: Vec<Value> = self
            .held_many
            .iter()
            .map(|row| {
                json!({
                    "store": row.store, "locks": row.locks, "held_s": row.held_s,
                    "ttl_s": row.ttl_s, "renewals_per_second": row.renewals_per_second,
                    "counted": row.counted, "bytes_per_lock": row.bytes_per_lock,
                    "lost": row.lost,
                })
            })
            .collect();
        let s7: Vec<Value> = self
            .takeovers
            .iter()
            .map(|row| {
                json!({
                    "store": row.store, "runs": row.runs, "p50_ms": row.p50_ms,
                    "max_ms": row.max_ms, "bound": row.bound, "bound_ms": row.bound_ms,
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|(line, met)| json!({ "target": line, "met": met }))
            .collect();
        let mut all_notes: Vec<String> = notes.iter().map(|note| (*note).to_owned()).collect();
        all_notes.extend(self.notes.iter().cloned());
        json!({
            "mode": mode,
            "notes": all_notes,
            "targets": targets,
            "s1_acquire_release": s1,
            "s4_handoff": s4,
            "server_ops_per_cycle": ops,
            "s2_distinct_names": s2,
            "s3_hot_lock": s3,
            "s5_held_many": s5,
            "s7_holder_killed": s7,
        })
    }
}

/// Jain's fairness index of `shares`: `(Σx)² / (n·Σx²)`, 1 when all are equal, `1/n`
/// when one takes everything; 1 for no shares at all.
pub(crate) fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    if shares.is_empty() || squares == 0.0 {
        return 1.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

fn verdict(ratio: f64, target: Option<f64>) -> String {
    match target {
        Some(bound) if ratio <= bound => format!("≤ {bound}×: met"),
        Some(bound) => format!("≤ {bound}×: **not met**"),
        None => "—".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_target_is_the_p50_ratio_to_the_named_variant_not_to_the_floor() {
        let mut report = Report::default();
        for (variant, p50_us) in [("one node", 100.0), ("floor", 50.0), ("five nodes", 140.0)] {
            report.acquire_release.push(AcquireRelease {
                store: "redis".into(),
                variant: variant.into(),
                role: Role::Library,
                cycles: 1,
                p50_us,
                p99_us: p50_us,
                floor: "floor".into(),
                p50_ratio: p50_us / 50.0,
                p99_ratio: p50_us / 50.0,
                target: None,
            });
        }
        report
            .add_relative_target("redis", "five nodes", "one node", 1.5)
            .unwrap();
        // 1.4× the one-node row: met, although it is 2.8× the floor.
        let targets = report.targets();
        assert_eq!(targets.len(), 1, "{targets:?}");
        assert!(targets[0].0.contains("p50 1.40× one node"), "{targets:?}");
        assert!(targets[0].1, "{targets:?}");
        let missing = report.add_relative_target("redis", "five nodes", "three nodes", 1.5);
        assert!(missing.is_err());
    }

    #[test]
    fn jain_index_is_one_when_even_and_one_over_n_when_one_takes_all() {
        assert_eq!(jain(&[5.0, 5.0, 5.0, 5.0]), 1.0);
        assert_eq!(jain(&[8.0, 0.0, 0.0, 0.0]), 0.25);
        let skewed = jain(&[3.0, 1.0]);
        assert!((skewed - 0.8).abs() < 1e-12, "{skewed}");
    }
}
