#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the generated fuzz seeds (corpus/<parser>/gen_*), deterministically.

    python3 tests/fuzz/make_seeds.py            # (re)write them
    python3 tests/fuzz/make_seeds.py --check    # exit 1 if a file differs (ctest fuzz_seeds_current)

Seeds that reach the parsers' slow or subtle paths, each under 64 KiB:
  - safetensors headers of many tensors (the SAX parser, the offset sort, the name index):
    one under the fuzzers' -max_len of 4096 bytes, one of 800 tensors for the replays;
  - nesting at the limit (127 levels: parses) and one past it (rejected);
  - zero-size tensors (reads that copy nothing), a NUL after the JSON, a repeated key;
  - a .npy header with terminal escapes in it (quoted, escaped, in the error message).
"""
import json
import pathlib
import struct
import sys

HERE = pathlib.Path(__file__).resolve().parent
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1}


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape)] in data order; data bytes are a ramp."""
    header, off = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(i % 251 for i in range(off))


def raw_safetensors(text, data=b""):
    return struct.pack("<Q", len(text)) + text + data


def npy(dict_text, data):
    body = dict_text.encode("latin-1")
    total = 10 + len(body) + 1
    body += b" " * (-total % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body + data


def nested(levels):
    """A tensor whose unknown field nests so that the document is `levels` deep."""
    inner = levels - 2  # the top object and the tensor's object
    value = "0"
    for i in range(inner):
        value = ("[" + value + "]") if i % 2 else ('{"a":' + value + "}")
    return (b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":' + value.encode() + b"}}",
            bytes(4))


def seeds():
    out = {}
    dtypes = ["F32", "BF16", "F16", "F64", "U8"]
    small = [(f"t{i}", dtypes[i % 5], [i % 3]) for i in range(40)]
    out["safetensors/gen_many_tensors_small.safetensors"] = safetensors(small, {"format": "pt", "n": "40"})
    big = [(f"w{i}", "F32" if i % 4 else "BF16", [1] if i % 3 else [0, 2]) for i in range(800)]
    out["safetensors/gen_many_tensors_800.safetensors"] = safetensors(big)
    text, data = nested(127)
    out["safetensors/gen_nesting_127.safetensors"] = raw_safetensors(text, data)
    text, data = nested(128)
    out["safetensors/gen_nesting_128.safetensors"] = raw_safetensors(text, data)
    out["safetensors/gen_zero_size.safetensors"] = safetensors(
        [("e32", "F32", [2, 0]), ("e64", "F64", [0]), ("eb", "BF16", [0, 3]), ("x", "F32", [1]), ("eh", "F16", [0])])
    ok = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    out["safetensors/gen_nul_after_header.safetensors"] = raw_safetensors(ok + b"\0GARBAGE", bytes(4))
    out["safetensors/gen_repeated_key.safetensors"] = raw_safetensors(
        b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        bytes(4))
    out["npy/gen_escapes_in_header.npy"] = npy(
        "{'descr': '\x1b[2J\x1b[31m<f4\x07', 'fortran_order': False, 'shape': (2, 3), }", bytes(24))
    for name, b in out.items():
        assert len(b) < 64 * 1024, name
    assert len(out["safetensors/gen_many_tensors_small.safetensors"]) <= 4096
    return out


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, b in seeds().items():
        path = HERE / "corpus" / name
        if check:
            if not path.is_file() or path.read_bytes() != b:
                stale.append(name)
        else:
            path.write_bytes(b)
    if stale:
        print("stale fuzz seeds (run tests/fuzz/make_seeds.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
