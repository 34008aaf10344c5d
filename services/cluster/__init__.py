"""Many hosts as one service (optional): generation jobs on Procrastinate's PostgreSQL queue,
pulled by each node only when its own gate admits; chat routed to a node holding the tier.

Nothing here is imported unless the config has a ``cluster`` section, except the plain
settings model in :mod:`services.cluster.config` (no database client).
"""
