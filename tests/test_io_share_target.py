"""bench/io_share.py holds a run to 14 % read + write only at bf16 on an AMX host (where
inference is fastest) and to 10 % everywhere else. The host that records BENCHMARKS.md's
rows may lack AMX, so the choice is tested here for every host kind, whatever this CPU is."""

from __future__ import annotations

import pytest
from io_share import AMX_BF16_TARGET, DEFAULT_TARGET, io_share_target

AMX_XEON = ["amx_tile", "amx_bf16", "avx512_bf16", "avx512_fp16", "avx512_vnni"]
EPYC_BF16 = ["avx512_bf16", "avx512_vnni"]
VNNI_XEON = ["avx512_vnni"]


@pytest.mark.parametrize(("precision", "features", "target"), [
    ("bf16", AMX_XEON, AMX_BF16_TARGET),
    ("fp32", AMX_XEON, DEFAULT_TARGET),
    ("int8", AMX_XEON, DEFAULT_TARGET),
    ("bf16", EPYC_BF16, DEFAULT_TARGET),
    ("fp32", VNNI_XEON, DEFAULT_TARGET),
    (None, [], DEFAULT_TARGET),
], ids=["amx_bf16", "amx_fp32", "amx_int8", "epyc_bf16", "vnni_fp32", "unknown_host"])
def test_io_share_target_per_host_and_precision(precision: str | None, features: list[str],
                                                target: float) -> None:
    assert io_share_target(precision, features) == target
