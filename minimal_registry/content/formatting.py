"""How sizes, durations and media types read to a person."""

from minimal_registry import manifest

_SHORT_TYPES = {
    manifest.OCI_INDEX: "oci-index",
    manifest.OCI_MANIFEST: "oci",
    manifest.DOCKER_LIST: "docker-list",
    manifest.DOCKER_MANIFEST: "docker",
    manifest.DOCKER_V1_SIGNED: "docker-v1",
}


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def counted(count: int, singular: str, plural: str = "") -> str:
    """`1 tag`, `2 tags`; `plural` where adding an s is wrong (`repository`, `repositories`)."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def human_duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def short_media_type(media_type: str) -> str:
    return _SHORT_TYPES.get(media_type, media_type or "unknown")
