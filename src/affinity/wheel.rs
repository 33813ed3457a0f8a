//! A two-level hashed timer wheel over small integer ids.
//!
//! Expiry must not scan a million affinities every tick. Level 0 has one
//! slot per [`TICK_MS`] for the current block of [`L0_SLOTS`] ticks; level 1
//! has one slot per block. When the cursor enters a block, that block's level-1
//! slot is moved down into level 0 (each timer moves at most once, plus once
//! per level-1 revolution — about 19 days — for longer ones). Advancing costs
//! the timers due plus the slots passed, and empty stretches are skipped a
//! block at a time. Timers are intrusive doubly linked lists in one array, so
//! cancelling or rescheduling is O(1).

pub(crate) const TICK_MS: u64 = 100;
const L0_BITS: u32 = 12;
const L0_SLOTS: u64 = 1 << L0_BITS;
const L1_SLOTS: u64 = 4096;
const NIL: u32 = u32::MAX;
const UNLINKED: u8 = u8::MAX;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    expires_ms: u64,
    level: u8,
    slot: u32,
}

const EMPTY: Link = Link {
    prev: NIL,
    next: NIL,
    expires_ms: 0,
    level: UNLINKED,
    slot: 0,
};

pub(crate) struct Wheel {
    links: Vec<Link>,
    heads: [Box<[u32]>; 2],
    counts: [usize; 2],
    /// The current tick: every slot before it has been processed.
    tick: u64,
    started: bool,
    /// Timers looked at while advancing (for tests).
    visited: u64,
}

impl Wheel {
    pub(crate) fn new() -> Wheel {
        Wheel {
            links: Vec::new(),
            heads: [
                vec![NIL; L0_SLOTS as usize].into_boxed_slice(),
                vec![NIL; L1_SLOTS as usize].into_boxed_slice(),
            ],
            counts: [0, 0],
            tick: 0,
            started: false,
            visited: 0,
        }
    }

    fn start(&mut self, now_ms: u64) {
        if !self.started {
            self.started = true;
            self.tick = now_ms / TICK_MS;
        }
    }

    /// Schedules `id` (not already scheduled) to fire at `expires_ms`.
    pub(crate) fn insert(&mut self, id: u32, expires_ms: u64, now_ms: u64) {
        self.start(now_ms);
        let i = id as usize;
        if self.links.len() <= i {
            self.links.resize(i + 1, EMPTY);
        }
        debug_assert_eq!(self.links[i].level, UNLINKED);
        self.links[i].expires_ms = expires_ms;
        self.place(id);
    }

    /// Unschedules `id`; nothing if it is not scheduled.
    pub(crate) fn remove(&mut self, id: u32) {
        if self
            .links
            .get(id as usize)
            .is_some_and(|l| l.level != UNLINKED)
        {
            self.unlink(id);
        }
    }

    /// Moves the cursor to `now_ms` and appends to `due` (unscheduling them)
    /// every timer with `expires_ms <= now_ms`.
    pub(crate) fn advance(&mut self, now_ms: u64, due: &mut Vec<u32>) {
        self.start(now_ms);
        let target = now_ms / TICK_MS;
        loop {
            self.fire(now_ms, due);
            if self.tick >= target {
                return;
            }
            let next = if self.counts[0] > 0 {
                self.tick + 1
            } else if self.counts[1] > 0 {
                ((self.tick | (L0_SLOTS - 1)) + 1).min(target)
            } else {
                target
            };
            let crossed = next >> L0_BITS != self.tick >> L0_BITS;
            self.tick = next;
            if crossed {
                self.cascade();
            }
        }
    }

    pub(crate) fn visited(&self) -> u64 {
        self.visited
    }

    /// The tick a timer belongs to: never before the cursor.
    fn due_tick(&self, id: u32) -> u64 {
        (self.links[id as usize].expires_ms / TICK_MS).max(self.tick)
    }

    fn place(&mut self, id: u32) {
        let t = self.due_tick(id);
        if t >> L0_BITS == self.tick >> L0_BITS {
            self.link(id, 0, (t % L0_SLOTS) as u32);
        } else {
            self.link(id, 1, ((t >> L0_BITS) % L1_SLOTS) as u32);
        }
    }

