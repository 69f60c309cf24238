"""The disk-less lab guest: Debian's cloud kernel and a busybox initramfs whose /init
(``init.sh``) takes the guest's identity from the kernel command line."""

from vmferry.image.builder import GuestImage, build_image, cached_image, ensure_image

__all__ = ["GuestImage", "build_image", "cached_image", "ensure_image"]
