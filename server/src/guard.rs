//! Unauthenticated floods: refused requests are counted per client IP and
//! minute in memory instead of each writing an audit row (the first few of
//! each minute still do, so ordinary mistakes stay visible one by one), and
//! an IP past its limit of failed authentications is answered `429` before
//! authentication, for the rest of the minute. Credentials that
//! authenticated recently still pass, so a legitimate user behind the same
//! address keeps working, and authenticated traffic never waits on the
//! audit lock behind a flood. So does a credential the address has not yet
//! failed with, while it has failed with only a few distinct ones this
//! minute (a user who just signed in, behind an address where a script sent
//! one wrong token a hundred times): a flood that repeats a bad credential
//! is refused before it is checked, and so is one that invents a new
//! credential each time.
//!
//! A client is its TCP peer's address; for IPv6, its /64 network (see
//! [`address_key`]), the block one subscriber gets, so that a flooder
//! cannot step past its count by changing the low bits of its address.
//! A flood from very many addresses fills at most [`MAX_TALLIES`] tallies
//! a minute; further addresses share one.
//!
//! A refused client that keeps knocking is also slowed down: its `429`
//! waits a moment (the tarpit) before it is sent, which costs the server a
//! timer, not a worker; a flooder that waits for each answer then sends one
//! request a second instead of thousands. The number of answers held back
//! at once is bounded; past it they go at once, closing the connection.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use sha2::{Digest, Sha256};

/// Failed authentications of one address in a minute before its requests
/// are answered `429` (`HANDOVER_UNAUTH_PER_MINUTE`'s default). Each one
/// below it is a full request: a flood's opening burst costs the server
/// this many of them before the throttle takes over, so it is set well
/// below what the API's own rate limits allow, and well above what people
/// mistyping a token or a script with a stale one reach.
pub const DEFAULT_UNAUTH_PER_MINUTE: u64 = 30;

/// Refusals of one IP that are still written one row each per minute.
pub const LOGGED_PER_MINUTE: u64 = 10;

/// Distinct failed credentials remembered per IP and minute; past them,
/// every credential not known to work is throttled.
pub const FAILED_REMEMBERED: usize = 16;

/// Addresses with a tally of their own in one minute, at most: a flood
/// from more of them (a botnet's, or one IPv6 prefix's many /64s) must not
/// grow the server's memory without bound. Refusals of further addresses
/// that minute are counted together under [`OTHER_ADDRESSES`], for the
/// audit log only: the shared count throttles nobody, or a flood that
/// filled the tallies would lock out every other client.
pub const MAX_TALLIES: usize = 50_000;

/// The key of the tally that addresses past [`MAX_TALLIES`] share.
pub const OTHER_ADDRESSES: &str = "other addresses";

/// The key the throttle counts a client under: an IPv4 address as it is
/// (also when it comes mapped into IPv6), an IPv6 address as its /64
/// network (`2001:db8:1:2::/64`), except loopback and link-local ones,
/// which are as they are (every link-local address is in `fe80::/64`).
///
/// # Examples
///
/// ```
/// use handover_server::guard::address_key;
///
/// assert_eq!(address_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
/// assert_eq!(address_key("2001:db8:1:2:aaaa::1".parse().unwrap()), "2001:db8:1:2::/64");
/// assert_eq!(address_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7");
/// ```
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            // Link-local: fe80::/10.
            None if v6.is_loopback() || v6.segments()[0] & 0xffc0 == 0xfe80 => v6.to_string(),
            None => {
                let s = v6.segments();
                let network = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{network}/64")
            }
        },
    }
}

/// Refused requests of one IP in one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub ip: String,
    /// Unix minute.
    pub minute: i64,
    /// Failed authentications (401).
    pub refused: u64,
    /// Answered 429 before authentication.
    pub throttled: u64,
    /// One of the paths asked for (capped).
    pub sample_path: String,
    /// SHA-256 of the Authorization headers that failed (at most
    /// [`FAILED_REMEMBERED`]; `None` once more did).
    failed: Option<HashSet<[u8; 32]>>,
}

impl Tally {
    fn new(ip: &str, minute: i64, path: &str) -> Self {
        Self {
            ip: ip.to_string(),
            minute,
            refused: 0,
            throttled: 0,
            sample_path: path.to_string(),
            failed: Some(HashSet::new()),
        }
    }

    /// Whether `authorization` may still be checked although the IP is over
    /// its limit: a credential it has not failed with, while few have.
    fn may_try(&self, credential: &[u8; 32]) -> bool {
        self.failed
            .as_ref()
            .is_some_and(|f| !f.contains(credential))
    }

