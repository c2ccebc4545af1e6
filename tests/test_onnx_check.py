"""Tests for ``nmcompile.runtime.onnx_check``: the N:M checker for arbitrary ONNX files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from nmcompile import NMPattern, OnnxFileError
from nmcompile.runtime.onnx_check import OnnxNMEntry, OnnxNMReport, check_onnx

RNG_SEED = 1234


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def dense(shape: Sequence[int], seed: int = RNG_SEED) -> np.ndarray:
    """Random float32 weights, none of them zero (magnitudes in [0.5, 1.5])."""
    rng = np.random.default_rng(seed)
    mag = rng.uniform(0.5, 1.5, size=tuple(shape))
    sign = rng.choice([-1.0, 1.0], size=tuple(shape))
    return (mag * sign).astype(np.float32)


def nm_prune(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the ``n`` largest |w| in every group of ``m`` along ``axis`` (numpy, vectorised)."""
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    pruned = np.where(keep, groups, np.zeros_like(groups)).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(pruned, -1, axis))


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    outputs: Sequence[str] = ("Y",),
    opset: int = 21,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def x_input(name: str = "X", elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None)


def conv_model(weight: np.ndarray, group: int = 1, name: str = "W") -> onnx.ModelProto:
    node = helper.make_node("Conv", ["X", name], ["Y"], name="conv", group=group)
    return make_model([node], [x_input()], [numpy_helper.from_array(weight, name)])


def gemm_model(b: np.ndarray, trans_b: int) -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["X", "B"], ["Y"], name="gemm", transB=trans_b)
    return make_model([node], [x_input()], [numpy_helper.from_array(b, "B")])


def matmul_model(b: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["X", "B"], ["Y"], name="mm")
    return make_model([node], [x_input()], [numpy_helper.from_array(b, "B")])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, path)
    return path


def only(report: OnnxNMReport) -> OnnxNMEntry:
    assert len(report.entries) == 1, report.entries
    return report.entries[0]


# ----------------------------------------------------------------------------------------------
# 1. Conv: the reduction axis is axis 1
# ----------------------------------------------------------------------------------------------


def test_conv_compliant_along_input_channels_is_ok(tmp_path: Path) -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    report = check_onnx(save(conv_model(w), tmp_path / "conv.onnx"), "2:4")
    entry = only(report)
    assert entry.status == "ok" and entry.ok and report.ok
    assert (entry.initializer, entry.node, entry.op_type) == ("W", "conv", "Conv")
    assert entry.axis == 1 and entry.shape == (8, 16, 3, 3) and entry.dtype == "float32"
    assert entry.groups == 8 * 4 * 3 * 3 and entry.violations == 0
    assert entry.density == pytest.approx(0.5)
    assert report.path == str(tmp_path / "conv.onnx")
    assert report.pattern == NMPattern(2, 4)


def test_conv_compliant_only_along_last_axis_violates(tmp_path: Path) -> None:
    # Nonzeros only at kernel columns 0 and 1: 2:4 along the last axis (kw = 4), but every group
    # of 4 input channels at those columns is fully dense.
    w = dense([8, 16, 3, 4])
    w[..., 2:] = 0.0
    assert np.count_nonzero(w.reshape(-1, 4), axis=1).max() == 2  # 2:4 along the last axis
    entry = only(check_onnx(conv_model(w), "2:4"))
    assert entry.status == "violates" and not entry.ok
    assert entry.axis == 1
    assert entry.groups == 8 * 4 * 3 * 4
    assert entry.violations == 8 * 4 * 3 * 2  # every group at kernel columns 0 and 1


def test_grouped_conv_is_recorded_and_checked() -> None:
    ok = nm_prune(dense([8, 4, 3, 3]), 2, 4, axis=1)
    entry = only(check_onnx(conv_model(ok, group=4), "2:4"))
    assert entry.group == 4 and entry.ok
    bad = dense([8, 4, 3, 3])
    entry = only(check_onnx(conv_model(bad, group=4), "2:4"))
    assert entry.group == 4 and entry.status == "violates" and entry.violations == 8 * 3 * 3


