//! Network access for builds that ask for it (`constraints.network_access`),
//! inside a private network: each test builds its own [`NetLab`] (two
//! network namespaces joined by a veth pair, see `harness/netns.rs`) and
//! starts `kiln serve` in the lab's host namespace, allowed to reach the
//! lab's one "public" server ([`ALLOWED`], also its DNS server) and nothing
//! else. Every address a test contacts lives in the lab or on loopback,
//! and each test's `teardown` fails if a packet tried to leave the lab.
//!
//! Everything is bounded: each wget and nslookup in a builder runs under
//! busybox `timeout` (this busybox's `wget -T` crashes it, so `timeout` does
//! the job of `-T`), each build under the harness's `BUILD_LIMIT`.
//!
//! `lab_reaches_its_servers_and_cleans_up` proves the lab itself without a
//! VM; the other tests boot VMs and need kiln's network support (passt,
//! nftables); the fixed-output one also needs Nix (`fetch.nix`).

#![allow(clippy::unwrap_used)]

mod harness;
#[path = "fixtures/nix/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harness::netns::kiln_serve::BUILD_LIMIT;
use harness::netns::{
    self, url, NetLab, ALLOWED, DENIED, FILES_NAME, HOST_VETH, LINK_LOCAL, LOOPBACK, PORT,
    UNKNOWN_NAME,
};
use harness::nix_request;
use kiln::proto::snix_build::BuildRequest;
use tonic::Code;

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";
const OUT2: &str = "nix/store/2bcdfghijklmnpqrsvwxyz0123456789-fetched";

/// Whether the VM tests of this file can run here (see `netns::unavailable`).
fn can_run() -> bool {
    harness::can_run(netns::unavailable())
}

/// `req` asking for network access.
fn with_network(mut req: BuildRequest) -> BuildRequest {
    req.constraints.as_mut().unwrap().network_access = true;
    req
}

/// A builder script running `body`, whose stdout and stderr end up in
/// `$out` and in the build log (so a failure shows them too).
fn transcript(body: &str) -> String {
    format!(
        "{{\n{body}\n}} > /build/transcript 2>&1; cat /build/transcript; \
         cat /build/transcript > $out"
    )
}

