//! The chart of a run, as SVG written by hand: one bar per fencelock row of S1 and
//! S4, its p50 as a multiple of the floor measured in the same run, on a log scale.

use std::fmt::Write;

use crate::measure::Role;
use crate::report::Report;

const WIDTH: f64 = 1100.0;
const LABEL_WIDTH: f64 = 520.0;
/// Longer labels are cut (with `…`) to fit left of the bars.
const LABEL_CHARS: usize = 80;
const RIGHT_MARGIN: f64 = 60.0;
const ROW: f64 = 22.0;
const TOP: f64 = 60.0;

/// One bar: its label, its ratio, its target bound (if any).
struct Bar {
    label: String,
    ratio: f64,
    target: Option<f64>,
}

/// The chart of `report` as a standalone SVG document.
pub(crate) fn svg(report: &Report, title: &str) -> String {
    let mut sections: Vec<(&str, Vec<Bar>)> = Vec::new();
    sections.push((
        "S1 uncontended acquire+release: p50 × floor",
        report
            .acquire_release
            .iter()
            .filter(|row| row.role == Role::Library)
            .map(|row| Bar {
                label: format!("{}: {}", row.store, row.variant),
                ratio: row.p50_ratio,
                target: row.target,
            })
            .collect(),
    ));
    let mut handoffs: Vec<Bar> = Vec::new();
    handoffs.extend(report.handoffs.iter().map(|row| Bar {
        label: format!("{}: vs {}", row.store, row.round_trip),
        ratio: row.ratio,
        target: row.target,
    }));
    sections.push((
        "S4 release→next holder: fencelock's p50 × a round trip, floor or peer",
        handoffs,
    ));
    sections.retain(|(_, bars)| !bars.is_empty());

    let ratios = || {
        sections
            .iter()
            .flat_map(|(_, bars)| bars.iter().map(|bar| bar.ratio))
            .filter(|ratio| ratio.is_finite() && *ratio > 0.0)
    };
    let highest = ratios().fold(2.0_f64, f64::max);
    // From the decade below the lowest ratio (a fencelock hand-off many times faster
    // than a polling peer's is far below 1×), at most 0.5×.
    let lowest = 10_f64
        .powf(ratios().fold(0.5_f64, f64::min).log10().floor())
        .min(0.5);
    let top_decade = 10_f64.powf(highest.log10().ceil()).max(10.0);
    let plot = WIDTH - LABEL_WIDTH - RIGHT_MARGIN;
    // Log scale from `lowest` to the decade above the highest ratio.
    let x = |ratio: f64| {
        let ratio = ratio.clamp(lowest, top_decade);
        LABEL_WIDTH + plot * (ratio / lowest).ln() / (top_decade / lowest).ln()
    };
    let rows: usize = sections.iter().map(|(_, bars)| bars.len() + 2).sum();
    let height = TOP + ROW * rows as f64 + 40.0;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>
<text x="10" y="22" font-size="15" font-weight="bold">{}</text>
<text x="10" y="42" fill="#555">log scale; green: target met, red: not met, grey: no target; dashed: the floor (1×)</text>"##,
        escape(title)
    );
    let mut ticks = Vec::new();
    let mut decade = lowest;
    while decade <= top_decade {
        ticks.extend([decade, 2.0 * decade, 5.0 * decade]);
        decade *= 10.0;
    }
    ticks.retain(|tick| *tick >= lowest && *tick <= top_decade);
    let bottom = height - 30.0;
    for tick in ticks {
        let at = x(tick);
        let dash = if tick == 1.0 {
            r##" stroke-dasharray="4 3" stroke="#333""##
        } else {
            r##" stroke="#ddd""##
        };
        let _ = writeln!(
            out,
            r##"<line x1="{at:.1}" y1="{TOP}" x2="{at:.1}" y2="{bottom}"{dash}/>
<text x="{at:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}×</text>"##,
            bottom + 14.0,
            // Ticks are 1, 2 and 5 times a power of ten: shortest exact text.
            format!("{tick:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.')
        );
    }
    let mut y = TOP;
    for (heading, bars) in &sections {
        y += ROW;
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}" font-weight="bold">{}</text>"#,
            y - 6.0,
            escape(heading)
        );
        for bar in bars {
            let colour = match bar.target {
                Some(bound) if bar.ratio <= bound => "#2e7d32",
                Some(_) => "#c62828",
                None => "#9e9e9e",
            };
            let end = x(bar.ratio);
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>
<rect x="{LABEL_WIDTH}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/>
<text x="{:.1}" y="{:.1}">{:.2}×</text>"#,
                LABEL_WIDTH - 8.0,
                y + 13.0,
                escape(&bar.label),
                y + 3.0,
                (end - LABEL_WIDTH).max(1.0),
                ROW - 6.0,
                end + 4.0,
                y + 13.0,
                bar.ratio,
            );
            if let Some(bound) = bar.target {
                let at = x(bound);
                let _ = writeln!(
                    out,
                    r##"<line x1="{at:.1}" y1="{:.1}" x2="{at:.1}" y2="{:.1}" stroke="#000" stroke-width="2"/>"##,
                    y + 1.0,
                    y + ROW - 1.0
                );
            }
            y += ROW;
        }
        y += ROW;
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    let text: String = if text.chars().count() > LABEL_CHARS {
        text.chars()
            .take(LABEL_CHARS - 1)
            .chain(std::iter::once('…'))
            .collect()
    } else {
        text.to_owned()
    };
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::AcquireRelease;

    #[test]
    fn chart_has_one_bar_per_library_row_and_escapes_labels() {
        let mut report = Report::default();
        for (variant, role, ratio) in [
            ("fencelock <a&b>", Role::Library, 1.1),
            ("floor", Role::Floor, 1.0),
        ] {
            report.acquire_release.push(AcquireRelease {
                store: "redis".into(),
                variant: variant.into(),
                role,
                cycles: 1,
                p50_us: 1.0,
                p99_us: 1.0,
                floor: "floor".into(),
                p50_ratio: ratio,
                p99_ratio: ratio,
                target: Some(1.2),
            });
        }
        let svg = svg(&report, "t");
        assert_eq!(svg.matches("<rect x=").count(), 1, "{svg}");
        assert!(svg.contains("fencelock &lt;a&amp;b&gt;"), "{svg}");
        assert!(svg.contains("#2e7d32"), "a met target is green: {svg}");
    }
}
