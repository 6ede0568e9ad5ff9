#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Runs a Hugging Face transformers model over text and caches one activation as shards
that hsae-train reads: DIR/acts_00000.npy, acts_00001.npy, ... (2-D [rows, d_model],
float16 or float32) or .safetensors files (one tensor, "activations"), and
DIR/activations.json, the manifest, written last. tools/README.md has the details."""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "activations.json"
SHARD_PREFIX = "acts_"
EXIT_ERROR = 2
DEFAULT_CONTEXT_SIZE = 128

DESCRIPTION = """\
Runs a Hugging Face transformers model over text and writes one activation of every
token as shards for hsae-train: OUT/acts_00000.npy, acts_00001.npy, ... (2-D
[rows, d_model]) or .safetensors files (tensor "activations"), then OUT/activations.json,
the manifest (model_name, hook_name, d_model, dtype, tokens, shards, ...).

Which activation (one of):
  --layer L        hidden_states[L] of the model (output_hidden_states=True).
                   hidden_states[0] is the embeddings, and hidden_states[L] for
                   L < number of layers is the residual stream entering block L,
                   which TransformerLens and SAELens call blocks.L.hook_resid_pre (the
                   manifest's hook_name); L = number of layers is the model's final
                   output (after the final norm for GPT-2, Pythia, Llama and most
                   others: TransformerLens' ln_final.hook_normalized).
  --hook PATH      the output of the submodule at PATH in model.named_modules(), e.g.
                   transformer.h.3.mlp (GPT-2), gpt_neox.layers.3.mlp (Pythia),
                   model.layers.3.self_attn (Llama), captured with a forward hook: its
                   output tensor, or the first element of a tuple output. PATH may also
                   be relative to the base model (h.3.mlp). The forward pass stops
                   there, so a hook in an early layer is cheap.

Tokens: each document is tokenized without special tokens and cut into chunks of
--context-size tokens (only the first chunk with --truncate); with BOS prepended (the
default when the tokenizer itself prepends tokenizer.bos_token_id, or --prepend-bos),
every chunk starts with BOS and holds context-size - 1 tokens of text. Rows are the
tokens' activations in document order; padding positions (attention mask 0) and the BOS
positions are not written (--keep-bos writes the BOS rows).
"""

EPILOG = """\
examples:
  cache_activations.py --model EleutherAI/pythia-70m --layer 3 \\
      --dataset NeelNanda/pile-10k --tokens 10000000 --out acts/
  cache_activations.py --model ./my-model --hook transformer.h.3.mlp \\
      --format safetensors --dtype float32 --out acts/ corpus/*.txt

An error is one line on stderr and exit status 2."""


class CacheError(Exception):
    """A problem with the arguments, the model, the input or the output directory: its
    message is printed as one line and the program exits with status 2."""


# ---------------------------------------------------------------------------------------
# Arguments


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cache_activations.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("input")
    source.add_argument("files", nargs="*", type=Path, metavar="FILE",
                        help="text files: one document per line (blank lines skipped)")
    source.add_argument("--whole-file", action="store_true",
                        help="each FILE is one document instead of one per line")
    source.add_argument("--dataset", metavar="NAME",
                        help="a Hugging Face dataset (hub name or local path), streamed, "
                             "instead of FILEs")
    source.add_argument("--dataset-config", metavar="NAME", help="the dataset's configuration")
    source.add_argument("--split", default="train", help="the dataset's split (default: train)")
    source.add_argument("--text-column", default="text", metavar="COLUMN",
                        help="the dataset's text column (default: text)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                       help="hub name or local directory (AutoModelForCausalLM, else AutoModel)")
    which = model.add_mutually_exclusive_group(required=True)
    which.add_argument("--layer", type=int, metavar="L", help="hidden_states[L] (see above)")
    which.add_argument("--hook", metavar="PATH", help="a submodule's output (see above)")
    model.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    model.add_argument("--model-dtype", default="float32",
                       choices=("float32", "bfloat16", "float16"),
                       help="the dtype the model runs in (default: float32)")

    tokens = parser.add_argument_group("tokens")
    tokens.add_argument("--context-size", type=positive_int, metavar="N",
                        help="tokens per sequence, BOS included (default: 128, or the "
                             "model's positions if fewer)")
    tokens.add_argument("--truncate", action="store_true",
                        help="keep only each document's first chunk")
    tokens.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                        help="sequences per forward pass (default: 32)")
    tokens.add_argument("--tokens", type=positive_int, metavar="N",
                        help="stop after N rows (default: all the input)")
    bos = tokens.add_mutually_exclusive_group()
    bos.add_argument("--prepend-bos", dest="prepend_bos", action="store_true", default=None,
                     help="prepend BOS to every chunk (default: when the tokenizer does)")
    bos.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false",
                     help="never prepend BOS")
    tokens.add_argument("--keep-bos", action="store_true", help="write the BOS positions' rows too")

    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output directory (created)")
    output.add_argument("--format", default="npy", choices=("npy", "safetensors"),
                        help="shard format (default: npy)")
    output.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="the shards' dtype (default: float16)")
    output.add_argument("--shard-tokens", type=positive_int, default=262144, metavar="N",
                        help="rows per shard, the last one shorter (default: 262144)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the activations already in DIR")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")

    args = parser.parse_args(argv)
    if bool(args.files) == bool(args.dataset):
        parser.error("give text FILEs or --dataset NAME (one of them)")
    if args.dataset and args.whole_file:
        parser.error("--whole-file applies to FILEs, not to --dataset")
    if args.layer is not None and args.layer < 0:
        parser.error(f"--layer must be >= 0, not {args.layer}")
    if args.keep_bos and args.prepend_bos is False:
        parser.error("--keep-bos with --no-prepend-bos: there is no BOS to keep")
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        parser.error(f"--device must be cpu, cuda or cuda:N, not {args.device!r}")
    return args


# ---------------------------------------------------------------------------------------
# Documents


def text_file_documents(paths: list[Path], whole_file: bool) -> Iterator[str]:
    """The documents of the text files: each file, or each non-blank line."""
    for path in paths:
        try:
            with path.open(encoding="utf-8") as f:
                if whole_file:
                    text = f.read()
                    if text.strip():
                        yield text
                else:
                    for line in f:
                        if line.strip():
                            yield line.rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise CacheError(f"cannot read {path}: {e}") from None


def dataset_documents(name: str, config: str | None, split: str, column: str) -> Iterator[str]:
    """The text column of a Hugging Face dataset, streamed. The dataset is opened and its
    columns checked here, before the first document is asked for."""
    try:
        import datasets
    except ImportError:
        raise CacheError("--dataset needs the 'datasets' package (pip install datasets)") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, ...)
        raise CacheError(f"cannot load dataset {name} (split {split}): {one_line(e)}") from None
    columns = stream.column_names
    if columns is not None and column not in columns:
        raise CacheError(f"dataset {name} has no column {column!r}; its columns: "
                         f"{', '.join(columns)} (--text-column)")

    def texts() -> Iterator[str]:
        for record in stream:
            if column not in record:
                raise CacheError(f"dataset {name} has no column {column!r}; its columns: "
                                 f"{', '.join(record)} (--text-column)")
            text = record[column]
            if isinstance(text, str) and text.strip():
                yield text

    return texts()


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------
# Tokens


def tokenizer_prepends_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own special tokens start with its BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    without = tokenizer("a b", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


def token_chunks(documents: Iterable[str], tokenizer: Any, context_size: int,
                 bos_id: int | None, truncate: bool, group: int = 64) -> Iterator[list[int]]:
    """Cuts each document's tokens into chunks of context_size tokens, each one starting
    with bos_id when it is not None; only the first chunk of a document with `truncate`."""
    body = context_size - (bos_id is not None)
    if body <= 0:
        raise CacheError(f"--context-size {context_size} leaves no room for text after BOS")
    head = [] if bos_id is None else [bos_id]
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        # verbose=False: no warning about documents longer than the model; they are cut here.
        encoded = tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
        pending.clear()
        for ids in encoded:
            stop = min(len(ids), body) if truncate else len(ids)
            for start in range(0, stop, body):
                yield head + ids[start:start + body]

    for document in documents:
        pending.append(document)
        if len(pending) == group:
            yield from flush()
    if pending:
        yield from flush()


def batched(items: Iterable[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------
# The model and the captured activation


def load_model(name: str, device: str, dtype_name: str) -> tuple[Any, Any]:
    """The model (AutoModelForCausalLM, or AutoModel when the configuration is not a causal
    LM's), in eval mode on `device`, and its tokenizer."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CacheError(f"--device {device}: torch sees no CUDA device")
    dtype = getattr(torch, dtype_name)
    try:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except ValueError:  # not a causal LM's configuration (an encoder, say)
            model = transformers.AutoModel.from_pretrained(name, dtype=dtype)
    except Exception as e:  # OSError (not found), ValueError, ...
        raise CacheError(f"cannot load model {name}: {one_line(e)}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise CacheError(f"cannot load the tokenizer of {name}: {one_line(e)}") from None
    model.config.use_cache = False  # no key/value cache: nothing is generated
    return model.to(device).eval(), tokenizer


def layer_count(model: Any) -> int | None:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def max_positions(model: Any) -> int | None:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    count = getattr(config, "max_position_embeddings", None)
    return count if isinstance(count, int) and count > 0 else None


def layer_hook_name(layer: int, layers: int) -> str:
    """TransformerLens' name of hidden_states[layer] (see the --help text)."""
    return "ln_final.hook_normalized" if layer == layers else f"blocks.{layer}.hook_resid_pre"


def find_module(model: Any, path: str) -> tuple[Any, Any]:
    """(the module at `path`, the model to run): `path` relative to the model or to its base
    model; the base model runs when the module is in it (no LM head computed)."""
    base = model.base_model
    modules = dict(model.named_modules())
    module = modules.get(path)
    if module is None and base is not model:
        module = dict(base.named_modules()).get(path)
    if module is None or path == "":
        names = [n for n in modules if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
        hint = ("close names: " + ", ".join(close)) if close else \
            ("top-level modules: " + ", ".join(n for n in names if "." not in n))
        raise CacheError(f"--hook {path}: {type(model).__name__} has no module {path!r}; {hint}")
    in_base = any(m is module for m in base.modules())
    return module, (base if in_base else model)


class _StopForward(Exception):
    """Raised by the forward hook once it has the activation: the rest is not computed."""


@dataclass
class Capture:
    """Runs the model on a batch and returns the chosen activation [batch, seq, d]."""
    runner: Any
    layer: int | None
    module: Any | None

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        if self.module is None:
            out = self.runner(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=True, return_dict=True)
            hidden = out.hidden_states
            if hidden is None:
                raise CacheError(f"{type(self.runner).__name__} returns no hidden_states; "
                                 "use --hook")
            if self.layer >= len(hidden):
                raise CacheError(f"--layer {self.layer} is out of range: the model has "
                                 f"{len(hidden) - 1} layers (hidden_states 0..{len(hidden) - 1})")
            return hidden[self.layer]
        captured: list[Any] = []

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if isinstance(output, dict):  # a ModelOutput: its first field
                output = next(iter(output.values()))
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handle = self.module.register_forward_hook(hook)
        try:
            self.runner(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise CacheError("the hooked module did not run in the forward pass")
        return captured[0]


# ---------------------------------------------------------------------------------------
# Output


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls write(temporary path) next to `path`, syncs it and renames it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def existing_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir()
                  if p.name == MANIFEST or (p.name.startswith(SHARD_PREFIX)
                                            and p.suffix in (".npy", ".safetensors")))


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Creates `out`; refuses one that holds activations unless `overwrite`, which removes
    them, the manifest first (a directory never describes shards it does not hold)."""
    if out.exists() and not out.is_dir():
        raise CacheError(f"--out {out} exists and is not a directory")
    old = existing_outputs(out)
    if old and not overwrite:
        raise CacheError(f"--out {out} already holds activations ({len(old)} files: "
                         f"{old[0].name}, ...); use --overwrite or another directory")
    old.sort(key=lambda p: p.name != MANIFEST)
    for path in old:
        path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create --out {out}: {e}") from None


class ShardWriter:
    """Collects rows and writes them as shards of `shard_rows` rows (the last one shorter)."""

    def __init__(self, out: Path, fmt: str, shard_rows: int, metadata: dict[str, str]):
        self.out = out
        self.fmt = fmt
        self.shard_rows = shard_rows
        self.metadata = metadata
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows)
        while self.pending_rows >= self.shard_rows:
            self._write(self.shard_rows)

    def close(self) -> list[dict[str, Any]]:
        if self.pending_rows:
            self._write(self.pending_rows)
        return self.shards

    def _write(self, rows: int) -> None:
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        shard, rest = np.ascontiguousarray(data[:rows]), data[rows:]
        self.pending = [rest] if len(rest) else []
        self.pending_rows = len(rest)
        name = f"{SHARD_PREFIX}{len(self.shards):05d}.{self.fmt}"
        atomic_write(self.out / name, lambda tmp: self._save(tmp, shard))
        self.shards.append({"file": name, "rows": int(rows)})

    def _save(self, path: Path, shard: np.ndarray) -> None:
        if self.fmt == "npy":
            with path.open("wb") as f:
                np.save(f, shard, allow_pickle=False)
        else:
            from safetensors.numpy import save_file
            save_file({"activations": shard}, str(path), metadata=self.metadata)


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------
# Progress


class PlainProgress:
    """The progress line when tqdm is missing: the rows so far, every few seconds."""

    def __init__(self, total: int | None, every: float = 5.0):
        self.total = total
        self.rows = 0
        self.every = every
        self.last = time.monotonic()

    def update(self, rows: int) -> None:
        self.rows += rows
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self._print()

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        of = f" of {self.total}" if self.total else ""
        print(f"cache_activations: {self.rows} rows{of}", file=sys.stderr, flush=True)


class NoProgress:
    def update(self, rows: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(total)
    return tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True,
                desc="activations")


# ---------------------------------------------------------------------------------------
# The run


def documents_of(args: argparse.Namespace) -> Iterator[str]:
    if args.dataset:
        return dataset_documents(args.dataset, args.dataset_config, args.split, args.text_column)
    for path in args.files:
        if not path.is_file():
            raise CacheError(f"{'not a file' if path.exists() else 'no such file'}: {path}")
    return text_file_documents(args.files, args.whole_file)


def input_description(args: argparse.Namespace) -> str:
    return args.dataset if args.dataset else ", ".join(str(p) for p in args.files)


def choose_activation(model: Any, args: argparse.Namespace) -> tuple[Capture, str]:
    """The capture of --layer or --hook, and its hook_name for the manifest."""
    if args.hook is not None:
        module, runner = find_module(model, args.hook)
        return Capture(runner, None, module), args.hook
    layers = layer_count(model)
    if layers is not None and args.layer > layers:
        raise CacheError(f"--layer {args.layer} is out of range: the model has {layers} "
                         f"layers (hidden_states 0..{layers})")
    hook_name = layer_hook_name(args.layer, layers if layers is not None else -1)
    return Capture(model.base_model, args.layer, None), hook_name


def choose_context_size(model: Any, requested: int | None) -> int:
    positions = max_positions(model)
    size = requested or min(DEFAULT_CONTEXT_SIZE, positions or DEFAULT_CONTEXT_SIZE)
    if positions is not None and size > positions:
        raise CacheError(f"--context-size {size} exceeds the model's {positions} positions")
    return size


def choose_bos(tokenizer: Any, args: argparse.Namespace) -> tuple[bool, bool]:
    """(prepend_bos, bos_dropped)."""
    prepend = tokenizer_prepends_bos(tokenizer) if args.prepend_bos is None else args.prepend_bos
    if prepend and tokenizer.bos_token_id is None:
        raise CacheError(f"--prepend-bos: the tokenizer of {args.model} has no BOS token")
    return prepend, prepend and not args.keep_bos


def kept_rows(acts: Any, keep: Any, dtype: Any, hook_name: str) -> Any:
    """The rows of acts [batch, tokens, d] where keep [batch, tokens] is true, in dtype."""
    import torch

    if not isinstance(acts, torch.Tensor) or acts.dim() != 3 or acts.shape[:2] != keep.shape:
        shape = list(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise CacheError(f"{hook_name} gives {shape} for a batch of {list(keep.shape)} tokens, "
                         "not [batch, tokens, features]")
    rows = acts[keep].to(dtype)
    if not torch.isfinite(rows).all():
        raise CacheError("activations overflow float16 (or are not finite); use --dtype float32"
                         if dtype == torch.float16 else "the activations hold NaN or Inf")
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Caches the activations and writes the manifest; returns it."""
    import torch

    documents = documents_of(args)
    model, tokenizer = load_model(args.model, args.device, args.model_dtype)
    capture, hook_name = choose_activation(model, args)
    context_size = choose_context_size(model, args.context_size)
    prepend_bos, bos_dropped = choose_bos(tokenizer, args)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    out_dtype = getattr(torch, args.dtype)

    prepare_out_dir(args.out, args.overwrite)
    writer = ShardWriter(args.out, args.format, args.shard_tokens,
                         {"model_name": args.model, "hook_name": hook_name})
    chunks = token_chunks(documents, tokenizer, context_size,
                          tokenizer.bos_token_id if prepend_bos else None, args.truncate)
    budget = args.tokens
    progress = make_progress(budget, not args.no_progress)
    written = 0
    d_model: int | None = None
    try:
        for batch in batched(chunks, args.batch_size):
            ids, mask = pad_batch(batch, pad_id, args.device)
            keep = mask.bool()
            if bos_dropped:
                keep[:, 0] = False
            with torch.inference_mode():
                rows = kept_rows(capture(ids, mask), keep, out_dtype, hook_name)
            if budget is not None:
                rows = rows[:budget - written]
            d_model = rows.shape[-1]
            writer.add(rows.cpu().numpy())
            written += len(rows)
            progress.update(len(rows))
            if budget is not None and written >= budget:
                break
    finally:
        progress.close()
    if written == 0:
        raise CacheError(f"no tokens to cache: the input ({input_description(args)}) has no text")
    manifest = {
        "format": "hsae-activations",
        "version": 1,
        "model_name": args.model,
        "hook_name": hook_name,
        "layer": args.layer,
        "d_model": d_model,
        "dtype": args.dtype,
        "tokens": written,
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "bos_dropped": bos_dropped,
        "dataset": input_description(args),
        "shards": writer.close(),
    }
    write_manifest(args.out, manifest)
    return manifest


def pad_batch(batch: list[list[int]], pad_id: int, device: str) -> tuple[Any, Any]:
    """input_ids and attention_mask [len(batch), longest], padded on the right."""
    import torch

    longest = max(len(seq) for seq in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = run(args)
    except CacheError as e:
        print(f"cache_activations.py: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    shards = len(manifest["shards"])
    print(f"cache_activations.py: {manifest['tokens']} rows of {manifest['hook_name']} "
          f"(d_model {manifest['d_model']}, {manifest['dtype']}) in {shards} "
          f"shard{'s' if shards != 1 else ''} under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
