"""Test support code shared by unit, integration and cluster tests (importable as `support`)."""
