"""Helpers shared by the tests (importable as ``helpers`` through pytest's ``pythonpath`` setting)."""
