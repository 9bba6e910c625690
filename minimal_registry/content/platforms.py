"""Platform strings (`linux/arm64/v8`) compared the way containerd compares them.

`arm64` means `arm64/v8`, `arm` means `arm/v7`, and `amd64/v1` is plain `amd64`, so
`-p linux/arm64` selects an index entry that says `linux/arm64/v8`.
"""

from typing import List, Optional, Tuple

ALL = "all"
_ARCH_ALIASES = {"aarch64": "arm64", "x86_64": "amd64", "x86-64": "amd64", "armhf": "arm", "armel": "arm"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def normalise(platform: str) -> Tuple[str, str, Optional[str]]:
    parts = platform.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{platform!r} is not a platform (write os/arch or os/arch/variant, e.g. linux/arm64)")
    os_name, arch = parts[0], _ARCH_ALIASES.get(parts[1], parts[1])
    variant = parts[2] if len(parts) == 3 else _DEFAULT_VARIANT.get(arch)
    if arch == "amd64" and variant == "v1":
        variant = None
    return os_name, arch, variant


def parse_list(text: Optional[str]) -> Optional[List[str]]:
    """`linux/amd64,linux/arm64` -> the list; None or `all` -> None (every platform)."""
    if text is None or text.strip().lower() == ALL:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("no platform given (write os/arch[,os/arch...] or all)")
    for item in items:
        normalise(item)
    return items


def matches(wanted: str, offered: Optional[str]) -> bool:
    if not offered:
        return False
    try:
        return normalise(wanted) == normalise(offered)
    except ValueError:
        return False
