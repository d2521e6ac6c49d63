//! Who gets which share of the users during a rollout: the split a rollout
//! asks of the proxies, and the resulting percent per release. One place for
//! both, used by the routing table, `drover status` and `drover plan`.

use crate::model::{DeploySettings, Rollout, Strategy};
use std::collections::BTreeMap;

/// The split an active canary, partial or blue/green rollout asks of the
/// proxies: its new release and the percent of users sent to it (0 while
/// rolling back: everyone on the stable release). None: no split, every
/// routed instance by weight. `settings` are those of the rollout's target.
pub fn rollout_split(r: &Rollout, settings: &DeploySettings) -> Option<(String, u32)> {
    if r.state.is_final() || r.from.is_none() || !settings.strategy.splits() {
        return None;
    }
    if r.reverting {
        return Some((r.to.clone(), 0));
    }
    match settings.strategy {
        Strategy::BlueGreen => {
            let switched = r
                .blue_green
                .as_ref()
                .is_some_and(|b| b.switched_at.is_some());
            Some((r.to.clone(), if switched { 100 } else { 0 }))
        }
        _ => {
            let cp = r.canary.as_ref();
            if cp.map_or(0, |c| c.step as usize) >= settings.steps.len() {
                return None;
            }
            Some((r.to.clone(), cp.map_or(0, |c| c.weight)))
        }
    }
}

/// Percent of users per release, from the routed instances per release:
/// by the split when there is one (and both sides are routed), else by
/// instance count, rounded so the shares sum to 100.
pub fn shares(
    mut routed: BTreeMap<String, u32>,
    split: Option<&(String, u32)>,
) -> BTreeMap<String, u32> {
    if let Some((new, w)) = split {
        let stable: Vec<&String> = routed.keys().filter(|r| *r != new).collect();
        if routed.contains_key(new) && stable.len() == 1 {
            return BTreeMap::from([(new.clone(), *w), (stable[0].clone(), 100 - w)]);
        }
        if *w == 0 && !stable.is_empty() {
            routed.remove(new);
        }
    }
    let total: u32 = routed.values().sum();
    if total == 0 {
        return BTreeMap::new();
    }
    // Largest-remainder rounding so the shares sum to 100.
    let mut shares: Vec<(String, u32, u32)> = routed
        .iter()
        .map(|(r, c)| (r.clone(), c * 100 / total, c * 100 % total))
        .collect();
    let mut left = 100 - shares.iter().map(|s| s.1).sum::<u32>();
    shares.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    for s in shares.iter_mut() {
        if left == 0 {
            break;
        }
        s.1 += 1;
        left -= 1;
    }
    shares.into_iter().map(|(r, p, _)| (r, p)).collect()
}
