"""Host-side networking for guest vifs: TAP devices with virtio-net headers (:mod:`.tap`) and
Linux bridges (:mod:`.bridge`), configured over rtnetlink in the current network namespace."""

from pyxen.host.bridge import (DEFAULT_ADDRESS, DEFAULT_BRIDGE, attach, bridge_exists,
                               delete_bridge, detach, ensure_bridge, ifindex, validate_ifname)
from pyxen.host.tap import (VNET_HDR_LEN, Tap, VnetHdr, pack_vnet_hdr, unpack_vnet_hdr)

__all__ = [
    "DEFAULT_ADDRESS", "DEFAULT_BRIDGE", "attach", "bridge_exists", "delete_bridge", "detach",
    "ensure_bridge", "ifindex", "validate_ifname",
    "VNET_HDR_LEN", "Tap", "VnetHdr", "pack_vnet_hdr", "unpack_vnet_hdr",
]
