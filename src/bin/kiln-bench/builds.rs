//! The builds the bench sends and how it sends them:
//! `snix.build.v1.DoBuild` and `kiln.v1.BuildEvents.Submit`, each on a new
//! connection, a failed build recorded and retried.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use kiln::castore::Node;
use kiln::client::{submit_and_follow, EventSink, FollowError};
use kiln::grpc::BUILD_ID_HEADER;
use kiln::proto::kiln_v1::{submit_request, Phase, Started, SubmitRequest};
use kiln::proto::snix_build::build_request::{BuildConstraints, EnvVar};
use kiln::proto::snix_build::build_service_client::BuildServiceClient;
use kiln::proto::{snix_build, snix_castore};
use tonic::transport::Channel;

use crate::server::{BenchServer, BUSYBOX};

/// How often a failed build is retried before the bench gives up.
pub const RETRIES: usize = 2;

/// When each phase of a submitted build was seen, and its VM.
struct Timing {
    started: Instant,
    phases: Vec<(String, Duration)>,
    memory_mib: Option<u64>,
    warm: Option<bool>,
}

impl EventSink for Timing {
    fn phase(&mut self, _build_id: &str, p: &Phase) {
        self.phases.push((p.name.clone(), self.started.elapsed()));
    }

    fn started(&mut self, _build_id: &str, s: &Started) {
        self.memory_mib = Some(s.guest_memory_bytes >> 20);
        self.warm = Some(s.warm);
    }
}

/// How one build went, seen from the client.
pub struct Finished {
    /// The server's build id.
    pub id: String,
    /// Request sent to answer received.
    pub wall: Duration,
    /// Request sent to each `kiln.v1` phase (only for [`BenchServer::submit`]).
    pub phases: Vec<(String, Duration)>,
    /// Guest RAM the build got, MiB (only for [`BenchServer::submit`]).
    pub memory_mib: Option<u64>,
    /// Whether it got a pool VM (only for [`BenchServer::submit`]).
    pub warm: Option<bool>,
}

impl Finished {
    /// When phase `name` was seen.
    pub fn phase(&self, name: &str) -> Option<Duration> {
        self.phases.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
    }

    /// When the builder started (the `build` phase).
    pub fn first_instruction(&self) -> anyhow::Result<Duration> {
        self.phase("build")
            .ok_or_else(|| anyhow!("build {} reported no `build` phase", self.id))
    }
}

impl BenchServer {
    /// A new client connection.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(kiln::cli::connect(&self.addr).await?)
    }

    /// A trivial build (`true` from busybox) with `extra` inputs (named
    /// store basenames sorting after busybox's), no outputs.
    pub fn trivial_request(&self, extra: &[(String, Node)]) -> snix_build::BuildRequest {
        self.request(vec![format!("/nix/store/{BUSYBOX}/bin/true")], extra)
    }

    /// A build running `script` with busybox's `sh -c`, no outputs.
    pub fn shell_request(&self, script: &str) -> snix_build::BuildRequest {
        let sh = format!("/nix/store/{BUSYBOX}/bin/sh");
        self.request(vec![sh, "-c".into(), script.into()], &[])
    }

    fn request(&self, argv: Vec<String>, extra: &[(String, Node)]) -> snix_build::BuildRequest {
        let bin = format!("/nix/store/{BUSYBOX}/bin");
        let mut inputs: Vec<snix_castore::Entry> =
            vec![self.busybox.to_snix_entry(BUSYBOX.as_bytes())];
        inputs.extend(
            extra
                .iter()
                .map(|(n, node)| node.to_snix_entry(n.as_bytes())),
        );
        let env = [
            ("HOME", "/homeless-shelter"),
            ("PATH", bin.as_str()),
            ("TMPDIR", "/build"),
        ];
        snix_build::BuildRequest {
            inputs,
            command_args: argv,
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            outputs: vec![],
            environment_vars: env
                .iter()
                .map(|(k, v)| EnvVar {
                    key: (*k).into(),
                    value: v.as_bytes().to_vec().into(),
                })
                .collect(),
            constraints: Some(BuildConstraints {
                system: "x86_64-linux".into(),
                ..Default::default()
            }),
            additional_files: vec![],
            refscan_needles: vec![],
        }
    }

    /// Runs `req` with `DoBuild` on a new connection (connecting is not
    /// timed). A failed build is recorded (see [`BenchServer::failures`])
    /// and retried, up to [`RETRIES`] times.
    pub async fn do_build(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        self.retrying("DoBuild", || self.do_build_once(req.clone()))
            .await
    }

    /// Runs `req` with `Submit`, timing each phase event as it arrives;
    /// retried like [`BenchServer::do_build`].
    pub async fn submit(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        self.retrying("Submit", || self.submit_once(req.clone()))
            .await
    }

    /// One trivial build to warm up (base image cached, TSC measured,
    /// files in the page cache); returns the guest RAM it got, MiB (what a
    /// bare boot is given to compare).
    pub async fn warm_up(&self) -> anyhow::Result<u64> {
        let done = self.submit(self.trivial_request(&[])).await?;
        done.memory_mib
            .ok_or_else(|| anyhow!("build {} reported no `started` event", done.id))
    }

    /// Builds that failed and were retried, with why (on every server of
    /// the run).
    pub fn failed_builds(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn retrying<F, Fut>(&self, what: &str, mut once: F) -> anyhow::Result<Finished>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Finished>>,
    {
        let mut attempt = 0;
        loop {
            match once().await {
                Ok(done) => return Ok(done),
                Err(e) if attempt < RETRIES => {
                    attempt += 1;
                    let why = format!("{what}: {e:#}");
                    eprintln!("kiln-bench: a build failed, retrying: {why}");
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(why);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn do_build_once(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        let channel = self.channel().await?;
        let started = Instant::now();
        let resp = BuildServiceClient::new(channel)
            .do_build(req)
            .await
            .map_err(|s| {
                let id = s
                    .metadata()
                    .get(BUILD_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned();
                anyhow!("build {id} failed ({:?}): {}", s.code(), s.message())
            })?;
        let wall = started.elapsed();
        let id = resp
            .metadata()
            .get(BUILD_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(Finished {
            id,
            wall,
            phases: vec![],
            memory_mib: None,
            warm: None,
        })
    }

    async fn submit_once(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        let channel = self.channel().await?;
        let request = SubmitRequest {
            request: Some(submit_request::Request::Snix(req)),
            argv0: String::new(),
            limits: None,
        };
        let mut timing = Timing {
            started: Instant::now(),
            phases: Vec::new(),
            memory_mib: None,
            warm: None,
        };
        match submit_and_follow(channel, request, &mut timing).await {
            Ok(done) => Ok(Finished {
                id: done.build_id,
                wall: timing.started.elapsed(),
                phases: timing.phases,
                memory_mib: timing.memory_mib,
                warm: timing.warm,
            }),
            Err(FollowError::Failed { build_id, failed }) => bail!(
                "build {build_id} failed ({}, {}): {}; log tail: {}",
                failed.kind,
                match timing.warm {
                    Some(true) => "on a warm pool VM",
                    Some(false) => "on a VM booted for it",
                    None => "before a VM was started",
                },
                failed.message,
                String::from_utf8_lossy(&failed.log_tail)
            ),
            Err(e) => Err(e.into()),
        }
    }
}
