"""`builder`: the maintainer's CLI, thin over `source/` and `runtime_python/`."""
