"""Markdown tables and PNG plots for a compile result (``CompileResult.report()``, ``nmcompile run``).

matplotlib is imported only when a plot is drawn (Agg backend, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._compile import CompileResult

__all__ = ["fmt_flops", "md_table", "plot_bars", "render_markdown"]


def fmt_flops(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(i) for i in v)
    return str(v).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render_markdown(result: CompileResult, *, level: int = 1) -> str:
    """The report; ``level`` is the heading level of its title (sections go one deeper)."""
    s = result.summary()
    h1, h2 = "#" * level, "#" * (level + 1)
    out = [
        f"{h1} nmcompile: {result.model_name} · {s['method']} · {s['pattern']}",
        "",
        md_table(
            ["metric", "value"],
            [
                ["method", s["method"]],
                ["pattern", s["pattern"]],
                ["pruned layers", s["sites"]],
                ["dense layers (excluded)", s["excluded"]],
                ["sparsity of pruned layers", _pct(s["sparsity"])],
                ["accuracy", _pct(s["accuracy"])],
                ["training FLOPs (cumulative)", fmt_flops(s["train_flops"])],
                ["forward FLOPs / sample, dense", fmt_flops(s["forward_flops_dense"])],
                ["forward FLOPs / sample, sparse", fmt_flops(s["forward_flops_sparse"])],
                *(
                    [
                        [
                            "parameters, channels removed",
                            f"{s['params_before_shrink']:,} -> {s['params_after_shrink']:,}",
                        ]
                    ]
                    if "params_before_shrink" in s
                    else []
                ),
            ],
        ),
        "",
        f"{h2} Rounds",
        "",
    ]
    base = ("round", "sparsity", "accuracy", "train_flops", "iterations", "wall_s")
    extra = sorted({k for h in result.history for k in h} - set(base))
    rows = []
    for h in result.history:
        rows.append(
            [
                h["round"],
                _pct(h["sparsity"]),
                _pct(h.get("accuracy")),
                fmt_flops(h["train_flops"]),
                h.get("iterations"),
                f"{h.get('wall_s', 0.0):.1f}",
            ]
            + [h.get(k) for k in extra]
        )
    out += [
        md_table(
            ["round", "sparsity", "accuracy", "train FLOPs", "iterations", "wall s", *extra], rows
        ),
        "",
    ]
    out += [f"{h2} Pruned layers", ""]
    out.append(
        md_table(
            [
                "layer",
                "kind",
                "weight shape",
                "density",
                "N:M ok",
                "fwd FLOPs dense",
                "fwd FLOPs sparse",
            ],
            [
                [
                    r["layer"],
                    r["kind"],
                    r["shape"],
                    r["density"],
                    r["nm_ok"],
                    fmt_flops(r["forward_flops_dense"]),
                    fmt_flops(r["forward_flops_sparse"]),
                ]
                for r in result.layers()
            ],
        )
    )
    out += _diagnostics(result.diagnostics, h2)
    if result.excluded:
        out += ["", f"{h2} Layers kept dense", ""]
        out.append(
            md_table(
                ["layer", "kind", "weight shape", "reason"],
                [[e.name, e.kind, e.shape, e.reason] for e in result.excluded],
            )
        )
    return "\n".join(out) + "\n"


def _diagnostics(diag: dict[str, Any], h2: str) -> list[str]:
    out: list[str] = []
    matrix = diag.get("mask_hamming")
    if matrix:
        n = len(matrix)
        out += [
            "",
            f"{h2} Mask Hamming distance between pruning steps",
            "",
            "Fraction of all pruned-layer weights whose mask differs between the masks of two "
            "pruning steps (the mIMP paper's Figure 3).",
            "",
        ]
        if n <= 20:
            out.append(
                md_table(
                    ["step", *[str(j + 1) for j in range(n)]],
                    [[i + 1, *[f"{v:.3f}" for v in row]] for i, row in enumerate(matrix)],
                )
            )
        else:
            consecutive = [matrix[i][i + 1] for i in range(n - 1)]
            out.append(
                f"{n} steps; first vs last {matrix[0][-1]:.3f}; consecutive steps "
                f"{min(consecutive):.3f}-{max(consecutive):.3f}."
            )
    rates = diag.get("plp_misprediction")
    if rates:
        out += [
            "",
            f"{h2} PLP misprediction",
            "",
            f"Per pruning step, the fraction of the weights proactive local pruning would have "
            f"removed (alpha = {diag.get('plp_alpha')}) that mIMP kept to the end (the mIMP "
            "paper's Figure 4).",
            "",
        ]
        out.append(
            md_table(
                ["step", "misprediction"],
                [[i + 1, "-" if r is None else f"{100 * r:.2f}%"] for i, r in enumerate(rates)],
            )
        )
    return out


def plot_bars(
    path: str | Path,
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    horizontal: bool | None = None,
) -> Path:
    """A grouped bar chart saved as PNG (one group per label, one bar per series)."""
    plt = _figure()
    n = len(labels)
    horizontal = n > 12 if horizontal is None else horizontal
    k = max(len(series), 1)
    width = 0.8 / k
    size = (8, max(3.0, 0.28 * n + 1.5)) if horizontal else (max(6.0, 0.5 * n + 2), 4.5)
    fig, ax = plt.subplots(figsize=size)
    for i, (name, values) in enumerate(series.items()):
        pos = [j + (i - (k - 1) / 2) * width for j in range(n)]
        if horizontal:
            ax.barh(pos, values, height=width, label=name)
        else:
            ax.bar(pos, values, width=width, label=name)
    if horizontal:
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
    else:
        ax.set_xticks(range(n), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    return _save(fig, plt, path)


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:
    from ._io import atomic_path

    try:
        with atomic_path(path, what="plot") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_lines(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """Line chart, one line per series, saved as PNG."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        ax.plot(list(x), list(values), marker="o", markersize=3, label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_heatmap(
    path: str | Path, matrix: Sequence[Sequence[float]], *, title: str, label: str
) -> Path:
    """A square matrix as a heatmap with a colour bar, saved as PNG."""
    plt = _figure()
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(matrix, cmap="viridis", origin="upper", extent=(0.5, n + 0.5, n + 0.5, 0.5))
    fig.colorbar(im, ax=ax, label="fraction of weights")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)
    ax.set_ylabel(label)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)
