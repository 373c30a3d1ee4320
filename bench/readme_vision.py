"""README blocks for the vision / activation-quantization results (bench/act_ptq.py)."""
from __future__ import annotations


def act_ptq(res: dict) -> str:
    import act_ptq as bench

    m = res["machine"]
    return "\n".join(bench.table(res)) + (
        f"\n\nSimulated (fake-quant) top-1 on a {m['cores']}-core {m['cpu']}, every baseline measured in the same run; "
        "protocol and commit in `bench/results/act_ptq.md`; rerun with `python bench/act_ptq.py`.")


def int8(res: dict) -> str:
    """The W8A8 speed table of the main shape (all shapes in bench/results/int8.md)."""
    m, acc = res["machine"], res["acceptance"]
    main = [r for r in res["rows"] if r["case"] == res["rows"][0]["case"]]
    lines = [f"{main[0]['case']}:", "", "| contender | ms | × fp32 | × torch fbgemm q→q |", "|---|---|---|---|"]
    lines += [f"| {r['contender']} | {r['ms']:.2f} | {r['x_fp32']:.2f} | {r['x_fbgemm_qq']:.2f} |" for r in main]
    return "\n".join(lines) + (
        f"\n\n{m['cpu'] if isinstance(m, dict) else m}, {res['threads']} threads, median of {res['rounds']} interleaved "
        f"rounds; qbayes/fbgemm q→q = {acc['ratio']:.2f} (float→float fbgemm {acc['fbgemm_ff_ms']:.2f} ms). Every "
        "shape, the convolutions and the protocol: `bench/results/int8.md`; rerun with `python bench/int8.py`.")


def onnx_qdq(res: dict) -> str:
    lines = ["| model | ONNX Runtime vs qbayes, max rel. | outputs within 1e-3 | ORT vs qbayes: agreement | qbayes vs itself "
             "after 1 ulp | codes ORT's rule disagrees on |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f, u = r["modes"]["faithful"], r["qbayes_ulp"]
        agree = (f"top-1 {100 * f['top1_agreement']:.2f}%" if "top1_agreement" in f
                 else f"cosine {f['cosine_mean']:.4f}")
        lines.append(f"| {r['model']} | {f['max_rel']:.1e} | {100 * f['within_1e-3']:.1f}% | {agree} | "
                     f"{u['max_rel']:.1e} | {r['codes']['rule_mismatches']} of {r['codes']['codes']:,} |")
    return "\n".join(lines) + ("\n\nW8A8 per-tensor static QDQ models run by ONNX Runtime "
                               f"{res['onnxruntime']}; protocol in `bench/results/onnx_qdq.md`.")


def int8_models(res: dict) -> str:
    import int8_models as bench

    m = res["machine"]
    return "\n".join(bench.table(res)) + (
        f"\n\n{m['cpu']}, {m['threads']} threads (torch and ONNX Runtime), median of {res['rounds']} interleaved "
        "rounds; protocol in `bench/results/int8_models.md`; rerun with `python bench/int8_models.py`.")
