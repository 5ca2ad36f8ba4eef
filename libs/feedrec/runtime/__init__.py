"""Process-level set-up shared by the entry points (Ray connection, threads)."""

from feedrec.runtime.ray_cluster import init_ray

__all__ = ["init_ray"]
