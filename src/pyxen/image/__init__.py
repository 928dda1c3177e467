"""The guest image for ``pyxen run`` / ``pyxen image``.

* :mod:`.build`     — ``ensure_image`` / ``find_image``: Debian cloud kernel + busybox initramfs,
  cached in ``$PYXEN_CACHE_DIR`` or ``~/.cache/pyxen`` (``images/debian-cloud-<version>/``).
* :mod:`.runspec`   — per-run overlay (mode, command, nonce), combined initrd, exit-marker filter.
* :mod:`.initramfs` — the guest's ``/init`` and the base archive layout.
* :mod:`.cpio`, :mod:`.kmod` — sans-IO cpio newc writer/reader; kernel config and module metadata.
* :mod:`.fetch`     — apt-get / dpkg-deb wrappers (the only module that runs package tools).
"""

from pyxen.image.build import Image, cache_root, ensure_image, find_image
from pyxen.image.runspec import ExitMarkerFilter, combined_initrd, make_overlay, new_nonce

__all__ = ["ExitMarkerFilter", "Image", "cache_root", "combined_initrd", "ensure_image",
           "find_image", "make_overlay", "new_nonce"]
