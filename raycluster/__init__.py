"""rankray's cluster-facing edge: CLI, pipeline, Ray start-up, serving start-up and job helpers.

Importing it changes nothing; entry points call `use_token_auth()` before Ray is imported."""
import os


def use_token_auth() -> None:
    """Token authentication for the clusters this process starts or joins and for the Ray CLI tools it
    runs (`ray job submit` needs it to talk to the dashboard). Ray reads RAY_AUTH_MODE when it is
    imported, so entry points call this first; an explicit setting in the environment wins."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
