"""Engines behind the API: one interface (`base.Backend`), several implementations."""