    /// Whether it holds refusals that got no audit row of their own.
    fn unlogged(&self) -> bool {
        self.refused > LOGGED_PER_MINUTE || self.throttled > 0
    }
}

/// Throttled answers held back at once, at most.
pub const TARPIT_SLOTS: usize = 256;

/// The refusals counted so far.
#[derive(Debug, Default)]
struct Tallies {
    /// One per address (or [`OTHER_ADDRESSES`]).
    by_address: HashMap<String, Tally>,
    /// Tallies of finished minutes set aside when the map was full, for
    /// the sweeper to write with the rest.
    finished: Vec<Tally>,
    /// The minute whose earlier tallies were last set aside (so that a
    /// full map is searched once a minute, not once a request).
    set_aside: i64,
}

impl Tallies {
    /// Queues a finished tally for the sweeper. Past [`MAX_TALLIES`] queued
    /// (the audit log unreachable for a while), one minute's further ones
    /// are added up in one shared tally, so memory stays bounded.
    fn finish(&mut self, t: Tally) {
        if self.finished.len() < MAX_TALLIES {
            self.finished.push(t);
            return;
        }
        let shared = self
            .finished
            .iter_mut()
            .rev()
            .find(|s| s.ip == OTHER_ADDRESSES && s.minute == t.minute);
        match shared {
            Some(s) => {
                s.refused += t.refused;
                s.throttled += t.throttled;
            }
            None => self.finished.push(Tally {
                ip: OTHER_ADDRESSES.to_string(),
                failed: None,
                ..t
            }),
        }
    }

    /// Moves the tallies of minutes before `now` out of the map, and those
    /// with refusals that got no row of their own into the queue.
    fn set_aside_before(&mut self, now: i64) {
        let (current, earlier): (HashMap<_, _>, HashMap<_, _>) =
            std::mem::take(&mut self.by_address)
                .into_iter()
                .partition(|(_, t)| t.minute >= now);
        self.by_address = current;
        for t in earlier.into_values().filter(Tally::unlogged) {
            self.finish(t);
        }
    }

    /// The tally `ip` counts in: its own, or, when the map is full and it
    /// has none, the one other addresses share.
    fn key<'a>(&self, ip: &'a str) -> &'a str {
        if self.by_address.len() < MAX_TALLIES || self.by_address.contains_key(ip) {
            ip
        } else {
            OTHER_ADDRESSES
        }
    }

    /// Failed authentications that count against `ip` in minute `now`
    /// (none from the shared tally: see [`MAX_TALLIES`]).
    fn failures(&self, ip: &str, now: i64) -> u64 {
        match self.key(ip) {
            OTHER_ADDRESSES => 0,
            key => self
                .by_address
                .get(key)
                .filter(|t| t.minute == now)
                .map_or(0, |t| t.refused),
        }
    }
}

#[derive(Debug, Default)]
pub struct Guard {
    /// Throttled answers being held back now.
    tarpitted: std::sync::atomic::AtomicUsize,
    tallies: Mutex<Tallies>,
    /// SHA-256 of Authorization headers that authenticated, and the minute.
    known: Mutex<HashMap<[u8; 32], i64>>,
    /// One lane per address that failed authentication this minute.
    lanes: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A held-back answer's place in the tarpit; freed when dropped.
#[derive(Debug)]
pub struct TarpitSlot<'g>(&'g Guard);

impl Drop for TarpitSlot<'_> {
    fn drop(&mut self) {
        self.0.tarpitted.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Guard {
    /// A place in the tarpit, or `None` when it is full (answer at once,
    /// and close the connection).
    pub fn tarpit(&self) -> Option<TarpitSlot<'_>> {
        let mut n = self.tarpitted.load(Ordering::Relaxed);
        loop {
            if n >= TARPIT_SLOTS {
                return None;
            }
            match self.tarpitted.compare_exchange_weak(
                n,
                n + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(TarpitSlot(self)),
                Err(now) => n = now,
            }
        }
    }
}

fn minute_now() -> i64 {
    time::OffsetDateTime::now_utc()
        .unix_timestamp()
        .div_euclid(60)
}

fn digest(header: &str) -> [u8; 32] {
    Sha256::digest(header.as_bytes()).into()
}

