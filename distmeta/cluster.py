"""Connecting a job to Ray: the one way every job does it.

Under `ray job submit` Ray sets `RAY_ADDRESS`, so a job joins the cluster it was
submitted to; run by hand it starts a local instance; a job's `ray_address`
setting overrides both (e.g. `ray_address=auto` to join the node's cluster).
"""

import os


def connect(address: str = "") -> None:
    """Join the Ray cluster at `address` ("" = $RAY_ADDRESS when set, else a new local instance);
    nothing happens when this process is already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
