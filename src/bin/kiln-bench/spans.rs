//! A tracing layer that times the executor's step spans.
//!
//! The executor runs each build in a `build` span (field `id`) and each step
//! in a child span (`admit`, `materialise`, `virtiofsd`, `initramfs`,
//! `vmm_start`, `supervise`, `teardown`, `ingest`, `cleanup`); it also logs
//! the agent's report (`boot_ms`, `setup_ms`, `build_ms`). This layer keeps,
//! per build id, how long each span lived (creation to close) and those
//! report figures, so the bench can say where a build's time went.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Milliseconds per step name, for one build.
pub type Steps = HashMap<String, f64>;

/// Collected step times, shared between the layer and the bench.
#[derive(Clone, Default)]
pub struct StepTimes {
    builds: Arc<Mutex<HashMap<String, Steps>>>,
}

impl StepTimes {
    fn record(&self, build: &str, step: &str, ms: f64) {
        let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
        *builds
            .entry(build.to_owned())
            .or_default()
            .entry(step.to_owned())
            .or_default() += ms;
    }

    /// The steps of build `id`, once its `build` span has closed (waits up
    /// to a second for the build task to finish dropping its span).
    pub async fn take(&self, id: &str) -> Option<Steps> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            {
                let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
                if builds.get(id).is_some_and(|s| s.contains_key("build")) {
                    return builds.remove(id);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The layer feeding this collection.
    pub fn layer(&self) -> StepLayer {
        StepLayer {
            times: self.clone(),
        }
    }
}

/// Per-span bookkeeping kept in the span's extensions.
struct Timing {
    start: Instant,
    build: Option<String>,
}

/// See the module docs.
pub struct StepLayer {
    times: StepTimes,
}

/// Picks one field's value out of a span or event, as text.
struct FieldText<'a> {
    name: &'a str,
    value: Option<String>,
}

impl Visit for FieldText<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.name {
            self.value = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.name {
            self.value = Some(format!("{value:?}"));
        }
    }
}

/// The agent report's figures, from the executor's `agent report` event.
#[derive(Default)]
struct ReportFields {
    is_report: bool,
    figures: Vec<(&'static str, u64)>,
}

impl Visit for ReportFields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        let name = match field.name() {
            "boot_ms" => "guest_boot",
            "setup_ms" => "agent_setup",
            "build_ms" => "builder",
            _ => return,
        };
        self.figures.push((name, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_u64(field, u64::try_from(value).unwrap_or(0));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" && format!("{value:?}") == "agent report" {
            self.is_report = true;
        }
    }
}

impl<S> Layer<S> for StepLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let build = if attrs.metadata().name() == "build" {
            let mut v = FieldText {
                name: "id",
                value: None,
            };
            attrs.record(&mut v);
            v.value
        } else {
            span.parent()
                .and_then(|p| p.extensions().get::<Timing>().and_then(|t| t.build.clone()))
        };
        span.extensions_mut().insert(Timing {
            start: Instant::now(),
            build,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let ext = span.extensions();
        if let Some(Timing {
            start,
            build: Some(build),
        }) = ext.get::<Timing>()
        {
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            self.times.record(build, span.name(), ms);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = ReportFields::default();
        event.record(&mut fields);
        if !fields.is_report {
            return;
        }
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let build = span
            .scope()
            .find_map(|s| s.extensions().get::<Timing>().and_then(|t| t.build.clone()));
        if let Some(build) = build {
            for (name, ms) in fields.figures {
                self.times.record(&build, name, ms as f64);
            }
        }
    }
}
