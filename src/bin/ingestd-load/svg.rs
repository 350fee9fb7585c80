//! Line charts as hand-written SVG: axes with "nice" ticks (linear or
//! logarithmic), one polyline per series, optional point markers, a legend.
//! No dependencies; the output opens in any browser and renders on GitHub.

use std::fmt::Write as _;

pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    pub markers: bool,
}

pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub y_log: bool,
    pub series: Vec<Series>,
    /// Shade x from the axis start up to this value (e.g. a warm-up).
    pub shade_until: Option<(f64, String)>,
}

const W: f64 = 860.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 62.0;
const BOTTOM: f64 = 56.0;

pub const COLORS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#8c564b"];

impl Chart {
    pub fn render(&self) -> String {
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.y_log || *y > 0.0))
            .collect();
        let (mut x0, mut x1) = bounds(pts.iter().map(|p| p.0));
        let (mut y0, mut y1) = bounds(pts.iter().map(|p| p.1));
        if pts.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, if self.y_log { 0.1 } else { 0.0 }, 1.0);
        }
        // Linear axes start at zero: rates and latencies are compared against it.
        x0 = x0.min(0.0);
        let (x_ticks, xa, xb) = linear_ticks(x0, x1.max(x0 + 1e-9));
        (x0, x1) = (xa, xb);
        let (y_ticks, ya, yb) =
            if self.y_log { log_ticks(y0, y1.max(y0 * 1.01)) } else { linear_ticks(y0.min(0.0), y1.max(1e-9)) };
        (y0, y1) = (ya, yb);
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| {
            let f = if self.y_log { (y.ln() - y0.ln()) / (y1.ln() - y0.ln()) } else { (y - y0) / (y1 - y0) };
            TOP + ph - f.clamp(-0.02, 1.02) * ph
        };

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(s, r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>"#, esc(&self.title));
        let _ = writeln!(s, r##"<text x="{LEFT}" y="44" fill="#555">{}</text>"##, esc(&self.subtitle));
        if let Some((until, label)) = &self.shade_until {
            let x = sx(until.min(x1));
            let _ = writeln!(
                s,
                r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{ph}" fill="#f0f0f0"/>"##,
                (x - LEFT).max(0.0)
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#888" text-anchor="middle">{}</text>"##,
                (LEFT + x) / 2.0,
                TOP + 14.0,
                esc(label)
            );
        }
        // Grid and tick labels.
        for &t in &x_ticks {
            let x = sx(t);
            let _ =
                writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##, TOP + ph);
            let _ =
                writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, TOP + ph + 18.0, label(t));
        }
        for &t in &y_ticks {
            let y = sy(t);
            let _ =
                writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/>"##, LEFT + pw);
            let _ =
                writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, label(t));
        }
        let _ = writeln!(s, r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 14.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // Series.
        for (i, series) in self.series.iter().enumerate() {
            let visible: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.y_log || *y > 0.0))
                .collect();
            if visible.len() > 1 {
                let path: Vec<String> = visible.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                    series.color,
                    path.join(" ")
                );
            }
            if series.markers || visible.len() == 1 {
                for &(x, y) in &visible {
                    let _ =
                        writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#, sx(x), sy(y), series.color);
                }
            }
            let ly = TOP + 10.0 + i as f64 * 20.0;
            let lx = LEFT + pw + 14.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{}" stroke-width="3"/>"#,
                lx + 22.0,
                series.color
            );
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, lx + 28.0, ly + 4.0, esc(&series.name));
        }
        s.push_str("</svg>\n");
        s
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// About six ticks at 1/2/5 × 10^k, and the axis range they span.
fn linear_ticks(lo: f64, hi: f64) -> (Vec<f64>, f64, f64) {
    let span = (hi - lo).max(1e-12);
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let end = (hi / step).ceil() * step;
    let mut ticks = Vec::new();
    let mut t = start;
    while t <= end + step * 0.001 {
        ticks.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    (ticks, start, end)
}

/// Ticks at 1, 2, 5 × 10^k covering `lo..hi` (both > 0).
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, f64, f64) {
    let lo = lo.max(1e-6);
    let mut k = lo.log10().floor() as i32;
    let mut ticks = Vec::new();
    let mut first = None;
    let mut last;
    'outer: loop {
        for m in [1.0, 2.0, 5.0] {
            let t = m * 10f64.powi(k);
            if t * 2.5 < lo && first.is_none() {
                continue;
            }
            if first.is_none() {
                // The tick just at or below `lo`.
                first = Some(t);
            }
            ticks.push(t);
            last = t;
            if t >= hi {
                break 'outer;
            }
        }
        k += 1;
    }
    let first = first.unwrap_or(lo);
    (ticks, first.min(lo), last.max(hi))
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e4 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else if a >= 1.0 || a == 0.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks() {
        let (t, a, b) = linear_ticks(0.0, 9.3);
        assert_eq!((a, b), (0.0, 10.0));
        assert_eq!(t.len(), 6);
        let (t, a, b) = log_ticks(0.7, 130.0);
        assert!(a <= 0.7 && b >= 130.0, "{a} {b} {t:?}");
        assert_eq!(t.first().copied(), Some(0.5));
        assert_eq!(label(150_000.0), "150k");
        assert_eq!(label(2.5), "2.5");
    }

    #[test]
    fn renders() {
        let c = Chart {
            title: "t <1>".into(),
            subtitle: String::new(),
            x_label: "x".into(),
            y_label: "y".into(),
            y_log: true,
            shade_until: Some((1.5, "warm-up".into())),
            series: vec![Series {
                name: "p99".into(),
                color: COLORS[0],
                points: vec![(1.0, 2.0), (2.0, 30.0)],
                markers: true,
            }],
        };
        let s = c.render();
        assert!(s.starts_with("<svg") && s.contains("polyline") && s.contains("t &lt;1&gt;"));
    }
}