    /// Fires the due timers of the current tick's level-0 slot.
    fn fire(&mut self, now_ms: u64, due: &mut Vec<u32>) {
        let mut id = self.heads[0][(self.tick % L0_SLOTS) as usize];
        while id != NIL {
            let l = self.links[id as usize];
            self.visited += 1;
            if l.expires_ms <= now_ms {
                self.unlink(id);
                due.push(id);
            }
            id = l.next;
        }
    }

    /// Moves the timers of the block just entered from level 1 to level 0.
    fn cascade(&mut self) {
        let block = self.tick >> L0_BITS;
        let mut id = self.heads[1][(block % L1_SLOTS) as usize];
        while id != NIL {
            let next = self.links[id as usize].next;
            self.visited += 1;
            if self.due_tick(id) >> L0_BITS == block {
                self.unlink(id);
                self.place(id);
            }
            id = next;
        }
    }

    fn link(&mut self, id: u32, level: u8, slot: u32) {
        let head = &mut self.heads[level as usize][slot as usize];
        let old = *head;
        *head = id;
        self.links[id as usize] = Link {
            prev: NIL,
            next: old,
            level,
            slot,
            ..self.links[id as usize]
        };
        if old != NIL {
            self.links[old as usize].prev = id;
        }
        self.counts[level as usize] += 1;
    }

    fn unlink(&mut self, id: u32) {
        let l = self.links[id as usize];
        if l.prev == NIL {
            self.heads[l.level as usize][l.slot as usize] = l.next;
        } else {
            self.links[l.prev as usize].next = l.next;
        }
        if l.next != NIL {
            self.links[l.next as usize].prev = l.prev;
        }
        self.counts[l.level as usize] -= 1;
        self.links[id as usize] = Link {
            expires_ms: l.expires_ms,
            ..EMPTY
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random timers and random steps (some beyond both levels): each timer
    /// fires at the first advance at or after its time, never before.
    #[test]
    fn fires_exactly_when_due() {
        let mut w = Wheel::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let start = 1_000_000u64;
        let n = 5_000u32;
        let mut expires = Vec::new();
        for id in 0..n {
            let d = match id % 4 {
                0 => rnd() % 2_000,
                1 => rnd() % 600_000,
                2 => rnd() % 100_000_000,
                _ => rnd() % 3_000_000_000,
            };
            expires.push(start + d);
            w.insert(id, start + d, start);
        }
        // Cancel a tenth; reschedule a tenth.
        for id in (0..n).step_by(10) {
            w.remove(id);
        }
        for id in (5..n).step_by(10) {
            w.remove(id);
            expires[id as usize] += 1_234_567;
            w.insert(id, expires[id as usize], start);
        }
        let mut fired = vec![false; n as usize];
        let mut now = start;
        let mut due = Vec::new();
        while now < start + 3_100_000_000 {
            now += match rnd() % 3 {
                0 => rnd() % 300,
                1 => rnd() % 1_000_000,
                _ => rnd() % 50_000_000,
            };
            due.clear();
            w.advance(now, &mut due);
            for &id in &due {
                assert!(!fired[id as usize]);
                assert_ne!(id % 10, 0, "cancelled timer fired");
                assert!(expires[id as usize] <= now);
                fired[id as usize] = true;
            }
            for id in 0..n {
                if id % 10 != 0 && !fired[id as usize] {
                    assert!(expires[id as usize] > now, "timer {id} late");
                }
            }
        }
        assert_eq!(w.counts, [0, 0]);
    }

    #[test]
    fn quiet_advance_visits_nothing() {
        let mut w = Wheel::new();
        for id in 0..10_000 {
            w.insert(id, 3_600_000 + u64::from(id), 0);
        }
        let mut due = Vec::new();
        for t in (100..600_000).step_by(100) {
            w.advance(t, &mut due);
        }
        assert!(due.is_empty());
        assert_eq!(w.visited(), 0);
        w.advance(3_600_000 + 4_999, &mut due);
        assert_eq!(due.len(), 5_000);
        assert!(w.visited() <= 10_000 + 5_000);
    }
}
