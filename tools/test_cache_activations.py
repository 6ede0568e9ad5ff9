# SPDX-License-Identifier: Apache-2.0
"""Tests of tools/cache_activations.py on a tiny randomly initialised GPT-2 and a word-level
tokenizer built here (nothing is downloaded): the shards' shapes, dtype and values against a
direct forward pass of the same model, the manifest, BOS handling, the token budget, the
inputs, and the errors. Most runs call the script's main() in this process (torch and
transformers are imported once); two run it as a subprocess, as a user does."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

SCRIPT = Path(__file__).resolve().with_name("cache_activations.py")
HSAE_TOOL = os.environ.get("HSAE_INTEROP_TOOL")  # tests/interop/hsae_interop_tool (ctest sets it)
N_LAYER, D_MODEL = 2, 32

TEXTS = [
    "the cat sat on the mat",
    "a dog ran after the cat and the cat ran up a tree while the dog sat below it all day",
    "birds sing",
    "rain",
    "the old man and the sea were friends for many years until the storm came",
]


def load_script():
    spec = importlib.util.spec_from_file_location("cache_activations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cache_activations = load_script()


def build_tokenizer(prepend_bos):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<bos>"]))
    if prepend_bos:  # as Llama's tokenizer does; GPT-2's and Pythia's do not
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="[PAD]",
                                   unk_token="[UNK]")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two directories with the same tiny GPT-2: "bos" with a tokenizer that prepends BOS,
    "plain" with one that does not. Also returns the model and the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer(prepend_bos=True)
    torch.manual_seed(1)
    config = GPT2Config(n_layer=N_LAYER, n_embd=D_MODEL, n_head=2, n_positions=64,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config).eval()
    dirs = {"bos": root / "bos", "plain": root / "plain"}
    for name, path in dirs.items():
        model.save_pretrained(path)
        build_tokenizer(prepend_bos=name == "bos").save_pretrained(path)
    huge = copy.deepcopy(model)  # embeddings beyond float16's range (65504)
    with torch.no_grad():
        huge.transformer.wte.weight.mul_(1e7)
    dirs["huge"] = root / "huge"
    huge.save_pretrained(dirs["huge"])
    tokenizer.save_pretrained(dirs["huge"])
    return {"dirs": dirs, "model": model, "tokenizer": tokenizer}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(TEXTS[:2]) + "\n\n" + "\n".join(TEXTS[2:]) + "\n")  # one blank line
    return path


def token_ids(tokenizer, text):
    """The word-level ids of a text, looked up directly (not through the tokenizer's call)."""
    return tokenizer.convert_tokens_to_ids(text.split())


def reference(env, texts, *, context_size, prepend_bos, keep_bos=False, layer=None, hook=None,
              truncate=False):
    """The rows the script should write: each chunk run alone (no padding) through the model."""
    model, tokenizer = env["model"], env["tokenizer"]
    body = context_size - prepend_bos
    rows = []
    for text in texts:
        ids = token_ids(tokenizer, text)
        starts = range(0, min(len(ids), body) if truncate else len(ids), body)
        for start in starts:
            seq = ([tokenizer.bos_token_id] if prepend_bos else []) + ids[start:start + body]
            acts = forward(model, torch.tensor([seq]), layer, hook)[0]
            rows.append(acts[1:] if prepend_bos and not keep_bos else acts)
    return torch.cat(rows).numpy()


def forward(model, ids, layer, hook):
    with torch.no_grad():
        if hook is None:
            return model.transformer(ids, output_hidden_states=True).hidden_states[layer]
        out = []
        handle = model.get_submodule(hook).register_forward_hook(
            lambda _m, _i, o: out.append(o[0] if isinstance(o, tuple) else o))
        try:
            model(ids)
        finally:
            handle.remove()
        return out[0]


def cache(*args, check=True):
    """Runs the script's main() here; returns its exit status."""
    status = cache_activations.main([str(a) for a in args])
    if check:
        assert status == 0, f"cache_activations.py {args} exited {status}"
    return status


def cache_subprocess(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def read_manifest(out):
    return json.loads((out / "activations.json").read_text())


def read_shards(out, fmt="npy", dtype=np.float32):
    """The shards the manifest lists, each checked for shape and dtype, concatenated."""
    manifest = read_manifest(out)
    parts = []
    for shard in manifest["shards"]:
        path = out / shard["file"]
        if fmt == "npy":
            data = np.load(path, allow_pickle=False)
        else:
            tensors = load_file(path)
            assert list(tensors) == ["activations"]
            data = tensors["activations"]
        assert data.dtype == dtype
        assert data.shape == (shard["rows"], manifest["d_model"])
        parts.append(data)
    acts = np.concatenate(parts)
    assert len(acts) == manifest["tokens"]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["activations.json"] + [s["file"] for s in manifest["shards"]])
    return acts


def assert_float32_close(got, ref):
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def assert_float16_rounding(got, ref):
    """got is ref rounded to float16. Batching and padding change ref's last float32 bits,
    which can move a value across a float16 rounding boundary: then got is within one
    float16 ulp of ref (2^-11 relative), and that is rare."""
    assert got.dtype == np.float16 and got.shape == ref.shape
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2.0**-11 * 1.001, atol=2.0**-24)
    assert np.mean(got == ref.astype(np.float16)) > 0.99