# ----------------------------------------------------------------------------------------------
# 2./3. Gemm and MatMul
# ----------------------------------------------------------------------------------------------


def test_gemm_trans_b_1_reduces_along_axis_1() -> None:
    b = nm_prune(dense([6, 8]), 2, 4, axis=1)  # [out, in]
    entry = only(check_onnx(gemm_model(b, trans_b=1), "2:4"))
    assert entry.ok and entry.axis == 1 and entry.groups == 6 * 2
    b_bad = nm_prune(dense([8, 8]), 2, 4, axis=0)  # compliant along the wrong axis
    assert np.count_nonzero(b_bad.reshape(8, 2, 4), axis=2).max() > 2
    entry = only(check_onnx(gemm_model(b_bad, trans_b=1), "2:4"))
    assert entry.status == "violates" and entry.axis == 1 and entry.violations > 0


def test_gemm_trans_b_0_reduces_along_axis_0() -> None:
    b = nm_prune(dense([8, 12]), 2, 4, axis=0)  # [in, out]
    entry = only(check_onnx(gemm_model(b, trans_b=0), "2:4"))
    assert entry.ok and entry.axis == 0 and entry.groups == 2 * 12
    b_bad = nm_prune(dense([8, 12]), 2, 4, axis=1)
    entry = only(check_onnx(gemm_model(b_bad, trans_b=0), "2:4"))
    assert entry.status == "violates" and entry.axis == 0 and entry.violations > 0
    # no transB attribute at all means transB = 0
    node = helper.make_node("Gemm", ["X", "B"], ["Y"])
    model = make_model([node], [x_input()], [numpy_helper.from_array(b, "B")])
    entry = only(check_onnx(model, "2:4"))
    assert entry.ok and entry.axis == 0 and entry.node == "Gemm_0"


def test_matmul_constant_b_reduces_along_axis_minus_2() -> None:
    b = nm_prune(dense([8, 5]), 2, 4, axis=0)  # [K, N]
    entry = only(check_onnx(matmul_model(b), "2:4"))
    assert entry.ok and entry.axis == 0 and entry.groups == 2 * 5
    entry = only(check_onnx(matmul_model(np.ascontiguousarray(b.T)), "2:4"))
    assert entry.status == "not-divisible"  # [5, 8]: K = 5
    b3 = nm_prune(dense([3, 8, 5]), 2, 4, axis=1)  # batched [batch, K, N]
    entry = only(check_onnx(matmul_model(b3), "2:4"))
    assert entry.ok and entry.axis == 1
    entry = only(check_onnx(matmul_model(nm_prune(dense([3, 8, 8]), 2, 4, axis=2)), "2:4"))
    assert entry.status == "violates" and entry.axis == 1


# ----------------------------------------------------------------------------------------------
# 4. Constants followed through Cast, Transpose, DequantizeLinear, Identity, Constant
# ----------------------------------------------------------------------------------------------


