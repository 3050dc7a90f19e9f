"""mimoserve: a self-hosted implementation of the MiMo chat completions API."""

__version__ = "0.1.0"
