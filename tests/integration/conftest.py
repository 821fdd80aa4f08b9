"""Fixtures shared by the integration tests: a template domain per module, copied per test."""

from __future__ import annotations

from support.hsa_nodes import domain, domain_template

__all__ = ["domain", "domain_template"]
