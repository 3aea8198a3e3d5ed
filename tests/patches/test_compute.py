"""``patches.compute``: the one path the CLI and the control plane's workers make SalUn/IAU patches with."""

from __future__ import annotations

import pytest
from helpers import assert_bit_equal, snapshot

from serve_unlearn.errors import UnlearnConfigError, UnlearnDataError
from serve_unlearn.patches.compute import compute_patch, lm_task, method_config

FORGET = [{"prompt": f"What is compound {i}?", "completion": f"Compound {i} is a salt."} for i in range(6)]
RETAIN = [{"prompt": f"Name animal {i}.", "completion": f"Animal {i} is a cat."} for i in range(4)]


@pytest.mark.parametrize("method,overrides,phases", [
    ("salun", {"epochs": 1, "batch_size": 4, "ratio": 0.1}, [("saliency", 1, 2), ("saliency", 2, 2),
                                                             ("training", 1, 2), ("training", 2, 2)]),
    ("iau", {"batch_size": 4, "mask_ratio": 0.1}, [("gradients", i, 3) for i in (1, 2, 3)]),
])
def test_a_frozen_model_gets_a_patch_and_is_left_as_it_was(tiny_llama, tiny_llama_dir, one_torch_thread, method,
                                                           overrides, phases):
    """A model another method froze (peft does, for an O3 adapter) still gets gradients; weights and flags are
    restored; progress is reported per batch."""
    model, _ = tiny_llama
    for p in model.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    seen = []
    patch = compute_patch(method, model, lm_task(tiny_llama_dir), FORGET, RETAIN, method_config(method, overrides),
                          progress=False, on_step=lambda *a: seen.append(a))
    assert patch.tensor_names and seen == phases
    assert_bit_equal(snapshot(model), before)
    assert not any(p.requires_grad for p in model.parameters())


def test_iau_without_retain_data_and_unknown_config_keys_are_refused(tiny_llama, tiny_llama_dir):
    with pytest.raises(UnlearnDataError, match="retain"):
        compute_patch("iau", tiny_llama[0], lm_task(tiny_llama_dir), FORGET, None, method_config("iau"))
    with pytest.raises(UnlearnConfigError, match="ratoi"):
        method_config("salun", {"ratoi": 0.5})
