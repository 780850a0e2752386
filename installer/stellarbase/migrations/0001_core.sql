-- What StellarBase keeps in PostgreSQL: site settings, documents' metadata (the bytes live
-- in S3) and the job queue. Runs in one transaction; PostgreSQL 14 or newer.

CREATE TABLE config (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE documents (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket       text NOT NULL,
    object_key   text NOT NULL,
    title        text,
    content_type text,
    size_bytes   bigint CHECK (size_bytes >= 0),
    sha256       text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    metadata     jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (bucket, object_key)
);

CREATE TABLE jobs (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL,
    state      text NOT NULL DEFAULT 'queued'
               CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    payload    jsonb NOT NULL DEFAULT '{}',
    attempts   integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    run_at     timestamptz NOT NULL DEFAULT now(),
    locked_by  text,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Workers dequeue with WHERE state = 'queued' AND run_at <= now() ORDER BY run_at.
CREATE INDEX jobs_dequeue_idx ON jobs (state, run_at);
