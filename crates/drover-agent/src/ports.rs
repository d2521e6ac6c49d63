//! Port allocation for instances: a rotating cursor over the configured
//! range, so a port that was just released is not handed out again soon
//! (a stale upstream entry somewhere must not reach a different instance).

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};

/// Picks the next free port in `range` (inclusive) starting at `*cursor`,
/// skipping `in_use` and ports that cannot be bound on 127.0.0.1 right now.
/// Advances the cursor past the chosen port. `None` when the range is full.
pub fn pick_port(range: (u16, u16), cursor: &mut u16, in_use: &HashSet<u16>) -> Option<u16> {
    let (lo, hi) = if range.0 <= range.1 {
        range
    } else {
        (range.1, range.0)
    };
    let span = u32::from(hi) - u32::from(lo) + 1;
    let start = if (lo..=hi).contains(cursor) {
        *cursor
    } else {
        lo
    };
    for i in 0..span {
        let port = (u32::from(lo) + (u32::from(start - lo) + i) % span) as u16;
        if in_use.contains(&port) || !is_free(port) {
            continue;
        }
        *cursor = if port == hi { lo } else { port + 1 };
        return Some(port);
    }
    None
}

/// Whether nothing listens on 127.0.0.1:`port` (checked by binding it).
pub fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_skips_used_and_bound_ports() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let p = held.local_addr().unwrap().port();
        // A range of 3 around the held port (stay within u16).
        let lo = p.saturating_sub(1).max(1);
        let range = (lo, lo + 2);
        let mut cursor = lo;
        let mut got = Vec::new();
        for _ in 0..4 {
            if let Some(x) = pick_port(range, &mut cursor, &HashSet::new()) {
                got.push(x);
            }
        }
        assert!(!got.contains(&p), "bound port handed out: {got:?}");
        // Rotation: consecutive picks differ when more than one port is free.
        if got.len() >= 2 && got.iter().collect::<HashSet<_>>().len() > 1 {
            assert_ne!(got[0], got[1]);
        }
        let mut cursor = lo;
        let all: HashSet<u16> = (lo..=lo + 2).collect();
        assert_eq!(pick_port(range, &mut cursor, &all), None);
    }
}
