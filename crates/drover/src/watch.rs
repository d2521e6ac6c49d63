//! `drover watch APP`: the app's rollout live in the terminal — progress
//! bars for the step and the target's instances, the traffic split, and
//! each release's request rate, error rate and p99 latency.
//!
//! On a terminal the frame is redrawn in place twice a second; otherwise a
//! line is printed whenever the state, step, split or message changes (for
//! logs and CI). It stops once no rollout is in progress and exits 0 only
//! if the last one succeeded; with `--follow`, only at Ctrl-C.

use crate::client::{fail, Client};
use crate::output::{self, escape_terminal, status_path};
use drover_api as api;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const BAR: usize = 30;

/// `[#####.....]` filled `n` of `of` (as `█` / `░` on a terminal).
fn bar(n: u64, of: u64, fancy: bool) -> String {
    let filled = (n.min(of) * BAR as u64 + of / 2)
        .checked_div(of)
        .unwrap_or(0) as usize;
    let (on, off) = if fancy { ('█', '░') } else { ('#', '.') };
    format!(
        "[{}{}]",
        on.to_string().repeat(filled),
        off.to_string().repeat(BAR - filled)
    )
}

/// The whole frame for a terminal.
pub fn frame(st: &api::AppStatus, fancy: bool) -> String {
    let mut out = String::new();
    let env = if st.environment.is_empty() {
        String::new()
    } else {
        format!(" · {}", st.environment)
    };
    out.push_str(&format!(
        "{}{env} · live {}\n\n",
        st.app,
        st.live_release.as_deref().unwrap_or("-")
    ));
    match &st.rollout {
        None => out.push_str("no rollout yet\n"),
        Some(r) => {
            out.push_str(&format!(
                "rollout #{}  {} → {}  {}  {}{}\n",
                r.id,
                r.from.as_deref().unwrap_or("nothing"),
                r.to,
                r.strategy,
                r.state,
                if r.reverting { " (rolling back)" } else { "" }
            ));
            if let Some((i, n)) = r
                .canary_step
                .as_deref()
                .and_then(|s| s.split_once('/'))
                .and_then(|(i, n)| Some((i.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
            {
                out.push_str(&format!("  steps      {} {i}/{n}\n", bar(i, n, fancy)));
            }
            out.push_str(&format!(
                "  instances  {} {}/{} of {} serving\n",
                bar(u64::from(r.step), u64::from(r.steps), fancy),
                r.step,
                r.steps,
                r.to
            ));
            out.push_str(&format!("  {}\n", escape_terminal(&r.message)));
            if let Some(a) = &r.analysis {
                out.push_str(&format!("  analysis: {}\n", escape_terminal(a)));
            }
        }
    }
    out.push_str("\ntraffic\n");
    if st.traffic.is_empty() {
        out.push_str("  no release serves\n");
    }
    for (release, pct) in st.traffic.iter().rev() {
        out.push_str(&format!(
            "  {release:<8} {} {pct:>3}% of users\n",
            bar(u64::from(*pct), 100, fancy)
        ));
    }
    out.push_str(&format!(
        "\n  {:<8} {:>8} {:>8} {:>8}\n",
        "RELEASE", "REQ/S", "ERRORS", "P99"
    ));
    for f in st.figures.iter().rev() {
        out.push_str(&format!(
            "  {:<8} {:>8.1} {:>8} {:>8}\n",
            f.release,
            f.rate,
            f.error_rate
                .map(|e| format!("{:.2}%", e * 100.0))
                .unwrap_or("-".into()),
            f.p99_ms.map(|p| format!("{p:.0}ms")).unwrap_or("-".into())
        ));
    }
    out.push_str("\ninstances\n");
    for i in &st.instances {
        out.push_str(&format!(
            "  {:<28} {:<4} {:<10} {:<10}{}\n",
            i.id,
            i.release,
            i.node,
            i.state,
            if i.routed { " routed" } else { "" }
        ));
    }
    out
}

/// One line for logs: printed when it changes.
pub fn line(st: &api::AppStatus) -> String {
    let split: Vec<String> = st
        .traffic
        .iter()
        .rev()
        .map(|(r, p)| format!("{r} {p}%"))
        .collect();
    match &st.rollout {
        None => format!("{}: no rollout yet | traffic {}", st.app, split.join(" ")),
        Some(r) => format!(
            "rollout #{} {} → {} {} {}{}{} | instances {}/{} | traffic {} | {}",
            r.id,
            r.from.as_deref().unwrap_or("nothing"),
            r.to,
            r.strategy,
            r.state,
            if r.reverting { " (rolling back)" } else { "" },
            r.canary_step
                .as_ref()
                .map(|s| format!(" step {s}"))
                .unwrap_or_default(),
            r.step,
            r.steps,
            split.join(" "),
            escape_terminal(&r.message)
        ),
    }
}

/// Watches until no rollout is in progress (`exit`), or until interrupted.
pub fn run(c: &Client, app: &str, env: Option<&str>, exit: bool) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut out = std::io::stdout();
    let started = Instant::now();
    let mut seen_active = false;
    loop {
        let st: api::AppStatus = c.get(&status_path(app, env))?;
        if tty {
            // Home, then clear: the frame is drawn in place.
            write!(out, "\x1b[H\x1b[2J{}", frame(&st, true))?;
        } else {
            let l = line(&st);
            if l != last {
                writeln!(out, "{l}")?;
                last = l;
            }
        }
        out.flush()?;
        if exit {
            match &st.rollout {
                Some(r) if output::in_progress(r) => seen_active = true,
                Some(r) if seen_active || started.elapsed() > Duration::from_secs(5) => {
                    return if r.state == "succeeded" {
                        Ok(())
                    } else {
                        Err(fail(
                            1,
                            format!(
                                "rollout #{} ended {}: {}",
                                r.id,
                                r.state,
                                escape_terminal(r.failure.as_deref().unwrap_or(&r.message))
                            ),
                        ))
                    };
                }
                None if started.elapsed() > Duration::from_secs(5) => {
                    return Err(fail(1, format!("{app} has no rollout to watch")));
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn st() -> api::AppStatus {
        api::AppStatus {
            app: "web".into(),
            environment: String::new(),
            environments: Vec::new(),
            waiting: None,
            live_release: Some("r1".into()),
            rollout: Some(api::RolloutStatus {
                id: 4,
                from: Some("r1".into()),
                to: "r2".into(),
                strategy: "canary".into(),
                state: "progressing".into(),
                step: 1,
                steps: 3,
                reverting: false,
                canary_step: Some("2/3".into()),
                weight: Some(20),
                analysis: Some("error rate 0.00% ≤ 1%".into()),
                preview: None,
                message: "step 2/3: holding \u{1b}[31m".into(),
                failure: None,
                started_at_ms: 0,
            }),
            traffic: BTreeMap::from([("r1".into(), 80), ("r2".into(), 20)]),
            instances: Vec::new(),
            last_run: None,
            figures: vec![api::ReleaseFigures {
                release: "r2".into(),
                rate: 12.25,
                error_rate: Some(0.005),
                p99_ms: Some(25.0),
            }],
        }
    }

    #[test]
    fn bars_fill_in_proportion() {
        assert_eq!(bar(0, 3, false), format!("[{}]", ".".repeat(30)));
        assert_eq!(
            bar(1, 3, false),
            format!("[{}{}]", "#".repeat(10), ".".repeat(20))
        );
        assert_eq!(bar(20, 100, false).matches('#').count(), 6);
        assert_eq!(
            bar(5, 0, false).matches('#').count(),
            0,
            "nothing of nothing"
        );
        assert_eq!(bar(9, 3, false).matches('#').count(), 30, "capped");
    }

    #[test]
    fn the_frame_shows_step_split_figures_and_escapes_server_text() {
        let f = frame(&st(), false);
        assert!(
            f.contains("rollout #4  r1 → r2  canary  progressing"),
            "{f}"
        );
        assert!(
            f.contains(&format!("steps      {} 2/3", bar(2, 3, false))),
            "{f}"
        );
        assert!(
            f.contains(&format!("r2       {}  20% of users", bar(20, 100, false))),
            "{f}"
        );
        assert!(
            f.contains(&format!("r1       {}  80% of users", bar(80, 100, false))),
            "{f}"
        );
        assert!(f.contains("r2           12.2    0.50%     25ms"), "{f}");
        assert!(
            !f.contains('\u{1b}'),
            "terminal escapes from the server are escaped: {f}"
        );
    }

    #[test]
    fn the_log_line_changes_with_the_split() {
        let a = st();
        let mut b = st();
        b.traffic = BTreeMap::from([("r1".into(), 50), ("r2".into(), 50)]);
        assert_ne!(line(&a), line(&b));
        assert!(
            line(&a).contains("step 2/3 | instances 1/3 | traffic r2 20% r1 80%"),
            "{}",
            line(&a)
        );
    }
}