/// Script lines fetching each `(name, url, seconds)` and printing
/// `NAME: reached` or `NAME: failed EXIT`.
fn fetches(targets: &[(&str, String, u32)]) -> String {
    targets
        .iter()
        .map(|(name, url, secs)| {
            format!(
                "if timeout {secs} wget -q -O /build/got {url}; then echo '{name}: reached'; \
                 else echo \"{name}: failed $?\"; fi"
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `NAME: …` lines of a transcript: name -> the rest.
fn outcomes(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(name, rest)| (name.to_owned(), rest.to_owned()))
        .collect()
}

/// Prints the names of the network interfaces the builder sees.
const INTERFACES: &str =
    "while read l; do case \"$l\" in *:*) echo \"if ${l%%:*}\";; esac; done < /proc/net/dev";

fn interfaces(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("if ")).collect()
}

/// Asserts the fetched bytes are the file the server on `addr` serves.
fn assert_served(lab: &NetLab, addr: &str, got: &[u8]) {
    let want = lab.file(addr);
    assert!(
        got == want,
        "fetched {} bytes, not the {} served by {addr}; they start: {:?}",
        got.len(),
        want.len(),
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_reaches_its_servers_and_cleans_up() {
    if !harness::can_run(netns::lab_unavailable()) {
        return;
    }
    let lab = NetLab::new();
    // From kiln's namespace every server answers: the policy is kiln's to
    // add, the lab itself blocks nothing.
    for addr in [ALLOWED, DENIED, LINK_LOCAL, LOOPBACK, HOST_VETH] {
        let got = lab
            .fetch_from_host(&url(addr))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_served(&lab, addr, &got);
        assert_eq!(lab.hits(addr), 1, "{addr}");
    }
    // No way out of the lab: the host namespace's default route leads to
    // the inet namespace, which has none.
    let routes = |ns: &str| {
        String::from_utf8(lab.busybox(ns, 10, &["ip", "-4", "route", "show"]).stdout).unwrap()
    };
    let default = format!("default via {}", netns::INET_VETH);
    assert!(
        routes(&lab.host).contains(&default),
        "{}",
        routes(&lab.host)
    );
    assert!(
        !routes(&lab.inet).contains("default"),
        "{}",
        routes(&lab.inet)
    );
    // The DNS server knows one name and no other, and forwards nothing.
    let nslookup = |name: &str| lab.busybox(&lab.host, 10, &["nslookup", name, ALLOWED]);
    let known = nslookup(FILES_NAME);
    let text = String::from_utf8_lossy(&known.stdout);
    assert!(known.status.success(), "{text}");
    let answer = format!("Name:\t{FILES_NAME}\nAddress: {ALLOWED}\n");
    assert!(text.contains(&answer), "{text}");
    let unknown = nslookup(UNKNOWN_NAME);
    let text = String::from_utf8_lossy(&unknown.stdout);
    assert!(
        !unknown.status.success() && text.contains("NXDOMAIN"),
        "{text}"
    );
    let dns = lab.dns_log();
    let query = format!("query[A] {FILES_NAME} from {HOST_VETH}");
    assert!(dns.contains(&query) && !dns.contains("forwarded"), "{dns}");
    // Nothing so far tried to leave the lab; a packet for an address the
    // lab lacks (one of its own range here, never one outside) shows.
    assert_eq!(lab.escaped_packets(), vec![]);
    let out = lab.busybox(&lab.host, 1, &["wget", "http://10.251.2.9/"]);
    assert!(!out.status.success());
    let escaped = lab.escaped_packets();
    assert!(
        escaped
            .iter()
            .any(|(counter, n)| counter.ends_with("-inet InAddrErrors") && *n > 0),
        "{escaped:?}"
    );
    // (Its teardown would rightly fail on that packet: a fresh lab.)
    drop(lab);
    let lab = NetLab::new();
    // kiln serve starts in the host namespace and answers on its socket
    // (without the network flags: this check must not need them).
    let kiln = lab.start_kiln_plain(&[]);
    assert!(kiln.healthy().await, "{}", kiln.log());
    drop(kiln);
    let (host, inet) = (lab.host.clone(), lab.inet.clone());
    lab.teardown();
    let out = std::process::Command::new(netns::find_binary("ip").unwrap())
        .args(["netns", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(
        !listed.contains(&host) && !listed.contains(&inet),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fetches_over_http_with_network_access() {
    if !can_run() {
        return;
    }
    let lab = NetLab::new();
    let kiln = lab.start_kiln(&[]);
    let busybox = kiln.busybox().await;
    let script = transcript(&format!(
        "timeout 30 wget -O $out1 {}\necho \"wget exit $?\"\ncat /etc/resolv.conf\n\
         ip -4 addr show dev eth0\nip -4 route show\n{INTERFACES}",
        url(ALLOWED)
    ));
    let req = with_network(nix_request(busybox, &script, &[OUT, OUT2]));
    let files = kiln.build_files(req).await;
    let text = String::from_utf8(files[0].clone()).unwrap();
    assert!(text.contains("wget exit 0\n"), "{text}");
    assert_served(&lab, ALLOWED, &files[1]);
    assert_eq!(lab.hits(ALLOWED), 1);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().eq(["nameserver", "10.0.2.3"])),
        "resolv.conf names passt's resolver:\n{text}"
    );
    assert!(text.contains("inet 10.0.2.15/24"), "{text}");
    assert!(text.contains("default via 10.0.2.2"), "{text}");
    assert_eq!(interfaces(&text), ["lo", "eth0"], "{text}");
    kiln.assert_nothing_left().await;
    drop(kiln);
    lab.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn resolves_names_through_the_dns_it_is_given() {
    if !can_run() {
        return;
    }
    let lab = NetLab::new();
    let kiln = lab.start_kiln(&[]);
    let busybox = kiln.busybox().await;
    // nslookup's own limit is 10 s a try: an answer takes far less, a
    // query nobody answers at least that.
    let script = transcript(&format!(
        "timeout 30 wget -O $out1 http://{FILES_NAME}:{PORT}/file\necho \"wget exit $?\"\n\
         read t0 rest < /proc/uptime\n\
         timeout 30 nslookup -timeout=10 -retry=1 {UNKNOWN_NAME}\necho \"nslookup exit $?\"\n\
         read t1 rest < /proc/uptime\necho \"elapsed $t0 $t1\""
    ));
    let req = with_network(nix_request(busybox, &script, &[OUT, OUT2]));
    let files = kiln.build_files(req).await;
    let text = String::from_utf8(files[0].clone()).unwrap();
    assert!(text.contains("wget exit 0\n"), "{text}");
    assert_served(&lab, ALLOWED, &files[1]);
    // The names went to the DNS server kiln was given (passt forwards from
    // kiln's namespace, whose address on the way out is the veth's).
    let dns = lab.dns_log();
    assert!(
        dns.contains(&format!("query[A] {FILES_NAME} from {HOST_VETH}")),
        "{dns}"
    );
    assert!(
        dns.contains(&format!("query[A] {UNKNOWN_NAME} from {HOST_VETH}")),
        "{dns}"
    );
    // The unknown name fails as an answer, promptly, not as a hang.
    assert!(text.contains("NXDOMAIN"), "{text}");
    let exit = text
        .lines()
        .find_map(|l| l.strip_prefix("nslookup exit "))
        .unwrap();
    assert_ne!(exit, "0", "{text}");
    assert_ne!(exit, "143", "nslookup had to be killed:\n{text}");
    let times: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("elapsed "))
        .unwrap()
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect();
    assert!(
        times[1] - times[0] < 5.0,
        "the NXDOMAIN took {:.1} s (nslookup waits 10 s for an answer):\n{text}",
        times[1] - times[0]
    );
    kiln.assert_nothing_left().await;
    drop(kiln);
    lab.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_device_without_asking() {
    if !can_run() {
        return;
    }
    let lab = NetLab::new();
    let kiln = lab.start_kiln(&[]);
    let busybox = kiln.busybox().await;
    let script = transcript(&format!(
        "{}\n{INTERFACES}",
        fetches(&[("allowed", url(ALLOWED), 30)])
    ));
    let files = kiln
        .build_files(nix_request(busybox, &script, &[OUT]))
        .await;
    let text = String::from_utf8(files[0].clone()).unwrap();
    assert!(
        outcomes(&text)["allowed"].starts_with("failed"),
        "a build that did not ask reached the network:\n{text}"
    );
    assert_eq!(interfaces(&text), ["lo"], "{text}");
    assert_eq!(lab.hits(ALLOWED), 0);
    kiln.assert_nothing_left().await;
    drop(kiln);
    lab.teardown();
}

/// What a build tries to reach, and how long it gives each: the allowed
/// server; the kiln namespace's loopback, which a guest could only reach
/// through the gateway address 10.0.2.2 were passt to map it there (its
/// default; kiln passes `--no-map-gw`, which makes 10.0.2.2 an ordinary
/// private address; the guest's own 127.0.0.1 is the guest's); the kiln
/// namespace's own veth address; a private address; the metadata address.
/// (Measured with kiln's table deleted: all but the loopback are reached,
/// so the lab routes them and their failing is the policy's.)
fn policy_targets() -> Vec<(&'static str, String, u32)> {
    vec![
        ("allowed", url(ALLOWED), 30),
        ("host-loopback", format!("http://10.0.2.2:{PORT}/file"), 5),
        ("host-veth", url(HOST_VETH), 5),
        ("private", url(DENIED), 5),
        ("link-local", url(LINK_LOCAL), 5),
    ]
}

/// Runs [`policy_targets`] in one network build and returns each name's
/// outcome.
async fn probe_policy(kiln: &netns::kiln_serve::Kiln<'_>) -> BTreeMap<String, String> {
    let script = transcript(&fetches(&policy_targets()));
    let req = with_network(nix_request(kiln.busybox().await, &script, &[OUT]));
    let files = kiln.build_files(req).await;
    outcomes(&String::from_utf8(files[0].clone()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_destinations_are_unreachable() {
    if !can_run() {
        return;
    }
    let lab = NetLab::new();
    let kiln = lab.start_kiln(&[]);
    let seen = probe_policy(&kiln).await;
    eprintln!("with the default policy: {seen:?}");
    // The network works (so the failures below are the policy's).
    assert_eq!(seen["allowed"], "reached", "{seen:#?}");
    for name in ["host-loopback", "host-veth", "private", "link-local"] {
        assert!(
            seen[name].starts_with("failed"),
            "{name} reached: {seen:#?}"
        );
    }
    // Nothing even arrived there.
    for addr in [LOOPBACK, HOST_VETH, DENIED, LINK_LOCAL] {
        assert_eq!(lab.hits(addr), 0, "{addr} was reached: {seen:#?}");
    }
    assert_eq!(lab.hits(ALLOWED), 1);
    kiln.assert_nothing_left().await;
    kiln.stop();

    // The operator allows the private server: it alone opens.
    let kiln = lab.start_kiln(&["--network-allow", "10.251.1.2/32"]);
    let seen = probe_policy(&kiln).await;
    assert_eq!(seen["allowed"], "reached", "{seen:#?}");
    assert_eq!(seen["private"], "reached", "{seen:#?}");
    for name in ["host-loopback", "host-veth", "link-local"] {
        assert!(
            seen[name].starts_with("failed"),
            "{name} reached: {seen:#?}"
        );
    }
    assert_eq!(lab.hits(DENIED), 1);
    for addr in [LOOPBACK, HOST_VETH, LINK_LOCAL] {
        assert_eq!(lab.hits(addr), 0, "{addr} was reached: {seen:#?}");
    }
    kiln.assert_nothing_left().await;
    drop(kiln);
    lab.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_network_flag_refuses() {
    if !can_run() {
        return;
    }
    let lab = NetLab::new();
    let kiln = lab.start_kiln_plain(&["--no-network"]);
    let busybox = kiln.busybox().await;
    let fetch = format!("timeout 30 wget -O $out {}", url(ALLOWED));
    let req = with_network(nix_request(busybox.clone(), &fetch, &[OUT]));
    let status = kiln.build(req).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        kiln.describe(&status)
    );
    assert!(status.message().contains("network"), "{}", status.message());
    let failed = kiln::grpc::status::failed_detail(&status).unwrap();
    assert_eq!(failed.precondition, "network", "{failed:?}");
    assert_eq!(lab.hits(ALLOWED), 0);
    // Builds that do not ask still run.
    let files = kiln
        .build_files(nix_request(busybox, "echo offline > $out", &[OUT]))
        .await;
    assert_eq!(files[0], b"offline\n");
    assert!(lab.passt_processes().is_empty());
    kiln.assert_nothing_left().await;
    drop(kiln);
    lab.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn nat_helper_killed_mid_build() {
    if !can_run() {
        return;
    }
    let lab = NetLab::new();
    let kiln = lab.start_kiln(&["--timeout-secs", "1800"]);
    let busybox = kiln.busybox().await;
    let script = format!(
        "if timeout 30 wget -q -O /build/got {}; then echo net-up; sleep 600; \
         else echo 'the first fetch failed'; exit 1; fi; echo late > $out",
        url(ALLOWED)
    );
    let req = with_network(nix_request(busybox.clone(), &script, &[OUT]));
    let follow = harness::submit_until_log(kiln.channel().await, req, b"net-up").await;
    let passts = lab.passt_processes();
    assert!(
        !passts.is_empty(),
        "no passt in kiln's namespace while a network build runs:\n{}",
        kiln.log()
    );
    for pid in &passts {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let killed = Instant::now();
    // The builder would sleep 600 s and the build's limit is 1800 s: an
    // end within 120 s is kiln noticing its helper died.
    let mut log = harness::LogBytes::default();
    let end = tokio::time::timeout(
        Duration::from_secs(120),
        harness::events::to_end(follow, &mut log),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the build still ran 120 s after its passt ({passts:?}) was killed:\n{}",
            kiln.log()
        )
    });
    let err = end.expect_err("the build completed although its NAT helper was killed");
    let failed = err.failed().cloned().unwrap_or_default();
    let said = format!("{err} {}", failed.message).to_lowercase();
    assert!(
        said.contains("passt") || said.contains("nat helper"),
        "the failure does not name the NAT helper: {err}\n{failed:?}\nserver log:\n{}",
        kiln.log()
    );
    assert_ne!(failed.kind, "timeout", "{failed:?}");
    eprintln!("{:?} after passt was killed: {err}", killed.elapsed());
    kiln.assert_nothing_left().await;

    // The next network build still works.
    let fetch = format!("timeout 30 wget -O $out {}", url(ALLOWED));
    let files = kiln
        .build_files(with_network(nix_request(busybox, &fetch, &[OUT])))
        .await;
    assert_served(&lab, ALLOWED, &files[0]);
    kiln.assert_nothing_left().await;
    drop(kiln);
    lab.teardown();
}

/// `fetch.nix` fetching the allowed server's file, built by `kiln build
/// --drv` (which asks for network for fixed outputs): the served file's
/// hash is accepted, `--out` holds the file; a wrong one is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_output_derivation_fetches_over_http_and_is_checked() {
    if !can_run() || !support::nix_available() {
        return;
    }
    let lab = NetLab::new();
    let kiln = lab.start_kiln(&[]);
    let served = support::sha256(&lab.file(ALLOWED));
    let drv = support::instantiate_fetch(&url(ALLOWED), &hex::encode(served));
    let dir = tempfile::tempdir().unwrap();
    let (printed, log) = support::kiln_build_drv(&kiln.addr(), &drv, Some(dir.path()), BUILD_LIMIT)
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", kiln.log()));
    let path = support::output_path(&drv);
    let local = dir.path().join(path.basename());
    assert_served(&lab, ALLOWED, &std::fs::read(&local).unwrap());
    let nar_hash = kiln::nix::nar::nar_hash_path(&local).unwrap().to_string();
    assert_eq!(printed, BTreeMap::from([(path, nar_hash)]), "{log}");
    assert_eq!(lab.hits(ALLOWED), 1);

    let wrong = support::sha256(b"not the served file\n");
    let wrong_drv = support::instantiate_fetch(&url(ALLOWED), &hex::encode(wrong));
    let refused = support::kiln_build_drv(&kiln.addr(), &wrong_drv, None, BUILD_LIMIT);
    let log = refused.expect_err("kiln accepted a fetch that is not its declared hash");
    support::assert_names_mismatch(&log, &wrong_drv, &wrong, &served);
    assert_eq!(lab.hits(ALLOWED), 2, "{log}");
    kiln.assert_nothing_left().await;
    drop(kiln);
    lab.teardown();
    support::try_delete(&[drv, wrong_drv]);
}