def test_constant_through_cast() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    nodes = [
        helper.make_node("Cast", ["W"], ["W16"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["X", "W16"], ["Y"], name="conv"),
    ]
    model = make_model(
        nodes, [x_input(elem=TensorProto.FLOAT16)], [numpy_helper.from_array(w, "W")]
    )
    entry = only(check_onnx(model, "2:4"))
    assert entry.ok and entry.initializer == "W" and entry.dtype == "float32" and entry.axis == 1
    assert "Cast" in entry.detail


def test_cast_is_evaluated_so_fp16_underflow_counts_as_zero() -> None:
    # The pruned slots hold 1e-10: nonzero in fp32, zero after the Cast to fp16 the Conv sees.
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    w[w == 0] = 1e-10
    direct = only(check_onnx(conv_model(w), "2:4"))
    assert direct.status == "violates" and direct.violations == direct.groups
    nodes = [
        helper.make_node("Cast", ["W"], ["W16"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["X", "W16"], ["Y"]),
    ]
    model = make_model(nodes, [x_input()], [numpy_helper.from_array(w, "W")])
    assert only(check_onnx(model, "2:4")).ok


def test_constant_through_transpose_maps_the_axis() -> None:
    # W0 [N, K] --Transpose(perm=[1, 0])--> [K, N] --> MatMul B: reduction axis 0 of B is axis 1
    # of the initializer.
    w0 = nm_prune(dense([5, 8]), 2, 4, axis=1)
    for perm in ([1, 0], None):
        kwargs = {} if perm is None else {"perm": perm}
        nodes = [
            helper.make_node("Transpose", ["W0"], ["WT"], **kwargs),
            helper.make_node("MatMul", ["X", "WT"], ["Y"]),
        ]
        model = make_model(nodes, [x_input()], [numpy_helper.from_array(w0, "W0")])
        entry = only(check_onnx(model, "2:4"))
        assert entry.ok and entry.initializer == "W0" and entry.axis == 1
        assert entry.shape == (5, 8)
    bad = nm_prune(dense([8, 8]), 2, 4, axis=0)
    nodes = [
        helper.make_node("Transpose", ["W0"], ["WT"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "WT"], ["Y"]),
    ]
    model = make_model(nodes, [x_input()], [numpy_helper.from_array(bad, "W0")])
    entry = only(check_onnx(model, "2:4"))
    assert entry.status == "violates" and entry.axis == 1


def test_transpose_of_a_4d_conv_weight() -> None:
    # The initializer is stored [C, K, kh, kw]; perm [1, 0, 2, 3] makes it [K, C, kh, kw].
    w = nm_prune(dense([16, 8, 3, 3]), 2, 4, axis=0)
    nodes = [
        helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["X", "W"], ["Y"]),
    ]
    model = make_model(nodes, [x_input()], [numpy_helper.from_array(w, "Wt")])
    entry = only(check_onnx(model, "2:4"))
    assert entry.ok and entry.axis == 0 and entry.shape == (16, 8, 3, 3)


def _dq_conv_model(q: np.ndarray, zero_point: np.ndarray | None, axis: int = 1) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(q, "Wq"),
        numpy_helper.from_array(np.asarray(0.05, dtype=np.float32), "scale"),
    ]
    inputs = ["Wq", "scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zp"))
        inputs.append("zp")
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["W"], axis=axis),
        helper.make_node("Conv", ["X", "W"], ["Y"]),
    ]
    return make_model(nodes, [x_input()], inits)


def test_constant_through_dequantize_linear_int8() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    q = np.clip(np.round(w / 0.05), -127, 127).astype(np.int8)
    assert np.array_equal(q != 0, w != 0)
    entry = only(check_onnx(_dq_conv_model(q, np.asarray(0, dtype=np.int8)), "2:4"))
    assert entry.ok and entry.initializer == "Wq" and entry.dtype == "int8" and entry.axis == 1
    assert only(check_onnx(_dq_conv_model(q, None), "2:4")).ok
    dense_q = np.clip(np.round(dense([8, 16, 3, 3]) / 0.05), -127, 127).astype(np.int8)
    entry = only(check_onnx(_dq_conv_model(dense_q, None), "2:4"))
    assert entry.status == "violates" and entry.dtype == "int8"


def test_dequantize_linear_zero_point_defines_zero() -> None:
    # uint8 with zero point 128: the pruned slots hold 128, which dequantizes to exactly 0.
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    q = (np.round(w / 0.05) + 128).astype(np.uint8)
    assert only(check_onnx(_dq_conv_model(q, np.asarray(128, dtype=np.uint8)), "2:4")).ok
    entry = only(check_onnx(_dq_conv_model(q, np.asarray(0, dtype=np.uint8)), "2:4"))
    assert entry.status == "violates" and entry.violations == entry.groups
    # per-output-channel zero points along axis 0
    zps = np.arange(8, dtype=np.uint8) + 100
    q_axis = (np.round(w / 0.05) + zps[:, None, None, None]).astype(np.uint8)
    assert only(check_onnx(_dq_conv_model(q_axis, zps, axis=0), "2:4")).ok


