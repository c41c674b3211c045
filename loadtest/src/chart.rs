//! A latency chart as hand-written SVG: the percentile distribution (x: percentile on the usual
//! 1/(1-p) log scale, 0% … 99.999%; y: latency in ms, log scale when the tail is long), one curve
//! per series, the p50/p99/p99.9 points marked, and the maxima in the legend.

use std::fmt::Write as _;

pub struct Series {
    pub label: String,
    /// (percentile 0..=100, milliseconds)
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 960.0;
/// Height of the plot area and everything but the legend.
const H0: f64 = 560.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 80.0;
/// One legend line, under the x axis title.
const LEGEND_LINE: f64 = 22.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The x position (0 = median's left end, 1 = p90, 2 = p99, ...) of a percentile.
fn x_of(pct: f64) -> f64 {
    let q = (pct / 100.0).min(0.999_999);
    (1.0 / (1.0 - q)).log10()
}

/// A "nice" step (1, 2 or 5 × 10^k) near `raw`.
fn nice_step(raw: f64) -> f64 {
    let exp = raw.log10().floor();
    let base = 10f64.powf(exp);
    let f = raw / base;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * base
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else if v >= 0.1 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

/// A tick label without needless zeros: 0.5, 2, 50, 1000.
fn fmt_tick(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_owned()
    }
}

fn value_at(points: &[(f64, f64)], pct: f64) -> Option<f64> {
    points.iter().find(|(p, _)| *p >= pct).map(|(_, v)| *v)
}

pub fn render(title: &str, subtitle: &str, series: &[Series]) -> String {
    // Per series: the curve in (x, ms) without the maximum, and the maximum.
    type Curve<'a> = (&'a Series, Vec<(f64, f64)>, f64);
    let curves: Vec<Curve> = series
        .iter()
        .map(|s| {
            let body: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|(p, _)| *p < 100.0)
                .map(|&(p, v)| (x_of(p), v))
                .collect();
            let max = s.points.iter().map(|(_, v)| *v).fold(0.0, f64::max);
            (s, body, max)
        })
        .collect();
    let x_max = curves
        .iter()
        .flat_map(|(_, b, _)| b.iter().map(|(x, _)| *x))
        .fold(2.0f64, f64::max)
        .ceil()
        .min(5.0);
    let all: Vec<f64> = curves
        .iter()
        .flat_map(|(_, b, _)| b.iter().map(|(_, v)| *v))
        .filter(|v| *v > 0.0)
        .collect();
    let y_hi_data = all.iter().copied().fold(0.0, f64::max).max(0.001);
    let y_lo_data = all
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(y_hi_data);
    let log_y = y_hi_data / y_lo_data.max(1e-6) > 50.0;

