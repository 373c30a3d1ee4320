"""README blocks for the vision / activation-quantization results (bench/act_ptq.py)."""
from __future__ import annotations


def act_ptq(res: dict) -> str:
    import act_ptq as bench

    m = res["machine"]
    return "\n".join(bench.table(res)) + (
        f"\n\nSimulated (fake-quant) top-1 on a {m['cores']}-core {m['cpu']}, every baseline measured in the same run; "
        "protocol and commit in `bench/results/act_ptq.md`; rerun with `python bench/act_ptq.py`.")
