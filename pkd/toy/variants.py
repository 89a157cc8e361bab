"""The rows of the demo's comparison: which cache each student learns from and with which flags.

Both the demo (which trains them) and its results (which tabulate them) read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: the student trained on `cache` ("aligned" or "unaligned"
    proxy's top-20, "sampled": the aligned proxy's sampled cache; None: not trained at all) with
    extra `pkd train-student` flags."""

    key: str
    label: str
    cache: str | None
    flags: tuple[str, ...] = ()


VARIANTS = (
    Variant("student_base", "student base (no distillation)", None),
    Variant("blackbox_kd", "black-box KD (α = 0)", "aligned", ("--alpha", "0")),
    Variant("unaligned_proxy", "Proxy-KD, unaligned proxy", "unaligned"),
    Variant("no_weights", "Proxy-KD, uniform weights (= mean w)", "aligned", ("--uniform-weights",)),
    Variant("proxy_kd", "Proxy-KD (full)", "aligned"),
    # beyond the paper: w weights the CE term too (normalised by the cache's token-weighted mean w)
    Variant("weight_ce", "Proxy-KD, CE weighted too", "aligned", ("--weight-ce",)),
    # RS-KD is unbiased when the draws come from the proxy itself at the KD temperature: both are
    # 1 here, as for every top-20 student (the toy recipe's τ), so this row compares like with like
    Variant("sampled_cache", "Proxy-KD, sampled cache (N = 12)", "sampled"),
)
SAMPLES = 12  # draws per position of the "sampled" cache
CACHE_DIRS = {"aligned": "logits", "unaligned": "logits-unaligned", "sampled": "logits-sampled"}
