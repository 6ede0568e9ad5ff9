# SPDX-License-Identifier: Apache-2.0
"""The README's walk "Train on your model's activations", end to end with the real tools:
tools/cache_activations.py caches the residual stream of a tiny randomly initialised GPT-2
(built here: nothing is downloaded), hsae-train trains on the cache and writes a SAELens
directory and a sparsify one, and SAELens (SAE.load_from_disk) and sparsify
(SparseCoder.load_from_disk) load them. Checked: the metadata the tools list (model, hook,
d_in, the schedule), that the FVU per k hsae-train recorded is the FVU SAELens computes on
the held-out rows (the last rows of the cache by position), and that both layouts hold the
same model."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # no GPU: sparsify's eager decoder
warnings.filterwarnings("ignore")
from sae_lens import SAE, TopKSAE  # noqa: E402
from sae_lens.saes.topk_sae import TopK  # noqa: E402
from sparsify import SparseCoder  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

HSAE_TRAIN = os.environ.get("HSAE_TRAIN")
TOOLS = Path(__file__).resolve().parents[2] / "tools"
WORDS = ("the cat sat on a mat while dog ran after tree bird sang rain fell old man sea "
         "storm came friends many years until day night light dark").split()
D_MODEL, LAYER, D_SAE, K = 32, 1, 128, 8
HELD_OUT = 2000


def run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd[:2]} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny GPT-2 and a text corpus, cached by tools/cache_activations.py as a user runs it."""
    if not HSAE_TRAIN:
        pytest.fail("HSAE_TRAIN is not set (run this test through ctest -L interop)")
    root = tmp_path_factory.mktemp("walk")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[PAD]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=2, n_positions=64,
                                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    model_dir = root / "tiny-gpt2"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = np.random.default_rng(5)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(20, 120))))
                                for _ in range(400)) + "\n")
    acts = root / "acts"
    run([sys.executable, TOOLS / "cache_activations.py", "--model", model_dir, "--layer", LAYER,
         "--context-size", 64, "--shard-tokens", 10000, "--no-progress", "--out", acts, corpus])
    manifest = json.loads((acts / "activations.json").read_text())
    rows = np.concatenate([np.load(acts / s["file"]).astype(np.float32) for s in manifest["shards"]])
    assert rows.shape == (manifest["tokens"], D_MODEL) and len(manifest["shards"]) >= 2
    return {"root": root, "acts": acts, "manifest": manifest, "rows": rows}


def train(cache, out, *extra):
    return run([HSAE_TRAIN, cache["acts"], "--out", out, "--d-sae", D_SAE, "--k-max", K, "--batch", 512,
                "--epochs", 2, "--held-out-rows", HELD_OUT, "--init-rows", 2048, "--threads", 1, *extra])


def fvu(x, recon):
    x = x.astype(np.float64)
    return float(((x - recon) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum())


def test_cache_to_hsae_train_to_saelens_and_sparsify(cache, tmp_path):
    out = tmp_path / "sae"
    r = train(cache, out)
    assert f"the last {HELD_OUT} rows of the data by position" in r.stdout
    for name in ("cfg.json", "sae_weights.safetensors", "report.md", "metrics.jsonl", "hsae_train_config.json"):
        assert (out / name).is_file(), name

    sae = SAE.load_from_disk(out, device="cpu", dtype="float32")
    assert isinstance(sae, TopKSAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (D_MODEL, D_SAE, K)
    meta = sae.cfg.metadata
    assert meta.model_name == cache["manifest"]["model_name"]
    assert meta.hook_name == cache["manifest"]["hook_name"] == f"blocks.{LAYER}.hook_resid_pre"
    assert meta.hsae_k_schedule["k"] == list(range(1, K + 1))
    assert meta.hsae_tokens_trained > 0 and 0 <= meta.hsae_dead_fraction <= 1

    # The held-out rows are the last HELD_OUT rows of the cache; SAELens' FVU on them at
    # every k (the top-k prefix of the one model) is the FVU hsae-train recorded.
    held = cache["rows"][-HELD_OUT:]
    recorded = meta.hsae_final_fvu
    assert sorted(int(k) for k in recorded) == list(range(1, K + 1))
    for k in (1, 2, 4, 8):
        sae.activation_fn = TopK(k)
        with torch.no_grad():
            recon = sae.decode(sae.encode(torch.from_numpy(held))).double().numpy()
        assert fvu(held, recon) == pytest.approx(recorded[str(k)], rel=2e-3, abs=1e-5), k
    assert recorded["8"] < recorded["1"] < 1.0  # it learned something, more at larger k

    # The same run in the sparsify layout (CPU training is deterministic): the same model.
    out_sp = tmp_path / "sae-sparsify"
    train(cache, out_sp, "--format", "sparsify")
    coder = SparseCoder.load_from_disk(out_sp)
    assert (coder.d_in, coder.num_latents, coder.cfg.k) == (D_MODEL, D_SAE, K)
    cfg = json.loads((out_sp / "cfg.json").read_text())
    assert cfg["hsae_metadata"]["hook_name"] == f"blocks.{LAYER}.hook_resid_pre"
    assert cfg["hsae_metadata"]["hsae_final_fvu"] == json.loads((out / "cfg.json").read_text())["metadata"][
        "hsae_final_fvu"]
    sae.activation_fn = TopK(K)
    with torch.no_grad():
        x = torch.from_numpy(held[:256])
        ref = sae.decode(sae.encode(x)).numpy()
        top_acts, top_indices, _ = coder.to(torch.float32).encode(x)
        mine = coder.decode(top_acts, top_indices).numpy()
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
