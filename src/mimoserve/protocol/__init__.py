"""Wire models only: field names exactly as on the wire, no logic and no I/O."""
