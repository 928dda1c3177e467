"""The toolstack: xl-compatible configuration parsing and output formatting (sans-IO).

- :mod:`pyxen.toolstack.xlcfg`: the xl.cfg grammar, ``key=value`` overrides, and the keys a
  PVH domain needs (:class:`~pyxen.toolstack.xlcfg.DomainSpec`).
- :mod:`pyxen.toolstack.xllist`: ``xl list`` output, byte for byte.
"""
