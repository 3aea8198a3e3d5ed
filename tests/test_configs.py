"""Every example config in configs/ validates against the model its name says (and typos are errors)."""

from pathlib import Path

import pytest

from serve_unlearn.adapters.forget_request import ForgetConfig
from serve_unlearn.errors import UnlearnConfigError
from serve_unlearn.patches.config import IAUConfig, SalUnConfig
from serve_unlearn.service.config import ServeConfig
from serve_unlearn.serving.vllm.config import VllmServeConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
MODELS = {"salun": SalUnConfig, "iau": IAUConfig, "o3": ForgetConfig, "vllm": VllmServeConfig, "serve": ServeConfig}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path):
    cls = MODELS[path.stem.split("_")[0]]
    cfg = cls.from_yaml(path)
    assert cfg.model_dump()  # every field known


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "salun_typo.yaml"
    p.write_text("ratoi: 0.5\n")
    with pytest.raises(UnlearnConfigError, match="ratoi"):
        SalUnConfig.from_yaml(p)


def test_o3_forget_config_lists_the_defaults():
    """configs/o3_forget.yaml documents the defaults: loading it must give exactly ForgetConfig()."""
    assert ForgetConfig.from_yaml(Path(__file__).parents[1] / "configs" / "o3_forget.yaml") == ForgetConfig()


def test_serve_config_documents_every_key():
    """configs/serve.yaml names every key of the control plane's sections (the eraser has its own example)."""
    import yaml

    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "serve.yaml").read_text())
    assert set(raw) == set(ServeConfig.model_fields)
    cfg = ServeConfig.from_yaml(Path(__file__).parents[1] / "configs" / "serve.yaml")
    for section in ("vllm", "worker", "evidence"):
        assert set(raw[section]) == set(type(getattr(cfg, section)).model_fields), section


def test_a_serve_config_with_nothing_to_serve_is_refused(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("registry: r\n")
    with pytest.raises(UnlearnConfigError, match="go together"):
        ServeConfig.from_yaml(p)
    p.write_text("admin_token_env: X\n")
    with pytest.raises(UnlearnConfigError, match="nothing to serve"):
        ServeConfig.from_yaml(p)
