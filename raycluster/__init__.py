"""rankray's cluster-facing edge: CLI, config, Ray start-up and job helpers."""
import os

# Ray 2.60 reads this at import: token auth on for the clusters we start and for the jobs CLI.
os.environ.setdefault("RAY_AUTH_MODE", "token")
