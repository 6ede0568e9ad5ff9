# SPDX-License-Identifier: Apache-2.0
"""safetensors files: hsae's writer against the safetensors library's reader, the
library's writer against hsae's reader, and hsae's validation of hostile files against
the library's own (safetensors.deserialize is the reference)."""
import json
import random
import struct

import numpy as np
import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import hsae

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}


def bits(t):
    return t.contiguous().view(BITS[t.dtype])


def same_bits(a, b):
    """Bitwise equal, except that a NaN need only be a NaN (torch's float -> bfloat16 of
    a NaN gives 0xffff, hsae a quiet NaN with the sign and payload kept)."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def special_matrix(rng):
    x = (rng.standard_normal((37, 19)) * 10).astype(np.float32)
    x[0, :8] = [0.0, -0.0, 1e-8, -3e-7, 70000.0, np.inf, -np.inf, np.nan]  # f16 subnormals, overflow
    x[1, :4] = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 65519.0]  # bf16 / f16 ties
    return x


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
def test_hsae_writes_what_safetensors_reads(tmp_path, rng, dtype):
    x = special_matrix(rng)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "h.safetensors"
    hsae("st-write", out, tmp_path / "x.npy", dtype)
    t = load_file(out)
    assert sorted(t) == ["row0", "x"]
    want = torch.from_numpy(x).to(TORCH[dtype])  # torch rounds to nearest even, as hsae must
    assert t["x"].dtype == want.dtype and t["x"].shape == want.shape
    assert same_bits(t["x"], want)
    assert same_bits(t["row0"], want[0])
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"writer": "hsae"}
    # The header is padded so that the data start is 8-byte aligned.
    n = struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert (8 + n) % 8 == 0


def test_safetensors_writes_what_hsae_reads(tmp_path, rng):
    x = special_matrix(rng)
    tensors = {
        "a32": torch.from_numpy(x),
        "b16": torch.from_numpy(x[:5, :7]).to(torch.float16),
        "cbf16": torch.from_numpy(x[2]).to(torch.bfloat16),
        "d64": torch.from_numpy(x[3:9, :4]).to(torch.float64) * (1 + 2.0**-30),
    }
    path = tmp_path / "s.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    for name, t in tensors.items():
        out = tmp_path / f"{name}.npy"
        hsae("st-read", path, name, out)
        got = np.load(out)
        want = t.to(torch.float32).numpy()  # exact for F16/BF16, nearest even for F64
        if want.ndim == 1:
            want = want[None, :]
        assert got.shape == want.shape
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), name


def library_accepts(data):
    try:
        safetensors.deserialize(bytes(data))
        return True
    except Exception:  # SafetensorError, or whatever the binding raises on junk
        return False


def hsae_accepts(tmp_path, data, name="case.safetensors"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    r = hsae("st-check", p, check=False)
    if r.returncode == 3:
        assert str(p) in r.stderr, f"error does not name the file: {r.stderr}"
    return r.returncode == 0


def valid_file():
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
               "b": torch.tensor([1.5, -2.0, 0.25], dtype=torch.bfloat16)}
    return bytearray(safetensors.torch.save(tensors, metadata={"k": "v"}))


def with_header(header, data=b""):
    h = json.dumps(header).encode() if not isinstance(header, (bytes, bytearray)) else bytes(header)
    return struct.pack("<Q", len(h)) + h + data


def test_every_truncation_is_rejected_by_both(tmp_path):
    full = valid_file()
    assert library_accepts(full) and hsae_accepts(tmp_path, full)
    for n in range(len(full)):
        assert not library_accepts(full[:n])
        assert not hsae_accepts(tmp_path, full[:n]), f"hsae accepted the file cut to {n} bytes"


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def nest(n):
    return [] if n == 1 else [nest(n - 1)]

HOSTILE = {
    "length beyond file": struct.pack("<Q", 1000) + b"{}",
    "length 2^63": struct.pack("<Q", 1 << 63) + b"{}",
    "length just over the limit": struct.pack("<Q", 100_000_001) + b"{}",
    "malformed json": with_header(b'{"a": {"dtype": "F32",'),
    "not an object": with_header([1, 2]),
    "invalid utf-8": with_header(b'{"\xff": 1}'),
    "unknown dtype": with_header({"a": {**F32x2, "dtype": "F31"}}, bytes(8)),
    "lowercase dtype": with_header({"a": {**F32x2, "dtype": "f32"}}, bytes(8)),
    "shape too small": with_header({"a": {**F32x2, "shape": [1]}}, bytes(8)),
    "shape too large": with_header({"a": {**F32x2, "shape": [3]}}, bytes(8)),
    "negative dim": with_header({"a": {**F32x2, "shape": [-2]}}, bytes(8)),
    "float dim": with_header({"a": {**F32x2, "shape": [2.0]}}, bytes(8)),
    "missing shape": with_header({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8)),
    "offsets not a pair": with_header({"a": {**F32x2, "data_offsets": [0, 8, 8]}}, bytes(8)),
    "offsets reversed": with_header({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)),
    "hole at start": with_header({"a": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)),
    "hole between": with_header({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, bytes(20)),
    "overlap": with_header({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)),
    "same range twice": with_header({"a": F32x2, "b": F32x2}, bytes(8)),
    "truncated data": with_header({"a": F32x2}, bytes(7)),
    "trailing data": with_header({"a": F32x2}, bytes(9)),
    "overflowing shape": with_header({"a": {"dtype": "F64", "shape": [2**62, 8], "data_offsets": [0, 0]}}),
    "huge offsets": with_header({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2**64 - 2, 2**64 - 1]}}),
    "metadata not strings": with_header({"__metadata__": {"a": 1}}),
    "metadata a list": with_header({"__metadata__": [1]}),
    "tensor not an object": with_header({"a": [1, 2]}),
    "sub-byte remainder": with_header({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2)),
    "nested 128 levels": with_header({"a": {**F32x2, "extra": nest(126)}}, bytes(8)),
    "nested 100000 levels": with_header(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"),
}
VALID = {
    "empty": with_header({}),
    "out of order listing": with_header({"b": {**F32x2, "data_offsets": [8, 16]}, "a": F32x2}, bytes(16)),
    "unknown field ignored": with_header({"a": {**F32x2, "extra": [1]}}, bytes(8)),
    "null metadata": with_header({"__metadata__": None, "a": F32x2}, bytes(8)),
    "zero-size tensor": with_header({"z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                                     "a": F32x2}, bytes(8)),
    "scalar": with_header({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, bytes(4)),
    "f4 packed": with_header({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, bytes(2)),
    "nan tensor": with_header({"a": F32x2}, struct.pack("<2f", float("nan"), float("nan"))),
    "nested 127 levels": with_header({"a": {**F32x2, "extra": nest(125)}}, bytes(8)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_rejected_like_the_library(tmp_path, case):
    data = HOSTILE[case]
    assert not library_accepts(data), f"the library accepts '{case}': the case is wrong"
    assert not hsae_accepts(tmp_path, data), f"hsae accepts '{case}'"


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_oddities_accepted_like_the_library(tmp_path, case):
    data = VALID[case]
    assert library_accepts(data), f"the library rejects '{case}': the case is wrong"
    assert hsae_accepts(tmp_path, data), f"hsae rejects '{case}'"


def test_duplicate_names_rejected_where_the_library_keeps_the_last(tmp_path):
    # Two entries named "a" over the same bytes: the library keeps the last one and
    # accepts the file; hsae refuses the ambiguity. Over different bytes, both refuse.
    same = with_header(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                       b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8))
    assert not hsae_accepts(tmp_path, same)
    other = with_header(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', bytes(16))
    assert not library_accepts(other)
    assert not hsae_accepts(tmp_path, other)


def test_random_mutations_agree_with_the_library(tmp_path):
    """Seeded byte mutations of a valid file: hsae never crashes, never accepts what the
    library rejects, and rejects what it accepts only for a duplicated key."""
    base = valid_file()
    n = struct.unpack("<Q", base[:8])[0]
    gen = random.Random(7)
    alphabet = b'{}[],:"0123456789-.eE FIUB_adhst\\\x00\xff'
    disagreements = []
    for i in range(400):
        data = bytearray(base)
        for _ in range(gen.randint(1, 3)):
            pos = gen.randrange(0, 8 + n + 8)
            op = gen.random()
            if op < 0.6:
                data[pos] = gen.choice(alphabet)
            elif op < 0.8:
                del data[pos]
            else:
                data.insert(pos, gen.choice(alphabet))
        lib = library_accepts(data)
        ours = hsae_accepts(tmp_path, data)
        if lib != ours:
            disagreements.append((i, lib, ours, bytes(data[: 8 + n + 8])))
    for i, lib, ours, head in disagreements:
        assert not ours, f"mutation {i}: hsae accepts what the library rejects: {head!r}"
        header = head[8:].split(b"}}")[0]
        assert header.count(b'"w"') > 1 or header.count(b'"b"') > 1 or header.count(b'"k"') > 1, (
            f"mutation {i}: hsae rejects what the library accepts: {head!r}")