def test_constant_node_and_identity() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "Wc")),
        helper.make_node("Identity", ["Wc"], ["W"]),
        helper.make_node("Conv", ["X", "W"], ["Y"]),
    ]
    entry = only(check_onnx(make_model(nodes, [x_input()], []), "2:4"))
    assert entry.ok and entry.initializer == "Wc" and entry.node == "Conv_2"


def test_initializer_also_listed_as_graph_input_is_constant() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    model = make_model(
        [helper.make_node("Conv", ["X", "W"], ["Y"])],
        [x_input(), helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape))],
        [numpy_helper.from_array(w, "W")],
        opset=9,
    )
    assert only(check_onnx(model, "2:4")).ok


def test_weight_inside_a_subgraph_uses_outer_scope_constant() -> None:
    w = nm_prune(dense([6, 8]), 2, 4, axis=1)
    then_graph = helper.make_graph(
        [helper.make_node("Gemm", ["X", "B"], ["Yt"], transB=1)],
        "then",
        [],
        [helper.make_tensor_value_info("Yt", TensorProto.FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Ye"])],
        "else",
        [],
        [helper.make_tensor_value_info("Ye", TensorProto.FLOAT, None)],
    )
    node = helper.make_node(
        "If", ["cond"], ["Y"], name="if", then_branch=then_graph, else_branch=else_graph
    )
    model = make_model(
        [node],
        [x_input(), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [numpy_helper.from_array(w, "B")],
    )
    entry = only(check_onnx(model, "2:4"))
    assert entry.ok and entry.node == "if/then_branch/Gemm_0" and entry.axis == 1


# ----------------------------------------------------------------------------------------------
# 5. fp16 / bf16 / -0.0
# ----------------------------------------------------------------------------------------------


def test_fp16_with_negative_zero() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1).astype(np.float16)
    w[w == 0] = np.float16(-0.0)
    assert np.signbit(w[w == 0]).all()
    entry = only(check_onnx(conv_model(w), "2:4"))
    assert entry.ok and entry.dtype == "float16" and entry.density == pytest.approx(0.5)


def _bf16_bits(w: np.ndarray) -> np.ndarray:
    return (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _bf16_model(bits: np.ndarray, raw: bool) -> onnx.ModelProto:
    if raw:
        tensor = helper.make_tensor("W", TensorProto.BFLOAT16, bits.shape, bits.tobytes(), raw=True)
    else:
        # bf16 bit patterns stored one per int32_data entry, as onnx does without raw data
        tensor = TensorProto(name="W", data_type=TensorProto.BFLOAT16, dims=bits.shape)
        tensor.int32_data.extend(bits.reshape(-1).astype(np.int32).tolist())
    node = helper.make_node("Conv", ["X", "W"], ["Y"])
    return make_model([node], [x_input(elem=TensorProto.BFLOAT16)], [tensor])


@pytest.mark.parametrize("raw", [True, False])
def test_bf16_with_negative_zero(raw: bool) -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    bits = _bf16_bits(w)
    bits[w == 0] = 0x8000  # -0.0 in bfloat16
    entry = only(check_onnx(_bf16_model(bits, raw), "2:4"))
    assert entry.ok and entry.dtype == "bfloat16" and entry.density == pytest.approx(0.5)
    # the smallest bf16 subnormal (bits 0x0001) is nonzero: one extra nonzero in one group
    bits.reshape(-1)[int(np.flatnonzero(w.reshape(-1) == 0)[0])] = 0x0001
    entry = only(check_onnx(_bf16_model(bits, raw), "2:4"))
    assert entry.status == "violates" and entry.violations == 1


def test_float64_and_nan_counts_as_nonzero() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1).astype(np.float64)
    assert only(check_onnx(conv_model(w), "2:4")).ok
    w[0, 0, 0, 0] = w[0, 1, 0, 0] = w[0, 2, 0, 0] = w[0, 3, 0, 0] = np.nan
    entry = only(check_onnx(conv_model(w), "2:4"))
    assert entry.status == "violates" and entry.violations == 1


# ----------------------------------------------------------------------------------------------
# 6. Not divisible, not constant
# ----------------------------------------------------------------------------------------------


def test_not_divisible_reduction_dim() -> None:
    w = dense([4, 6, 3, 3])
    report = check_onnx(conv_model(w), "2:4")
    entry = only(report)
    assert entry.status == "not-divisible" and not entry.ok and entry.axis == 1
    assert entry.density == pytest.approx(1.0)
    assert not report.ok  # nothing was checked
    assert "not divisible by 4" in report.summary()


def test_operand_from_graph_input_or_computed_is_not_constant() -> None:
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")
    model = make_model([node], [x_input(), x_input("W")], [])
    report = check_onnx(model, "2:4")
    entry = only(report)
    assert entry.status == "not-constant" and entry.initializer == "W" and entry.axis is None
    assert "graph input" in entry.detail
    assert not report.ok

    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    nodes = [
        helper.make_node("Mul", ["W0", "two"], ["W"]),
        helper.make_node("Conv", ["X", "W"], ["Y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "W0"),
        numpy_helper.from_array(np.asarray(2.0, np.float32), "two"),
    ]
    entry = only(check_onnx(make_model(nodes, [x_input()], inits), "2:4"))
    assert entry.status == "not-constant" and "Mul" in entry.detail


def test_conv_transpose_and_matmul_a_are_not_checked() -> None:
    w = dense([16, 8, 3, 3])
    nodes = [
        helper.make_node("ConvTranspose", ["X", "W"], ["Y1"]),
        helper.make_node("MatMul", ["A", "X"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(dense([4, 8]), "A")]
    report = check_onnx(make_model(nodes, [x_input()], inits), "2:4")
    assert [e.status for e in report.entries] == ["not-constant"]  # only MatMul's B (= X)


# ----------------------------------------------------------------------------------------------
# 7. Other patterns
# ----------------------------------------------------------------------------------------------


def test_pattern_1_4() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 1, 4, axis=1)
    assert only(check_onnx(conv_model(w), "1:4")).ok
    assert only(check_onnx(conv_model(w), NMPattern(2, 4))).ok  # 1:4 implies 2:4
    w2 = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    entry = only(check_onnx(conv_model(w2), "1:4"))
    assert entry.status == "violates" and entry.violations == entry.groups


def test_pattern_2_8() -> None:
    w = dense([8, 16, 3, 3])
    w[:, [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15]] = 0.0  # channels 0,1 and 8,9 survive
    entry = only(check_onnx(conv_model(w), "2:8"))
    assert entry.ok and entry.groups == 8 * 2 * 3 * 3
    entry = only(check_onnx(conv_model(w), "1:4"))  # channels 0 and 1 share a group of 4
    assert entry.status == "violates" and entry.violations == 8 * 2 * 3 * 3
    entry = only(check_onnx(conv_model(dense([8, 12, 1, 1])), "2:8"))
    assert entry.status == "not-divisible"


# ----------------------------------------------------------------------------------------------
# Report API
# ----------------------------------------------------------------------------------------------


def _two_layer_model(w_ok: np.ndarray, w_bad: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["X", "good"], ["H"], name="c1"),
        helper.make_node("Conv", ["H", "bad"], ["Y"], name="c2"),
    ]
    inits = [numpy_helper.from_array(w_ok, "good"), numpy_helper.from_array(w_bad, "bad")]
    return make_model(nodes, [x_input()], inits)


def test_report_summary_markdown_json_and_satisfied() -> None:
    w_ok = nm_prune(dense([16, 8, 3, 3]), 2, 4, axis=1)
    w_bad = dense([8, 16, 3, 3])
    report = check_onnx(_two_layer_model(w_ok, w_bad), "2:4")
    assert report.path == "<model>"
    assert not report.ok
    assert [e.initializer for e in report.compliant] == ["good"]
    assert [e.initializer for e in report.violating] == ["bad"]
    assert report.summary() == "1/2 weights satisfy 2:4 (1 violate: bad (288 of 288 groups))"
    md = report.to_markdown()
    assert "| initializer | op | shape | axis | groups | violations | density | status |" in md
    assert "| bad | Conv `c2` | 8×16×3×3 | 1 | 288 | 288 | 1.000 | violates |" in md
    data = json.loads(json.dumps(report.to_json()))
    assert data["pattern"] == "2:4" and data["ok"] is False
    assert data["entries"][0]["shape"] == [16, 8, 3, 3]
    assert report.satisfied(["good"])
    assert report.satisfied("good")
    assert not report.satisfied(["good", "bad"])
    assert not report.satisfied(["good", "renamed.weight"])  # a missing weight is not satisfied
    good_report = check_onnx(_two_layer_model(w_ok, nm_prune(w_bad, 2, 4, axis=1)), "2:4")
    assert good_report.ok and good_report.summary() == "2/2 weights satisfy 2:4"


def test_empty_graph_report() -> None:
    model = make_model([], [x_input()], [], outputs=("X",))
    report = check_onnx(model, "2:4")
    assert report.entries == () and not report.ok
    assert "no Conv/MatMul/Gemm weights found" in report.summary()


# ----------------------------------------------------------------------------------------------
# External data, corrupt tensors
# ----------------------------------------------------------------------------------------------


def test_external_data_loaded_and_missing_or_short(tmp_path: Path) -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        conv_model(w),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.bin",
        size_threshold=0,
    )
    assert (tmp_path / "ext.bin").stat().st_size == w.nbytes
    assert only(check_onnx(path, "2:4")).ok
    assert only(check_onnx(str(path), "2:4")).ok

    in_memory = onnx.load_model(path, load_external_data=False)
    entry = only(check_onnx(in_memory, "2:4"))
    assert entry.status.startswith("error:") and "pass the .onnx path" in entry.status

    (tmp_path / "ext.bin").write_bytes(w.tobytes()[:100])
    entry = only(check_onnx(path, "2:4"))
    assert entry.status.startswith("error:") and "truncated" in entry.status

    (tmp_path / "ext.bin").unlink()
    report = check_onnx(path, "2:4")
    entry = only(report)
    assert entry.status.startswith("error:") and "missing" in entry.status
    assert entry.initializer == "W" and not report.ok
    assert "1 unreadable" in report.summary()


def test_absurd_dims_do_not_allocate() -> None:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[10**6, 10**6, 1, 1])
    tensor.raw_data = b"\0" * 64
    model = make_model([helper.make_node("Conv", ["X", "W"], ["Y"])], [x_input()], [tensor])
    entry = only(check_onnx(model, "2:4"))
    assert entry.status.startswith("error:") and "need" in entry.status

    typed = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[10**9, 8])
    typed.float_data.extend([1.0] * 8)
    model = make_model([helper.make_node("Gemm", ["X", "W"], ["Y"])], [x_input()], [typed])
    entry = only(check_onnx(model, "2:4"))
    assert entry.status.startswith("error:")

    neg = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[-4, 4])
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [x_input()], [neg])
    assert only(check_onnx(model, "2:4")).status.startswith("error:")


