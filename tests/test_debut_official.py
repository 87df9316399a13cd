"""Official DeBut artefacts (rlin27/DeBut): rshapes chain files, fine-tuned twiddles, ALS files.

The files are written here in the official formats, and the expected outputs come from the
official code's procedures re-implemented in the test (``deform_butterfly_mult_torch``,
``DeBut_2dConv.pre_process``, ``Generate_Chain``'s block placement), not the library's helpers.
"""

from __future__ import annotations

import fractions

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorslim import debut_official as official
from tensorslim.errors import TensorslimError
from tensorslim.layers.debut import DeButConv2d, DeButLinear

DT = torch.float64
# Fine_tuning/rshapes/lenet.txt of the official repository (conv2 8→16 3×3, fc 400→128, fc2)
LENET_RSHAPES = (
    "96 72 4 3 1 48 96 1 2 4 16 48 2 6 4 16 16 2 2 8\n"
    "256 400 16 25 1 256 256 2 2 16 128 256 1 2 32 128 128 2 2 32 128 128 2 2 64\n"
    "64 128 2 4 1 64 64 2 2 2 64 64 2 2 4 64 64 2 2 8 64 64 2 2 16 64 64 2 2 32\n"
    "\n"
)


def specs(line: str) -> list[tuple[int, ...]]:
    v = [int(x) for x in line.split()]
    return [tuple(v[k : k + 5]) for k in range(0, len(v), 5)]


