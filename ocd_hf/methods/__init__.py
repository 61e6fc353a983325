"""One folder per weight-generation method, each built on the shared modules of :mod:`ocd_hf`."""
