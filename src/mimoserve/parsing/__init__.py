"""Pure incremental text processors: feed pieces, get output; `finish()` flushes.

Nothing here does I/O or knows about wire types, so every processor can be tested by
feeding the same text in every possible split.
"""