def test_one_bad_node_does_not_hide_the_others() -> None:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    string_tensor = helper.make_tensor("S", TensorProto.STRING, [1], [b"x"])
    nodes = [
        helper.make_node("MatMul", ["X", "S"], ["H"]),
        helper.make_node("Transpose", ["W"], ["WT"], perm=[0, 0, 1, 2]),  # not a permutation
        helper.make_node("Conv", ["H", "WT"], ["H2"]),
        helper.make_node("Conv", ["H2", "W"], ["Y"], name="good"),
        helper.make_node("Conv", ["H2"], ["Y2"]),  # no weight input
    ]
    inits = [numpy_helper.from_array(w, "W"), string_tensor]
    report = check_onnx(make_model(nodes, [x_input()], inits), "2:4")
    statuses = [e.status for e in report.entries]
    assert len(statuses) == 4
    assert statuses[0].startswith("error:") and "string" in statuses[0]
    assert statuses[1].startswith("error:") and "perm" in statuses[1]
    assert statuses[2] == "ok"
    assert statuses[3].startswith("error:") and "no weight input" in statuses[3]
    assert report.ok  # the only checked entry is ok


# ----------------------------------------------------------------------------------------------
# 8. A real torch export
# ----------------------------------------------------------------------------------------------


def _pruned_torch_model(half: bool):  # -> tuple[torch.nn.Module, torch.Tensor]
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 8),
    ).eval()
    with torch.no_grad():
        for layer in (model[0], model[3]):
            w = layer.weight.detach().cpu().numpy()
            layer.weight.copy_(torch.from_numpy(nm_prune(w, 2, 4, axis=1)))
    x = torch.randn(1, 8, 6, 6)
    if half:
        model, x = model.half(), x.half()
    return model, x


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_torch_export_is_found_and_ok(tmp_path: Path, half: bool) -> None:
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    model, x = _pruned_torch_model(half)
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    report = check_onnx(path, "2:4")
    weights = [name for name, p in model.named_parameters() if p.dim() > 1]
    assert weights == ["0.weight", "3.weight"]
    assert report.ok, report.to_markdown()
    assert len(report.compliant) == 2
    assert report.satisfied(weights), report.to_markdown()
    assert {e.dtype for e in report.compliant} == {"float16" if half else "float32"}
    assert {e.op_type for e in report.compliant} <= {"Conv", "Gemm", "MatMul"}
    assert not check_onnx(path, "1:4").ok
    if not half:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 9. Bad files
