# SPDX-License-Identifier: Apache-2.0
"""SAELens (the real package, sae_lens.SAE.load_from_disk and save_model) against hsae:
files hsae writes open in SAELens and compute the same encode/decode; files SAELens
writes open in hsae and compute the same."""
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import HsaeError, assert_close, assert_same_code, hsae, hsae_dump, hsae_encode, load_json

warnings.filterwarnings("ignore")
from sae_lens import (  # noqa: E402
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.topk_sae import TopK  # noqa: E402

D, F = 24, 96
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def inputs(rng, b=64):
    return (rng.standard_normal((b, D)) * 1.5 + 0.3).astype(np.float32)


def saelens_run(sae, x):
    """SAELens' dense top-k activations and reconstruction, in float32."""
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x))
        return acts.float().numpy(), sae.decode(acts).float().numpy()


def compare(sae, sae_dir, x, tmp, k):
    acts, recon = saelens_run(sae, x)
    h = hsae_encode(sae_dir, x, tmp)
    assert h["info"]["k"] == k
    assert_same_code(acts, h["dense"], k)
    assert_close(recon, h["recon"])
    return h


# --- hsae -> SAELens -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("schedule", ["plain:16", "2,4,8,16", "4,16;1,0.125"])
def test_hsae_files_open_in_saelens(tmp_path, rng, dtype, schedule):
    d = tmp_path / "sae"
    meta = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}
    hsae("save", "saelens", d, D, F, 11, dtype, schedule, json.dumps(meta))
    sae = SAE.load_from_disk(d, dtype="float32")
    assert isinstance(sae, TopKSAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (D, F, 16)
    assert sae.cfg.metadata.model_name == "gpt2" and sae.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
    if schedule != "plain:16":
        ks = [int(k) for k in schedule.split(";")[0].split(",")]
        assert sae.cfg.metadata.hsae_k_schedule["k"] == ks
    # The weights are the same numbers: SAELens' W_enc is hsae's transposed.
    w = hsae_dump(d, tmp_path)
    assert np.array_equal(sae.W_enc.detach().numpy().T, w["W_enc"])
    assert np.array_equal(sae.W_dec.detach().numpy(), w["W_dec"])
    assert np.array_equal(sae.b_enc.detach().numpy(), w["b_enc"])
    assert np.array_equal(sae.b_dec.detach().numpy(), w["b_dec"])
    compare(sae, d, inputs(rng), tmp_path, 16)
    # Loaded in the file's own dtype (SAELens' default), the weights still agree bitwise.
    sae_native = SAE.load_from_disk(d)
    assert sae_native.W_dec.dtype == {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    assert np.array_equal(sae_native.W_dec.detach().float().numpy(), w["W_dec"])


def test_hierarchical_prefixes_are_topk_saes_in_saelens(tmp_path, rng):
    """A HierarchicalTopK SAE saved with k = K_max: any prefix k' <= K_max, set in
    SAELens as its TopK k, computes what hsae computes with k'."""
    d = tmp_path / "sae"
    hsae("save", "saelens", d, D, F, 12, "F32", ",".join(str(k) for k in range(1, 17)))
    sae = SAE.load_from_disk(d)
    x = inputs(rng)
    for kp in (1, 3, 8, 16):
        sae.activation_fn = TopK(kp)
        acts, recon = saelens_run(sae, x)
        h = hsae_encode(d, x, tmp_path, k=kp)
        assert_same_code(acts, h["dense"], kp)
        assert_close(recon, h["recon"])


def test_schedule_survives_a_saelens_load_and_save(tmp_path):
    d, d2 = tmp_path / "a", tmp_path / "b"
    hsae("save", "saelens", d, D, F, 13, "F32", "2,8;1,0.5", json.dumps({"hook_name": "h"}))
    sae = SAE.load_from_disk(d)
    sae.save_model(d2)
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    w1 = hsae_dump(d, tmp_path / "1")
    w2 = hsae_dump(d2, tmp_path / "2")
    assert w2["info"]["schedule"] == {"k": [2, 8], "weight": [1.0, 0.5]}
    assert w2["info"]["metadata"]["hook_name"] == "h"
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert np.array_equal(w1[n], w2[n]), n


# --- SAELens -> hsae -----------------------------------------------------------------------

def randomize(sae, gen, dec_norm=None):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) *
                    (0.3 if name.startswith("b_") else 1.0))
        if dec_norm is not None:  # decoder rows of varied norms
            norms = torch.rand(sae.cfg.d_sae, generator=gen) * 2 + 0.2
            sae.W_dec.copy_((sae.W_dec.float() / sae.W_dec.float().norm(dim=1, keepdim=True) *
                             norms[:, None]).to(sae.W_dec.dtype))
    return sae


SAELENS_VARIANTS = {
    "topk f32": dict(dtype="float32"),
    "topk no b_dec on input": dict(dtype="float32", apply_b_dec_to_input=False),
    "topk rescaled by decoder norm": dict(dtype="float32", rescale_acts_by_decoder_norm=True),
    "topk bf16": dict(dtype="bfloat16"),
    "topk f16, both folds": dict(dtype="float16", apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True),
}


