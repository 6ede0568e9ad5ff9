# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the interop tests: run hsae_interop_tool, read what it wrote."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

TOOL = os.environ.get("HSAE_INTEROP_TOOL")


class HsaeError(Exception):
    """hsae_interop_tool exited with status 3: an hsae::error, message in str()."""


def hsae(*args, check=True):
    """Runs hsae_interop_tool and returns the CompletedProcess. Status 3 (an hsae::error)
    raises HsaeError when `check`; any status but 0 and 3 (a crash, a sanitizer report)
    fails the test."""
    if not TOOL:
        pytest.fail("HSAE_INTEROP_TOOL is not set (run these tests through ctest -L interop)")
    r = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, errors="replace", timeout=300)
    if r.returncode == 3:
        if check:
            raise HsaeError(r.stderr.strip())
        return r
    if r.returncode != 0:
        pytest.fail(f"hsae_interop_tool {args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def load_json(path):
    return json.loads(Path(path).read_text())


def hsae_encode(sae_dir, x, tmp, k=None):
    """hsae's encode + decode of the rows of x (float32 [B, D]) with the SAE in sae_dir.
    Returns dict(values [B,k], indices [B,k], dense [B,F], recon [B,D], info)."""
    xin = Path(tmp) / "x.npy"
    np.save(xin, np.ascontiguousarray(x, dtype=np.float32))
    prefix = Path(tmp) / "hsae_out"
    hsae("encode", sae_dir, xin, prefix, *([] if k is None else [k]))
    out = {n: np.load(f"{prefix}.{n}.npy") for n in ("values", "indices", "dense", "recon")}
    out["indices"] = out["indices"].astype(np.int64)
    out["info"] = load_json(f"{prefix}.json")
    return out


def hsae_dump(sae_dir, tmp):
    """The weights as hsae loads them (hsae orientation: W_enc [F, D]) + the info json."""
    prefix = Path(tmp) / "hsae_dump"
    hsae("dump", sae_dir, prefix)
    w = {n: np.load(f"{prefix}.{n}.npy") for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    w["b_enc"] = w["b_enc"][0]
    w["b_dec"] = w["b_dec"][0]
    w["info"] = load_json(f"{prefix}.json")
    return w


def assert_same_code(dense_ref, dense_hsae, k, rtol=2e-5, atol=2e-5):
    """The dense top-k activations agree. Where the selected sets differ (a near tie at
    the k-th value), the differing entries must be within the tolerance of the k-th value."""
    dense_ref = np.asarray(dense_ref, dtype=np.float64)
    dense_hsae = np.asarray(dense_hsae, dtype=np.float64)
    assert dense_ref.shape == dense_hsae.shape
    scale = max(1.0, float(np.abs(dense_ref).max()))
    close = np.isclose(dense_ref, dense_hsae, rtol=rtol, atol=atol * scale)
    for b in np.nonzero(~close.all(axis=1))[0]:
        kth = np.sort(dense_ref[b])[::-1][k - 1]
        bad = ~close[b]
        differing = np.concatenate([dense_ref[b, bad], dense_hsae[b, bad]])
        assert np.all((differing == 0) | np.isclose(differing, kth, rtol=1e-4, atol=atol * scale)), (
            f"row {b}: activations differ beyond a tie at the k-th value {kth}: "
            f"ref {dense_ref[b, bad]}, hsae {dense_hsae[b, bad]}")


def assert_close(a, b, rtol=2e-5, atol=2e-5):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(np.abs(a).max()))
    np.testing.assert_allclose(b, a, rtol=rtol, atol=atol * scale)


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)
