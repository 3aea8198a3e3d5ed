"""Every example config in configs/ validates against the model its name says (and typos are errors)."""

from pathlib import Path

import pytest

from serve_unlearn.errors import UnlearnConfigError
from serve_unlearn.patches.config import IAUConfig, SalUnConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
MODELS = {"salun": SalUnConfig, "iau": IAUConfig}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path):
    cls = MODELS[path.name.split("_")[0]]
    cfg = cls.from_yaml(path)
    assert cfg.model_dump()  # every field known


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "salun_typo.yaml"
    p.write_text("ratoi: 0.5\n")
    with pytest.raises(UnlearnConfigError, match="ratoi"):
        SalUnConfig.from_yaml(p)
