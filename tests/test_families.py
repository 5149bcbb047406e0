"""The TransformerLens sites added with the new families (hook_k, hook_v, hook_pattern,
hook_resid_mid, mlp.hook_post, router logits) checked against plain torch hooks and HF outputs on
every tiny family, and their edits against equivalent edits elsewhere."""

from __future__ import annotations

import pytest
import torch

import finesteer as fs
from finesteer.errors import FinesteerError
from finesteer.hooks import HookSet
from finesteer.interventions import Add, Edit, Intervention, InterventionError, ProjectOut, Scale, Zero
from finesteer.models import LoadedModel, load_model
from finesteer.sites import Site, SiteError
from tests.conftest import ALL_FAMILIES

TEXTS = ["hello there, general", "hi"]
# the block submodule whose input is resid_mid, per family (independent of the adapters)
MID_INPUT = {"gemma2": "pre_feedforward_layernorm", "gemma3_text": "pre_feedforward_layernorm"}
MID_INPUT |= {"olmo2": "mlp", "gpt2": "ln_2"}


@pytest.fixture(params=ALL_FAMILIES)
def lm(request: pytest.FixtureRequest, tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models[request.param]


def _raw(lm: LoadedModel, text: str, module: torch.nn.Module, *, pre: bool, index: int = 0) -> torch.Tensor:
    """One module's input (pre) or output, read with a plain torch hook around a single-text forward."""
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs_or_output, *rest):
        if pre:
            seen.append(args[0] if args else kwargs_or_output["hidden_states"])
        else:
            out = kwargs_or_output
            seen.append(out[index] if isinstance(out, tuple) else out)

    handle = (
        module.register_forward_pre_hook(grab, with_kwargs=True)
        if pre
        else module.register_forward_hook(grab)
    )
    try:
        with torch.no_grad():
            lm.model(**lm.tokenizer([text], return_tensors="pt", add_special_tokens=False))
    finally:
        handle.remove()
    return seen[0][0]


def _acts(lm: LoadedModel, sites: list[str], intervention: Intervention | None = None):
    return fs.capture(lm, TEXTS, sites, position="all", intervention=intervention)


