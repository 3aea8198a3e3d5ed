"""The worker side of live patches: methods vLLM mixes into every worker (``--worker-extension-cls``), called
through the engine's ``collective_rpc`` by the admin route (``live_patch``).

How a patch reaches the loaded weights. The worker keeps the list of patches in force (those given to
``--load-format serve_unlearn`` at start, then every live apply and revert). A change is made in two calls:

- ``serve_unlearn_prepare(action, path)`` computes the new list and streams the checkpoint through the same
  loader a start with that list would use (``PatchingModelLoader``: each patched tensor verified against its
  base digest and patched in checkpoint names and coordinates), keeping in memory the tensors of every
  transformer block the change touches (``model.layers.N.``: all of a block's tensors, so fused q/k/v and
  gate/up layers get every shard; a tensor outside the blocks takes the whole checkpoint). A wrong base, an
  unknown tensor, a patch already in force or not in force, a damaged file: refused here, before any weight
  changes, as a result (not an exception: vLLM's RPC would turn it into a bare string).
- ``serve_unlearn_commit(token)`` feeds those tensors to vLLM's own in-place reload
  (``Worker.reload_weights(is_checkpoint_format=True)``): the model's ``load_weights`` fuses and slices them for
  this worker's tensor-parallel rank, and vLLM's layerwise reload re-runs each touched layer's weight processing
  (on CPU the repacked GEMM weights). The loaded weights are then exactly those of a server started with the same
  list, so a revert (the list without the patch, recomputed from the checkpoint) is the base bit for bit, in any
  order.

The engine is paused (in-flight requests finish first) between the two calls; see ``live_patch``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any

from ...errors import PatchStateError, ServeUnlearnError
from ...patches import WeightPatch
from .contract import LOAD_FORMAT, OVERLAP_KEY, PATCHES_KEY
from .loader_config import parse_loader_config

logger = logging.getLogger(__name__)

__all__ = ["LivePatchExtension", "block_prefix"]

_BLOCK = re.compile(r"^(.*?\.layers\.\d+\.)")
ACTIONS = ("apply", "revert")


def block_prefix(name: str) -> str:
    """The checkpoint-name prefix of the transformer block holding ``name`` ('' for a tensor outside the blocks:
    the whole checkpoint is reloaded then)."""
    m = _BLOCK.match(name)
    return m.group(1) if m else ""


def failure(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}


@dataclasses.dataclass
class _LiveState:
    paths: list[str]                    # patch files in force, in stacking order
    ids: list[str]                      # their patch ids
    overlap: str
    inner_format: str
    rest: dict[str, Any]
    pending: dict[str, Any] | None = None


class LivePatchExtension:
    """Mixed into vLLM's worker class; every name starts with ``serve_unlearn_`` (vLLM refuses clashes)."""

    def _serve_unlearn_state(self) -> _LiveState:
        state = getattr(self, "_serve_unlearn_live", None)
        if state is None:
            load = self.vllm_config.load_config
            if load.load_format == LOAD_FORMAT:
                cfg = parse_loader_config(load.model_loader_extra_config)
                paths, overlap, inner, rest = list(cfg.patches), cfg.overlap, cfg.inner_load_format, cfg.rest
            else:
                paths, overlap, inner = [], "last", str(load.load_format)
                rest = dict(load.model_loader_extra_config or {})
            ids = [WeightPatch.load(p).patch_id for p in paths]
            state = _LiveState(paths, ids, overlap, inner, rest)
            self._serve_unlearn_live = state
        return state

    def serve_unlearn_patches(self) -> dict[str, Any]:
        """The patches in force on this worker, in order."""
        try:
            state = self._serve_unlearn_state()
        except ServeUnlearnError as exc:
            return failure(exc)
        return {"ok": True, "patches": [{"path": p, "patch_id": i} for p, i in zip(state.paths, state.ids)]}

    def _serve_unlearn_stream(self, state: _LiveState, paths: list[str], prefixes: set[str]) -> list:
        """Checkpoint tensors under ``prefixes`` with ``paths`` applied, as a start with them would load them."""
        from .loader import PatchingModelLoader

        load = self.vllm_config.load_config
        extra = {**state.rest, PATCHES_KEY: paths, OVERLAP_KEY: state.overlap, "inner_load_format": state.inner_format}
        loader = PatchingModelLoader(dataclasses.replace(load, load_format=LOAD_FORMAT,
                                                         model_loader_extra_config=extra))
        everything = "" in prefixes
        model = self.model_runner.get_model()
        out = []
        for name, tensor in loader.get_all_weights(self.vllm_config.model_config, model):
            if everything or name.startswith(tuple(prefixes)):
                out.append((name, tensor))
        return out

    def serve_unlearn_prepare(self, action: str, path: str, token: str) -> dict[str, Any]:
        """Check a change and stage the tensors it loads under ``token``; nothing in the model changes here."""
        t0 = time.perf_counter()
        try:
            if action not in ACTIONS:
                raise PatchStateError(f"action must be one of {ACTIONS}, got {action!r}")
            state = self._serve_unlearn_state()
            patch = WeightPatch.load(path)  # the file's own integrity, before anything else
            if action == "apply":
                if patch.patch_id in state.ids:
                    raise PatchStateError(f"patch {patch.patch_id} ({path}) is already applied on this server")
                paths, ids = [*state.paths, path], [*state.ids, patch.patch_id]
            else:
                if patch.patch_id not in state.ids:
                    raise PatchStateError(f"patch {patch.patch_id} ({path}) is not applied on this server "
                                          f"(in force: {state.ids or 'none'})")
                k = state.ids.index(patch.patch_id)
                paths, ids = state.paths[:k] + state.paths[k + 1:], state.ids[:k] + state.ids[k + 1:]
            prefixes = {block_prefix(n) for n in patch.tensor_names}
            weights = self._serve_unlearn_stream(state, paths, prefixes)
        except (ServeUnlearnError, OSError) as exc:
            return failure(exc)
        state.pending = {"token": token, "paths": paths, "ids": ids, "weights": weights}
        return {"ok": True, "patch_id": patch.patch_id, "tensors": len(weights),
                "blocks": sorted(prefixes), "prepare_s": round(time.perf_counter() - t0, 4)}

    def serve_unlearn_commit(self, token: str) -> dict[str, Any]:
        """Load the staged tensors into the model (vLLM's in-place reload) and put the new list in force."""
        state = self._serve_unlearn_state()
        pending = state.pending
        if pending is None or pending["token"] != token:
            return failure(PatchStateError("no prepared change with this token on this worker (another admin call "
                                           "replaced it): try again"))
        t0 = time.perf_counter()
        state.pending = None
        self.reload_weights(weights_iterator=iter(pending["weights"]), is_checkpoint_format=True)
        state.paths, state.ids = pending["paths"], pending["ids"]
        logger.info("serve-unlearn: %d tensors reloaded; patches in force: %s", len(pending["weights"]), state.ids)
        return {"ok": True, "patches": [{"path": p, "patch_id": i} for p, i in zip(state.paths, state.ids)],
                "commit_s": round(time.perf_counter() - t0, 4)}

    def serve_unlearn_discard(self, token: str) -> dict[str, Any]:
        state = self._serve_unlearn_state()
        if state.pending is not None and state.pending["token"] == token:
            state.pending = None
        return {"ok": True}
