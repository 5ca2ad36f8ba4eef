"""Process-level set-up shared by the entry points (Ray connection, threads)."""

from feedrec.runtime.ray_cluster import init_ray
from feedrec.runtime.run_layout import RunLayout

__all__ = ["RunLayout", "init_ray"]
