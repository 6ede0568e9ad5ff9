# SPDX-License-Identifier: Apache-2.0
"""sparsify (EleutherAI's package: SparseCoder.load_from_disk / save_to_disk) against
hsae, and conversions between the SAELens and sparsify layouts checked by both tools."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import HsaeError, assert_close, assert_same_code, hsae, hsae_encode, load_json

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
warnings.filterwarnings("ignore")
from sae_lens import SAE, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

D, F = 24, 96


def inputs(rng, b=64):
    return (rng.standard_normal((b, D)) * 1.5 + 0.3).astype(np.float32)


def sparsify_run(coder, x):
    """sparsify's top-k code (as dense activations) and reconstruction, float32 compute."""
    coder = coder.to(torch.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        top_acts, top_indices, _ = coder.encode(xt)
        dense = torch.zeros(x.shape[0], coder.num_latents).scatter_(1, top_indices, top_acts)
        recon = coder.decode(top_acts, top_indices)
        if not coder.cfg.multi_topk:  # with multi_topk, forward returns the 4k reconstruction
            assert torch.allclose(coder(xt).sae_out, recon, rtol=1e-5, atol=1e-5)
        return dense.numpy(), recon.numpy()


def compare(coder, sae_dir, x, tmp, k):
    dense, recon = sparsify_run(coder, x)
    h = hsae_encode(sae_dir, x, tmp)
    assert h["info"]["k"] == k
    assert_same_code(dense, h["dense"], k)
    assert_close(recon, h["recon"])
    # sparsify's values, sorted per row, are hsae's sorted top-k values.
    assert_close(-np.sort(-dense, axis=1)[:, :k], h["values"])
    return h


# --- hsae -> sparsify ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("schedule", ["plain:16", "1,2,4,8,16"])
def test_hsae_files_open_in_sparsify(tmp_path, rng, dtype, schedule):
    d = tmp_path / "sae"
    hsae("save", "sparsify", d, D, F, 21, dtype, schedule, json.dumps({"hook_name": "layers.3"}))
    coder = SparseCoder.load_from_disk(d)
    assert (coder.d_in, coder.num_latents, coder.cfg.k) == (D, F, 16)
    assert coder.dtype == {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    h = compare(coder, d, inputs(rng), tmp_path, 16)
    if schedule != "plain:16":
        assert h["info"]["schedule"]["k"] == [1, 2, 4, 8, 16]
    assert h["info"]["metadata"] == {"hook_name": "layers.3"}


def test_hierarchical_prefixes_are_topk_saes_in_sparsify(tmp_path, rng):
    d = tmp_path / "sae"
    hsae("save", "sparsify", d, D, F, 22, "F32", ",".join(str(k) for k in range(1, 17)))
    coder = SparseCoder.load_from_disk(d)
    x = inputs(rng)
    for kp in (1, 5, 16):
        coder.cfg.k = kp
        dense, recon = sparsify_run(coder, x)
        h = hsae_encode(d, x, tmp_path, k=kp)
        assert_same_code(dense, h["dense"], kp)
        assert_close(recon, h["recon"])


# --- sparsify -> hsae ----------------------------------------------------------------------

def random_coder(cfg, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    coder = SparseCoder(D, cfg, dtype=dtype)
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.randn(coder.num_latents) * 0.3)
        coder.b_dec.copy_(torch.randn(D) * 0.5)
        coder.encoder.weight.add_(torch.randn_like(coder.encoder.weight.float()).to(dtype) * 0.1)
    return coder


SPARSIFY_VARIANTS = {
    "num_latents f32": (dict(num_latents=F, k=12), torch.float32),
    "expansion factor": (dict(expansion_factor=3, k=7), torch.float32),
    "bf16": (dict(num_latents=F, k=12), torch.bfloat16),
    "f16 multi_topk": (dict(num_latents=F, k=6, multi_topk=True), torch.float16),
}


@pytest.mark.parametrize("variant", sorted(SPARSIFY_VARIANTS))
def test_sparsify_files_open_in_hsae(tmp_path, rng, variant):
    kw, dtype = SPARSIFY_VARIANTS[variant]
    coder = random_coder(SparseCoderConfig(**kw), dtype, seed=3)
    d = tmp_path / "sae"
    coder.save_to_disk(d)
    compare(SparseCoder.load_from_disk(d), d, inputs(rng), tmp_path, kw["k"])


@pytest.mark.parametrize("setting,match", [
    (dict(activation="groupmax", k=8), "groupmax"),
    (dict(transcode=True), "transcode"),
    (dict(skip_connection=True), "skip_connection"),
])
def test_what_hsae_cannot_express_is_named(tmp_path, setting, match):
    coder = random_coder(SparseCoderConfig(num_latents=F, **setting))
    d = tmp_path / "sae"
    coder.save_to_disk(d)
    with pytest.raises(HsaeError, match=rf"cfg\.json.*{match}"):
        hsae_encode(d, np.zeros((1, D), np.float32), tmp_path)


def test_nan_weights_are_a_numeric_error_naming_the_tensor(tmp_path):
    coder = random_coder(SparseCoderConfig(num_latents=F, k=4))
    with torch.no_grad():
        coder.encoder.bias[7] = float("inf")
    d = tmp_path / "sae"
    coder.save_to_disk(d)
    with pytest.raises(HsaeError, match=r"sae\.safetensors.*'encoder\.bias'.*non-finite"):
        hsae_encode(d, np.zeros((1, D), np.float32), tmp_path)


# --- Conversions, checked by the tools on both ends ---------------------------------------

def saelens_run(sae, x):
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x))
        return acts.float().numpy(), sae.decode(acts).float().numpy()


