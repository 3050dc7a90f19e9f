"""Credentials -> Principal: API key issue, hashing, lookup and revocation."""
