"""save / load: safetensors + plan.json + manifest, rebuilt structure, strict and checked."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn

import tensorslim as ts
from tensorslim.errors import TensorslimError
from tensorslim.io import MANIFEST_FILE, PLAN_FILE, WEIGHTS_FILE, read_plans
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.models import create_model
from tensorslim.plan import plans_of

X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def fresh(name: str, seed: int) -> nn.Module:
    """A zoo model with its own random weights (the base model of a load)."""
    torch.manual_seed(seed)
    return create_model(name, in_channels=1, num_classes=10).eval()


def trained_like(name: str) -> nn.Module:
    """A model whose BatchNorm statistics differ from a fresh one's, so a load must restore them."""
    model = fresh(name, 0)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 28, 28))
    return model.eval()


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_save_load_gives_identical_outputs(name: str, scheme: str, tmp_path) -> None:
    model = trained_like(name)
    plan = ts.plan(model, "svd", ts.Budget(flops=0.5), X, scheme=scheme)
    small = ts.apply(model, plan)
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, base_model=fresh(name, 1))
    assert not again.training
    with torch.no_grad():
        torch.testing.assert_close(again(X), small(X), rtol=0, atol=0)
    for lp in plan.compressed_layers:
        module = again.get_submodule(lp.fqn)
        assert isinstance(module, LowRankConv2d | LowRankLinear)
        assert module.config()["rank"] == lp.config["rank"]
    assert [p.to_dict() for p in plans_of(again)] == [p.to_dict() for p in plans_of(small)]


def test_multi_stage_model_round_trips(tmp_path) -> None:
    model = trained_like("small_cnn")
    convs = ts.plan(model, "svd", "flops=0.6", X, filter_fn=lambda m, fqn: isinstance(m, nn.Conv2d))
    stage1 = ts.apply(model, convs)
    linears = ts.plan(stage1, "svd", None, X, rank=4, layers=["classifier.1", "classifier.3"])
    stage2 = ts.apply(stage1, linears)
    assert len(plans_of(stage2)) == 2
    ts.save(stage2, tmp_path)
    stages = read_plans(tmp_path)
    assert [s.to_dict() for s in stages] == [convs.to_dict(), linears.to_dict()]
    again = ts.load(tmp_path, fresh("small_cnn", 5))
    with torch.no_grad():
        torch.testing.assert_close(again(X), stage2(X), rtol=0, atol=0)
    assert isinstance(again.classifier[1], LowRankLinear) and again.classifier[1].rank == 4
    # the loaded model saves again to the same files
    ts.save(again, tmp_path / "again")
    assert (tmp_path / "again" / PLAN_FILE).read_text() == (tmp_path / PLAN_FILE).read_text()


def test_a_dense_model_round_trips(tmp_path) -> None:
    model = trained_like("lenet5")
    ts.save(model, tmp_path)
    assert read_plans(tmp_path) == []
    again = ts.load(tmp_path, fresh("lenet5", 3))
    torch.testing.assert_close(again(X), model(X), rtol=0, atol=0)