impl Guard {
    /// Seconds until `ip` may try again, when it is over `limit` failed
    /// authentications this minute and `authorization` neither
    /// authenticated recently nor is new to it (see the module's comment).
    pub fn throttled(&self, ip: &str, limit: u64, authorization: Option<&str>) -> Option<u64> {
        self.throttled_at(ip, limit, authorization, minute_now())
    }

    fn throttled_at(
        &self,
        ip: &str,
        limit: u64,
        authorization: Option<&str>,
        now: i64,
    ) -> Option<u64> {
        if limit == 0 {
            return None;
        }
        if self.failures(ip, now) < limit {
            return None;
        }
        if let Some(credential) = authorization.map(digest) {
            let new_here = || {
                self.tallies.lock().is_ok_and(|t| {
                    t.by_address
                        .get(ip)
                        .is_some_and(|t| t.minute == now && t.may_try(&credential))
                })
            };
            if self.is_known(&credential, now) || new_here() {
                return None;
            }
        }
        let secs = 60
            - time::OffsetDateTime::now_utc()
                .unix_timestamp()
                .rem_euclid(60);
        Some(secs.max(1) as u64)
    }

    /// Failed authentications of `ip` in minute `now`.
    fn failures(&self, ip: &str, now: i64) -> u64 {
        self.tallies.lock().map_or(0, |t| t.failures(ip, now))
    }

    /// Whether the credential (its digest) authenticated this minute or the last.
    fn is_known(&self, credential: &[u8; 32], now: i64) -> bool {
        self.known
            .lock()
            .is_ok_and(|k| k.get(credential).is_some_and(|m| now - m <= 1))
    }

