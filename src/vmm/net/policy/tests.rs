#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::io::Write;
use std::process::{Command, Stdio};

use super::*;

fn policy() -> EgressPolicy {
    EgressPolicy {
        allow: vec![
            "10.251.1.1/32".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ],
        dns: vec!["10.251.1.1".parse().unwrap(), "127.0.0.53".parse().unwrap()],
        flood: FloodLimits::default(),
    }
}

#[test]
fn the_rules_decide_in_order() {
    let p = policy();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Public addresses: yes.
    assert!(permits(&p, ip("93.184.216.34"), 80));
    assert!(permits(&p, ip("2606:4700::1111"), 443));
    // Denied ranges: no.
    for denied in [
        "10.0.0.1",
        "172.16.5.5",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "127.0.0.1",
        "224.0.0.251",
        "255.255.255.255",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
    ] {
        assert!(!permits(&p, ip(denied), 80), "{denied} permitted");
    }
    // The operator's allow list wins over the denied ranges.
    assert!(permits(&p, ip("10.251.1.1"), 8080));
    assert!(!permits(&p, ip("10.251.1.2"), 8080));
    assert!(permits(&p, ip("fd00::5"), 80));
    // The resolvers, on port 53 only.
    assert!(permits(&p, ip("127.0.0.53"), 53));
    assert!(!permits(&p, ip("127.0.0.53"), 80));
}

#[test]
fn the_ruleset_names_every_range_and_only_the_helpers() {
    let rules = policy().ruleset("kiln_test");
    for range in DENIED_V4.iter().chain(DENIED_V6) {
        assert!(rules.contains(range), "{range} missing:\n{rules}");
    }
    assert!(rules.contains("10.251.1.1/32"), "{rules}");
    let uids = format!(
        "meta skuid {}-{}",
        NAT_UID_BASE,
        NAT_UID_BASE + NAT_UIDS - 1
    );
    assert!(rules.contains(&uids), "{rules}");
    assert!(rules.contains("fib daddr type { local, broadcast, multicast, anycast }"));
    // Only the helpers' sockets are policed; the default stays accept.
    assert_eq!(rules.matches("hook output").count(), 1, "{rules}");
    assert!(rules.contains("policy accept"), "{rules}");
}

/// `nft --check` on `rules`: None when nft is not installed.
fn nft_check(rules: &str) -> Option<std::process::Output> {
    let mut child = Command::new("nft")
        .args(["--check", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    Some(child.wait_with_output().unwrap())
}

/// The real `nft` accepts the table (check mode: nothing is changed).
#[test]
fn nft_accepts_the_ruleset() {
    let empty = EgressPolicy {
        allow: vec![],
        dns: vec![],
        flood: FloodLimits::default(),
    };
    for p in [policy(), empty] {
        let Some(out) = nft_check(&p.ruleset("kiln_test")) else {
            test_skip!("nft (nftables) is not installed; `make deps` installs it");
            return;
        };
        assert!(
            out.status.success(),
            "nft refused:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            p.ruleset("kiln_test")
        );
    }
}