def official_mult(x: torch.Tensor, line: str, twiddle: torch.Tensor) -> torch.Tensor:
    """``deform_butterfly_mult_torch``: x (N, in) through the flat twiddle, factor by factor."""
    out, used = x, 0
    for p, q, r, s, t in specs(line):
        tw = twiddle[used : used + s * p].view(q // (s * t), t, r, s).permute(0, 2, 3, 1)
        out = (tw * out.reshape(x.shape[0], q // (s * t), 1, s, t)).sum(dim=3)
        out = out.reshape(x.shape[0], p)
        used += s * p
    return out


def official_conv(x: torch.Tensor, line: str, twiddle: torch.Tensor, bias: torch.Tensor):
    """``DeBut_2dConv`` (3×3, stride 1, no padding): unfold, rows position-major."""
    n, c, h, w = x.shape
    patches = F.unfold(x, 3).view(n, c, 9, (h - 2) * (w - 2))
    rows = patches.permute(0, 3, 2, 1).reshape(-1, 9 * c)
    y = official_mult(rows, line, twiddle) + bias
    return y.view(n, (h - 2) * (w - 2), -1).transpose(1, 2).reshape(n, -1, h - 2, w - 2)


def official_dense_factor(spec: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """``Generate_Chain`` for one factor: block j at (j·r·t, j·s·t), each an r×s grid of
    t×t diagonal matrices."""
    p, q, r, s, t = spec
    mat = torch.zeros(p, q, dtype=DT)
    for j in range(p // (r * t)):
        for m in range(r):
            for n in range(s):
                diag = torch.diag(torch.rand(t, generator=gen, dtype=DT))
                row, col = j * r * t + m * t, j * s * t + n * t
                mat[row : row + t, col : col + t] = diag
    return mat


def official_als_factors(line: str, seed: int) -> list[torch.Tensor]:
    """An ALS result as the official code stores it: output side first."""
    gen = torch.Generator().manual_seed(seed)
    return [official_dense_factor(spec, gen) for spec in reversed(specs(line))]


# ------------------------------------------------------------------------------ rshapes


def test_rshapes_file_reads_one_chain_per_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "lenet.txt"
    path.write_text(LENET_RSHAPES)
    chains = official.read_rshapes(path)
    lines = LENET_RSHAPES.strip().splitlines()
    assert len(chains) == 3
    for chain, line in zip(chains, lines, strict=True):
        assert chain.nnz == sum(p * s for p, _, _, s, _ in specs(line))
        assert (chain.in_features, chain.out_features) == (specs(line)[0][1], specs(line)[-1][0])
    assert official.format_rshapes(chains) == "".join(line + "\n" for line in lines)
    setting = official.chain_setting(chains, ["conv2", "fc1", "fc2"])
    assert setting["fc1"] == chains[1].text
    with pytest.raises(TensorslimError, match="3 chains for 2 layers"):
        official.chain_setting(chains, ["conv2", "fc1"])
    path.write_text("16 16 2 2 8\n16 16 3 2 8\n")
    with pytest.raises(TensorslimError, match="rshapes line 2"):
        official.read_rshapes(path)


# ----------------------------------------------------------------------- fine-tuned twiddles


class OfficialLeNetPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chains = official.parse_rshapes(LENET_RSHAPES)
        self.conv2 = DeButConv2d(8, 16, 3, chains[0])
        self.fc1 = DeButLinear(128, 64, chains[2])


def test_checkpoint_twiddles_reproduce_the_official_layers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    lines = LENET_RSHAPES.strip().splitlines()
    tw_conv = torch.randn(sum(p * s for p, _, _, s, _ in specs(lines[0])))
    tw_fc = torch.randn(sum(p * s for p, _, _, s, _ in specs(lines[2])))
    state = {
        "module.conv2.twiddle": tw_conv,
        "module.conv2.bias": torch.randn(16),
        "module.fc.twiddle": tw_fc,
        "module.fc.bias": torch.randn(64),
        "module.conv1.weight": torch.randn(8, 1, 3, 3),
    }
    path = tmp_path / "model_best.pth"
    torch.save({"state_dict": state, "min_val_loss": 0.25}, path)  # as the official train.py
    model = OfficialLeNetPart()
    assert official.load_checkpoint(model, path, names={"fc1": "fc"}) == ["conv2", "fc1"]
    x = torch.randn(2, 8, 7, 6)
    expected = official_conv(x, lines[0], tw_conv, state["module.conv2.bias"])
    torch.testing.assert_close(model.conv2(x), expected, atol=1e-5, rtol=1e-5)
    rows = torch.randn(5, 128)
    expected = official_mult(rows, lines[2], tw_fc) + state["module.fc.bias"]
    torch.testing.assert_close(model.fc1(rows), expected, atol=1e-5, rtol=1e-5)
    twiddle = official.factors_to_twiddle(list(model.fc1.factors), model.fc1.chain)
    torch.testing.assert_close(twiddle, tw_fc)
    with pytest.raises(TensorslimError, match=r"no 'fc2\.twiddle'"):
        official.load_checkpoint(OfficialLeNetPart(), path, names={"fc1": "fc2"})
    short = {"conv2.twiddle": tw_conv[:-1]}
    with pytest.raises(TensorslimError, match="layer conv2: a twiddle of"):
        official.load_checkpoint(OfficialLeNetPart(), short)


# ------------------------------------------------------------------------------ ALS files


def test_als_file_initialises_linear_and_position_major_conv(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lines = LENET_RSHAPES.strip().splitlines()
    for line, layer in (
        (lines[2], DeButLinear(128, 64, lines[2]).double()),
        (lines[0], DeButConv2d(8, 16, 3, lines[0]).double()),
    ):
        factors = official_als_factors(line, seed=1)
        d_approx = factors[0]
        for f in factors[1:]:
            d_approx = d_approx @ f  # the ALS code's product, left to right
        path = tmp_path / "Best_DeBut_info.pth.tar"
        torch.save({"DeBut_factors": factors, "D_approx": d_approx, "error": [0.1]}, path)
        official.load_als(layer, path)
        weight = layer.to_dense().weight.detach()
        if isinstance(layer, DeButConv2d):  # the official ALS flattens D.permute(0, 2, 3, 1)
            d_approx = d_approx.view(16, 3, 3, 8).permute(0, 3, 1, 2)
        torch.testing.assert_close(weight, d_approx)
        assert layer.init_info == {"method": "official"}


def official_process_als_weight(factors: list[torch.Tensor], line: str) -> torch.Tensor:
    """``utils/als_process.process_als_weight``: the ALS matrices as the fine-tuning twiddle."""
    values = []
    for m, (_, q, r, s, t) in zip(reversed(factors), specs(line), strict=True):
        nonzero = m[m != 0]  # row-major order, as numpy's m[m.nonzero()]
        values.append(nonzero.view(q // (s * t), r, t, s).permute(0, 2, 1, 3).reshape(-1))
    return torch.cat(values)


def test_als_to_twiddle_agrees_with_the_official_conversion() -> None:
    line = LENET_RSHAPES.strip().splitlines()[1]
    factors = official_als_factors(line, seed=5)
    ours = official.factors_to_twiddle(official.dense_to_factors(factors, line), line)
    torch.testing.assert_close(ours, official_process_als_weight(factors, line))


def test_als_factors_from_numpy_and_safetensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import safetensors.torch

    line = LENET_RSHAPES.strip().splitlines()[2]
    factors = official_als_factors(line, seed=2)
    expected = factors[0]
    for f in factors[1:]:
        expected = expected @ f
    npz = tmp_path / "als.npz"
    np.savez(npz, *[f.numpy() for f in factors])
    st = tmp_path / "als.safetensors"
    safetensors.torch.save_file({f"DeBut_factors.{k}": f for k, f in enumerate(factors)}, st)
    for path in (npz, st):
        layer = DeButLinear(128, 64, line).double()
        official.load_als(layer, path)
        torch.testing.assert_close(layer.to_dense().weight.detach(), expected)


def test_refusals(tmp_path) -> None:  # type: ignore[no-untyped-def]
    line = LENET_RSHAPES.strip().splitlines()[2]
    pickled = tmp_path / "evil.pth"
    torch.save({"DeBut_factors": [fractions.Fraction(1, 2)]}, pickled)
    with pytest.raises(TensorslimError, match="refused"):
        official.load_als(DeButLinear(128, 64, line), pickled)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TensorslimError, match="refused"):
        official.read_tensors(objects)
    # a dense matrix with a value off the factor's pattern is not that factor
    factors = official_als_factors(line, seed=3)
    factors[-1][0, -1] = 1.0
    with pytest.raises(TensorslimError, match="outside its pattern"):
        official.dense_to_factors(factors, line)
    with pytest.raises(TensorslimError, match="output side first"):
        official.dense_to_factors(list(reversed(factors)), line)
    conv_line = LENET_RSHAPES.strip().splitlines()[0]
    channel = DeButConv2d(8, 16, 3, conv_line, order="channel")
    with pytest.raises(TensorslimError, match="position-major"):
        official.set_factors(
            channel, official.dense_to_factors(official_als_factors(conv_line, seed=4), conv_line)
        )
