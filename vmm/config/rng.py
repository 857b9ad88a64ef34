"""--rng: a virtio-rng device, `[rate=BYTES/S]` (nothing: no limit)."""

from __future__ import annotations

from dataclasses import dataclass

from .options import ConfigError, GiB, check_dict, parse_size, split_options

RNG_SPEC_SYNTAX = "[rate=BYTES/S] (e.g. rate=64K)"
RNG_KEYS = ("rate",)
MAX_RATE = GiB  # bytes a second: far beyond what getrandom gives; a larger figure is a typo


@dataclass(frozen=True)
class RngSpec:
    """The entropy device as the configuration describes it."""

    rate: int | None = None  # bytes a second the guest may draw on average; None: no limit


def parse_rng_spec(text: str) -> RngSpec:
    """'' or 'rate=16K' (or 'rate=16384/s'); ConfigError says what is wrong."""
    if not text.strip():
        return RngSpec()
    _, values = split_options(text, what="rng", syntax=RNG_SPEC_SYNTAX, known=RNG_KEYS)
    return rng_from_values(values, where=f"rng {text!r}")


def rng_from_dict(d: dict) -> RngSpec:
    """{"rate": ...} (a config file's form; {} for no limit)."""
    where = f"rng {d!r}"
    check_dict(d, where=where, known=RNG_KEYS, required=None)
    return rng_from_values(d, where=where)


def rng_from_values(values: dict, *, where: str) -> RngSpec:
    if "rate" not in values:
        return RngSpec()
    text = values["rate"]
    if isinstance(text, str) and text.strip().lower().endswith("/s"):
        text = text.strip()[:-2]
    try:
        rate = parse_size(text)
    except ConfigError:
        rate = 0
    if not 1 <= rate <= MAX_RATE:
        raise ConfigError(f"{where}: rate={values['rate']!r} is not a byte rate from 1 to 1G a second")
    return RngSpec(rate=rate)
