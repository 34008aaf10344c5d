"""Edison's own tables and statements next to Procrastinate's, in the same database.

Procrastinate keeps the queue (``procrastinate_jobs``), the workers and their heartbeats
(``procrastinate_workers``) and each job's history (``procrastinate_events``). It keeps no
progress and no results: ``edison_jobs`` holds them, one row per job, keyed by the id
clients see. ``edison_nodes`` holds what each node tells the others (its URL, kinds, devices,
loaded tiers); a node is alive while its Procrastinate worker's heartbeat is fresh, by the
database's own clock (``now()``), never by comparing two hosts' clocks.
"""

from __future__ import annotations

TASK_NAME = "edison.generate"
JOB_CHANNEL = "edison_job"  # payload: the edison job id whose row or status changed
SCHEMA_LOCK = 0x0ED150  # advisory lock: two nodes starting at once apply the schema once


def queue_name(kind: str) -> str:
    """One Procrastinate queue per generation kind."""
    return f"edison.{kind}"


EDISON_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS edison_jobs (
    id text PRIMARY KEY,
    procrastinate_id bigint UNIQUE,
    kind text NOT NULL,
    params jsonb NOT NULL,
    submitted_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    node text,
    worker_id bigint,
    device text,
    started_at timestamptz,
    finished_at timestamptz,
    progress_done integer NOT NULL DEFAULT 0,
    progress_total integer NOT NULL DEFAULT 0,
    result jsonb,
    error jsonb,
    runs jsonb NOT NULL DEFAULT '[]',
    refusals jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS edison_jobs_outputs ON edison_jobs USING gin ((result -> 'names'));

CREATE TABLE IF NOT EXISTS edison_nodes (
    name text PRIMARY KEY,
    worker_id bigint,
    public_url text NOT NULL,
    kinds text[] NOT NULL DEFAULT '{{}}',
    meta jsonb NOT NULL DEFAULT '{{}}',
    started_at timestamptz NOT NULL DEFAULT now()
);

-- Whether a worker's heartbeat is fresh. VOLATILE plpgsql: each call reads the latest
-- committed heartbeat, not the calling statement's snapshot (the sweep re-checks under
-- the row lock with it).
CREATE OR REPLACE FUNCTION edison_worker_alive(wid bigint, timeout_s double precision)
    RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN wid IS NOT NULL AND EXISTS (
        SELECT 1 FROM procrastinate_workers
         WHERE id = wid AND last_heartbeat >= now() - make_interval(secs => timeout_s));
END;
$$;

-- Any change of an Edison job's queue status (queued, running, cancelled, requeued, done)
-- or of its row wakes the nodes that watch it.
CREATE OR REPLACE FUNCTION edison_notify_job_status() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.task_name = '{TASK_NAME}' THEN
        PERFORM pg_notify('{JOB_CHANNEL}', NEW.args ->> 'id');
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE FUNCTION edison_notify_job_row() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{JOB_CHANNEL}', NEW.id);
    RETURN NEW;
END;
$$;
DROP TRIGGER IF EXISTS edison_job_status ON procrastinate_jobs;
CREATE TRIGGER edison_job_status AFTER UPDATE OF status, abort_requested ON procrastinate_jobs
    FOR EACH ROW EXECUTE PROCEDURE edison_notify_job_status();
DROP TRIGGER IF EXISTS edison_job_row ON edison_jobs;
CREATE TRIGGER edison_job_row AFTER UPDATE ON edison_jobs
    FOR EACH ROW EXECUTE PROCEDURE edison_notify_job_row();
"""

# One job as every node shows it: the engine's status and attempts, Edison's progress and
# results. ``place``: jobs of its queue ahead of it, itself included, while queued.
JOB_VIEW = """
SELECT e.*, p.status AS queue_status, p.attempts, p.abort_requested, p.queue_name,
       p.worker_id AS queue_worker_id,
       CASE WHEN p.status = 'todo' THEN (
           SELECT count(*) FROM procrastinate_jobs o
            WHERE o.queue_name = p.queue_name AND o.status = 'todo' AND o.id <= p.id)
       END AS place
  FROM edison_jobs e JOIN procrastinate_jobs p ON p.id = e.procrastinate_id
 WHERE e.id = %(id)s
