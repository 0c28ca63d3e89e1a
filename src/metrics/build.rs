//! One build's metrics: a [`BuildObserver`] that notes when each phase of
//! the build began (from its events) and the agent's timings (from its
//! report), and at the build's last event observes the duration of every
//! phase it went through and then counts it, so that a scrape that sees a
//! build counted sees its histograms too.
//!
//! What each histogram measures, on the host's clock unless said:
//! - queue wait: `queued` until the build was given a VM slot (or a warm VM);
//! - materialise: `materialise` until `boot`;
//! - VM boot: `boot` until the builder started, less the agent's set-up;
//!   for a warm VM that is sending it the job; observed with the set-up
//!   when the agent reported (not for a build stopped before);
//! - agent set-up: the agent's own measure (start, or the job's arrival,
//!   to the builder's exec);
//! - builder run: the agent's own measure, or, for a builder stopped
//!   without a report (timeout, cancel), until it was stopped;
//! - ingest: `ingest` until the end;
//! - total: from the request to the end, clean-up included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_guest::contract::Report;

use crate::executor::events::{BuildObserver, Event, Phase};
use crate::metrics::labels::{
    self, BootLabels, BuildLabels, BuildScope, DurationLabels, TenantLabels,
};
use crate::metrics::Metrics;

/// The agent's timings of one build.
#[derive(Debug, Clone, Copy)]
struct AgentTimings {
    setup: Duration,
    build: Duration,
}

/// Follows one build; see the module's docs.
pub struct BuildTimer {
    metrics: Arc<Metrics>,
    scope: BuildScope,
    started: Instant,
    queued: Option<Instant>,
    admitted: Option<(Instant, bool)>,
    materialise: Option<Instant>,
    boot: Option<Instant>,
    builder: Option<Instant>,
    agent: Option<AgentTimings>,
    ingest: Option<Instant>,
}

impl BuildTimer {
    /// Starts following a build of `scope` that began `started`.
    pub fn new(metrics: Arc<Metrics>, scope: BuildScope, started: Instant) -> Self {
        Self {
            metrics,
            scope,
            started,
            queued: None,
            admitted: None,
            materialise: None,
            boot: None,
            builder: None,
            agent: None,
            ingest: None,
        }
    }

    /// The build ended at `at`, as `result` says.
    fn finish(&self, result: Result<(), &crate::executor::BuildError>, at: Instant) {
        let m = &self.metrics;
        let tenant = TenantLabels {
            tenant: self.scope.tenant.clone(),
        };
        let (outcome, kind) = labels::outcome(result);
        m.build_duration
            .get_or_create(&DurationLabels {
                tenant: self.scope.tenant.clone(),
                layout: self.scope.layout,
                outcome,
            })
            .observe(between(self.started, at));
        if let (Some(queued), Some((admitted, _))) = (self.queued, self.admitted) {
            m.queue_wait
                .get_or_create(&tenant)
                .observe(between(queued, admitted));
        }
        if let (Some(start), Some(end)) = (self.materialise, self.boot) {
            m.materialise
                .get_or_create(&tenant)
                .observe(between(start, end));
        }
        if let (Some(boot), Some(builder), Some(agent), Some((_, warm))) =
            (self.boot, self.builder, self.agent, self.admitted)
        {
            let booted = builder
                .saturating_duration_since(boot)
                .saturating_sub(agent.setup);
            let vm = if warm { "warm" } else { "cold" };
            m.vm_boot
                .get_or_create(&BootLabels {
                    tenant: self.scope.tenant.clone(),
                    vm,
                })
                .observe(seconds(booted));
            m.agent_setup
                .get_or_create(&tenant)
                .observe(seconds(agent.setup));
        }
        if let Some(builder) = self.builder {
            let ran = self
                .agent
                .map_or(at.saturating_duration_since(builder), |a| a.build);
            m.builder_run.get_or_create(&tenant).observe(seconds(ran));
        }
        if let Some(ingest) = self.ingest {
            m.ingest.get_or_create(&tenant).observe(between(ingest, at));
        }
        // Counted last, and the counter is encoded first: a scrape that
        // sees a build counted sees all of its histograms too.
        m.builds
            .get_or_create(&BuildLabels {
                tenant: self.scope.tenant.clone(),
                layout: self.scope.layout,
                outcome,
                kind,
            })
            .inc();
    }
}

impl BuildObserver for BuildTimer {
    fn event(&mut self, event: &Event, at: Instant) {
        match event {
            Event::Phase(Phase::Queued) => self.queued = Some(at),
            Event::Started(vm) => self.admitted = Some((at, vm.warm)),
            Event::Phase(Phase::Materialise) => self.materialise = Some(at),
            Event::Phase(Phase::Boot) => self.boot = Some(at),
            Event::Phase(Phase::Build) => self.builder = Some(at),
            Event::Phase(Phase::Ingest) => self.ingest = Some(at),
            Event::Completed(_) => self.finish(Ok(()), at),
            Event::Failed(e) => self.finish(Err(e), at),
            Event::CacheHit(_) => {
                self.metrics
                    .result_cache_hits
                    .get_or_create(&TenantLabels {
                        tenant: self.scope.tenant.clone(),
                    })
                    .inc();
            }
            Event::Log { .. } | Event::Output(_) => {}
        }
    }

    fn report(&mut self, report: &Report, _at: Instant) {
        self.agent = Some(AgentTimings {
            setup: Duration::from_millis(report.setup_ms),
            build: Duration::from_millis(report.build_ms),
        });
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Seconds from `start` to `end` (none if the clock says otherwise).
fn between(start: Instant, end: Instant) -> f64 {
    seconds(end.saturating_duration_since(start))
}
