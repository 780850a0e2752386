-- Who changed what on which host, and whether it worked: one row per administrative action.
-- details never holds secrets (stellarbase.audit drops such keys before writing).

CREATE TABLE audit_log (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    actor          text NOT NULL,
    host           text NOT NULL,
    action         text NOT NULL,
    outcome        text NOT NULL CHECK (outcome IN ('success', 'failure')),
    details        jsonb NOT NULL DEFAULT '{}',
    correlation_id text NOT NULL
);

CREATE INDEX audit_log_at_idx ON audit_log (at);