@pytest.mark.parametrize("kw", [dict(), dict(apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True)])
def test_saelens_file_converted_to_sparsify(tmp_path, rng, kw):
    torch.manual_seed(9)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=12, **kw))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape))
    src, dst = tmp_path / "saelens", tmp_path / "sparsify"
    sae.save_model(src)
    hsae("convert", src, dst, "sparsify")
    coder = SparseCoder.load_from_disk(dst)
    x = inputs(rng)
    acts, recon = saelens_run(sae, x)
    dense, recon2 = sparsify_run(coder, x)
    assert_same_code(acts, dense, 12)
    assert_close(recon, recon2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_file_converted_to_saelens(tmp_path, rng, dtype):
    coder = random_coder(SparseCoderConfig(num_latents=F, k=12), dtype, seed=4)
    src, dst = tmp_path / "sparsify", tmp_path / "saelens"
    coder.save_to_disk(src)
    hsae("convert", src, dst, "saelens")
    cfg = load_json(dst / "cfg.json")
    assert cfg["dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    sae = SAE.load_from_disk(dst, dtype="float32")
    x = inputs(rng)
    dense, recon = sparsify_run(coder, x)
    acts, recon2 = saelens_run(sae, x)
    assert_same_code(dense, acts, 12)
    assert_close(recon, recon2)


def test_hierarchical_schedule_survives_conversion_both_ways(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    hsae("save", "saelens", a, D, F, 23, "BF16", "2,4,8;1,1,0.5", json.dumps({"model_name": "m"}))
    hsae("convert", a, b, "sparsify")
    hsae("convert", b, c, "saelens")
    for dd in (a, b, c):
        (dd.parent / (dd.name + "_dump")).mkdir()
    dumps = [hsae("dump", dd, dd.parent / (dd.name + "_dump") / "w") and
             load_json(dd.parent / (dd.name + "_dump") / "w.json") for dd in (a, b, c)]
    for info in dumps:
        assert info["schedule"] == {"k": [2, 4, 8], "weight": [1.0, 1.0, 0.5]}
        assert info["storage_dtype"] == "BF16" and info["k"] == 8
        assert info["metadata"]["model_name"] == "m"
    w = [np.load(dd.parent / (dd.name + "_dump") / "w.W_dec.npy") for dd in (a, b, c)]
    assert np.array_equal(w[0], w[1]) and np.array_equal(w[0], w[2])


def test_saelens_sparsify_converter_treats_hsae_files_like_sparsify_files(tmp_path, rng):
    """SAELens ships its own sparsify loader (sparsify_disk_loader). Whatever it does
    with a file sparsify wrote, it does with the file hsae writes for the same SAE: the
    same error (6.54.12 transposes W_dec and fails unless d_in == num_latents) or the
    same model."""
    coder = random_coder(SparseCoderConfig(num_latents=F, k=12), seed=5)
    theirs, ours = tmp_path / "theirs" / "layers.3", tmp_path / "ours" / "layers.3"
    coder.save_to_disk(theirs)
    hsae("convert", theirs, ours, "sparsify")

    def attempt(p):
        try:
            return SAE.load_from_disk(p, converter=sparsify_disk_loader), None
        except Exception as e:  # noqa: BLE001 - the outcome itself is compared
            return None, f"{type(e).__name__}: {e}"

    (s1, e1), (s2, e2) = attempt(theirs), attempt(ours)
    assert e1 == e2
    if s1 is not None:
        x = inputs(rng)
        a1, r1 = saelens_run(s1, x)
        a2, r2 = saelens_run(s2, x)
        assert np.array_equal(a1, a2) and np.array_equal(r1, r2)
