"""The ``nmcompile`` command.

``nmcompile run``      the main job: model + dataset + method + pattern -> train / prune -> ONNX ->
                       N:M check -> ONNX Runtime latency dense vs sparse -> an output folder with
                       report.md, layers.csv, PNG plots and the .onnx files. With no arguments it
                       runs the embedded default: digits, the small CNN, asp, 2:4.
``nmcompile check``    the N:M checker on any ONNX file.
``nmcompile methods``  the registered methods.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from nmcompile._machine import machine_info

__all__ = ["main"]

# Iteration defaults per dataset: enough for the small CNN to converge on 2 CPU cores quickly.
_DEFAULTS = {
    "digits": {"pretrain": 600, "finetune": 300, "round": 300, "lr": 0.05, "batch": 64},
    "fashion-mnist": {"pretrain": 3000, "finetune": 1500, "round": 1500, "lr": 0.05, "batch": 128},
}


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key.strip(), value


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nmcompile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="train/prune -> ONNX -> N:M check -> latency -> report")
    run.add_argument("--model", default="cnn", help="zoo model name (default: cnn)")
    run.add_argument("--dataset", default="digits", help="digits | fashion-mnist (default: digits)")
    run.add_argument("--data-root", default=None, help="folder holding the dataset files")
    run.add_argument("--method", default="asp", help="a registered method (nmcompile methods)")
    run.add_argument("--pattern", default="2:4", help="N:M pattern, e.g. 2:4, 1:4, 2:8")
    run.add_argument(
        "--out", default="nmcompile-run", help="output folder (default: nmcompile-run)"
    )
    run.add_argument(
        "--pretrain-iterations",
        type=int,
        default=None,
        help="dense training before compile (default per dataset; 0 for none)",
    )
    run.add_argument(
        "--finetune-iterations",
        type=int,
        default=None,
        help="asp/omp/random fine-tuning iterations (default per dataset)",
    )
    run.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="training iterations per round of iterative methods (imp, mimp, lmimp, eb, ...; "
        "default per dataset)",
    )
    run.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save the run here: every round, or every --checkpoint-every iterations of a "
        "single-run method",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="iterations between checkpoints of single-run methods (default 1000)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest good checkpoint in --checkpoint-dir",
    )
    run.add_argument("--batch-size", type=int, default=None)
    run.add_argument("--lr", type=float, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu")
    run.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image size the model is built for (default: the dataset's)",
    )
    run.add_argument(
        "--option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable (JSON values)",
    )
    run.add_argument("--latency-repeat", type=int, default=100)
    run.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime timing")
    run.add_argument("--progress", action="store_true", help="show training progress bars")

    chk = sub.add_parser("check", help="check every weight of an ONNX file against an N:M pattern")
    chk.add_argument("file", help="an .onnx file")
    chk.add_argument("--pattern", default="2:4")
    chk.add_argument("--json", action="store_true", help="print the report as JSON")
    chk.add_argument(
        "--all",
        action="store_true",
        help="require every weight to satisfy the pattern, also those an nmcompile export "
        "declares dense by design (stem, classifier)",
    )

    sub.add_parser("methods", help="list the registered methods")

    bench = sub.add_parser("bench", help="dense vs sparse latency on several backends")
    bench.add_argument("model", help="an .onnx file or a zoo model name (e.g. resnet50, bert_base)")
    bench.add_argument(
        "--backends",
        default="ort-cpu,torch",
        help="comma list of ort-cpu, ort-cuda, torch, torch-2:4, trt",
    )
    bench.add_argument("--dtypes", default="fp32", help="comma list of fp32, fp16, bf16")
    bench.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,8,32")
    bench.add_argument(
        "--input-shape",
        default=None,
        help="per-sample input shape, e.g. 3,224,224 or 128,768 (default per model)",
    )
    bench.add_argument("--pattern", default="2:4")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--repeat", type=int, default=50)
    bench.add_argument(
        "--eager",
        dest="cuda_graphs",
        action="store_false",
        help="time eager calls on the GPU instead of CUDA-graph replays (torch backends)",
    )
    bench.add_argument("--out", default="nmcompile-bench", help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    from ._errors import NMCompileError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv:
        argv = ["run"]
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args, argv)
        if args.command == "check":
            return _check(args)
        if args.command == "methods":
            return _methods()
        if args.command == "bench":
            return _bench(args)
    except NMCompileError as exc:
        print(f"nmcompile: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


def _methods() -> int:
    from ._registry import get_method, methods

    rows = []
    for name in methods():
        spec = get_method(name)
        rows.append((name, spec.describe_kind(), spec.summary))
    w_name = max(len(r[0]) for r in rows)
    w_kind = max(len(r[1]) for r in rows)
    try:
        for name, kind, summary in rows:
            print(f"{name:<{w_name}}  {kind:<{w_kind}}  {summary}")
        sys.stdout.flush()
    except BrokenPipeError:  # `nmcompile methods | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _csv(text: str, cast=str) -> list:
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def _bench(args: argparse.Namespace) -> int:
    from ._io import ensure_dir
    from .runtime.bench import benchmark

    out = ensure_dir(args.out)  # fail before timing anything
    try:
        batches = _csv(args.batch_sizes, int)
        shape = _csv(args.input_shape, int) if args.input_shape else None
    except ValueError as exc:
        raise SystemExit(
            f"nmcompile bench: --batch-sizes / --input-shape take integers: {exc}"
        ) from exc
    report = benchmark(
        args.model,
        backends=_csv(args.backends),
        dtypes=_csv(args.dtypes),
        batch_sizes=batches,
        input_shape=shape,
        pattern=args.pattern,
        warmup=args.warmup,
        repeat=args.repeat,
        cuda_graphs=args.cuda_graphs,
        workdir=out / "work",
    )
    files = report.save(out)
    print(report.to_markdown())
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ._pattern import NMPattern
    from .runtime import check_onnx

    report = check_onnx(args.file, NMPattern.parse(args.pattern))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.to_markdown())
        print()
        print(report.summary())
    # A file nmcompile exported names the weights it pruned; the stem and classifier it left
    # dense on purpose do not fail the check unless --all asks for every weight.
    if report.declared is not None and not args.all:
        return 0 if report.declared_ok else 1
    return 0 if report.ok else 1


def _diagnostic_plots(out: Path, result: Any, args: argparse.Namespace) -> list[str]:
    """Per-round accuracy / sparsity / FLOPs, the mask Hamming heatmap and PLP misprediction."""
    from ._report import plot_heatmap, plot_lines

    made = []
    hist = result.history
    if len(hist) > 1:
        rounds = [h["round"] for h in hist]
        plot_lines(
            out / "rounds.png",
            rounds,
            {
                "accuracy": [
                    h["accuracy"] if h["accuracy"] is not None else float("nan") for h in hist
                ],
                "sparsity": [h["sparsity"] for h in hist],
            },
            title=f"{args.method}: accuracy and sparsity per round",
            xlabel="round",
            ylabel="fraction",
        )
        made.append("rounds")
    matrix = result.diagnostics.get("mask_hamming")
    if matrix and len(matrix) > 1:
        plot_heatmap(
            out / "mask_hamming.png",
            matrix,
            title="mask Hamming distance between pruning steps",
            label="pruning step",
        )
        made.append("mask_hamming")
    rates = result.diagnostics.get("plp_misprediction")
    if rates:
        plot_lines(
            out / "plp_misprediction.png",
            list(range(1, len(rates) + 1)),
            {"misprediction": [float("nan") if r is None else r for r in rates]},
            title=f"PLP misprediction (alpha = {result.diagnostics.get('plp_alpha')})",
            xlabel="pruning step",
            ylabel="fraction",
        )
        made.append("plp_misprediction")
    return made


def _log(msg: str) -> None:
    from ._dist import is_main

    if is_main():
        print(f"[nmcompile] {msg}", flush=True)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from . import _dist, data, zoo
    from ._compile import _GENERAL
    from ._compile import compile as nm_compile
    from ._errors import ConfigError
    from ._io import atomic_write_json, atomic_write_text, ensure_dir
    from ._pattern import NMPattern
    from ._registry import get_method, methods
    from ._report import fmt_flops, md_table, plot_bars
    from ._trainer import SupervisedTrainer

    t_start = time.perf_counter()
    _dist.maybe_init(args.device)  # under torchrun: one process group, rank 0 logs and writes
    # Everything that can be refused is refused here, before data loading and training.
    spec = get_method(args.method)
    pattern = NMPattern.parse(args.pattern)
    key = "fashion-mnist" if args.dataset.replace("_", "-") == "fashion-mnist" else args.dataset
    d = _DEFAULTS.get(key, _DEFAULTS["fashion-mnist"])
    fields = spec.config_cls.options()
    iterative = "iterations_per_round" in fields
    for flag, value, field in (
        ("--checkpoint-dir", args.checkpoint_dir, "checkpoint_dir"),
        ("--resume", args.resume, "checkpoint_dir"),
        ("--checkpoint-every", args.checkpoint_every, "checkpoint_every"),
    ):
        if value and field not in fields:
            keeping = sorted(n for n in methods() if field in get_method(n).config_cls.options())
            raise ConfigError(
                f"{flag} applies to the methods {', '.join(keeping)}; {args.method!r} does not "
                f"take it: drop {flag}"
            )
    for flag, value in (
        ("--lr", args.lr),
        ("--batch-size", args.batch_size),
        ("--iterations", args.iterations),
        ("--checkpoint-every", args.checkpoint_every),
    ):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    # Iterative methods train from the initialisation themselves (round 0 is the dense round).
    default_pretrain = 0 if iterative else d["pretrain"]
    pretrain = default_pretrain if args.pretrain_iterations is None else args.pretrain_iterations
    if "pretrain_iterations" in fields and "checkpoint_dir" in fields and args.checkpoint_dir:
        # the method pre-trains itself, inside its checkpoints
        options_pretrain, pretrain = pretrain, 0
    else:
        options_pretrain = None
    finetune = d["finetune"] if args.finetune_iterations is None else args.finetune_iterations
    batch = args.batch_size or d["batch"]
    lr = args.lr or d["lr"]
    options = dict(args.option)
    if "finetune_iterations" in fields and not iterative:
        options.setdefault("finetune_iterations", finetune)
    if iterative:
        options.setdefault("iterations_per_round", args.iterations or d["round"])
    if args.checkpoint_dir:
        options["checkpoint_dir"] = args.checkpoint_dir
    if args.resume:
        options["resume"] = True
    if args.checkpoint_every:
        options["checkpoint_every"] = args.checkpoint_every
    if options_pretrain is not None:
        options.setdefault("pretrain_iterations", options_pretrain)
    options.setdefault("seed", args.seed)
    general = {k: v for k, v in options.items() if k in _GENERAL}
    config = spec.config_cls.from_options(
        {k: v for k, v in options.items() if k not in general}, extra_valid=_GENERAL
    )
    structured = spec.is_structured(config)

    torch.manual_seed(args.seed)
    ds = data.load(args.dataset, batch_size=batch, root=args.data_root, seed=args.seed)
    c, h, _ = ds.input_shape
    model = zoo.create(
        args.model, num_classes=ds.num_classes, in_channels=c, image_size=args.image_size or h
    )
    example = (ds.example_input(1),)
    out = ensure_dir(args.out)  # refused here, before any training, if it cannot be written
    trainer = SupervisedTrainer(
        ds.train,
        ds.val,
        lr=lr,
        milestones=(0.5, 0.75),
        device=args.device,
        progress=args.progress or None,
    )
    _log(
        f"{args.model} on {args.dataset} ({len(ds.train)} batches/epoch"
        + (f", {_dist.world_size()} ranks" if _dist.enabled() else "")
        + f"), {args.method} "
        f"{pattern if structured else 'unstructured'}, output in {out}/"
    )
    dense_acc = None
    dense_samples = 0
    if pretrain:
        t0 = time.perf_counter()

        def count(info) -> None:
            nonlocal dense_samples
            dense_samples += info.batch_size

        trainer.train(model, pretrain, count)
        dense_acc = trainer.evaluate(model)
        _log(
            f"dense training: {pretrain} iterations, accuracy {100 * dense_acc:.2f}% "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    model = model.cpu()
    t0 = time.perf_counter()
    result = nm_compile(
        model, args.method, pattern, example_inputs=example, trainer=trainer, **options
    )
    compile_s = time.perf_counter() - t0
    from ._dist import is_main

    if not is_main():  # under torchrun only rank 0 exports, times and writes the report
        return 0
    sparse_acc = result.history[-1]["accuracy"] if result.history else None
    if dense_acc is None and result.history and result.history[0]["sparsity"] == 0.0:
        dense_acc = result.history[0]["accuracy"]  # round 0 of an iterative method is dense
    _log(
        f"{args.method}: sparsity {100 * result.sparsity:.1f}% of pruned layers, accuracy "
        f"{'-' if sparse_acc is None else f'{100 * sparse_acc:.2f}%'} ({compile_s:.1f} s)"
    )

    from .runtime import export_onnx, ort_latency, speedup

    model.cpu().eval()
    result.module.cpu().eval()
    sparse_path = out / "model.onnx"
    dense_path = out / "dense.onnx"
    sparse_export = result.export_onnx(sparse_path)
    export_onnx(model, example, dense_path, verify=True)
    nm_report = sparse_export.nm_report
    nm_line = ""
    if nm_report is not None:
        pruned = {s.param for s in result.sites}
        dense_by_design = [e.initializer for e in nm_report.entries if e.initializer not in pruned]
        nm_line = (
            f"all {len(pruned)} pruned weights satisfy {pattern} in the file"
            if nm_report.satisfied(pruned)
            else nm_report.summary()
        )
        if dense_by_design:
            nm_line += f"; {len(dense_by_design)} weights left dense by design ({', '.join(dense_by_design)})"
    _log(
        f"ONNX: {sparse_path} (ONNX Runtime vs torch rel. error {sparse_export.max_rel_error:.2g})"
        + (f"; N:M check: {nm_line}" if nm_line else "")
    )

    latency = None
    if not args.no_latency:
        lat_batch = (ds.example_input(1),)
        stats = ort_latency(
            {"dense": dense_path, "sparse": sparse_path},
            lat_batch,
            warmup=10,
            repeat=args.latency_repeat,
        )
        latency = {k: v.to_json() for k, v in stats.items()}
        latency["speedup"] = speedup(stats["dense"], stats["sparse"])
        _log(
            f"ONNX Runtime CPU latency (batch 1): dense {stats['dense'].median_ms:.3f} ms, "
            f"sparse {stats['sparse'].median_ms:.3f} ms, speedup {latency['speedup']:.2f}x"
        )

    # -- outputs -----------------------------------------------------------------------------
    layers = result.layers()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(layers[0]))
    writer.writeheader()
    for row in layers:
        writer.writerow({**row, "shape": "x".join(map(str, row["shape"]))})
    atomic_write_text(out / "layers.csv", buf.getvalue())
    density = {r["layer"]: r["density"] for r in layers}
    for e in result.excluded:
        density[f"{e.name} (dense)"] = 1.0
    order = [n.target for n in result.module.graph.nodes if n.op == "call_module"]
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(density, key=lambda k: rank.get(k.removesuffix(" (dense)"), len(rank)))
    plot_bars(
        out / "sparsity.png",
        names,
        {"fraction kept": [density[k] for k in names]},
        title=f"{args.model} · {args.method} · per-layer density",
        ylabel="fraction kept",
    )
    if latency:
        plot_bars(
            out / "latency.png",
            ["median", "p90"],
            {
                name: [latency[name]["median_ms"], latency[name]["p90_ms"]]
                for name in ("dense", "sparse")
            },
            title="ONNX Runtime CPU latency, batch 1",
            ylabel="ms",
            horizontal=False,
        )
    plots = _diagnostic_plots(out, result, args)
    machine = machine_info()
    command = "nmcompile " + " ".join(shlex.quote(a) for a in argv)
    summary = {
        "command": command,
        "machine": machine,
        "model": args.model,
        "dataset": args.dataset,
        "pretrain_iterations": pretrain,
        "dense_accuracy": dense_acc,
        "compile_seconds": compile_s,
        "total_seconds": time.perf_counter() - t_start,
        **result.summary(),
        "history": result.history,
        "onnx": {
            "path": str(sparse_path),
            "dense_path": str(dense_path),
            "max_rel_error": sparse_export.max_rel_error,
            "nm_check": nm_report.to_json() if nm_report is not None else None,
        },
        "latency": latency,
    }
    atomic_write_json(out / "summary.json", summary)

    lines = [
        f"# nmcompile run: {args.model} on {args.dataset}, {args.method} "
        f"{pattern if structured else '(unstructured)'}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}  ",
        f"Wall time: {summary['total_seconds']:.1f} s (compile {compile_s:.1f} s)",
        "",
        md_table(
            ["", "accuracy", "sparsity (pruned layers)", "training FLOPs"],
            [
                [
                    "dense",
                    "-" if dense_acc is None else f"{100 * dense_acc:.2f}%",
                    "0%",
                    fmt_flops(dense_samples * result.flops.train_step()) if pretrain else "-",
                ],
                [
                    f"{args.method} {pattern if structured else ''}".strip(),
                    "-" if sparse_acc is None else f"{100 * sparse_acc:.2f}%",
                    f"{100 * result.sparsity:.1f}%",
                    fmt_flops(result.history[-1]["train_flops"]),
                ],
            ],
        ),
        "",
        "## ONNX",
        "",
        f"`{sparse_path.name}` (masks and BatchNorm folded; ONNX Runtime vs torch relative error "
        f"{sparse_export.max_rel_error:.2g}); dense reference `{dense_path.name}`.",
    ]
    if nm_report is not None:
        lines += ["", f"N:M check: {nm_line}.", "", nm_report.to_markdown()]
    if latency:
        lines += [
            "",
            "## Latency (ONNX Runtime, CPU, batch 1, same process, interleaved)",
            "",
            md_table(
                ["model", "median ms", "p90 ms", "p99 ms", "runs"],
                [
                    [
                        n,
                        latency[n]["median_ms"],
                        latency[n]["p90_ms"],
                        latency[n]["p99_ms"],
                        latency[n]["runs"],
                    ]
                    for n in ("dense", "sparse")
                ],
            ),
            "",
            f"Speedup (dense median / sparse median): {latency['speedup']:.2f}x. ONNX Runtime's CPU "
            "kernels do not skip N:M zeros, so a ratio near 1.0 is the expected result here; "
            "2:4 pays off on sparse tensor cores (TensorRT / cuSPARSELt on an NVIDIA GPU).",
            "",
            "![latency](latency.png)",
        ]
    lines += ["", "![per-layer density](sparsity.png)", ""]
    lines += [f"![{name}]({name}.png)\n" for name in plots]
    lines += ["---", "", result.report(level=2)]
    atomic_write_text(out / "report.md", "\n".join(lines))
    _log(
        f"wrote {out}/report.md, layers.csv, summary.json, plots and ONNX files "
        f"({summary['total_seconds']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
