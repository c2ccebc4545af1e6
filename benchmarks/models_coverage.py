"""Coverage of models nobody here wrote: Hugging Face transformers, timm and torchvision.

Each model is built with its library's default configuration (random init: no weights can be
downloaded), compiled with ``asp`` 2:4 and no trainer (prune only), and exported to ONNX in fp32
and fp16; each file is checked by onnx, run by ONNX Runtime against the compiled module's fp32
output, and read back by the N:M checker. A row records: tracer, parameters, sites and excluded
layers (with their reasons, counted), the share of weight-layer parameters pruned, ONNX fp32 /
fp16 (relative error or the failure), the N:M check of the declared weights, the file's dynamic
axes, and the seconds each step took.

The large language models are built from their default config with the width and depth cut
(``hidden_size`` 256, 4 layers; the config's other defaults kept, vocabulary included): their
7B defaults do not fit a 2-core machine's time. The row's ``config`` says what was changed.

    python benchmarks/models_coverage.py                 # all models, resumes from its rows
    python benchmarks/models_coverage.py --models hf-bert,tv-swin_t --force

Rows go to ``benchmarks/results/models_coverage.json`` after every model (written atomically),
so an interrupted run keeps what it finished and a rerun skips those rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nmcompile
from nmcompile._machine import machine_info
from nmcompile.passes.trace import input_spec

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "models_coverage.json"

SMALL_LM = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 4}  # fmt: skip


def _ids(batch: int = 2, length: int = 32, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _hf(name: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    import transformers as T

    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig()), (_ids(),), {}
    if name == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig()), (_ids() + 3,), {}
    if name == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig()), (_ids(),), {}
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config()), (_ids(),), {}
    if name == "t5":  # t5-small is T5Config's default
        cfg = T.T5Config()
        return (
            T.T5ForConditionalGeneration(cfg),
            {"input_ids": _ids(), "decoder_input_ids": _ids(length=16)},
            {},
        )
    if name == "bart":
        changed = {"d_model": 512, "encoder_layers": 4, "decoder_layers": 4,
                   "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048}  # fmt: skip
        return T.BartForConditionalGeneration(T.BartConfig(**changed)), (_ids(),), changed
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig()), (torch.randn(2, 3, 224, 224),), {}
    cls = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
    }[name]
    changed = dict(SMALL_LM)
    if name == "qwen2":
        changed["intermediate_size"] = 704
    return cls[1](cls[0](**changed)), (_ids(),), changed


def _timm(name: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    import timm

    return timm.create_model(name), (torch.randn(1, 3, 224, 224),), {}


def _tv(name: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    import torchvision

    return getattr(torchvision.models, name)(), (torch.randn(1, 3, 224, 224),), {}


MODELS: dict[str, Any] = {
    **{f"hf-{n}": (_hf, n) for n in
       ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "t5", "bart",
        "vit")},
    **{f"timm-{n}": (_timm, n) for n in
       ("resnet50", "convnext_tiny", "efficientnet_b0", "vit_small_patch16_224",
        "swin_tiny_patch4_window7_224", "mobilenetv3_large_100", "regnety_002")},
    **{f"tv-{n}": (_tv, n) for n in
       ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "swin_t",
        "vit_b_16")},
}  # fmt: skip


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or type(m).__name__ == "Conv1D"
    }


def _wake(model: nn.Module, inputs: Any) -> str | None:
    """Make a random-init model's output non-trivial, so the ONNX comparison compares something.

    torchvision initialises classifier heads (ViT) to zero and its BatchNorm running statistics
    to (0, 1), which shrink MobileNet/EfficientNet outputs to 1e-10..1e-14 at random init: an
    fp16 file that returned zeros would pass any tolerance. Zero weight tensors are re-drawn
    (normal, std 0.02) and BatchNorm statistics re-estimated from a few random batches."""
    done = []
    zero = [m for m in _weight_layers(model).values() if not m.weight.detach().any()]
    with torch.no_grad():
        for m in zero:
            nn.init.normal_(m.weight, std=0.02)
    if zero:
        done.append(f"{len(zero)} zero-initialised weight layer(s) re-drawn")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns and isinstance(inputs, tuple):
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(8, *inputs[0].shape[1:], generator=g))
        for m in bns:
            m.momentum = 0.1
        model.eval()
        done.append("BatchNorm statistics re-estimated on 4 random batches of 8")
    return "; ".join(done) or None


def _reason_kind(reason: str) -> str:
    """The reason without its particulars (channel counts, names), for counting."""
    for key in ("stem", "classifier", "grouped/depthwise", "not a multiple", "tied to an",
                "also used by", "not called", "overrides", "transposed", "exclude"):  # fmt: skip
        if key in reason:
            return key
    return reason[:40]


def _export(r, path: Path, dtype: torch.dtype) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e = r.export_onnx(path, dtype=dtype)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                "s": round(time.perf_counter() - t, 1)}  # fmt: skip
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dyn = {
        i.name: [d.dim_param for d in i.type.tensor_type.shape.dim if d.dim_param]
        for i in model.graph.input
    }
    rep = e.nm_report
    return {
        "ok": True,
        "max_rel_error": e.max_rel_error,
        "nm_declared_ok": rep.declared_ok if rep is not None else None,
        "nm_summary": rep.summary() if rep is not None else None,
        "dynamic_axes": {k: len(v) for k, v in dyn.items()},
        "mb": round(path.stat().st_size / 2**20, 1),
        # how the file was made when the first way failed (ONNX export's fallback warning)
        "fallback": [
            str(w.message)[:400]
            for w in caught
            if issubclass(w.category, nmcompile.NMCompileWarning)
        ],
        "s": round(time.perf_counter() - t, 1),
    }


def run(key: str, tmp: Path) -> dict[str, Any]:
    build, name = MODELS[key]
    torch.manual_seed(0)
    row: dict[str, Any] = {"model": key}
    t = time.perf_counter()
    try:
        model, inputs, changed = build(name)
    except Exception as exc:
        return {**row, "error": f"build: {type(exc).__name__}: {exc}"}
    model.eval()
    row["config"] = changed or "library default"
    woken = _wake(model, inputs) if not key.startswith("hf-") else None
    if woken:
        row["init"] = f"random; {woken}"
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    out = getattr(out, "logits", out)
    row["output_max_abs"] = float(out.abs().max())
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    t = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = nmcompile.compile(model, "asp", "2:4", example_inputs=inputs)
    except Exception as exc:
        traceback.print_exc()
        return {**row, "error": f"compile: {type(exc).__name__}: {str(exc)[:500]}"}
    row["compile_s"] = round(time.perf_counter() - t, 1)
    row["tracer"] = r.tracer
    spec = input_spec(r.module)
    row["dynamic"] = spec.describe() if spec is not None else "fx graph (shape-generic)"
    row["warnings"] = sorted({str(w.message)[:160] for w in caught
                              if issubclass(w.category, nmcompile.NMCompileWarning)})  # fmt: skip
    layers = _weight_layers(model)
    accounted = {s.name for s in r.sites} | {a for s in r.sites for a in s.aliases}
    accounted |= {e.name for e in r.excluded}
    row["weight_layers"] = len(layers)
    row["unaccounted"] = sorted(set(layers) - accounted)
    row["sites"] = len(r.sites)
    row["site_kinds"] = dict(collections.Counter(s.kind for s in r.sites))
    row["excluded"] = len(r.excluded)
    row["excluded_reasons"] = dict(
        collections.Counter(_reason_kind(e.reason) for e in r.excluded).most_common()
    )
    # weight tensors of weight layers plus those of sites that are no layer module
    # (nn.MultiheadAttention's in_proj_weight)
    total = sum(m.weight.numel() for m in layers.values())
    total += sum(s.numel for s in r.sites if s.name not in layers)
    row["pruned_share_of_weight_layers"] = round(sum(s.numel for s in r.sites) / total, 4)
    row["sparsity"] = round(r.sparsity, 4)
    row["onnx_fp32"] = _export(r, tmp / f"{key}.onnx", torch.float32)
    (tmp / f"{key}.onnx").unlink(missing_ok=True)
    row["onnx_fp16"] = _export(r, tmp / f"{key}_fp16.onnx", torch.float16)
    for f in tmp.iterdir():
        f.unlink()
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table RESULTS.md takes: one line per model."""

    def onnx(e: dict[str, Any]) -> str:
        if not e:
            return "-"
        if not e.get("ok"):
            return "fails: " + e.get("error", "")[:60]
        nm = "N:M ok" if e.get("nm_declared_ok") else "N:M FAILS"
        return f"{e['max_rel_error']:.1e}, {nm}" + (" (fallback)" if e.get("fallback") else "")

    lines = [
        "| model | tracer | sites | excluded (reason: count) | pruned share | compile s "
        "| ONNX fp32 (rel. err., check) | ONNX fp16 | dynamic dims |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | fails: {r['error'][:100]} |||||||| ")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in r["site_kinds"].items())
        why = ", ".join(f"{k}: {v}" for k, v in r["excluded_reasons"].items())
        dyn = r["onnx_fp32"].get("dynamic_axes", {}) if r["onnx_fp32"].get("ok") else {}
        lines.append(
            f"| {r['model']}{' *' if r['config'] != 'library default' else ''} | {r['tracer']} "
            f"| {r['sites']} ({kinds}) | {why} | {r['pruned_share_of_weight_layers']:.0%} "
            f"| {r['compile_s']} | {onnx(r['onnx_fp32'])} | {onnx(r['onnx_fp16'])} "
            f"| {', '.join(f'{k}: {v}' for k, v in dyn.items()) or '-'} |"
        )
    missed = [r["model"] for r in rows if r.get("unaccounted")]
    lines.append("")
    lines.append(
        "Weight layers neither pruned nor listed in `excluded`: "
        + (", ".join(missed) if missed else "none, in every model.")
    )
    return "\n".join(lines)


def _write(rows: dict[str, dict[str, Any]], path: Path) -> None:
    data = {"machine": machine_info(), "rows": list(rows.values())}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--force", action="store_true", help="redo rows that are already there")
    ap.add_argument("--table", action="store_true", help="print the Markdown table and exit")
    args = ap.parse_args()
    out = Path(args.out)
    rows: dict[str, dict[str, Any]] = {}
    if out.exists():
        rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    if args.table:
        print(markdown(list(rows.values())))
        return
    for key in args.models.split(","):
        if key not in MODELS:
            raise SystemExit(f"unknown model {key!r}; known: {list(MODELS)}")
        if key in rows and not args.force and "error" not in rows[key]:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = run(key, Path(tmp))
        rows[key] = row
        _write(rows, out)
        f32, f16 = row.get("onnx_fp32", {}), row.get("onnx_fp16", {})
        print(
            f"{key}: {row.get('tracer', '-')} sites={row.get('sites')} "
            f"excluded={row.get('excluded_reasons')} fp32={f32.get('ok')} fp16={f16.get('ok')} "
            f"compile={row.get('compile_s')}s export={f32.get('s')}/{f16.get('s')}s "
            + (row.get("error", "") or ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
