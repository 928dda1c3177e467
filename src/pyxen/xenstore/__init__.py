"""Xenstore: the wire protocol, the database, a sans-IO server and the guest ring backend.

``wire`` (message framing), ``store`` (tree + permissions + quotas), ``server``
(:class:`XenstoreServer`, :class:`Connection`, :func:`populate_domain`) and ``ring``
(:class:`XenstoreRing`, one guest's store page). Only ``ring`` touches guest memory.
"""

from pyxen.xenstore.ring import XenstoreRing
from pyxen.xenstore.server import Connection, XenstoreServer, populate_domain
from pyxen.xenstore.store import Quota, Store, XenstoreError
from pyxen.xenstore.wire import Message, MessageParser, ProtocolError, pack

__all__ = ["Connection", "Message", "MessageParser", "ProtocolError", "Quota", "Store",
           "XenstoreError", "XenstoreRing", "XenstoreServer", "pack", "populate_domain"]