"""

# A run starts: fenced on the engine having given this job to this worker.
START_RUN = """
UPDATE edison_jobs e
   SET node = %(node)s, worker_id = %(worker_id)s, started_at = now(), finished_at = NULL,
       progress_done = 0, error = NULL,
       runs = e.runs || jsonb_build_array(jsonb_build_object(
           'node', %(node)s::text, 'worker_id', %(worker_id)s::bigint, 'started_at', now()))
  FROM procrastinate_jobs p
 WHERE e.id = %(id)s AND p.id = e.procrastinate_id
   AND p.status = 'doing' AND p.worker_id = %(worker_id)s
RETURNING e.id
"""

# Progress, fenced: refused (no row) once the job is no longer this worker's.
WRITE_PROGRESS = """
UPDATE edison_jobs e
   SET progress_done = %(done)s, progress_total = %(total)s, device = %(device)s
  FROM procrastinate_jobs p
 WHERE e.id = %(id)s AND p.id = e.procrastinate_id
   AND p.status = 'doing' AND p.worker_id = %(worker_id)s
RETURNING p.abort_requested
"""

# The result, fenced, and the engine's own finish in the same transaction: the row lock
# taken here keeps a sweeper from requeueing the job between the two.
WRITE_RESULT = """
UPDATE edison_jobs e
   SET result = %(result)s, error = %(error)s, finished_at = now(),
       progress_done = %(done)s, progress_total = %(total)s, device = %(device)s
  FROM (SELECT id FROM procrastinate_jobs
         WHERE id = %(pid)s AND status = 'doing' AND worker_id = %(worker_id)s
         FOR UPDATE) p
 WHERE e.id = %(id)s AND p.id = e.procrastinate_id
RETURNING e.id
"""
FINISH = "SELECT procrastinate_finish_job_v1(%(pid)s, %(status)s, false)"

# A job this node can never hold goes back to the queue for another node, fenced, after
# ``delay`` seconds; the refusal (its figures) is recorded on the job.
HAND_BACK = """
WITH mine AS (
    SELECT id FROM procrastinate_jobs
     WHERE id = %(pid)s AND status = 'doing' AND worker_id = %(worker_id)s FOR UPDATE
), noted AS (
    UPDATE edison_jobs e
       SET refusals = e.refusals || jsonb_build_array(jsonb_build_object(
               'node', %(node)s::text, 'message', %(message)s::text, 'at', now())),
           node = NULL, device = NULL, started_at = NULL
      FROM mine WHERE e.procrastinate_id = mine.id
    RETURNING e.id
)
SELECT procrastinate_retry_job_v2(
           mine.id, now() + make_interval(secs => %(delay)s::float8), NULL, NULL, NULL)
  FROM mine, noted
"""

# A job this node refused before, fetched again while no other node took it: back to the
# queue unchanged (no second refusal, no attempt: the engine's retry would count one).
PASS_BACK = """
UPDATE procrastinate_jobs
   SET status = 'todo', scheduled_at = now() + make_interval(secs => %(delay)s::float8)
 WHERE id = %(pid)s AND status = 'doing' AND worker_id = %(worker_id)s
RETURNING id
"""

# The nodes that consume ``kind`` and are alive, and the ones that refused this job.
WHO_CAN_TAKE = """
SELECT n.name FROM edison_nodes n
 WHERE %(kind)s = ANY(n.kinds) AND edison_worker_alive(n.worker_id, %(timeout)s)
   AND NOT EXISTS (
       SELECT 1 FROM edison_jobs e, jsonb_array_elements(e.refusals) r
        WHERE e.id = %(id)s AND r ->> 'node' = n.name)
