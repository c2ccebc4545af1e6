"""Hostile inputs: each one gets a clear error (naming the layer, file or option) or is handled."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile import NonFiniteError, OutputPathError, TraceError
from nmcompile.passes import fold_batchnorm

X = torch.randn(4, 8)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
        nn.ReLU(), nn.Linear(16, 2),
    )  # fmt: skip


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named_before_anything_runs(value):
    net = mlp()
    with torch.no_grad():
        net[4].weight[3, 5] = value
    kind = "NaN" if value != value else "Inf"
    with pytest.raises(NonFiniteError, match=rf"4\.weight \(16, 16\): .*1 {kind}"):
        nmcompile.compile(net, "asp", example_inputs=(X,))


def test_non_finite_weight_in_an_excluded_layer_is_still_refused():
    """NaN * 0 is NaN: a NaN poisons the output even in a pruned or dense layer."""
    net = mlp()
    with torch.no_grad():
        net[6].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"6\.bias"):
        nmcompile.compile(net, "asp", example_inputs=(X,))


class ExplodingTrainer:
    """A user trainer whose updates overflow in its ``explode_on``-th call (the protocol, not a
    mock of ours)."""

    def __init__(self, explode_on: int = 1) -> None:
        self.explode_on, self.calls = explode_on, 0

    def train(self, model, iterations, on_step=None):
        self.calls += 1
        if self.calls < self.explode_on:
            return
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1e30).mul_(1e30)

    def evaluate(self, model):
        return 0.1


def test_divergence_during_training_stops_with_the_round_and_keeps_checkpoints(tmp_path):
    with pytest.raises(NonFiniteError, match=r"after round 0: .*training diverged"):
        nmcompile.compile(
            mlp(), "imp", example_inputs=(X,), trainer=ExplodingTrainer(),
            iterations_per_round=5,
        )  # fmt: skip
    # diverging in round 2: the rounds before it stay on disk, loadable and finite
    from nmcompile._checkpoint import find_latest, load_round

    ck = tmp_path / "ck"
    with pytest.raises(NonFiniteError, match=r"after round 2: .*training diverged"):
        nmcompile.compile(
            mlp(), "imp", example_inputs=(X,), trainer=ExplodingTrainer(explode_on=3),
            iterations_per_round=5, checkpoint_dir=str(ck),
        )  # fmt: skip
    meta = json.loads(sorted(ck.glob("round-*.json"))[-1].read_text())
    latest = find_latest(ck, {k: meta[k] for k in ("method", "config", "pattern", "sites")})
    assert latest == 2  # taken after round 2's pruning, before the training that diverged
    state = load_round(ck, latest)
    assert all(torch.isfinite(t).all() for t in state["session"]["model"].values())


def test_zero_size_layers_are_excluded_with_a_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about initialising zero-element tensors
        net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 0), nn.Linear(0, 16), nn.Linear(16, 16),
            nn.Linear(16, 2),
        )  # fmt: skip
    r = nmcompile.compile(net, "asp", example_inputs=(X,))
    assert list(r.masks) == ["4.weight"]
    reasons = {e.name: e.reason for e in r.excluded}
    assert reasons["2"] == reasons["3"] == "zero-size weight"


class ShapeBranch(nn.Module):
    """symbolic_trace refuses (control flow on a shape); torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        y = self.bn(self.c1(self.c0(x))).relu()
        if x.shape[0] > 1:
            y = y + self.c2(y)
        return self.out(self.drop(self.fc(y.mean((2, 3))).relu()))


def test_torch_export_is_the_fallback_when_symbolic_trace_refuses(tmp_path):
    torch.manual_seed(0)
    net = ShapeBranch().eval()
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"traced with torch.export \(torch.fx could not"):
        r = nmcompile.compile(net, "asp", example_inputs=(x,))
    assert sorted(r.masks) == ["c1.weight", "c2.weight", "fc.weight"]
    # module calls were restored: BatchNorm folds, dropout follows eval(), the masked model
    # equals the original with the masks applied
    assert "bn" in {n.target for n in r.masked.graph.nodes if n.op == "call_module"}
    calls = {n.target for n in r.module.graph.nodes if n.op == "call_module"}
    assert {"c0", "c1", "c2", "fc", "drop", "out"} <= calls
    ref = ShapeBranch().eval()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        for name, m in r.masks.items():
            ref.get_parameter(name).mul_(m)
        assert torch.allclose(r.masked.eval()(x), ref(x), atol=1e-5)
        assert torch.allclose(r.module.eval()(x), ref(x), atol=1e-5)
        folded = copy.deepcopy(r.module).eval()
        fold_batchnorm(folded)  # what the ONNX export does
        assert "bn" not in {n.target for n in folded.graph.nodes if n.op == "call_module"}
        assert torch.allclose(folded(x), ref(x), atol=1e-5)
    export = r.export_onnx(tmp_path / "m.onnx")
    assert export.nm_report.satisfied(set(r.masks))


def test_when_export_fails_too_both_reasons_are_given():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) if x.mean() > 0 else x  # data-dependent: neither can trace it

    net = nn.Sequential(nn.Linear(8, 8), Gate(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(TraceError, match=r"`1` \(Gate\).*torch\.export failed too"):
        nmcompile.compile(net, "asp", example_inputs=(X,))


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    class CountingTrainer(ExplodingTrainer):
        calls = 0

        def train(self, model, iterations, on_step=None):
            CountingTrainer.calls += 1

    with pytest.raises(OutputPathError, match="checkpoint folder"):
        nmcompile.compile(
            mlp(), "mimp", example_inputs=(X,), trainer=CountingTrainer(),
            checkpoint_dir=str(blocker / "ck"),
        )  # fmt: skip
    assert CountingTrainer.calls == 0


def test_wrong_example_inputs_name_the_layer():
    with pytest.raises(nmcompile.InputError, match=r"layer `0` \(Linear, in_features=8\)"):
        nmcompile.compile(mlp(), "asp", example_inputs=(torch.randn(4, 5),))


def test_empty_loader_is_named():
    from nmcompile.data import TensorLoader

    loader = TensorLoader(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), 4, shuffle=False,
                          drop_last=True)  # fmt: skip
    trainer = nmcompile.SupervisedTrainer(loader, progress=False)
    with pytest.raises(nmcompile.InputError, match="train_loader yielded no batches"):
        nmcompile.compile(mlp(), "asp", example_inputs=(X,), trainer=trainer,
                          finetune_iterations=3)  # fmt: skip
