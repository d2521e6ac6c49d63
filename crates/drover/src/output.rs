//! Human and `--json` output of client commands, and `watch`/`--wait`
//! progress. Strings from the server are escaped before they reach a
//! terminal (no ANSI injection through commit messages or logs).

use crate::client::{fail, Client};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use drover_api as api;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Replaces control characters (except newline and tab) with `\u{..}`.
pub fn escape_terminal(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn apps(apps: &[api::AppInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&apps);
    }
    let mut t = table(&["APP", "HOST", "LIVE", "BRANCH", "REPO"]);
    for a in apps {
        t.add_row(vec![
            a.name.clone(),
            a.host.clone(),
            match (&a.error, &a.live_release) {
                (Some(_), _) => "ERROR".to_string(),
                (None, l) => l.clone().unwrap_or("-".into()),
            },
            a.branch.clone(),
            escape_terminal(&a.repo),
        ]);
    }
    println!("{t}");
    for e in apps.iter().filter_map(|a| a.error.as_ref()) {
        println!("{}", escape_terminal(e));
    }
    Ok(())
}

pub fn status(st: &api::AppStatus, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(st);
    }
    if st.environment.is_empty() {
        println!("app:      {}", st.app);
    } else {
        println!("app:      {} (environment {})", st.app, st.environment);
        let mut t = table(&["ENVIRONMENT", "HOST", "LIVE", "PROMOTE", "LAST ROLLOUT"]);
        for e in &st.environments {
            t.add_row(vec![
                e.name.clone(),
                e.host.clone(),
                e.live_release.clone().unwrap_or("-".into()),
                e.promote.clone(),
                e.rollout.clone().unwrap_or("-".into()),
            ]);
        }
        println!("{t}");
    }
    if let Some(w) = &st.waiting {
        println!("waiting:  {}", escape_terminal(w));
    }
    println!("live:     {}", st.live_release.as_deref().unwrap_or("-"));
    if let Some(r) = &st.rollout {
        println!(
            "rollout:  #{} {} → {} ({}) {}{} step {}/{}",
            r.id,
            r.from.as_deref().unwrap_or("-"),
            r.to,
            r.strategy,
            r.state,
            if r.reverting { " (rolling back)" } else { "" },
            r.step,
            r.steps
        );
        println!("          {}", escape_terminal(&r.message));
        if let Some(w) = r.weight {
            println!(
                "canary:   {}{w}% of users → {}",
                r.canary_step
                    .as_ref()
                    .map(|s| format!("step {s}, "))
                    .unwrap_or_default(),
                r.to
            );
        }
        if let Some(a) = &r.analysis {
            println!("analysis: {}", escape_terminal(a));
        }
        if let Some(p) = &r.preview {
            println!("preview:  host {p}, or any request with the header x-drover-preview: 1");
        }
    }
    if let Some(r) = &st.last_run {
        println!(
            "last run: #{} {} of {} ({}){}",
            r.id,
            r.state,
            &r.commit[..12.min(r.commit.len())],
            r.trigger,
            r.release
                .as_ref()
                .map(|x| format!(" → {x}"))
                .unwrap_or_default()
        );
        if r.state == "failed" {
            print_run_failure(r);
        }
    }
    let traffic: Vec<String> = st
        .traffic
        .iter()
        .map(|(r, p)| format!("{r} {p}%"))
        .collect();
    println!(
        "traffic:  {}",
        if traffic.is_empty() {
            "none".to_string()
        } else {
            traffic.join(", ")
        }
    );
    let mut t = table(&[
        "INSTANCE",
        "RELEASE",
        "NODE",
        "ADDRESS",
        "STATE",
        "ROUTED",
        "PID",
        "RESTARTS",
        "LAST CHECK",
    ]);
    for i in &st.instances {
        t.add_row(vec![
            i.id.clone(),
            i.release.clone(),
            i.node.clone(),
            i.address.clone().unwrap_or("-".into()),
            i.state.clone(),
            if i.routed { "yes" } else { "no" }.to_string(),
            i.pid.map(|p| p.to_string()).unwrap_or("-".into()),
            i.restarts.to_string(),
            escape_terminal(
                i.last_check
                    .as_deref()
                    .or(i.message.as_deref())
                    .unwrap_or("-"),
            ),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn runs(rs: &[api::RunInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&rs);
    }
    let mut t = table(&["RUN", "COMMIT", "TRIGGER", "STATE", "STEPS", "RELEASE"]);
    for r in rs {
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|s| match s.duration_ms {
                Some(d) => format!(
                    "{} {} {}",
                    s.name,
                    if s.state == "succeeded" {
                        "ok"
                    } else {
                        &s.state
                    },
                    drover_core::duration::format_ms(d)
                ),
                None => format!("{} {}", s.name, s.state),
            })
            .collect();
        t.add_row(vec![
            r.id.to_string(),
            r.commit[..12.min(r.commit.len())].to_string(),
            r.trigger.clone(),
            r.state.clone(),
            steps.join(", "),
            r.release.clone().unwrap_or("-".into()),
        ]);
    }
    println!("{t}");
    if let Some(r) = rs.first().filter(|r| r.state == "failed") {
        print_run_failure(r);
    }
    Ok(())
}

fn print_run_failure(r: &api::RunInfo) {
    if let Some(step) = r.steps.iter().find(|s| s.state == "failed") {
        println!(
            "run {} failed at step {}; last lines of its output:",
            r.id, step.name
        );
        for l in step.log_tail.as_deref().unwrap_or("").lines() {
            println!("  | {}", escape_terminal(l));
        }
    } else if let Some(e) = &r.error {
        println!("run {} failed: {}", r.id, escape_terminal(e));
    }
}

/// Prints a run's log; with `follow`, until the run ends.
pub fn run_log(c: &Client, _app: &str, id: i64, follow: bool) -> anyhow::Result<()> {
    let mut offset = 0usize;
    loop {
        let text = c.get_text(&format!("/v1/runs/{id}/log?offset={offset}"))?;
        offset += text.len();
        print!("{}", escape_terminal(&text));
        if !follow {
            return Ok(());
        }
        let run: api::RunInfo = c.get(&format!("/v1/runs/{id}"))?;
        if !matches!(run.state.as_str(), "queued" | "running") {
            let rest = c.get_text(&format!("/v1/runs/{id}/log?offset={offset}"))?;
            print!("{}", escape_terminal(&rest));
            println!("(run {id} {})", run.state);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn releases(rs: &[api::ReleaseInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&rs);
    }
    let mut t = table(&["RELEASE", "COMMIT", "ARTIFACT", "SIZE", "STATUS"]);
    for r in rs {
        t.add_row(vec![
            r.name.clone(),
            r.commit[..12.min(r.commit.len())].to_string(),
            match &r.image {
                // A container image: its id (the artifact is its archive).
                Some(id) => format!("image {}", &id[..19.min(id.len())]),
                None => r.artifact_sha256[..12].to_string(),
            },
            r.artifact_size.to_string(),
            match (r.live_in.as_slice(), r.live) {
                ([], false) => r.status.clone(),
                // An app without environments: its one is named "".
                ([e], _) if e.is_empty() => "live".to_string(),
                (envs, _) => format!("live in {}", envs.join(", ")),
            },
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn nodes(ns: &[api::NodeInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&ns);
    }
    let mut t = table(&["NODE", "READY", "LAST SEEN", "INSTANCES", "LABELS"]);
    for n in ns {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.add_row(vec![
            n.name.clone(),
            if n.ready { "ready" } else { "lost" }.to_string(),
            format!("{:.1}s ago", n.last_seen_ms_ago as f64 / 1000.0),
            n.instances.to_string(),
            escape_terminal(&labels.join(",")),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn secrets(list: &[api::SecretInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&list);
    }
    let now = now_ms();
    let mut t = table(&["ENV", "NAME", "SET"]);
    for s in list {
        t.add_row(vec![
            if s.env.is_empty() {
                "-".to_string()
            } else {
                escape_terminal(&s.env)
            },
            s.name.clone(),
            format!(
                "{} ago",
                drover_core::duration::format_ms(now.saturating_sub(s.updated_at))
            ),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn tokens(ts: &[api::TokenInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&ts);
    }
    let now = now_ms();
    let mut t = table(&["ID", "NAME", "ROLE", "STATE", "EXPIRES IN"]);
    for k in ts {
        let state = match (k.revoked_at, k.expires_at) {
            (Some(_), _) => "revoked",
            (None, Some(e)) if e <= now => "expired",
            _ => "active",
        };
        t.add_row(vec![
            k.id.clone(),
            escape_terminal(&k.name),
            k.role.clone(),
            state.to_string(),
            match k.expires_at {
                None => "never".to_string(),
                Some(e) if e <= now => "-".to_string(),
                Some(e) => drover_core::duration::format_ms(e - now),
            },
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn events(ev: &[api::EventInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&ev);
    }
    for e in ev.iter().rev() {
        println!(
            "#{} {} {} {}",
            e.id,
            e.app.as_deref().unwrap_or("-"),
            e.kind,
            escape_terminal(&e.message)
        );
    }
    Ok(())
}

pub fn deliveries(d: &[api::DeliveryInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&d);
    }
    if d.is_empty() {
        println!("no webhook deliveries (add [[notify]] to drover.toml to send some)");
        return Ok(());
    }
    for x in d {
        let last = match (&x.last_status, &x.last_error) {
            (_, Some(e)) => escape_terminal(e),
            (Some(s), None) => format!("answered {s}"),
            (None, None) => String::new(),
        };
        println!(
            "{} {}{} {} {} after {} attempt(s) {}",
            x.id,
            x.event,
            if x.env.is_empty() {
                String::new()
            } else {
                format!(" ({})", x.env)
            },
            x.url,
            x.state,
            x.attempts,
            last
        );
    }
    Ok(())
}

/// Whether a rollout has yet to end.
pub fn in_progress(r: &api::RolloutStatus) -> bool {
    matches!(r.state.as_str(), "pending" | "progressing" | "paused")
}

/// Follows the app's rollout (a given id, or the latest) until it ends.
/// Exit 0 only if it succeeded.
/// The status URL path of an app, in `env` (default: the server's choice,
/// the last environment).
pub fn status_path(app: &str, env: Option<&str>) -> String {
    match env.filter(|e| !e.is_empty()) {
        Some(e) => format!("/v1/apps/{app}/status?env={}", query_safe(e)),
        None => format!("/v1/apps/{app}/status"),
    }
}

/// Environment and release names are [a-z0-9-]; anything else is refused by
/// the server, but must not bend the URL.
pub fn query_safe(v: &str) -> String {
    v.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
}

pub fn plan(p: &api::PlanInfo, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(p);
    }
    println!(
        "plan:     {}{} → {} ({}), expected {} — {}",
        p.from.as_deref().unwrap_or("nothing"),
        drover_core::spec::in_env(&p.env),
        p.to,
        p.strategy,
        drover_core::duration::format_ms(p.duration_ms),
        escape_terminal(&p.outcome)
    );
    println!("assumes:  {}", p.assumptions);
    let mut t = table(&["AT", "CHANGES", "TRAFFIC"]);
    for st in &p.steps {
        let traffic: Vec<String> = st
            .traffic
            .iter()
            .map(|(r, w)| format!("{r} {w}%"))
            .collect();
        t.add_row(vec![
            format!("+{}", drover_core::duration::format_ms(st.at_ms)),
            if st.changes.is_empty() {
                escape_terminal(&st.message)
            } else {
                st.changes.join("\n")
            },
            traffic.join(", "),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn follow(
    c: &Client,
    app: &str,
    env: Option<&str>,
    rollout_id: Option<i64>,
) -> anyhow::Result<()> {
    follow_until(c, app, env, rollout_id, "succeeded")
}

/// Follows a rollout to its end; exit 0 only if it ends in state `success`.
pub fn follow_until(
    c: &Client,
    app: &str,
    env: Option<&str>,
    rollout_id: Option<i64>,
    success: &str,
) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let mut last_msg = String::new();
    let started = Instant::now();
    loop {
        let st: api::AppStatus = c.get(&status_path(app, env))?;
        let Some(r) = st
            .rollout
            .as_ref()
            .filter(|r| rollout_id.is_none_or(|id| r.id >= id))
        else {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(fail(1, format!("{app} has no rollout to follow")));
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let traffic: Vec<String> = st
            .traffic
            .iter()
            .map(|(r, p)| format!("{r} {p}%"))
            .collect();
        let msg = format!(
            "{} [{}] {}",
            r.state,
            traffic.join(" "),
            escape_terminal(&r.message)
        );
        match &bar {
            Some(b) => {
                b.set_length(r.steps as u64);
                b.set_position(r.step as u64);
                b.set_message(msg.clone());
            }
            None => {
                if msg != last_msg {
                    eprintln!("{msg}");
                }
            }
        }
        last_msg = msg;
        let done = !in_progress(r);
        if done {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if r.state == success {
                println!(
                    "rollout #{} {}: {}",
                    r.id,
                    r.state,
                    escape_terminal(&r.message)
                );
                return Ok(());
            }
            return Err(fail(
                1,
                format!(
                    "rollout #{} {}: {}",
                    r.id,
                    r.state,
                    escape_terminal(&r.message)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
