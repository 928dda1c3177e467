"""Save/restore and live migration of pyxen domains.

:mod:`pyxen.migration.stream` is the sans-IO codec of the save/migration byte stream
(docs/migration-stream.md): encoders that build records and an incremental parser that
validates them. It does no I/O and knows nothing about domains.
"""
