//! The app page's live chart, as data for an SVG template: the split of
//! users per release now, and over the last minutes the split, each
//! release's request rate, error rate and p99 latency (from
//! [`crate::timeseries`]).
//!
//! Releases are told apart by their name written beside each line and by a
//! dash pattern, not by colour alone. Every drawn element carries
//! `data-release` and the figure it shows (`data-percent`, `data-last`) so
//! tests and scripts read what the picture says.

use crate::timeseries::Sample;
use std::collections::BTreeMap;

/// The longest span of history drawn; a shorter history is drawn over
/// whole minutes (at least one), so a fresh rollout is not a sliver.
pub const SPAN_MS: u64 = 5 * 60 * 1000;
/// Two samples further apart than this are not joined (the server was
/// down, or the deployment had no traffic).
const GAP_MS: u64 = 3_500;

// Panel geometry (SVG user units; the SVG scales to its box).
const W: f64 = 320.0;
const H: f64 = 120.0;
const LEFT: f64 = 40.0;
const RIGHT: f64 = 312.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 98.0;
/// The least vertical distance between two lines' labels.
const LABEL_GAP: f64 = 10.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// The current split, left to right (oldest release first).
    pub split: Vec<SplitSeg>,
    /// "r1 80% · r2 20%", or why there is none.
    pub split_text: String,
    pub panels: Vec<Panel>,
    pub legend: Vec<LegendItem>,
    /// e.g. "last 5 min, figures over 5 s windows"
    pub caption: String,
    /// No history yet.
    pub empty: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SplitSeg {
    pub release: String,
    pub percent: u32,
    /// Style class (colour and pattern) of the release: `s0`, `s1`, …
    pub class: String,
    /// Where it starts, in percent of the bar.
    pub x: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// percent | rate | errors | p99
    pub series: &'static str,
    pub title: &'static str,
    pub view_box: String,
    /// The top of the y axis, formatted ("100%", "50/s", …).
    pub max_label: String,
    pub lines: Vec<Line>,
    pub grid: Vec<GridLine>,
    /// The left edge's time, e.g. "−2 min".
    pub from_label: String,
    // Axis geometry, for the template.
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GridLine {
    pub y: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub release: String,
    pub class: String,
    /// SVG path data ("M x y L x y …"); several runs when there are gaps.
    pub d: String,
    /// The last value, formatted, drawn beside the line's end.
    pub last: String,
    /// The last value, raw (for `data-last`).
    pub last_raw: String,
    pub end_x: String,
    /// Where the label goes (lines ending close together are stacked).
    pub label_y: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LegendItem {
    pub release: String,
    pub class: String,
    /// "20% of users · 12.5 req/s · 0.00% errors · p99 ≤ 25 ms"
    pub now: String,
}

/// Release names ordered by number (r2 before r10).
fn release_order(a: &str, b: &str) -> std::cmp::Ordering {
    let n = |s: &str| crate::view::parse_release_name(s).unwrap_or(i64::MAX);
    n(a).cmp(&n(b)).then(a.cmp(b))
}

/// 1, 2, 5 × 10^k: the smallest not below `v` (and at least `min`).
pub fn nice_ceil(v: f64, min: f64) -> f64 {
    let v = v.max(min);
    let mut m = 10f64.powf(v.log10().floor());
    for f in [1.0, 2.0, 5.0, 10.0] {
        if f * m >= v * 0.999_999 {
            m *= f;
            return m;
        }
    }
    m * 10.0
}

fn num(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

pub fn fmt_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}/s")
    } else {
        format!("{}/s", num(v))
    }
}

pub fn fmt_errors(v: f64) -> String {
    format!("{:.2}%", v * 100.0)
}

pub fn fmt_p99(v: f64) -> String {
    format!("≤ {} ms", num(v))
}

