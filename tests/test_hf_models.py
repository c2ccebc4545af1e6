"""Models nobody here wrote: Hugging Face transformers, timm and torchvision, tiny configs with
their library defaults otherwise (``use_cache`` on, sdpa attention, tied embeddings).

Each model: compiled with ``asp`` 2:4 and no trainer; every conv, linear and transformers
``Conv1D`` is a site or excluded with a reason; ``masked`` and ``module`` agree; fp32 and fp16
ONNX files hold the N:M weights; text models run at a second sequence length, in torch and in
ONNX Runtime.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import nmcompile
from nmcompile import InputError, NMCompileWarning, NMPattern

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

P24 = NMPattern(2, 4)
VOCAB = 1000


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg), (_ids(2, 16),)


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg), (_ids(2, 16),)


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg), (_ids(2, 16),)


def _t5():
    cfg = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB
    )
    # keyword inputs, as a tokenizer gives them: bound to forward(input_ids, attention_mask, ...)
    return transformers.T5ForConditionalGeneration(cfg), {
        "input_ids": _ids(2, 16),
        "decoder_input_ids": _ids(2, 8),
    }


def _vit():
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    net = SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4],
        window_size=[4, 4], num_classes=10,
    )  # fmt: skip
    return net, (torch.randn(2, 3, 64, 64),)


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    blocks = [CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 1), CNBlockConfig(128, 256, 1)]
    return ConvNeXt([*blocks, CNBlockConfig(256, None, 1)], num_classes=10), (
        torch.randn(2, 3, 64, 64),
    )


def _timm_swin():
    net = timm.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
        img_size=64, window_size=4, num_classes=10,
    )  # fmt: skip
    return net, (torch.randn(2, 3, 64, 64),)


def _timm_convnext():
    net = timm.create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(32, 64, 128, 256))
    return net, (torch.randn(2, 3, 64, 64),)


MODELS = {
    "bert": _bert,
    "gpt2": _gpt2,
    "llama": _llama,
    "t5": _t5,
    "vit": _vit,
    "tv_swin": _tv_swin,
    "tv_convnext": _tv_convnext,
    "timm_swin": _timm_swin,
    "timm_convnext": _timm_convnext,
}
TEXT = {"bert", "gpt2", "llama", "t5"}


def _weight_layers(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or type(m).__name__ == "Conv1D"
    ]


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


_CACHE: dict[str, tuple] = {}


def _compiled(name: str):
    if name not in _CACHE:
        torch.manual_seed(0)
        model, inputs = MODELS[name]()
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NMCompileWarning)
            result = nmcompile.compile(model, "asp", "2:4", example_inputs=inputs)
        _CACHE[name] = (model, inputs, result)
    return _CACHE[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_weight_layer_is_a_site_or_excluded_with_a_reason(name: str) -> None:
    model, inputs, r = _compiled(name)
    accounted = {s.name for s in r.sites} | {a for s in r.sites for a in s.aliases}
    accounted |= {e.name for e in r.excluded}
    missing = [n for n in _weight_layers(model) if n not in accounted]
    assert not missing, f"{name}: weight layers neither pruned nor excluded: {missing}"
    assert all(e.reason for e in r.excluded)
    assert r.sites and r.sparsity == pytest.approx(0.5)
    report = r.report()
    for e in r.excluded:
        assert e.name in report
    # the masks are what the module computes with
    args = inputs if isinstance(inputs, tuple) else ()
    kwargs = inputs if isinstance(inputs, dict) else {}
    with torch.no_grad():
        a = _logits(r.masked.eval()(*args, **kwargs))
        b = _logits(r.module.eval()(*args, **kwargs))
    assert torch.allclose(a, b, atol=1e-5)


def test_roles_and_layouts_of_transformer_layers() -> None:
    _, _, bert = _compiled("bert")
    names = {s.name for s in bert.sites}
    # an attention projection is never the stem: layer 0's query is pruned with its siblings
    assert "bert.encoder.layer.0.attention.self.query" in names
    assert {e.name: e.reason for e in bert.excluded}["classifier"].startswith("classifier")

    _, _, gpt2 = _compiled("gpt2")
    conv1d = [s for s in gpt2.sites if s.name.endswith("attn.c_attn")]
    assert conv1d and all(s.kind == "matmul" and s.group_axis == 0 for s in conv1d)
    mask = gpt2.masks[conv1d[0].param]  # weight stored [in, out]: 2:4 runs along axis 0
    assert P24.violations(mask, axis=0) == 0 and P24.violations(mask, axis=1) > 0
    assert {e.name for e in gpt2.excluded} == {"lm_head"}

    _, _, swin = _compiled("tv_swin")
    # qkv / proj weights reach F.linear inside shifted_window_attention, an fx-wrapped helper
    qkv = [s for s in swin.sites if s.name.endswith("attn.qkv")]
    proj = [s for s in swin.sites if s.name.endswith("attn.proj")]
    assert len(qkv) == len(proj) == 5 and all(s.group_axis == 1 for s in qkv + proj)
    assert swin.flops.sites[qkv[0].param] > 0  # the probe counted the FLOPs inside


def test_caches_are_switched_off_with_a_warning_and_the_callers_model_kept() -> None:
    model, inputs = _llama()
    assert model.config.use_cache is True
    with pytest.warns(NMCompileWarning, match="use_cache switched off for tracing"):
        r = nmcompile.compile(model.eval(), "asp", example_inputs=inputs)
    assert model.config.use_cache is True
    # the model's own class with the pruned weights still generates with its cache
    eager = r.eager()
    assert eager.config.use_cache is True
    site = r.sites[0]
    assert torch.equal(eager.get_parameter(site.param), r.module.get_parameter(site.param))
    out = eager.generate(inputs[0][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_a_second_sequence_length_runs(name: str) -> None:
    model, inputs, r = _compiled(name)
    shorter = (
        {k: v[:, :-3] for k, v in inputs.items()}
        if isinstance(inputs, dict)
        else tuple(x[:, :-3] for x in inputs)
    )
    args = shorter if isinstance(shorter, tuple) else ()
    kwargs = shorter if isinstance(shorter, dict) else {}
    with torch.no_grad():
        got = _logits(r.module(*args, **kwargs))
        for p, m in r.masks.items():
            model.get_parameter(p).data.mul_(m)
        want = _logits(model.eval()(*args, **kwargs, use_cache=False))
    assert torch.allclose(got, want, atol=1e-5)


def test_fixed_shapes_warn_and_a_call_at_another_shape_says_why() -> None:
    model, inputs = _bert()
    with pytest.warns(NMCompileWarning, match="every input dim is fixed"):
        r = nmcompile.compile(model.eval(), "asp", example_inputs=inputs, dynamic_shapes=None)
    with pytest.raises(InputError, match=r"input `input_ids` has shape \[2, 8\].*dims \[1\]"):
        r.module(inputs[0][:, :8])
    with pytest.raises(InputError, match=r"\['input_ids'\] given both by position and by keyword"):
        r.module(inputs[0], input_ids=inputs[0])
    with pytest.raises(InputError, match=r"\['token_type_id'\] is not an input"):
        r.module(inputs[0], token_type_id=inputs[0])


# fp16 of every transformers model (torch.export-traced, exported from the model's own code) and
# of one swin per library; the convnexts' fp16 path is the swins' (fx-traced, cast graph)
EXPORTS = [(n, torch.float32) for n in MODELS] + [
    (n, torch.float16) for n in ("bert", "gpt2", "llama", "t5", "tv_swin", "timm_swin")
]
EXPORTS.append(("llama", torch.bfloat16))  # ONNX holds bf16; ONNX Runtime's CPU cannot run it
IDS = [f"{n}-{str(d).removeprefix('torch.')}" for n, d in EXPORTS]


@pytest.mark.parametrize(("name", "dtype"), EXPORTS, ids=IDS)
def test_onnx_export_holds_nm_weights(name: str, dtype: torch.dtype, tmp_path) -> None:
    model, inputs, r = _compiled(name)
    export = r.export_onnx(tmp_path / f"{name}.onnx", dtype=dtype)
    rep = export.nm_report
    assert rep.declared_ok, rep.summary()
    assert (export.max_rel_error is None) == (dtype == torch.bfloat16)
    # every weight is named after its parameter, pruned or dense (no ``val_55``)
    params = {n for n, _ in model.named_parameters()}
    assert {e.initializer for e in rep.checked} <= params
    if name in TEXT and dtype != torch.bfloat16:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
        tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        feeds = {i.name: x[:, :-3].numpy() for i, x in zip(sess.get_inputs(), tensors)}
        out = sess.run(None, feeds)[0]
        assert np.isfinite(out.astype(np.float32)).all()
        assert out.shape[0] == 2 and (out.ndim == 2 or out.shape[1] == tensors[-1].shape[1] - 3)


def test_tied_lm_head_is_excluded_and_masked_agrees_with_module() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.body = nn.Linear(32, 32)
            self.head = nn.Linear(32, 64, bias=False)
            self.head.weight = self.embed.weight  # tied, as most LMs are

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.embed(ids))))

    torch.manual_seed(0)
    lm, ids = TinyLM().eval(), torch.randint(0, 64, (2, 8))
    with pytest.warns(NMCompileWarning, match=r"linear `head`: tied to an embedding"):
        r = nmcompile.compile(lm, "asp", example_inputs=(ids,), prune_classifier=True)
    reasons = {e.name: e.reason for e in r.excluded}
    assert "tied to an embedding" in reasons["head"] and "tied to an embedding" in r.report()
    assert [s.name for s in r.sites] == ["body"]
    with torch.no_grad():
        assert torch.allclose(r.masked(ids), r.module(ids), atol=1e-5)
        assert torch.equal(r.module.embed.weight, lm.embed.weight)  # the embedding is whole

    model, inputs = _gpt2()
    with pytest.warns(NMCompileWarning, match="tied to an embedding"):
        g = nmcompile.compile(model.eval(), "asp", example_inputs=inputs, prune_classifier=True)
    assert "lm_head" in {e.name for e in g.excluded}
    with torch.no_grad():
        assert torch.allclose(g.masked(*inputs).logits, g.module(*inputs).logits, atol=1e-5)


def test_a_model_compiled_in_training_mode_has_no_attention_dropout_in_eval() -> None:
    """A transformers model is built in training mode; torch.export then bakes sdpa's
    ``dropout_p`` into the call. The compiled module must still follow train() / eval()."""
    model, inputs = _bert()
    assert model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NMCompileWarning)
        r = nmcompile.compile(model, "asp", example_inputs=inputs, finetune_iterations=0)
    assert "bert.encoder.layer.0.attention.self.query" in {s.name for s in r.sites}
    r.module.train()
    torch.manual_seed(0)
    assert not torch.equal(_logits(r.module(*inputs)), _logits(r.module(*inputs)))
    r.module.eval()
    eager = r.eager()  # the model's own code with the pruned weights, in eval mode
    with torch.no_grad():
        got, want = _logits(r.module(*inputs)), _logits(eager(*inputs))
    assert torch.allclose(got, want, atol=1e-5)
