"""Every example config in configs/ validates against the model its name says (and typos are errors)."""

from pathlib import Path

import pytest

from serve_unlearn.adapters.forget_request import ForgetConfig
from serve_unlearn.errors import UnlearnConfigError
from serve_unlearn.patches.config import IAUConfig, SalUnConfig
from serve_unlearn.serving.vllm.config import VllmServeConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
MODELS = {"salun": SalUnConfig, "iau": IAUConfig, "o3": ForgetConfig, "vllm": VllmServeConfig}


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
