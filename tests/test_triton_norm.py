"""The Triton NHWC GroupNorm (emerdiff_pl.triton_norm), run by Triton's CPU interpreter: it is F.group_norm, and
where the kernels cannot run the torch-op version takes over with a warning."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import emerdiff_pl.layout as layout

pytest.importorskip("triton")

# Each case: N, C, H, W, groups, dtype, affine ("both", "weight", "bias", "none"), PROGRAMS (fewer: more rows per
# statistics program), GRID_Y_MAX (small: the row blocks of the scale-and-shift pass go on grid axis 0).
CASES = [
    (2, 64, 5, 7, 32, "float32", "both", 1024, 65535),  # H·W not a multiple of the row block
    (
        3,
        96,
        8,
        8,
        32,
        "bfloat16",
        "both",
        1024,
        65535,
    ),  # 96 channels: 32-wide channel blocks, bf16 in and out
    (1, 40, 3, 3, 4, "float32", "none", 1024, 65535),  # 10 channels per group (padded to 16)
    (2, 64, 16, 16, 32, "float32", "weight", 2, 65535),  # 1 statistics program per image over 4 row blocks
    (
        1,
        16,
        80,
        128,
        4,
        "float32",
        "bias",
        1024,
        65535,
    ),  # 40 partials: the group kernel adds 2 blocks of them
    # the production layout: several images × several statistics programs × several row blocks each
    (4, 64, 40, 40, 32, "float32", "both", 64, 65535),
    (3, 64, 20, 20, 16, "float32", "both", 1024, 2),  # 7 row blocks > GRID_Y_MAX: rows on axis 0
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.nn.functional as F
    import emerdiff_pl.triton_norm as tn
    from emerdiff_pl.layout import _group_norm_channels_last_torch
    out = []
    for n, c, h, w, groups, dtype, affine, programs, grid_y_max in json.loads(sys.argv[1]):
        tn.PROGRAMS, tn.GRID_Y_MAX = programs, grid_y_max
        g = torch.Generator().manual_seed(n * c + h)
        dt = getattr(torch, dtype)
        x = (torch.randn(n, c, h, w, generator=g) * 3 + 1).to(dt).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, generator=g).to(dt) if affine in ("both", "weight") else None
        bias = torch.randn(c, generator=g).to(dt) if affine in ("both", "bias") else None
        got = tn.group_norm_nhwc(x, groups, weight, bias, 1e-5)
        f = lambda t: None if t is None else t.float()
        exact = F.group_norm(x.float(), groups, f(weight), f(bias), 1e-5)
        torch_ops = _group_norm_channels_last_torch(x, groups, weight, bias, 1e-5)
        out.append(dict(
            err=(got.float() - exact).abs().max().item(),
            torch_ops_err=(torch_ops.float() - exact).abs().max().item(),
            # within one unit in the last place of the exact result
            within_ulp=bool(((got.float() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-6).all()),
            nhwc=got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous(),
            dtype=str(got.dtype).removeprefix("torch."),
        ))
    print(json.dumps(out))
    """
)


def test_triton_group_norm_equals_group_norm_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case, r in zip(CASES, results, strict=True):
        assert r["nhwc"] and r["dtype"] == case[5], (case, r)
        if case[5] == "float32":
            assert r["err"] < 2e-5, (case, r)
        else:  # bf16: the interpreter truncates where the GPU rounds to nearest (there the error equals the
            # torch ops', BENCHMARKS.md): within one bf16 ulp of the exact value, and about one ulp at most
            assert r["within_ulp"] and r["err"] <= 4 * r["torch_ops_err"], (case, r)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs the kernels on CPU"
)
def test_kernels_that_cannot_run_fall_back_to_torch_ops_with_a_warning(monkeypatch):
    """No GPU here: launching the compiled kernels fails, the probe says so once, and the torch ops are used."""
    monkeypatch.setattr(layout, "_triton_verdict", {})
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="Triton NHWC GroupNorm unavailable on cpu"):
        assert layout._triton_works(cpu) is False
    assert layout._triton_verdict == {cpu: False}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no second probe, no second warning
        assert layout._triton_works(cpu) is False


def test_the_triton_path_is_taken_only_where_it_can_be(monkeypatch):
    """CUDA, eager, no gradient needed, an image under 2^31 elements: else the torch ops (checked by stubbing
    both implementations and the device check)."""
    calls = []
    monkeypatch.setattr(layout, "_group_norm_channels_last_torch", lambda *a: calls.append("torch"))
    import emerdiff_pl.triton_norm as tn

    monkeypatch.setattr(tn, "group_norm_nhwc", lambda *a: calls.append("triton"))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.ones(64, requires_grad=True)
    with torch.no_grad():
        layout.group_norm_channels_last(x, 32, w, None, 1e-5, "triton")
    layout.group_norm_channels_last(x, 32, w.detach(), None, 1e-5, "triton")
    layout.group_norm_channels_last(x, 32, w, None, 1e-5, "triton")  # trainable: the kernels have no backward
    huge = torch.zeros(1, 1, 1, 1).expand(2, 64, 2**15, 2**10)  # 2^31 elements per image, no memory
    layout.group_norm_channels_last(huge, 32, None, None, 1e-5, "triton")
    layout.group_norm_channels_last(x, 32, None, None, 1e-5, "torch")
    assert calls == ["triton", "triton", "torch", "torch", "torch"]


def test_group_norm_refuses_channels_that_do_not_split_into_groups():
    from emerdiff_pl.triton_norm import group_norm_nhwc

    x = torch.randn(1, 30, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="30 channels do not split into 32 groups"):
        group_norm_nhwc(x, 32, None, None, 1e-5)
