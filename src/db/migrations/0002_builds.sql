-- Hosts and the builds they run, with each build's events, so that any host
-- answers Watch, Logs and ListBuilds for a build running on another.
CREATE TABLE hosts (
    host_id text PRIMARY KEY,
    address text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    state text NOT NULL
);
CREATE TABLE builds (
    build_id text PRIMARY KEY,
    tenant text NOT NULL,
    host_id text NOT NULL,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    state text NOT NULL,
    phase text NOT NULL DEFAULT '',
    last_seq bigint NOT NULL DEFAULT 0,
    cancel_requested boolean NOT NULL DEFAULT false,
    ended_at timestamptz
);
CREATE INDEX builds_running ON builds (host_id) WHERE state = 'running';
-- seq counts from 1 per build; event is an encoded kiln.v1.BuildEvent.
CREATE TABLE build_events (
    build_id text NOT NULL REFERENCES builds ON DELETE CASCADE,
    seq bigint NOT NULL,
    event bytea NOT NULL,
    PRIMARY KEY (build_id, seq)
);