"""

# The stalled-job sweep, atomic with any number of sweepers. The inner SELECT locks each
# candidate (SKIP LOCKED: another sweeper or a finishing worker holds it); the UPDATE then
# re-checks, on the row's latest version, that the worker is still the silent one and
# that its heartbeat is still stale (a fresh read, edison_worker_alive is VOLATILE). A
# job a live worker took in between is left alone, so nothing runs twice. A requeue sends
# no NOTIFY on its own: the job_inserted notification here wakes the fetch loops at once.
SWEEP = """
WITH stalled AS (
    SELECT j.id, j.worker_id FROM procrastinate_jobs j
     WHERE j.status = 'doing' AND j.task_name = %(task)s
       AND NOT edison_worker_alive(j.worker_id, %(timeout)s)
     FOR UPDATE OF j SKIP LOCKED
), swept AS (
    UPDATE procrastinate_jobs j
       SET status = (CASE
               WHEN j.abort_requested THEN 'aborted'
               WHEN j.attempts + 1 >= %(max_attempts)s THEN 'failed'
               ELSE 'todo' END)::procrastinate_job_status,
           attempts = j.attempts + 1, worker_id = NULL, abort_requested = false,
           scheduled_at = NULL
      FROM stalled
     WHERE j.id = stalled.id AND j.status = 'doing'
       AND j.worker_id IS NOT DISTINCT FROM stalled.worker_id
       AND NOT edison_worker_alive(j.worker_id, %(timeout)s)
    RETURNING j.id, j.queue_name, j.status, j.attempts, j.args ->> 'id' AS edison_id
), noted AS (
    UPDATE edison_jobs e
       SET error = CASE WHEN s.status = 'failed' THEN jsonb_build_object(
               'code', 'node_lost',
               'message', format('node %%s stopped heartbeating while it ran the job; '
                                 'failed after %%s attempts (cluster.max_attempts)',
                                 e.node, s.attempts),
               'details', jsonb_build_object('node', e.node, 'attempts', s.attempts))
           ELSE e.error END,
           finished_at = CASE WHEN s.status <> 'todo' THEN now() END,
           node = CASE WHEN s.status = 'todo' THEN NULL ELSE e.node END
      FROM swept s WHERE e.id = s.edison_id
    RETURNING e.id
)
SELECT s.id, s.edison_id, s.status::text AS status, s.attempts,
       CASE WHEN s.status = 'todo' THEN pg_notify(
           'procrastinate_queue_v1#' || s.queue_name,
           json_build_object('type', 'job_inserted', 'job_id', s.id)::text) END AS notified,
       (SELECT count(*) FROM noted) AS noted
  FROM swept s
"""

HEARTBEAT = "UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = %(id)s RETURNING id"

UPSERT_NODE = """
INSERT INTO edison_nodes (name, worker_id, public_url, kinds, meta, started_at)
VALUES (%(name)s, %(worker_id)s, %(public_url)s, %(kinds)s, %(meta)s, now())
ON CONFLICT (name) DO UPDATE
   SET worker_id = EXCLUDED.worker_id, public_url = EXCLUDED.public_url,
       kinds = EXCLUDED.kinds, meta = EXCLUDED.meta
"""
UPDATE_NODE_META = "UPDATE edison_nodes SET meta = %(meta)s WHERE name = %(name)s"

NODES = """
SELECT n.name, n.public_url, n.kinds, n.meta, n.started_at, n.worker_id,
       w.last_heartbeat,
       extract(epoch FROM now() - w.last_heartbeat) AS heartbeat_age_s,
       edison_worker_alive(n.worker_id, %(timeout)s) AS alive
  FROM edison_nodes n LEFT JOIN procrastinate_workers w ON w.id = n.worker_id
 ORDER BY n.name
"""

# Per queue: jobs waiting and running now, and the attempts the engine recorded over every
# job it keeps (a requeue after a node died, a hand-back, a finished run).
QUEUE_STATS = """
SELECT queue_name,
       count(*) FILTER (WHERE status = 'todo') AS queued,
       count(*) FILTER (WHERE status = 'doing') AS running,
       coalesce(sum(attempts), 0) AS attempts,
       count(*) FILTER (WHERE attempts > 1
                        OR (attempts > 0 AND status IN ('todo', 'doing'))) AS retried
  FROM procrastinate_jobs WHERE task_name = %(task)s
 GROUP BY queue_name ORDER BY queue_name
"""

OUTPUT_NODE = """
SELECT n.public_url, n.name FROM edison_jobs e JOIN edison_nodes n ON n.name = e.node
 WHERE e.result -> 'names' ? %(name)s
"""

FAIL_UNHOLDABLE = """
WITH mine AS (
    SELECT id FROM procrastinate_jobs
     WHERE id = %(pid)s AND status = 'doing' AND worker_id = %(worker_id)s FOR UPDATE
)
UPDATE edison_jobs e
   SET error = %(error)s, finished_at = now(),
       refusals = CASE WHEN %(again)s THEN e.refusals ELSE e.refusals || jsonb_build_array(
           jsonb_build_object('node', %(node)s::text, 'message', %(message)s::text, 'at', now()))
       END
  FROM mine WHERE e.procrastinate_id = mine.id
RETURNING e.id
"""