    /// The lane in which requests from `ip` check their credentials, one
    /// at a time, once the address has failed authentication this minute;
    /// `None` for other addresses, for credentials that authenticated
    /// recently, and when the throttle is off (`limit` 0). A flood from one
    /// address then checks one credential at a time and holds one of the
    /// database's connections, not all of them, while everyone else's
    /// requests go on beside it. Only the check waits in the lane, not the
    /// rest of the request (its body, its handler).
    pub fn lane(
        &self,
        ip: &str,
        limit: u64,
        authorization: Option<&str>,
    ) -> Option<Arc<Semaphore>> {
        if limit == 0 {
            // Off, as the throttle is (behind a proxy every client shares
            // one address).
            return None;
        }
        let now = minute_now();
        if self.failures(ip, now) == 0
            || authorization.is_some_and(|a| self.is_known(&digest(a), now))
        {
            return None;
        }
        let mut lanes = self.lanes.lock().ok()?;
        if lanes.len() >= 10_000 {
            // Lanes nobody is in or waiting for.
            lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
        }
        Some(
            lanes
                .entry(ip.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(1)))
                .clone(),
        )
    }

    /// Remembers credentials that authenticated.
    pub fn authenticated(&self, authorization: &str) {
        let now = minute_now();
        if let Ok(mut known) = self.known.lock() {
            if known.len() > 10_000 {
                known.retain(|_, m| now - *m <= 1);
            }
            known.insert(digest(authorization), now);
        }
    }

    /// Counts a refusal (`throttled`: a 429 before authentication) and
    /// remembers the credential that failed; returns whether it should
    /// still get an audit row of its own. Tallies of earlier minutes that
    /// this completes wait for the sweeper ([`Guard::take_finished`]): no
    /// request writes them, so none is lost with a request.
    pub fn refused(
        &self,
        ip: &str,
        path: &str,
        throttled: bool,
        authorization: Option<&str>,
    ) -> bool {
        self.refused_at(ip, path, throttled, authorization, minute_now())
    }

    fn refused_at(
        &self,
        ip: &str,
        path: &str,
        throttled: bool,
        authorization: Option<&str>,
        now: i64,
    ) -> bool {
        let Ok(mut tallies) = self.tallies.lock() else {
            return true;
        };
        let tallies = &mut *tallies;
        if tallies.by_address.len() >= MAX_TALLIES
            && !tallies.by_address.contains_key(ip)
            && tallies.set_aside != now
        {
            // Full: the tallies of finished minutes make room now, and
            // wait for the sweeper with the others.
            tallies.set_aside = now;
            tallies.set_aside_before(now);
        }
        // The address's tally of an earlier minute is finished.
        let stale = tallies.key(ip);
        if tallies
            .by_address
            .get(stale)
            .is_some_and(|t| t.minute != now)
        {
            if let Some(finished) = tallies.by_address.remove(stale).filter(Tally::unlogged) {
                tallies.finish(finished);
            }
        }
        // Again: a removed tally may have made room for the address's own.
        let key = tallies.key(ip);
        let t = tallies
            .by_address
            .entry(key.to_string())
            .or_insert_with(|| Tally::new(key, now, path));
        if throttled {
            t.throttled += 1;
        } else {
            t.refused += 1;
            if let (Some(a), Some(failed)) = (authorization, t.failed.as_mut()) {
                failed.insert(digest(a));
                if failed.len() > FAILED_REMEMBERED {
                    t.failed = None;
                }
            }
        }
        !throttled && t.refused <= LOGGED_PER_MINUTE
    }

    /// Puts back tallies that could not be written, for the next sweep.
    pub fn requeue(&self, tallies: impl IntoIterator<Item = Tally>) {
        if let Ok(mut t) = self.tallies.lock() {
            for tally in tallies {
                t.finish(tally);
            }
        }
    }

    /// Tallies of minutes before this one (for the sweeper to write).
    pub fn take_finished(&self) -> Vec<Tally> {
        let now = minute_now();
        let Ok(mut tallies) = self.tallies.lock() else {
            return Vec::new();
        };
        tallies.set_aside_before(now);
        std::mem::take(&mut tallies.finished)
    }

    /// Every tally, finished or not (tests and shutdown).
    pub fn take_all(&self) -> Vec<Tally> {
        let Ok(mut tallies) = self.tallies.lock() else {
            return Vec::new();
        };
        tallies.set_aside_before(i64::MAX);
        std::mem::take(&mut tallies.finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tarpit_holds_a_bounded_number_of_answers() {
        let g = Guard::default();
        let held: Vec<_> = (0..TARPIT_SLOTS).map(|_| g.tarpit().unwrap()).collect();
        assert!(g.tarpit().is_none(), "full");
        drop(held);
        assert!(g.tarpit().is_some(), "freed");
    }

    #[test]
    fn throttles_an_ip_past_its_limit_but_not_known_credentials() {
        let g = Guard::default();
        for i in 0..5 {
            let own = g.refused("10.0.0.1", "/api/x", false, Some("Bearer bad"));
            assert_eq!(own, i < LOGGED_PER_MINUTE);
        }
        assert_eq!(g.throttled("10.0.0.1", 6, None), None);
        g.refused("10.0.0.1", "/api/x", false, Some("Bearer bad"));
        assert!(g.throttled("10.0.0.1", 6, None).is_some());
        assert!(g.throttled("10.0.0.1", 6, Some("Bearer bad")).is_some());
        g.authenticated("Bearer good");
        assert_eq!(g.throttled("10.0.0.1", 6, Some("Bearer good")), None);
        assert_eq!(
            g.throttled("10.0.0.2", 6, None),
            None,
            "other IPs are not affected"
        );
        assert_eq!(g.throttled("10.0.0.1", 0, None), None, "0 turns it off");
    }

    #[test]
    fn a_credential_new_to_a_throttled_address_is_still_checked() {
        let g = Guard::default();
        for i in 0..30 {
            g.refused(
                "10.0.0.1",
                "/api/x",
                false,
                Some(&format!("Bearer bad{}", i % 3)),
            );
        }
        assert!(g.throttled("10.0.0.1", 20, Some("Bearer bad1")).is_some());
        assert!(g.throttled("10.0.0.1", 20, None).is_some());
        assert_eq!(g.throttled("10.0.0.1", 20, Some("Bearer new")), None);
        // An address that failed with many distinct credentials (a flood
        // inventing them) gets no such benefit.
        for i in 0..=FAILED_REMEMBERED {
            g.refused(
                "10.0.0.2",
                "/api/x",
                false,
                Some(&format!("Bearer made_up_{i}")),
            );
        }
        assert!(g.throttled("10.0.0.2", 2, Some("Bearer new")).is_some());
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_network() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::1"), "::1");
        assert_ne!(key("fe80::1"), key("fe80::2"), "link-local: each its own");
        assert_eq!(key("::ffff:10.0.0.1"), "10.0.0.1");
        let g = Guard::default();
        // A fixed minute: the clock's must not turn during the test.
        let now = 29_000_000;
        for n in 0..6 {
            let ip = key(&format!("2001:db8:1:2::{n}"));
            g.refused_at(&ip, "/api/x", false, None, now);
        }
        assert!(g
            .throttled_at(&key("2001:db8:1:2::99"), 6, None, now)
            .is_some());
        assert_eq!(g.throttled_at(&key("2001:db8:1:3::1"), 6, None, now), None);
    }

    #[test]
    fn past_the_cap_further_addresses_share_one_tally_that_throttles_nobody() {
        let g = Guard::default();
        let now = 29_000_000;
        for n in 0..MAX_TALLIES {
            let ip = format!("10.{}.{}.1", n / 256, n % 256);
            g.refused_at(&ip, "/api/x", false, None, now);
        }
        assert_eq!(g.tallies.lock().unwrap().by_address.len(), MAX_TALLIES);
        for n in 0..12 {
            g.refused_at(&format!("172.16.0.{n}"), "/api/y", false, None, now);
        }
        let tallies = g.tallies.lock().unwrap();
        assert_eq!(
            tallies.by_address.len(),
            MAX_TALLIES + 1,
            "one more: the shared tally"
        );
        assert_eq!(tallies.by_address[OTHER_ADDRESSES].refused, 12);
        assert_eq!(
            tallies.by_address["10.0.0.1"].refused, 1,
            "counted apart as before"
        );
        drop(tallies);
        assert_eq!(
            g.throttled_at("172.16.9.9", 5, None, now),
            None,
            "the shared count locks nobody out"
        );
        // A new minute: the full map's finished tallies make room, and
        // wait for the sweeper; the next address has a tally of its own.
        g.refused_at("172.16.0.1", "/api/y", false, None, now + 1);
        let tallies = g.tallies.lock().unwrap();
        assert_eq!(tallies.by_address.len(), 1);
        assert_eq!(tallies.by_address["172.16.0.1"].refused, 1);
        drop(tallies);
        let finished = g.take_all();
        assert_eq!(
            finished.len(),
            1,
            "only the shared tally has refusals without a row"
        );
        assert_eq!(
            (finished[0].ip.as_str(), finished[0].refused),
            (OTHER_ADDRESSES, 12)
        );
    }

    #[test]
    fn a_finished_minute_waits_for_the_sweeper_whichever_answer_ends_it() {
        let g = Guard::default();
        let now = 29_000_000;
        for _ in 0..12 {
            g.refused_at("10.0.0.1", "/api/x", false, None, now);
        }
        // The next minute's first refusal is a throttled one (the 429
        // before authentication, whose caller writes nothing).
        assert!(!g.refused_at("10.0.0.1", "/api/x", true, None, now + 1));
        let mut tallies = g.take_all();
        tallies.sort_by_key(|t| t.minute);
        let counts: Vec<_> = tallies
            .iter()
            .map(|t| (t.minute, t.refused, t.throttled))
            .collect();
        assert_eq!(counts, [(now, 12, 0), (now + 1, 0, 1)]);
    }

    #[test]
    fn counts_waiting_to_be_written_stay_bounded_and_add_up() {
        let g = Guard::default();
        let tally = |n: usize| Tally {
            refused: 20,
            ..Tally::new(
                &format!("10.{}.{}.1", n / 256, n % 256),
                29_000_000,
                "/api/x",
            )
        };
        // The audit log unreachable: what could not be written goes back.
        g.requeue((0..MAX_TALLIES + 3).map(tally));
        let waiting = g.take_finished();
        assert_eq!(waiting.len(), MAX_TALLIES + 1);
        let shared = waiting.last().unwrap();
        assert_eq!((shared.ip.as_str(), shared.refused), (OTHER_ADDRESSES, 60));
        assert_eq!(
            waiting.iter().map(|t| t.refused).sum::<u64>(),
            20 * (MAX_TALLIES as u64 + 3)
        );
    }

    #[test]
    fn a_failing_address_checks_one_credential_at_a_time() {
        let g = Guard::default();
        assert!(
            g.lane("10.0.0.1", 120, Some("Bearer x")).is_none(),
            "no failures yet"
        );
        g.refused("10.0.0.1", "/api/x", false, Some("Bearer bad"));
        let lane = g.lane("10.0.0.1", 120, Some("Bearer x")).expect("a lane");
        assert_eq!(lane.available_permits(), 1);
        let same = g.lane("10.0.0.1", 120, None).expect("the same lane");
        assert!(Arc::ptr_eq(&lane, &same), "one lane per address");
        assert!(
            g.lane("10.0.0.2", 120, Some("Bearer x")).is_none(),
            "other addresses pass"
        );
        g.authenticated("Bearer good");
        assert!(
            g.lane("10.0.0.1", 120, Some("Bearer good")).is_none(),
            "known credentials pass beside the lane"
        );
        assert!(
            g.lane("10.0.0.1", 0, Some("Bearer x")).is_none(),
            "no lane when the throttle is off"
        );
    }
}
