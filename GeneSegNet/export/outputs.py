"""The ``--outputs`` switch: which result files a run writes."""

from __future__ import annotations

from collections.abc import Iterable

from GeneSegNet.errors import InputError

OUTPUT_KINDS = ("csv", "h5ad", "geojson", "geoparquet", "spatialdata", "xenium", "qc")
DEFAULT_OUTPUTS = ("csv",)


def parse_outputs(value: str | Iterable[str] | None, option: str = "--outputs") -> tuple[str, ...]:
    """Normalise ``"csv,h5ad"`` (or a sequence) to a tuple of known kinds, in
    :data:`OUTPUT_KINDS` order without duplicates; None or "" gives :data:`DEFAULT_OUTPUTS`.

    Raises InputError naming ``option`` for an unknown kind.
    """
    if value is None:
        return DEFAULT_OUTPUTS
    items = value.split(",") if isinstance(value, str) else list(value)
    wanted = {str(v).strip().lower() for v in items if str(v).strip()}
    if not wanted:
        return DEFAULT_OUTPUTS
    unknown = sorted(wanted - set(OUTPUT_KINDS))
    if unknown:
        raise InputError(f"{option}: unknown output(s) {unknown}; choose from "
                         f"{','.join(OUTPUT_KINDS)}")
    return tuple(k for k in OUTPUT_KINDS if k in wanted)