def test_pattern_v_and_z_agree_with_the_model(lm: LoadedModel) -> None:
    """pattern = HF's attention weights; z = pattern @ v per head (GQA groups); k, v widths use kv heads."""
    layer, info = 1, lm.info
    acts = _acts(lm, [f"blocks.{layer}.attn.hook_{c}" for c in ("pattern", "v", "k", "z")])
    pattern, v, z = (acts[f"blocks.{layer}.attn.hook_{c}"] for c in ("pattern", "v", "z"))
    assert acts[f"blocks.{layer}.attn.hook_k"].shape[2:] == (info.n_kv_heads, info.head_dim)
    group = info.n_heads // info.n_kv_heads
    for row, (text, length) in enumerate(zip(TEXTS, acts.lengths.tolist(), strict=True)):
        with torch.no_grad():
            enc = lm.tokenizer([text], return_tensors="pt", add_special_tokens=False)
            expected = lm.model(**enc, output_attentions=True).attentions[layer][0]  # [H, S, S]
        got = pattern[row, :length, :, :length].transpose(0, 1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        values = v[row, :length].repeat_interleave(group, dim=1)  # [S, H, D]
        mixed = torch.einsum("hst,thd->shd", got, values)
        torch.testing.assert_close(z[row, :length], mixed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-phi3"])
def test_fused_qkv_sites_are_slices_of_the_projection(tiny_models, name: str) -> None:
    lm = tiny_models[name]
    info, layer = lm.info, 2
    fused = _raw(lm, TEXTS[0], lm.adapter.attn_part(lm.model, layer, lm.adapter.q_proj), pre=False)
    acts = fs.capture(lm, TEXTS[:1], [f"blocks.{layer}.attn.hook_{c}" for c in "qkv"], position="all")
    q_width, kv_width = info.n_heads * info.head_dim, info.n_kv_heads * info.head_dim
    parts = fused.split([q_width, kv_width, kv_width], dim=-1)
    for component, part in zip("qkv", parts, strict=True):
        torch.testing.assert_close(acts[f"blocks.{layer}.attn.hook_{component}"][0].flatten(1), part)


def test_resid_mid_and_mlp_post_match_the_module_inputs(lm: LoadedModel) -> None:
    layer = 1
    block = lm.adapter.block(lm.model, layer)
    mid = _raw(
        lm,
        TEXTS[0],
        lm.adapter.get(block, MID_INPUT.get(lm.info.family, "post_attention_layernorm")),
        pre=True,
    )
    sites = [f"blocks.{layer}.hook_resid_mid"]
    if lm.info.n_experts is None:
        sites.append(f"blocks.{layer}.mlp.hook_post")
    acts = fs.capture(lm, TEXTS[:1], sites, position="all")
    torch.testing.assert_close(acts[sites[0]][0], mid)
    if lm.info.n_experts is None:
        down = lm.adapter.mlp_part(lm.model, layer, lm.adapter.mlp_down, "down projection")
        torch.testing.assert_close(acts[sites[1]][0], _raw(lm, TEXTS[0], down, pre=True))
        assert acts[sites[1]].shape[-1] == lm.info.d_mlp
    else:
        with pytest.raises(FinesteerError, match="no single MLP hidden layer"):
            fs.capture(lm, TEXTS, [f"blocks.{layer}.mlp.hook_post"])


def test_resid_mid_edits_reach_the_residual_stream(lm: LoadedModel) -> None:
    layer, site = 1, "blocks.1.hook_resid_mid"
    vector, direction = torch.randn(lm.info.hidden_size), torch.randn(lm.info.hidden_size)
    base = _acts(lm, [site, "blocks.1.hook_resid_post"])
    add = Intervention((Edit(Site(layer, "resid_mid"), Add(vector, 2.0)),))
    added = _acts(lm, [site, "blocks.1.hook_resid_post"], add)
    mask = torch.arange(base[site].shape[1])[None, :] < base.lengths[:, None]
    torch.testing.assert_close(added[site][mask], (base[site] + 2.0 * vector)[mask], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(added["blocks.1.hook_resid_post"], base["blocks.1.hook_resid_post"], atol=1e-3)
    projected = _acts(lm, [site], Intervention((Edit(Site(layer, "resid_mid"), ProjectOut(direction)),)))
    assert float((projected[site][mask] @ (direction / direction.norm())).abs().max()) < 1e-3


def test_mlp_post_add_equals_down_projection_add(lm: LoadedModel) -> None:
    if lm.info.n_experts is not None:
        pytest.skip("mixture of experts: no single MLP hidden layer")
    layer = 2
    u = torch.randn(lm.info.d_mlp)
    down = lm.adapter.mlp_part(lm.model, layer, lm.adapter.mlp_down, "down projection")
    via_down = lm.adapter.weight(down).detach() @ u
    enc = lm.tokenizer(TEXTS[:1], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        with fs.intervene(lm, Intervention((Edit(Site(layer, "mlp_post"), Add(u)),))):
            a = lm.model(**enc).logits
        with fs.intervene(lm, Intervention((Edit(Site(layer, "mlp_out"), Add(via_down)),))):
            b = lm.model(**enc).logits
        assert not torch.allclose(a, lm.model(**enc).logits, atol=1e-3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(InterventionError, match=f"site width={lm.info.d_mlp}"):
        fs.intervene(lm, Intervention((Edit(Site(layer, "mlp_post"), Add(torch.ones(3))),))).__enter__()


def test_key_and_value_edits_act_on_their_query_group(lm: LoadedModel) -> None:
    """k × 0 makes the group's attention uniform; v zeroed zeroes the group's head outputs only."""
    layer, info = 1, lm.info
    kv_head, size = info.n_kv_heads - 1, info.n_heads // info.n_kv_heads
    group = range(kv_head * size, (kv_head + 1) * size)
    others = [h for h in range(info.n_heads) if h not in group]
    sites = [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_z"]
    base = _acts(lm, sites)
    flat_k = _acts(lm, sites, Intervention((Edit(Site(layer, "k", kv_head), Scale(0.0)),)))
    zero_v = _acts(lm, sites, Intervention((Edit(Site(layer, "v", kv_head), Zero()),)))
    length = int(base.lengths[0])
    uniform = torch.tril(torch.ones(length, length)) / torch.arange(1, length + 1)[:, None]
    pattern = flat_k[sites[0]][0, :length, :, :length]
    for head in group:
        torch.testing.assert_close(pattern[:, head], uniform, atol=1e-5, rtol=0)
        assert float(zero_v[sites[1]][0, :length, head].abs().max()) == 0.0
    torch.testing.assert_close(pattern[:, others], base[sites[0]][0, :length, others, :length])
    torch.testing.assert_close(zero_v[sites[1]][:, :, others], base[sites[1]][:, :, others])
    with pytest.raises(SiteError, match=f"{info.n_kv_heads} key/value heads"):
        Site(layer, "k", info.n_kv_heads).validate(info)


def test_read_only_sites_refuse_edits(tiny_models) -> None:
    lm = tiny_models["tiny-qwen2moe"]
    for site in (Site(0, "pattern", 1), Site(1, "router_logits")):
        with pytest.raises(InterventionError, match="read-only"):
            fs.intervene(lm, Intervention((Edit(site, Zero()),))).__enter__()
    hooks = HookSet(lm.model, lm.adapter)
    with hooks, pytest.raises(SiteError, match="read-only"):
        hooks.add(Site(0, "router_logits"), lambda act, ctx: act * 0)
        lm.model(**lm.tokenizer(["hi"], return_tensors="pt"))


@pytest.mark.parametrize("name", ["tiny-qwen2moe", "tiny-mixtral"])
def test_router_logits_match_the_model(tiny_models, name: str) -> None:
    lm = tiny_models[name]
    acts = fs.capture(lm, TEXTS[:1], ["blocks.2.mlp.hook_router_logits"], position="all")
    with torch.no_grad():
        enc = lm.tokenizer(TEXTS[:1], return_tensors="pt", add_special_tokens=False)
        expected = lm.model(**enc, output_router_logits=True).router_logits[2]  # [S, experts]
    assert acts["blocks.2.mlp.hook_router_logits"].shape == (1, expected.shape[0], lm.info.n_experts)
    torch.testing.assert_close(acts["blocks.2.mlp.hook_router_logits"][0], expected)
    with pytest.raises(FinesteerError, match="no expert router"):
        fs.capture(tiny_models["tiny-llama"], TEXTS, ["blocks.0.mlp.hook_router_logits"])


def test_pattern_capture_switches_to_eager_attention_and_back() -> None:
    lm = load_model("tiny-llama", attn_implementation="sdpa")
    eager = load_model("tiny-llama")
    acts = fs.capture(lm, TEXTS, ["blocks.0.attn.hook_pattern[2]"], position="last")
    assert lm.model.config._attn_implementation == "sdpa"
    expected = fs.capture(eager, TEXTS, ["blocks.0.attn.hook_pattern[2]"], position="last")
    torch.testing.assert_close(
        acts["blocks.0.attn.hook_pattern[2]"], expected["blocks.0.attn.hook_pattern[2]"]
    )
    hooks = HookSet(lm.model, lm.adapter)
    with hooks, pytest.raises(SiteError, match="eager"):
        hooks.add(Site(0, "pattern"), lambda act, ctx: None)
        lm.model(**lm.tokenizer(["hi"], return_tensors="pt"))


def test_new_site_names_round_trip() -> None:
    for text in (
        "blocks.3.attn.hook_k[1]",
        "blocks.3.attn.hook_v",
        "blocks.0.attn.hook_pattern[2]",
        "blocks.2.hook_resid_mid",
        "blocks.1.mlp.hook_post",
        "blocks.1.mlp.hook_router_logits",
    ):
        assert Site.parse(text).name == text
    assert Site.parse("blocks.3.hook_z[5]") == Site(3, "z", 5)  # the lenient old form still parses
    with pytest.raises(SiteError, match=r"unknown hook 'mlp\.hook_pre'"):
        Site.parse("blocks.1.mlp.hook_pre")
    with pytest.raises(SiteError, match="has no heads"):
        Site(1, "mlp_post", 0)


def test_prepend_bos_matches_a_bos_written_in_the_text(tiny_models) -> None:
    lm = tiny_models["tiny-gpt2"]
    tokenizer = lm.tokenizer
    assert fs.to_tokens(tokenizer, "hi", prepend_bos=True) == [
        tokenizer.bos_token_id,
        *tokenizer("hi")["input_ids"],
    ]
    assert fs.to_tokens(tokenizer, "<s>hi", prepend_bos=True).count(tokenizer.bos_token_id) == 1
    site = "blocks.2.hook_resid_post"
    with_bos = fs.capture(lm, TEXTS, [site], position="all", prepend_bos=True)
    written = fs.capture(lm, [f"{tokenizer.bos_token}{t}" for t in TEXTS], [site], position="all")
    assert with_bos.lengths.tolist() == [
        n + 1 for n in fs.capture(lm, TEXTS, [site], position="all").lengths.tolist()
    ]
    torch.testing.assert_close(with_bos[site], written[site])
    # a (prompt, completion) pair: BOS before the prompt, so the answer span moves one token right
    pair = fs.capture(lm, [("hi", " there")], [site], position="answer_mean", prepend_bos=True)
    whole = fs.capture(lm, ["<s>hi there"], [site], position="all")
    torch.testing.assert_close(pair[site][0], whole[site][0, 3:].mean(0))
