# TEMPORARY (written by the hub-server helper to verify the import; the lead owns this file)
from conftest_hub import loopback_hub  # noqa: F401
