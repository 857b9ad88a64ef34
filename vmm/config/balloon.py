"""--balloon: a virtio-balloon device, `[size=SIZE][,stats=SECONDS][,free-page-reporting=on][,deflate-on-oom=on]`.

size: the balloon's first target (guest RAM the guest gives back at boot; 0 by default), a
multiple of 4 KiB no larger than --mem; `Machine.set_balloon_target` changes it while the VM
runs.  stats: ask the guest for memory statistics every SECONDS (1 to 3600; off by default).
free-page-reporting: the guest reports free memory, which is given back to the host.
deflate-on-oom: the guest may deflate by itself rather than run out of memory."""

from __future__ import annotations

from dataclasses import dataclass

from .options import ConfigError, check_dict, parse_bool, parse_count, parse_size, split_options

BALLOON_SPEC_SYNTAX = "[size=SIZE][,stats=SECONDS][,free-page-reporting=on][,deflate-on-oom=on]"
BALLOON_KEYS = ("size", "stats", "free-page-reporting", "deflate-on-oom")
BALLOON_ALIASES = {"free_page_reporting": "free-page-reporting", "deflate_on_oom": "deflate-on-oom"}
MAX_STATS_INTERVAL = 3600
BALLOON_PAGE = 4096


@dataclass(frozen=True)
class BalloonSpec:
    """The memory balloon as the configuration describes it."""

    size: int = 0  # bytes: the first target
    stats_interval: int | None = None  # seconds between statistics; None: no statistics queue
    free_page_reporting: bool = False
    deflate_on_oom: bool = False


def parse_balloon_spec(text: str) -> BalloonSpec:
    """'' or 'size=256M,stats=1,free-page-reporting=on'; ConfigError says what is wrong."""
    if not text.strip():
        return BalloonSpec()
    _, values = split_options(text, what="balloon", syntax=BALLOON_SPEC_SYNTAX, known=BALLOON_KEYS,
                              aliases=BALLOON_ALIASES)
    return balloon_from_values(values, where=f"balloon {text!r}")


def balloon_from_dict(d: dict) -> BalloonSpec:
    """{"size": ..., "stats": ..., "free-page-reporting": ..., "deflate-on-oom": ...} (a config file's form)."""
    where = f"balloon {d!r}"
    check_dict(d, where=where, known=(*BALLOON_KEYS, *BALLOON_ALIASES), required=None)
    return balloon_from_values({BALLOON_ALIASES.get(k, k): v for k, v in d.items()}, where=where)


def balloon_from_values(values: dict, *, where: str) -> BalloonSpec:
    size = 0
    if "size" in values:
        try:
            size = parse_size(values["size"])
        except ConfigError as err:
            raise ConfigError(f"{where}: size: {err}") from None
        if size % BALLOON_PAGE:
            raise ConfigError(f"{where}: size={values['size']!r} is not a multiple of 4 KiB")
    stats = parse_count(values["stats"], where, "stats", MAX_STATS_INTERVAL) if "stats" in values else None
    flag = {key: parse_bool(values[key], where, key) if key in values else False
            for key in ("free-page-reporting", "deflate-on-oom")}
    return BalloonSpec(size=size, stats_interval=stats, free_page_reporting=flag["free-page-reporting"],
                       deflate_on_oom=flag["deflate-on-oom"])


def check_balloon_size(spec: BalloonSpec | None, mem_size: int) -> None:
    if spec is not None and spec.size > mem_size:
        raise ConfigError(f"--balloon size={spec.size} is more than the guest's RAM ({mem_size} bytes)")