class SharedHead(nn.Module):
    """One Linear reached under two names (a tied layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 12)
        self.branch = nn.ModuleDict({"tied": self.body})
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.branch["tied"](torch.relu(self.body(x))))


def test_shared_modules_stay_shared_through_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = SharedHead().eval()
    x = torch.randn(5, 12)
    plan = ts.plan(model, "svd", None, x, rank=3)
    small = ts.apply(model, plan)
    assert small.body is small.branch["tied"]
    ts.save(small, tmp_path)
    torch.manual_seed(1)
    again = ts.load(tmp_path, SharedHead().eval())
    assert isinstance(again.body, LowRankLinear) and again.body is again.branch["tied"]
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


def test_saved_files_are_safetensors_and_json_without_pickle(tmp_path) -> None:
    model = trained_like("lenet5")
    small = ts.apply(model, ts.plan(model, "svd", "flops=0.5", X))
    ts.save(small, tmp_path, metadata={"note": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE, PLAN_FILE]
    tensors = safetensors.torch.load_file(str(tmp_path / WEIGHTS_FILE))
    state = small.state_dict()
    assert set(tensors) == set(state)
    for key, value in tensors.items():
        assert torch.equal(value, state[key]), key
    with open(tmp_path / WEIGHTS_FILE, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    assert header["__metadata__"] == {"note": "test"}
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    assert plan["stages"][0]["method"] == "svd"
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["format"] == "tensorslim" and manifest["torch"] == torch.__version__
    assert manifest["tensorslim"] == ts.__version__
    assert set(manifest["files"]) == {WEIGHTS_FILE, PLAN_FILE}


def test_loading_into_another_architecture_is_a_clear_error(tmp_path) -> None:
    model = trained_like("small_cnn")
    ts.save(ts.apply(model, ts.plan(model, "svd", "flops=0.5", X)), tmp_path)
    with pytest.raises(TensorslimError, match=r"does not have|another architecture"):
        ts.load(tmp_path, fresh("resnet20", 0))
    torch.manual_seed(0)
    narrow = create_model("small_cnn", in_channels=1, num_classes=10, width=0.5)
    with pytest.raises(TensorslimError, match=r"do not fit the base model \(size mismatch"):
        ts.load(tmp_path, narrow)


def test_loading_dense_weights_into_another_architecture_is_a_clear_error(tmp_path) -> None:
    ts.save(trained_like("lenet5"), tmp_path)
    with pytest.raises(TensorslimError, match="do not fit the base model"):
        ts.load(tmp_path, fresh("small_cnn", 0))
    torch.manual_seed(0)
    other_classes = create_model("lenet5", in_channels=1, num_classes=7)
    with pytest.raises(TensorslimError, match="do not fit the base model"):
        ts.load(tmp_path, other_classes)


def test_corrupt_weights_fail_the_checksum(tmp_path) -> None:
    model = trained_like("lenet5")
    ts.save(model, tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in a tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(TensorslimError, match="checksum"):
        ts.load(tmp_path, fresh("lenet5", 0))


def test_truncated_weights_are_a_clear_error_even_unverified(tmp_path) -> None:
    ts.save(trained_like("lenet5"), tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TensorslimError, match=r"not a readable safetensors file.*corrupt"):
        ts.load(tmp_path, fresh("lenet5", 0), verify=False)


def test_missing_pieces_are_clear_errors(tmp_path) -> None:
    with pytest.raises(TensorslimError, match="not a directory"):
        ts.load(tmp_path / "nowhere", fresh("lenet5", 0))
    with pytest.raises(TensorslimError, match=WEIGHTS_FILE):
        ts.load(tmp_path, fresh("lenet5", 0))
    ts.save(trained_like("lenet5"), tmp_path / "a")
    (tmp_path / "a" / PLAN_FILE).unlink()
    with pytest.raises(TensorslimError, match=PLAN_FILE):
        ts.load(tmp_path / "a", fresh("lenet5", 0))
    ts.save(trained_like("lenet5"), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (tmp_path / "b" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TensorslimError, match="newer tensorslim"):
        ts.load(tmp_path / "b", fresh("lenet5", 0))
    ts.save(trained_like("lenet5"), tmp_path / "d")
    (tmp_path / "d" / MANIFEST_FILE).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(TensorslimError, match=r"manifest\.json is not valid JSON"):
        ts.load(tmp_path / "d", fresh("lenet5", 0))
    ts.save(trained_like("lenet5"), tmp_path / "c")
    (tmp_path / "c" / PLAN_FILE).write_text("{not json")
    with pytest.raises(TensorslimError, match=r"plan\.json does not match its checksum"):
        ts.load(tmp_path / "c", fresh("lenet5", 0))
    with pytest.raises(TensorslimError, match="not valid JSON"):
        ts.load(tmp_path / "c", fresh("lenet5", 0), verify=False)


def test_save_into_an_unwritable_place_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TensorslimError, match="cannot create"):
        ts.save(fresh("lenet5", 0), blocker / "out")


KILLED_SAVE = """\
import os, sys
from pathlib import Path

import torch
from torch import nn

import tensorslim.io as tio

directory, seed, when = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(seed)
model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
moved = []

def die():
    os._exit(9)  # a kill: no finally, no cleanup

if when == "before-commit":
    tio._commit = lambda pending: die()
elif when.startswith("after-move-"):
    real_move = tio._move_into_place

    def move(source, target):
        real_move(source, target)
        moved.append(target)
        if len(moved) == int(when.rsplit("-", 1)[1]):
            die()

    tio._move_into_place = move
tio.save(model, directory)
"""


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize(
    ("when", "survivor"),
    [("before-commit", 1), ("after-move-1", 2), ("after-move-2", 2), ("after-move-3", 2)],
)
def test_a_save_killed_between_files_leaves_the_old_set_or_the_new(
    tmp_path, when: str, survivor: int
) -> None:
    """A real kill (os._exit in a child process) between the files of a save."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    directory = tmp_path / "model"
    ts.save(_model(1), directory)
    (directory / "notes.txt").write_text("the user's own file")
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    killed = subprocess.run(
        [sys.executable, str(script), str(directory), "2", when], env=env, timeout=120
    )
    assert killed.returncode == 9
    loaded = ts.load(directory, _model(0))  # no checksum error, no mix of the two saves
    expected = _model(survivor).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), (when, name)
    # the next save completes (or drops) what the killed one left, and keeps other files
    ts.save(_model(3), directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [WEIGHTS_FILE, PLAN_FILE, MANIFEST_FILE, "notes.txt"]
    )
    assert torch.equal(ts.load(directory, _model(0))[0].weight, _model(3)[0].weight)