# ----------------------------------------------------------------------------------------------


def _valid_bytes() -> bytes:
    w = nm_prune(dense([8, 16, 3, 3]), 2, 4, axis=1)
    return conv_model(w).SerializeToString()


def _expect_file_error(path: Path, *words: str) -> str:
    with pytest.raises(OnnxFileError) as info:
        check_onnx(path, "2:4")
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


def test_missing_path(tmp_path: Path) -> None:
    _expect_file_error(tmp_path / "nope.onnx", "no such file")


def test_directory(tmp_path: Path) -> None:
    _expect_file_error(tmp_path, "directory")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _expect_file_error(path, "empty")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("hello world\nthis is not a model\n")
    _expect_file_error(path, "not an ONNX model")


@pytest.mark.parametrize("text", [b"Hi", b"(1(2(3", b"2\x00"])
def test_text_that_parses_as_an_empty_model_proto(tmp_path: Path, text: bytes) -> None:
    # "Hi" is field 9 (unknown) as a varint; "(1" sets model_version = 49; "2\x00" is an empty
    # doc_string: all parse as a ModelProto with no graph nodes and no opset_import.
    model = onnx.load_model_from_string(text)
    assert len(model.graph.node) == 0 and len(model.opset_import) == 0
    path = tmp_path / "tiny.onnx"
    path.write_bytes(text)
    _expect_file_error(path, "not an ONNX model", "no graph nodes")


