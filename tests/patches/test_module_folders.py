"""Module folders name code in a data file: only allowed classes are imported (like trust_remote_code)."""

import json
import sys

import numpy as np
import pytest
from torch import nn

from serve_unlearn.cli import main
from serve_unlearn.errors import ModuleFolderError, UntrustedCodeError
from serve_unlearn.patches.inputs import MODULE_FILE, load_module_folder, save_module_folder

MODULE = "su_untrusted_net"  # written into tmp_path per test; importing it leaves a marker file
SOURCE = '''
import pathlib
import torch

pathlib.Path(__file__).with_name("IMPORTED").write_text("module code ran")


class Net(torch.nn.Module):
    def __init__(self, in_features=16, num_classes=4):
        super().__init__()
        self.lin = torch.nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.lin(x)
'''


@pytest.fixture
def untrusted(tmp_path, monkeypatch):
    """A module on sys.path whose import has a visible side effect, and a folder naming its class."""
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    weights = nn.Module()
    weights.lin = nn.Linear(16, 4)  # the same state-dict keys as Net, without importing it
    folder = save_module_folder(weights, tmp_path / "net", cls=f"{MODULE}:Net", kwargs={"in_features": 16,
                                                                                      "num_classes": 4})
    yield folder, code / "IMPORTED"
    sys.modules.pop(MODULE, None)


def test_unlisted_class_refused_without_importing(untrusted):
    folder, marker = untrusted
    with pytest.raises(UntrustedCodeError, match="--trust-module-code") as err:
        load_module_folder(folder)
    assert "trusted_classes=" in str(err.value) and f"{MODULE}:Net" in str(err.value)
    assert MODULE not in sys.modules and not marker.exists()
    with pytest.raises(UntrustedCodeError):
        load_module_folder(folder, trusted_classes=["other_module:Net"])
    assert MODULE not in sys.modules and not marker.exists()


def test_listed_or_trusted_class_loads(untrusted):
    folder, marker = untrusted
    model, spec = load_module_folder(folder, trusted_classes=[f"{MODULE}:Net"])
    assert type(model).__name__ == "Net" and spec["kwargs"]["num_classes"] == 4 and marker.exists()
    model2, _ = load_module_folder(folder, trust_module_code=True)
    assert type(model2) is type(model)


class Allowed(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.lin = nn.Linear(n, n)


def test_class_object_allowed_without_import(tmp_path, monkeypatch):
    """A class passed as an object is matched by its path and used as it is: nothing is imported."""
    from serve_unlearn.patches import inputs

    folder = save_module_folder(Allowed(), tmp_path / "local", cls=f"{Allowed.__module__}:Allowed", kwargs={"n": 3})

    def no_import(name):
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(inputs, "import_module", no_import)
    model, _ = load_module_folder(folder, trusted_classes=[Allowed])
    assert isinstance(model, Allowed)


def test_any_callable_is_refused_even_when_trusted(tmp_path):
    """The review's case: shutil:copyfile with src/dst kwargs wrote a file. Refused by default, and refused as
    not a model class even with trust_module_code=True; the file is never written."""
    src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
    src.write_text("x")
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / MODULE_FILE).write_text(json.dumps({"class": "shutil:copyfile", "kwargs": {"src": str(src),
                                                                                         "dst": str(dst)}}))
    with pytest.raises(UntrustedCodeError, match="not allowed"):
        load_module_folder(folder)
    with pytest.raises(UntrustedCodeError, match="not an nn.Module class"):
        load_module_folder(folder, trust_module_code=True)
    assert not dst.exists()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"class": "no colon"}), json.dumps(["a"]),
                                     json.dumps({"class": "a.b:C", "kwargs": [1]})])
def test_malformed_module_file(tmp_path, content):
    (tmp_path / MODULE_FILE).write_text(content)
    with pytest.raises(ModuleFolderError):
        load_module_folder(tmp_path, trust_module_code=True)


def test_serve_unlearn_classes_are_trusted(tiny_mlp, tmp_path):
    folder = save_module_folder(tiny_mlp, tmp_path / "mlp", cls="serve_unlearn.testing.tiny_models:TinyMLP",
                                kwargs={"in_features": 16, "hidden": 32, "num_classes": 4})
    model, _ = load_module_folder(folder)
    assert type(model).__name__ == "TinyMLP"


def test_cli_opt_in(untrusted, tmp_path, capsys):
    folder, marker = untrusted
    g = np.random.default_rng(0)
    np.savez(tmp_path / "forget.npz", x=g.normal(size=(8, 16)).astype("float32"), y=g.integers(0, 4, 8))
    np.savez(tmp_path / "retain.npz", x=g.normal(size=(16, 16)).astype("float32"), y=g.integers(0, 4, 16))
    out = tmp_path / "p.patch.safetensors"
    args = ["salun", "--model", str(folder), "--forget", str(tmp_path / "forget.npz"), "--retain",
            str(tmp_path / "retain.npz"), "--out", str(out), "--epochs", "1", "--lr", "0.01"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--trust-module-code" in err and "--trusted-class" in err
    assert MODULE not in sys.modules and not marker.exists() and not out.exists()
    assert main([*args, "--trusted-class", f"{MODULE}:Net"]) == 0
    assert out.exists() and marker.exists()
    out.unlink()
    assert main([*args, "--trust-module-code"]) == 0
    assert out.exists()