def test_layer_npy_float32_as_a_subprocess(model_dirs, text_file, tmp_path):
    out = tmp_path / "acts"
    model = model_dirs["dirs"]["bos"]
    r = cache_subprocess("--model", model, "--layer", 1, "--context-size", 8, "--batch-size", 3,
                         "--shard-tokens", 7, "--dtype", "float32", "--out", out, text_file)
    assert r.returncode == 0, r.stderr
    ref = reference(model_dirs, TEXTS, context_size=8, prepend_bos=True, layer=1)
    expected_rows = sum(len(t.split()) for t in TEXTS)  # every token but the BOS ones
    assert len(ref) == expected_rows
    assert_float32_close(read_shards(out), ref)
    manifest = read_manifest(out)
    sizes = [7] * (expected_rows // 7) + ([expected_rows % 7] if expected_rows % 7 else [])
    assert manifest == {
        "format": "hsae-activations", "version": 1, "model_name": str(model),
        "hook_name": "blocks.1.hook_resid_pre", "layer": 1, "d_model": D_MODEL,
        "dtype": "float32", "tokens": expected_rows, "context_size": 8, "prepend_bos": True,
        "bos_dropped": True, "dataset": str(text_file),
        "shards": [{"file": f"acts_{i:05d}.npy", "rows": n} for i, n in enumerate(sizes)],
    }
    assert f"{expected_rows} rows of blocks.1.hook_resid_pre" in r.stderr


def test_hook_safetensors_float16(model_dirs, text_file, tmp_path):
    out = tmp_path / "acts"
    cache("--model", model_dirs["dirs"]["bos"], "--hook", "transformer.h.0.mlp",
          "--context-size", 16, "--batch-size", 2, "--shard-tokens", 20,
          "--format", "safetensors", "--out", out, "--no-progress", text_file)
    ref = reference(model_dirs, TEXTS, context_size=16, prepend_bos=True, hook="transformer.h.0.mlp")
    assert_float16_rounding(read_shards(out, "safetensors", np.float16), ref)
    manifest = read_manifest(out)
    assert (manifest["hook_name"], manifest["layer"], manifest["dtype"]) == \
        ("transformer.h.0.mlp", None, "float16")
    assert [s["file"] for s in manifest["shards"]] == ["acts_00000.safetensors", "acts_00001.safetensors",
                                                       "acts_00002.safetensors"]
    with safe_open(out / "acts_00000.safetensors", "np") as f:
        assert f.metadata() == {"model_name": str(model_dirs["dirs"]["bos"]),
                                "hook_name": "transformer.h.0.mlp"}


def test_hook_on_a_tuple_output_relative_to_the_base_model(model_dirs, text_file, tmp_path):
    """GPT2Attention returns (output, weights): the first element is cached. h.1.attn names
    the module inside the base model (transformer.h.1.attn in the LM)."""
    out = tmp_path / "acts"
    cache("--model", model_dirs["dirs"]["bos"], "--hook", "h.1.attn", "--context-size", 8,
          "--dtype", "float32", "--out", out, "--no-progress", text_file)
    ref = reference(model_dirs, TEXTS, context_size=8, prepend_bos=True, hook="transformer.h.1.attn")
    assert_float32_close(read_shards(out), ref)
    assert read_manifest(out)["hook_name"] == "h.1.attn"


@pytest.mark.parametrize("layer,hook_name", [(0, "blocks.0.hook_resid_pre"),
                                             (N_LAYER, "ln_final.hook_normalized")])
def test_keep_bos_and_the_end_layers(model_dirs, text_file, tmp_path, layer, hook_name):
    out = tmp_path / "acts"
    cache("--model", model_dirs["dirs"]["bos"], "--layer", layer, "--keep-bos", "--context-size", 8,
          "--dtype", "float32", "--out", out, "--no-progress", text_file)
    ref = reference(model_dirs, TEXTS, context_size=8, prepend_bos=True, keep_bos=True, layer=layer)
    chunks = sum(-(-len(t.split()) // 7) for t in TEXTS)
    assert len(ref) == sum(len(t.split()) for t in TEXTS) + chunks
    assert_float32_close(read_shards(out), ref)
    manifest = read_manifest(out)
    assert (manifest["hook_name"], manifest["prepend_bos"], manifest["bos_dropped"]) == \
        (hook_name, True, False)


@pytest.mark.parametrize("flag,prepend_bos", [(None, False), ("--prepend-bos", True)])
def test_tokenizer_without_bos(model_dirs, text_file, tmp_path, flag, prepend_bos):
    """A tokenizer that prepends nothing (GPT-2's): all tokens are rows, or BOS is
    prepended on request and dropped."""
    out = tmp_path / "acts"
    cache("--model", model_dirs["dirs"]["plain"], "--layer", 1, "--context-size", 8,
          "--dtype", "float32", "--out", out, "--no-progress", text_file, *([flag] if flag else []))
    ref = reference(model_dirs, TEXTS, context_size=8, prepend_bos=prepend_bos, layer=1)
    assert len(ref) == sum(len(t.split()) for t in TEXTS)
    assert_float32_close(read_shards(out), ref)
    manifest = read_manifest(out)
    assert (manifest["prepend_bos"], manifest["bos_dropped"]) == (prepend_bos, prepend_bos)


def test_token_budget(model_dirs, text_file, tmp_path):
    out = tmp_path / "acts"
    cache("--model", model_dirs["dirs"]["bos"], "--layer", 1, "--tokens", 10, "--shard-tokens", 4,
          "--batch-size", 1, "--context-size", 8, "--dtype", "float32", "--out", out, "--no-progress",
          text_file)
    ref = reference(model_dirs, TEXTS, context_size=8, prepend_bos=True, layer=1)
    assert_float32_close(read_shards(out), ref[:10])
    manifest = read_manifest(out)
    assert manifest["tokens"] == 10
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]


def test_whole_file_and_truncate(model_dirs, tmp_path):
    """--whole-file: a file is one document (its lines run on); --truncate: only its
    first context_size tokens."""
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("\n".join(TEXTS[:3]) + "\n")
    files[1].write_text(TEXTS[4] + "\n")
    documents = [" ".join(TEXTS[:3]), TEXTS[4]]
    for truncate in (False, True):
        out = tmp_path / f"acts{truncate}"
        cache("--model", model_dirs["dirs"]["bos"], "--layer", 2, "--whole-file", "--context-size", 6,
              "--dtype", "float32", "--out", out, "--no-progress", *files,
              *(["--truncate"] if truncate else []))
        ref = reference(model_dirs, documents, context_size=6, prepend_bos=True, layer=2,
                        truncate=truncate)
        assert len(ref) == (10 if truncate else sum(len(d.split()) for d in documents))
        assert_float32_close(read_shards(out), ref)
        assert read_manifest(out)["dataset"] == f"{files[0]}, {files[1]}"


def test_dataset_with_a_text_column(model_dirs, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    with (data / "train.jsonl").open("w") as f:
        for i, text in enumerate(TEXTS):
            f.write(json.dumps({"id": i, "body": text}) + "\n")
    out = tmp_path / "acts"
    cache("--model", model_dirs["dirs"]["bos"], "--layer", 1, "--dataset", data, "--text-column", "body",
          "--context-size", 8, "--dtype", "float32", "--out", out, "--no-progress")
    ref = reference(model_dirs, TEXTS, context_size=8, prepend_bos=True, layer=1)
    assert_float32_close(read_shards(out), ref)
    assert read_manifest(out)["dataset"] == str(data)


def test_plain_progress_without_tqdm(model_dirs, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    cache("--model", model_dirs["dirs"]["bos"], "--layer", 1, "--tokens", 12, "--out", tmp_path / "acts",
          text_file)
    assert "cache_activations: 12 rows of 12" in capsys.readouterr().err


def test_overwrite(model_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "acts"
    common = ["--model", model_dirs["dirs"]["bos"], "--layer", 1, "--out", out, "--no-progress", text_file]
    cache(*common, "--shard-tokens", 10)
    assert len(read_manifest(out)["shards"]) > 1
    assert cache(*common, check=False) == 2
    assert "already holds activations" in capsys.readouterr().err
    cache(*common, "--overwrite", "--format", "safetensors")
    assert len(read_shards(out, "safetensors", np.float16)) == sum(len(t.split()) for t in TEXTS)


@pytest.mark.parametrize("case", ["layer", "hook", "unknown hook", "empty", "column", "context",
                                  "overflow"])
def test_errors(model_dirs, text_file, tmp_path, capsys, case):
    model = ["--model", model_dirs["dirs"]["huge" if case == "overflow" else "bos"]]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"body": "the cat"}) + "\n")
    args, message = {
        "layer": (["--layer", 3, text_file], "--layer 3 is out of range: the model has 2 layers"),
        "hook": (["--hook", "transformer.h.0.mlpp", text_file], "close names: transformer.h.0.mlp"),
        "unknown hook": (["--hook", "encoder.layers.7", text_file],
                         "has no module 'encoder.layers.7'; top-level modules: transformer, lm_head"),
        "empty": (["--layer", 1, empty], f"the input ({empty}) has no text"),
        "column": (["--layer", 1, "--dataset", data], "has no column 'text'; its columns: body"),
        "context": (["--layer", 1, "--context-size", 65, text_file], "exceeds the model's 64 positions"),
        "overflow": (["--layer", 0, text_file], "activations overflow float16 (or are not finite); "
                                                "use --dtype float32"),
    }[case]
    assert cache(*model, *args, "--out", tmp_path / "acts", "--no-progress", check=False) == 2
    err = capsys.readouterr().err
    assert err.startswith("cache_activations.py: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "acts" / "activations.json").exists()


def test_error_as_a_subprocess(model_dirs, tmp_path):
    """A missing input is found before torch is imported: this run is quick."""
    missing = tmp_path / "missing.txt"
    r = cache_subprocess("--model", model_dirs["dirs"]["bos"], "--hook", "transformer.h.0.mlp",
                         "--out", tmp_path / "acts", missing)
    assert r.returncode == 2
    assert r.stderr == f"cache_activations.py: error: no such file: {missing}\n"
    assert not (tmp_path / "acts").exists()


@pytest.mark.skipif(not HSAE_TOOL, reason="HSAE_INTEROP_TOOL is not set (ctest -L python sets it)")
@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_hsae_reads_the_shards(model_dirs, text_file, tmp_path, fmt, dtype):
    """hsae's own readers (npy_file, safetensors_file, through hsae_interop_tool) read every
    shard as the same numbers as numpy and safetensors do."""
    out = tmp_path / "acts"
    cache("--model", model_dirs["dirs"]["bos"], "--layer", 1, "--format", fmt, "--dtype", dtype,
          "--shard-tokens", 20, "--out", out, "--no-progress", text_file)
    shards = read_manifest(out)["shards"]
    assert len(shards) > 1
    for i, shard in enumerate(shards):
        path = out / shard["file"]
        if fmt == "npy":  # hsae reads the .npy, writes it as the safetensors tensor "x"
            expected = np.load(path)
            converted = tmp_path / f"hsae{i}.safetensors"
            run_hsae("st-write", converted, path, "F32")
            got = load_file(converted)["x"]
        else:  # hsae reads the tensor "activations", writes it as float32 .npy
            expected = load_file(path)["activations"]
            converted = tmp_path / f"hsae{i}.npy"
            run_hsae("st-read", path, "activations", converted)
            got = np.load(converted)
        assert expected.dtype == np.dtype(dtype)
        assert got.dtype == np.float32 and np.array_equal(got, expected.astype(np.float32))


def run_hsae(*args):
    r = subprocess.run([HSAE_TOOL, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hsae_interop_tool {args} exited {r.returncode}: {r.stderr}"


def test_help_names_both_activations(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cache_activations.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("hidden_states[0] is the embeddings", "blocks.L.hook_resid_pre",
                   "first element of a tuple", "--shard-tokens", "--keep-bos"):
        assert needle in text