def test_truncated_file(tmp_path: Path) -> None:
    data = _valid_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _expect_file_error(path, "truncated")


def test_random_binary_and_pickle(tmp_path: Path) -> None:
    path = tmp_path / "noise.onnx"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    _expect_file_error(path)
    path.write_bytes(b"\x80\x04\x95" + b"\0" * 32)
    _expect_file_error(path, "pickle")


def test_text_format_model_is_accepted(tmp_path: Path) -> None:
    w = nm_prune(dense([4, 8, 1, 1]), 2, 4, axis=1)
    path = tmp_path / "model.textproto"
    onnx.save_model(conv_model(w), path, format="textproto")
    assert only(check_onnx(path, "2:4")).ok


# ----------------------------------------------------------------------------------------------
# 10. Property test: numpy-built N:M masks pass, one extra nonzero gives exactly one violation
# ----------------------------------------------------------------------------------------------

PATTERNS = [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 8),
    g=st.integers(1, 6),
    kernel=st.integers(1, 3),
    nm=st.sampled_from(PATTERNS),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_nm_masks_pass_and_one_extra_nonzero_violates(
    k: int, g: int, kernel: int, nm: tuple[int, int], seed: int, data: st.DataObject
) -> None:
    n, m = nm
    shape = (k, m * g, kernel, kernel)
    w = nm_prune(dense(shape, seed), n, m, axis=1)
    entry = only(check_onnx(conv_model(w), f"{n}:{m}"))
    assert entry.ok, entry
    assert entry.groups == k * g * kernel * kernel
    assert entry.density == pytest.approx(n / m)
    zeros = np.flatnonzero(w.reshape(-1) == 0)
    pos = zeros[data.draw(st.integers(0, len(zeros) - 1), label="pruned position")]
    w.reshape(-1)[pos] = data.draw(st.sampled_from([1e-30, -2.0, 0.75, np.inf]), label="value")
    entry = only(check_onnx(conv_model(w), f"{n}:{m}"))
    assert entry.status == "violates" and entry.violations == 1, entry


