"""``--model-loader-extra-config`` of the ``serve_unlearn`` load format, parsed and checked without an engine."""

import pytest
import torch

from serve_unlearn.errors import UnlearnConfigError
from serve_unlearn.patches import WeightPatch, stack_patches
from serve_unlearn.serving.vllm.loader_config import LoaderConfig, parse_loader_config


@pytest.fixture
def one_patch(tmp_path):
    base = {"w": torch.zeros(4, 4)}
    edited = {"w": torch.eye(4)}
    return WeightPatch.from_diff(base, edited, method="test").save(tmp_path / "a.patch.safetensors")


@pytest.mark.parametrize("extra", [None, {}])
def test_defaults(extra):
    assert parse_loader_config(extra) == LoaderConfig(patches=[], overlap="last", inner_load_format="safetensors",
                                                      rest={})


def test_our_keys_are_taken_out_and_the_rest_goes_to_vllm():
    extra = {"patches": "a.patch.safetensors", "overlap": "error", "inner_load_format": "pt", "num_threads": 4}
    config = parse_loader_config(extra)
    assert config == LoaderConfig(["a.patch.safetensors"], "error", "pt", {"num_threads": 4})
    assert extra["patches"] == "a.patch.safetensors"  # the caller's dict is left as it was


@pytest.mark.parametrize("patches", [[1], {"a": "b"}, ["a", None], 3])
def test_patches_must_be_paths(patches):
    with pytest.raises(UnlearnConfigError, match="'patches' must be a list of patch file paths"):
        parse_loader_config({"patches": patches})


@pytest.mark.parametrize("patches", [[], ["a.patch.safetensors"], ["a.patch.safetensors", "b.patch.safetensors"]])
def test_bogus_overlap_is_refused_whatever_the_number_of_patches(patches):
    with pytest.raises(UnlearnConfigError, match="'overlap' must be one of 'last', 'error', got 'bogus'"):
        parse_loader_config({"patches": patches, "overlap": "bogus"})


def test_stack_patches_checks_overlap_before_the_single_patch_shortcut(one_patch):
    """The bug: a single patch returned early, before ``overlap`` was looked at."""
    with pytest.raises(ValueError, match="overlap must be 'last' or 'error', got 'bogus'"):
        stack_patches([one_patch], overlap="bogus")
    assert stack_patches([one_patch], overlap="error").patch_id == WeightPatch.load(one_patch).patch_id


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing vLLM warns about torch.jit
def test_the_loader_refuses_a_bogus_overlap_before_reading_any_patch(tmp_path):
    pytest.importorskip("vllm")
    from vllm.config.load import LoadConfig

    from serve_unlearn.serving.vllm.loader import PatchingModelLoader

    missing = str(tmp_path / "never-read.patch.safetensors")
    with pytest.raises(UnlearnConfigError, match="'overlap'"):
        PatchingModelLoader(LoadConfig(load_format="serve_unlearn",
                                       model_loader_extra_config={"patches": [missing], "overlap": "bogus"}))
    loader = PatchingModelLoader(LoadConfig(load_format="serve_unlearn",
                                            model_loader_extra_config={"num_threads": 2}))
    assert loader.patch is None
    assert loader.load_config.load_format == "safetensors"
    assert loader.load_config.model_loader_extra_config == {"num_threads": 2}
