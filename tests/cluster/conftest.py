"""Cluster tests share the `local_cluster` fixture (real processes, always cleaned up)."""

from __future__ import annotations

from support.cluster import local_cluster

__all__ = ["local_cluster"]