# ----------------------------------------------------------------------------------------------
# 11. Fuzz: mutated files give a report or OnnxFileError, nothing else
# ----------------------------------------------------------------------------------------------


def _fuzz_seed_model() -> bytes:
    """A small model touching every code path: Conv, Gemm, MatMul, Cast, Transpose, DQ."""
    w = nm_prune(dense([4, 8, 1, 2]), 2, 4, axis=1)
    b = nm_prune(dense([4, 8]), 2, 4, axis=1)
    q = np.round(nm_prune(dense([8, 4]), 2, 4, axis=0) * 10).astype(np.int8)
    nodes = [
        helper.make_node("Cast", ["W"], ["W16"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["X", "W16"], ["H1"], group=1),
        helper.make_node("Transpose", ["B"], ["BT"], perm=[1, 0]),
        helper.make_node("MatMul", ["H1", "BT"], ["H2"]),
        helper.make_node("DequantizeLinear", ["Q", "s", "zp"], ["QD"]),
        helper.make_node("Gemm", ["H2", "QD"], ["Y"], transB=0),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(q, "Q"),
        numpy_helper.from_array(np.asarray(0.1, np.float32), "s"),
        numpy_helper.from_array(np.asarray(0, np.int8), "zp"),
    ]
    model = make_model(nodes, [x_input()], inits)
    report = check_onnx(model, "2:4")
    assert [e.status for e in report.entries] == ["ok", "ok", "ok"]
    return model.SerializeToString()


FUZZ_BASE = _fuzz_seed_model()


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.one_of(st.none(), st.integers(1, len(FUZZ_BASE))),
    nm=st.sampled_from(["2:4", "1:4", "2:8"]),
)
def test_fuzz_mutated_files_report_or_onnx_file_error(
    tmp_path: Path, edits: list[tuple[int, int]], cut: int | None, nm: str
) -> None:
    data = bytearray(FUZZ_BASE)
    for pos, value in edits:
        data[pos] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(bytes(data))
    try:
        report = check_onnx(path, nm)
    except OnnxFileError as exc:
        assert str(path) in str(exc)
        assert "could not analyse" not in str(exc)  # the last-resort guard never fires
        return
    json.dumps(report.to_json())
    report.to_markdown()
    assert isinstance(report.ok, bool)
    for entry in report.entries:
        assert isinstance(entry.initializer, str) and isinstance(entry.node, str)
        assert entry.status in ("ok", "violates", "not-divisible", "not-constant") or (
            entry.status.startswith("error: ")
        )


def test_check_onnx_rejects_non_path_argument() -> None:
    with pytest.raises(TypeError):
        check_onnx(42, "2:4")  # type: ignore[arg-type]
    assert os.path.exists(__file__)