/// Builds the chart of one deployment: `traffic` is the split now (as
/// `drover status` shows it), `samples` its history, `now_ms` the right edge.
pub fn build(traffic: &BTreeMap<String, u32>, samples: &[Sample], now_ms: u64) -> Chart {
    let mut releases: Vec<String> = traffic.keys().cloned().collect();
    for s in samples {
        for r in s.points.keys() {
            if !releases.contains(r) {
                releases.push(r.clone());
            }
        }
    }
    releases.sort_by(|a, b| release_order(a, b));
    let class_of = |r: &str| {
        let i = releases.iter().position(|x| x == r).unwrap_or(0);
        format!("s{}", i % 4)
    };

    // The split now.
    // (In percent: the bar's viewBox is 100 wide and stretches.)
    let mut split = Vec::new();
    let mut x = 0;
    let mut in_order: Vec<(&String, &u32)> = traffic.iter().collect();
    in_order.sort_by(|a, b| release_order(a.0, b.0));
    for (r, p) in &in_order {
        split.push(SplitSeg {
            release: (*r).clone(),
            percent: **p,
            class: class_of(r),
            x,
        });
        x += **p;
    }
    let split_text = if in_order.is_empty() {
        "no instance serves".to_string()
    } else {
        in_order
            .iter()
            .map(|(r, p)| format!("{r} {p}%"))
            .collect::<Vec<_>>()
            .join(" · ")
    };

    let samples: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_ms >= now_ms.saturating_sub(SPAN_MS))
        .collect();
    let minutes = samples
        .first()
        .map_or(1, |s| now_ms.saturating_sub(s.at_ms).div_ceil(60_000))
        .clamp(1, SPAN_MS / 60_000);
    let span = minutes * 60_000;
    let from = now_ms.saturating_sub(span);
    let x_of = |at: u64| LEFT + (RIGHT - LEFT) * (at.saturating_sub(from)) as f64 / span as f64;
    type Get = fn(&crate::timeseries::Point) -> Option<f64>;
    let specs: [(&'static str, &'static str, Get); 4] = [
        ("percent", "Users per release", |p| p.percent.map(f64::from)),
        ("rate", "Requests per second", |p| Some(p.rate)),
        ("errors", "Error rate", |p| p.error_rate),
        ("p99", "p99 latency", |p| p.p99_ms),
    ];
    let mut panels = Vec::new();
    for (series, title, get) in specs {
        let max_seen = samples
            .iter()
            .flat_map(|s| s.points.values())
            .filter_map(get)
            .fold(0.0f64, f64::max);
        let (max, max_label) = match series {
            "percent" => (100.0, "100%".to_string()),
            "rate" => {
                let m = nice_ceil(max_seen, 1.0);
                (m, fmt_rate(m))
            }
            "errors" => {
                let m = nice_ceil(max_seen * 100.0, 1.0) / 100.0;
                (m, format!("{}%", num(m * 100.0)))
            }
            _ => {
                let m = nice_ceil(max_seen, 10.0);
                (m, format!("{} ms", num(m)))
            }
        };
        let y_of = |v: f64| BOTTOM - (BOTTOM - TOP) * (v / max).clamp(0.0, 1.0);
        let mut lines = Vec::new();
        for r in &releases {
            let mut d = String::new();
            let mut prev: Option<u64> = None;
            let mut last = None;
            for s in &samples {
                let Some(v) = s.points.get(r).and_then(get) else {
                    prev = None;
                    continue;
                };
                let cmd = match prev {
                    Some(p) if s.at_ms - p <= GAP_MS => 'L',
                    _ => 'M',
                };
                if !d.is_empty() {
                    d.push(' ');
                }
                d.push_str(&format!("{cmd}{:.1} {:.1}", x_of(s.at_ms), y_of(v)));
                prev = Some(s.at_ms);
                last = Some((s.at_ms, v));
            }
            let Some((at, v)) = last else { continue };
            // A single point is drawn as a short tick so it shows.
            if !d.contains('L') {
                d.push_str(" l-2 0 l4 0");
            }
            lines.push(Line {
                release: r.clone(),
                class: class_of(r),
                d,
                last: match series {
                    "percent" => format!("{}%", num(v)),
                    "rate" => fmt_rate(v),
                    "errors" => fmt_errors(v),
                    _ => fmt_p99(v),
                },
                last_raw: format!("{v}"),
                end_x: format!("{:.1}", x_of(at)),
                // Above the line's end, inside the plot.
                label_y: format!("{:.1}", (y_of(v) - 3.0).max(TOP + 8.0)),
            });
        }
        // Labels of lines ending close together are stacked, not overlaid.
        // From the bottom up, so none drops below the axis.
        let mut order: Vec<usize> = (0..lines.len()).collect();
        order.sort_by(|a, b| {
            let y = |i: usize| lines[i].label_y.parse::<f64>().unwrap_or(0.0);
            y(*b).total_cmp(&y(*a))
        });
        let mut prev: Option<f64> = None;
        for i in order {
            let mut y: f64 = lines[i].label_y.parse().unwrap_or(0.0);
            if let Some(p) = prev {
                if p - y < LABEL_GAP {
                    y = p - LABEL_GAP;
                }
            }
            lines[i].label_y = format!("{y:.1}");
            prev = Some(y);
        }
        panels.push(Panel {
            series,
            title,
            view_box: format!("0 0 {W} {H}"),
            max_label,
            lines,
            grid: [0.5]
                .iter()
                .map(|f| GridLine {
                    y: format!("{:.1}", BOTTOM - (BOTTOM - TOP) * f),
                })
                .collect(),
            from_label: format!("−{minutes} min"),
            left: LEFT,
            right: RIGHT,
            top: TOP,
            bottom: BOTTOM,
        });
    }

    let latest: BTreeMap<&String, &crate::timeseries::Point> = samples
        .last()
        .map(|s| s.points.iter().collect())
        .unwrap_or_default();
    let legend = releases
        .iter()
        .map(|r| {
            let mut parts = vec![match traffic.get(r) {
                Some(p) => format!("{p}% of users"),
                None => "no users".to_string(),
            }];
            if let Some(p) = latest.get(r) {
                parts.push(format!("{} requests", fmt_rate(p.rate)));
                if let Some(e) = p.error_rate {
                    parts.push(format!("{} errors", fmt_errors(e)));
                }
                if let Some(l) = p.p99_ms {
                    parts.push(format!("p99 {}", fmt_p99(l)));
                }
            }
            LegendItem {
                release: r.clone(),
                class: class_of(r),
                now: parts.join(" · "),
            }
        })
        .collect();
    Chart {
        split,
        split_text,
        panels,
        legend,
        caption: format!(
            "last {minutes} min; rates, errors and p99 over {} s windows",
            crate::timeseries::SMOOTH
        ),
        empty: samples.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeseries::Point;

    fn point(percent: u32, rate: f64) -> Point {
        Point {
            percent: Some(percent),
            rate,
            error_rate: Some(0.0),
            p99_ms: Some(25.0),
        }
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceil(0.0, 1.0), 1.0);
        assert_eq!(nice_ceil(1.2, 1.0), 2.0);
        assert_eq!(nice_ceil(3.0, 1.0), 5.0);
        assert_eq!(nice_ceil(7.0, 1.0), 10.0);
        assert_eq!(nice_ceil(120.0, 1.0), 200.0);
        assert_eq!(nice_ceil(5.0, 10.0), 10.0);
    }

    #[test]
    fn the_split_now_and_the_history_of_each_release_are_drawn() {
        let now = 1_000_000;
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                at_ms: now - 10_000 + i * 1000,
                points: BTreeMap::from([
                    ("r1".to_string(), point(80, 40.0)),
                    ("r2".to_string(), point(20, 10.0)),
                ]),
            })
            .collect();
        let traffic = BTreeMap::from([("r10".to_string(), 0), ("r2".to_string(), 100)]);
        let c = build(&traffic, &samples, now);
        // Ordered by release number, r2 before r10.
        let split: Vec<(&str, u32)> = c
            .split
            .iter()
            .map(|s| (s.release.as_str(), s.percent))
            .collect();
        assert_eq!(split, [("r2", 100), ("r10", 0)]);
        assert_eq!(c.split_text, "r2 100% · r10 0%");
        assert_eq!(c.panels.len(), 4);
        let percent = &c.panels[0];
        let r1 = percent.lines.iter().find(|l| l.release == "r1").unwrap();
        assert_eq!(r1.last, "80%");
        // r1 and r2 end 60 points apart: their labels do not overlap.
        let r2 = percent.lines.iter().find(|l| l.release == "r2").unwrap();
        let (y1, y2): (f64, f64) = (r1.label_y.parse().unwrap(), r2.label_y.parse().unwrap());
        assert!((y1 - y2).abs() >= LABEL_GAP, "{y1} {y2}");
        let errors = &c.panels[2];
        let ys: Vec<f64> = errors
            .lines
            .iter()
            .map(|l| l.label_y.parse().unwrap())
            .collect();
        assert!(
            (ys[0] - ys[1]).abs() >= LABEL_GAP,
            "equal values, stacked labels: {ys:?}"
        );
        assert!(
            r1.d.starts_with('M') && r1.d.matches('L').count() == 9,
            "{}",
            r1.d
        );
        let rate = &c.panels[1];
        assert_eq!(rate.max_label, "50/s");
        assert_eq!(rate.from_label, "−1 min");
        let legend: Vec<&str> = c.legend.iter().map(|l| l.release.as_str()).collect();
        assert_eq!(legend, ["r1", "r2", "r10"]);
        assert!(c.legend[1].now.starts_with("100% of users · 10/s requests"));
        assert!(!c.empty);
    }

    #[test]
    fn gaps_break_the_line_and_old_samples_fall_off_the_left_edge() {
        let now = 10 * SPAN_MS;
        let at = [now - SPAN_MS - 1000, now - 9000, now - 8000, now - 1000];
        let samples: Vec<Sample> = at
            .iter()
            .map(|t| Sample {
                at_ms: *t,
                points: BTreeMap::from([("r1".to_string(), point(100, 1.0))]),
            })
            .collect();
        let c = build(&BTreeMap::new(), &samples, now);
        let d = &c.panels[1].lines[0].d;
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches('L').count(), 1, "{d}");
        assert_eq!(c.split_text, "no instance serves");
        assert!(build(&BTreeMap::new(), &[], now).empty);
    }
}