@pytest.mark.parametrize("variant", sorted(SAELENS_VARIANTS))
def test_saelens_topk_files_open_in_hsae(tmp_path, rng, variant):
    kw = SAELENS_VARIANTS[variant]
    gen = torch.Generator().manual_seed(5)
    sae = randomize(TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=12, **kw)), gen, dec_norm=True)
    d = tmp_path / "sae"
    sae.save_model(d)
    # Compare in float32 compute: the file's values, read by SAELens as float32.
    ref = SAE.load_from_disk(d, dtype="float32")
    h = compare(ref, d, inputs(rng), tmp_path, 12)
    if not kw.get("apply_b_dec_to_input", True):
        assert any("apply_b_dec_to_input" in a for a in h["info"]["adjustments"])
    if kw.get("rescale_acts_by_decoder_norm"):
        assert any("rescale_acts_by_decoder_norm" in a for a in h["info"]["adjustments"])
    assert h["info"]["metadata"]["sae_lens_version"] == ref.cfg.metadata.sae_lens_version


def test_saelens_standard_sae_opens_in_hsae_as_topk_d_sae(tmp_path, rng):
    gen = torch.Generator().manual_seed(6)
    sae = randomize(StandardSAE(StandardSAEConfig(d_in=D, d_sae=F)), gen)
    d = tmp_path / "sae"
    sae.save_model(d)
    compare(SAE.load_from_disk(d), d, inputs(rng), tmp_path, F)


def test_saelens_trained_topk_inference_files_open_in_hsae(tmp_path, rng):
    """What a SAELens training run leaves: TopKTrainingSAE.save_inference_model
    (rescale_acts_by_decoder_norm defaults to True there)."""
    gen = torch.Generator().manual_seed(7)
    tsae = randomize(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=10)), gen, dec_norm=True)
    d = tmp_path / "sae"
    tsae.save_inference_model(d)
    cfg = load_json(d / "cfg.json")
    assert cfg["architecture"] == "topk" and cfg["rescale_acts_by_decoder_norm"] is True
    compare(SAE.load_from_disk(d), d, inputs(rng), tmp_path, 10)


def test_saelens_pre_6_config_opens_like_saelens_opens_it(tmp_path, rng):
    d = tmp_path / "old"
    d.mkdir()
    g = np.random.default_rng(3)
    tensors = {
        "W_enc": torch.from_numpy(g.standard_normal((D, F)).astype(np.float32)),
        "b_enc": torch.from_numpy(g.standard_normal(F).astype(np.float32) * 0.3),
        "W_dec": torch.from_numpy(g.standard_normal((F, D)).astype(np.float32)),
        "b_dec": torch.from_numpy(g.standard_normal(D).astype(np.float32)),
        "scaling_factor": torch.ones(F),
    }
    save_file(tensors, d / "sae_weights.safetensors")
    old = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
           "hook_point": "blocks.2.hook_resid_pre", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 9}, "apply_b_dec_to_input": False, "normalize_activations": False,
           "sae_lens_training_version": "3.5.0", "finetuning_scaling_factor": False}
    (d / "cfg.json").write_text(json.dumps(old))
    sae = SAE.load_from_disk(d)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 9
    h = compare(sae, d, inputs(rng), tmp_path, 9)
    assert h["info"]["metadata"]["hook_name"] == "blocks.2.hook_resid_pre"


# --- What hsae refuses, with the file and the reason named -----------------------------------

def test_unsupported_architecture_is_named(tmp_path):
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F))
    d = tmp_path / "jr"
    sae.save_model(d)
    with pytest.raises(HsaeError, match=r"cfg\.json.*'jumprelu' is not supported"):
        hsae_encode(d, np.zeros((1, D), np.float32), tmp_path)


def test_run_time_normalisation_is_refused(tmp_path):
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=4, normalize_activations="layer_norm"))
    d = tmp_path / "ln"
    sae.save_model(d)
    with pytest.raises(HsaeError, match="layer_norm"):
        hsae_encode(d, np.zeros((1, D), np.float32), tmp_path)


def test_nan_weights_are_a_numeric_error_naming_the_tensor(tmp_path):
    gen = torch.Generator().manual_seed(8)
    sae = randomize(TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=4)), gen)
    with torch.no_grad():
        sae.W_dec[3, 5] = float("nan")
    d = tmp_path / "nan"
    sae.save_model(d)
    with pytest.raises(HsaeError, match=r"sae_weights\.safetensors.*'W_dec'.*non-finite.*\[3, 5\]"):
        hsae_encode(d, np.zeros((1, D), np.float32), tmp_path)


def test_extra_tensor_is_refused_like_saelens_strict_load(tmp_path):
    d = tmp_path / "extra"
    hsae("save", "saelens", d, D, F, 14, "F32", "plain:4")
    from safetensors.torch import load_file
    t = load_file(d / "sae_weights.safetensors")
    t["threshold"] = torch.zeros(F)
    save_file(t, d / "sae_weights.safetensors")
    with pytest.raises(RuntimeError, match="threshold"):
        SAE.load_from_disk(d)
    with pytest.raises(HsaeError, match="unexpected tensor 'threshold'"):
        hsae_dump(d, tmp_path)
