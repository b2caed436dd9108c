"""Background jobs: a `jobs` table, one queue interface (in-process or ARQ on Redis), a runner."""