    let pw = W - LEFT - RIGHT;
    let ph = H0 - TOP - BOTTOM;
    let legend_lines = series.len().max(1) as f64;
    let h = H0 + legend_lines * LEGEND_LINE + 10.0;
    let px = |x: f64| LEFT + x / x_max * pw;
    let (y_lo, y_hi, ticks): (f64, f64, Vec<f64>) = if log_y {
        let lo = 10f64.powf(y_lo_data.max(1e-3).log10().floor());
        // The smallest 1, 2 or 5 × 10^k at or above the data.
        let decade = 10f64.powf(y_hi_data.log10().floor());
        let hi = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * decade)
            .find(|v| *v >= y_hi_data * 0.9999)
            .unwrap_or(decade * 10.0);
        let mut t = Vec::new();
        let mut d = lo;
        while d <= hi * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                if d * m <= hi * 1.0001 {
                    t.push(d * m);
                }
            }
            d *= 10.0;
        }
        (lo, hi, t)
    } else {
        let step = nice_step(y_hi_data / 6.0);
        let hi = (y_hi_data / step).ceil() * step;
        let n = (hi / step).round() as usize;
        (0.0, hi, (0..=n).map(|i| i as f64 * step).collect())
    };
    let py = |v: f64| {
        let f = if log_y {
            (v.max(y_lo).log10() - y_lo.log10()) / (y_hi.log10() - y_lo.log10())
        } else {
            (v - y_lo) / (y_hi - y_lo)
        };
        TOP + ph - f.clamp(0.0, 1.0) * ph
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="30" font-size="20" font-weight="bold" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="52" font-size="13" fill="#555" text-anchor="middle">{}</text>"##,
        W / 2.0,
        esc(subtitle)
    );
    // Grid and y ticks.
    for t in &ticks {
        let y = py(*t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
            W - RIGHT
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            y + 4.0,
            fmt_tick(*t)
        );
    }
    // X ticks.
    let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];
    for (i, label) in labels.iter().enumerate().take(x_max as usize + 1) {
        let x = px(i as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e3e3e3"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" font-size="12" text-anchor="middle">{label}</text>"#,
            TOP + ph + 20.0
        );
    }
    // Axes.
    let _ = writeln!(
        s,
        r#"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="black" stroke-width="1.2"/>"#,
        TOP + ph,
        W - RIGHT
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="14" text-anchor="middle">percentile (log scale of 1/(1−p))</text>"#,
        LEFT + pw / 2.0,
        H0 - 30.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(24,{:.1}) rotate(-90)" font-size="14" text-anchor="middle">latency (ms{})</text>"#,
        TOP + ph / 2.0,
        if log_y { ", log scale" } else { "" }
    );
    // Curves.
    for (i, (series, body, max)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if body.is_empty() {
            continue;
        }
        let mut d = String::new();
        for (j, (x, v)) in body.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if j == 0 { "M" } else { "L" },
                px(*x),
                py(*v)
            );
        }
        let _ = writeln!(
            s,
            r#"<path d="{}" fill="none" stroke="{color}" stroke-width="2.2"/>"#,
            d.trim_end()
        );
        for pct in [50.0, 99.0, 99.9] {
            let exact = series
                .points
                .iter()
                .find(|(p, _)| (*p - pct).abs() < 1e-9 && *p < 100.0);
            if let Some(&(p, v)) = exact {
                let (cx, cy) = (px(x_of(p)), py(v));
                let _ = writeln!(
                    s,
                    r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{color}"/>"#
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-size="11" fill="{color}" stroke="white" stroke-width="3" paint-order="stroke">p{} {} ms</text>"#,
                    cx + 6.0,
                    cy - 6.0,
                    fmt_tick(pct),
                    fmt_ms(v)
                );
            }
        }
        // Legend entry.
        let ly = H0 + 4.0 + i as f64 * LEGEND_LINE;
        let lx = LEFT;
        let p50 = value_at(&series.points, 50.0).unwrap_or(0.0);
        let p99 = value_at(&series.points, 99.0).unwrap_or(0.0);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#,
            lx + 22.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="13">{} — p50 {} ms, p99 {} ms, max {} ms</text>"#,
            lx + 30.0,
            ly + 4.0,
            esc(&series.label),
            fmt_ms(p50),
            fmt_ms(p99),
            fmt_ms(*max)
        );
    }
    if curves.iter().all(|(_, b, _)| b.is_empty()) {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="16" text-anchor="middle">no samples</text>"#,
            W / 2.0,
            H0 / 2.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_well_formed_svg() {
        let points: Vec<(f64, f64)> = (0..60)
            .map(|i| {
                let x = i as f64 * 0.05;
                (100.0 * (1.0 - 1.0 / 10f64.powf(x)), 1.0 + x * x)
            })
            .chain(std::iter::once((100.0, 12.0)))
            .collect();
        let svg = render(
            "t <&>",
            "sub",
            &[Series {
                label: "a".into(),
                points,
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert!(svg.contains("99%"));
        assert!(render("e", "", &[]).contains("no samples"));
    }
}
