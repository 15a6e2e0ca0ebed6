//! Console logins: cookie sessions with their CSRF token, and the login
//! rate limit.
//!
//! The cookie (`lamina_console`, HttpOnly, Secure, SameSite=Strict) holds a
//! random 32-byte secret; the broker keeps only its BLAKE3 hash. A login
//! lasts [`LOGIN_TTL`] at most and ends after [`LOGIN_IDLE`] unused. Every
//! state-changing form carries the session's CSRF token, compared in
//! constant time. Logins live in the broker's memory: a restarted broker
//! asks users to log in again (their desktops' sessions stay).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The cookie's name.
pub const COOKIE: &str = "lamina_console";
/// Longest a login lasts.
pub const LOGIN_TTL: Duration = Duration::from_secs(8 * 3600);
/// A login unused this long ends.
pub const LOGIN_IDLE: Duration = Duration::from_secs(3600);
/// Failed logins allowed per user name, and per client address, in
/// [`FAIL_WINDOW`].
pub const MAX_FAILURES: u32 = 5;
/// The window of [`MAX_FAILURES`].
pub const FAIL_WINDOW: Duration = Duration::from_secs(300);
/// Most logins (and rate-limit entries) kept; the oldest go first.
const MAX_ENTRIES: usize = 100_000;

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Login {
    /// User name.
    pub user: String,
    /// Token of the session's forms.
    pub csrf: String,
    created: Instant,
    used: Instant,
}

/// Logins and failed attempts.
#[derive(Default)]
pub struct Logins {
    sessions: Mutex<HashMap<String, Login>>,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

fn key(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// Constant-time comparison of two tokens.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Logins {
    /// Logs `user` in: the cookie's secret.
    pub fn create(&self, user: &str) -> String {
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let mut map = locked(&self.sessions);
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, l| live(l, now));
            if map.len() >= MAX_ENTRIES {
                if let Some(k) = map
                    .iter()
                    .min_by_key(|(_, l)| l.used)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            key(&secret),
            Login {
                user: user.to_owned(),
                csrf: hex::encode(rand::random::<[u8; 16]>()),
                created: now,
                used: now,
            },
        );
        secret
    }

    /// The login of a cookie's secret, if it is live (and marks it used).
    pub fn get(&self, secret: &str) -> Option<Login> {
        let now = Instant::now();
        let mut map = locked(&self.sessions);
        let k = key(secret);
        let l = map.get_mut(&k)?;
        if !live(l, now) {
            map.remove(&k);
            return None;
        }
        l.used = now;
        Some(l.clone())
    }

    /// Logs a cookie's browser out.
    pub fn end(&self, secret: &str) {
        locked(&self.sessions).remove(&key(secret));
    }

    /// Logs `user` out everywhere (removed, or their password changed).
    pub fn end_user(&self, user: &str) {
        locked(&self.sessions).retain(|_, l| l.user != user);
    }

    /// Whether a login as `user` from `ip` may be tried now; if not, how
    /// long until it may.
    pub fn check(&self, user: &str, ip: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        let map = locked(&self.failures);
        let mut wait = Duration::ZERO;
        for k in fail_keys(user, ip) {
            if let Some((n, since)) = map.get(&k) {
                let age = now.duration_since(*since);
                if *n >= MAX_FAILURES && age < FAIL_WINDOW {
                    wait = wait.max(FAIL_WINDOW - age);
                }
            }
        }
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// Counts a failed login.
    pub fn failed(&self, user: &str, ip: Option<IpAddr>) {
        let now = Instant::now();
        let mut map = locked(&self.failures);
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (_, since)| now.duration_since(*since) < FAIL_WINDOW);
        }
        for k in fail_keys(user, ip) {
            let e = map.entry(k).or_insert((0, now));
            if now.duration_since(e.1) >= FAIL_WINDOW {
                *e = (0, now);
            }
            e.0 += 1;
        }
    }

    /// Forgets a user's failures after a good login (the address's stay).
    pub fn succeeded(&self, user: &str) {
        locked(&self.failures).remove(&format!("user:{user}"));
    }
}

fn live(l: &Login, now: Instant) -> bool {
    now.duration_since(l.created) < LOGIN_TTL && now.duration_since(l.used) < LOGIN_IDLE
}

fn fail_keys(user: &str, ip: Option<IpAddr>) -> Vec<String> {
    let mut keys = vec![format!("user:{user}")];
    if let Some(ip) = ip {
        keys.push(format!("ip:{ip}"));
    }
    keys
}

/// The `Set-Cookie` value of a login (`None`: logging out).
pub fn set_cookie(secret: Option<&str>) -> String {
    match secret {
        Some(s) => format!(
            "{COOKIE}={s}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
            LOGIN_TTL.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
    }
}

/// The console cookie's value in a `Cookie` header.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_lives_until_ended() {
        let l = Logins::default();
        let s = l.create("alice");
        let got = l.get(&s).unwrap();
        assert_eq!(got.user, "alice");
        assert_eq!(got.csrf.len(), 32);
        assert!(l.get("not-a-secret").is_none());
        l.end(&s);
        assert!(l.get(&s).is_none());
        let s2 = l.create("alice");
        l.end_user("alice");
        assert!(l.get(&s2).is_none());
    }

    #[test]
    fn idle_logins_end() {
        let l = Logins::default();
        let s = l.create("alice");
        locked(&l.sessions).values_mut().for_each(|x| {
            x.used = Instant::now().checked_sub(LOGIN_IDLE).unwrap();
        });
        assert!(l.get(&s).is_none());
    }

    #[test]
    fn failures_are_limited_per_user_and_address() {
        let l = Logins::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(l.check("alice", Some(ip)).is_ok());
            l.failed("alice", Some(ip));
        }
        assert!(l.check("alice", Some(ip)).is_err());
        // Another address is still refused for alice…
        assert!(l.check("alice", Some("10.0.0.1".parse().unwrap())).is_err());
        // …and another name from the same address too.
        assert!(l.check("bob", Some(ip)).is_err());
        assert!(l.check("bob", Some("10.0.0.1".parse().unwrap())).is_ok());
    }

    #[test]
    fn cookies() {
        assert_eq!(cookie_value("a=1; lamina_console=xyz; b=2"), Some("xyz"));
        assert_eq!(cookie_value("lamina_console="), None);
        assert_eq!(cookie_value("other=1"), None);
        let c = set_cookie(Some("s"));
        for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(part), "{c}");
        }
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
