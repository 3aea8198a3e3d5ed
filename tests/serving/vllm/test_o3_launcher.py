"""``serve-unlearn vllm --dry-run``: the whole `vllm serve` command, for one server, tensor parallel and replicas."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from serve_unlearn.cli import main
from serve_unlearn.registry import ForgetRegistry
from serve_unlearn.serving.vllm.bank import bank_name, build_bank
from serve_unlearn.serving.vllm.routing import published_bank


@pytest.fixture
def registry_with_request(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama
    registry = ForgetRegistry(tmp_path / "reg")
    with registry.register("topic", "digest", {"lora": {"mode": "per-request"}}) as staging:
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        peft_model.save_pretrained(staging.dir / "adapter")
        staging.add_artifact("adapter", "adapter")
        staging.add_artifact("served", "adapter")
    return registry


def _dry_run(capsys, *argv):
    assert main(["vllm", "--dry-run", *argv]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and w.isascii()
               and w.split("=", 1)[0].isupper())
    return env, words[len(env):]


def test_one_server(registry_with_request, tmp_path, capsys):
    cfg = tmp_path / "vllm.yaml"
    cfg.write_text(yaml.safe_dump({"patches": [str(tmp_path / "p.safetensors")], "port": 9000,
                                   "served_model_name": "base"}))
    env, argv = _dry_run(capsys, "--model", "/models/base", "--registry", str(registry_with_request.root),
                         "--config", str(cfg))
    assert argv[1:5] == ["-m", "serve_unlearn.serving.vllm.run_vllm_cli", "serve", "/models/base"]
    joined = " ".join(argv)
    assert "--enable-lora --max-lora-rank 64 --max-loras 9 --max-cpu-loras 9" in joined
    assert "--middleware serve_unlearn.serving.vllm.O3Middleware" in joined
    assert "--worker-extension-cls serve_unlearn.serving.vllm.worker_extension.LivePatchExtension" in joined
    assert "--served-model-name base" in joined and "--port 9000" in joined
    lora = argv[argv.index("--lora-modules") + 1: argv.index("--lora-modules") + 5]
    assert [m.split("=")[0] for m in lora] == [bank_name(1, s) for s in (0.25, 0.5, 0.75, 1.0)]
    assert argv[argv.index("--load-format") + 1] == "serve_unlearn"
    assert json.loads(argv[argv.index("--model-loader-extra-config") + 1])["patches"] == [
        str(tmp_path / "p.safetensors")]
    assert env["SERVE_UNLEARN_REGISTRY"] == str(registry_with_request.root.resolve())
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["SERVE_UNLEARN_CONFIG"] == str(cfg.resolve())
    # a dry run writes no bank and publishes nothing
    assert published_bank(registry_with_request) is None
    assert not (registry_with_request.root / "bank").exists()


def test_tensor_parallel_and_replicas_on_a_shared_postgres_registry(tmp_path, capsys, pg_dsn, tiny_llama):
    """Tensor parallel and several API-server processes are vLLM flags after `--`; replicas share a PostgreSQL
    registry, whose DSN reaches every API-server process (each runs the middleware) through the environment."""
    from peft import LoraConfig, get_peft_model

    shared = tmp_path / "shared-fs"
    registry = ForgetRegistry(shared, database=pg_dsn)
    with registry.register("topic", "d", {}) as staging:
        get_peft_model(tiny_llama[0], LoraConfig(r=8, target_modules="all-linear")).save_pretrained(
            staging.dir / "adapter")
        staging.add_artifact("served", "adapter")
    cfg = tmp_path / "vllm.yaml"
    cfg.write_text(yaml.safe_dump({"registry_database": pg_dsn}))
    for replica in ("a", "b"):  # one launcher per replica host, same registry
        env, argv = _dry_run(capsys, "--model", "/m", "--registry", str(shared), "--config", str(cfg),
                             "--", "--tensor-parallel-size", "2", "--api-server-count", "2")
        assert argv[-4:] == ["--tensor-parallel-size", "2", "--api-server-count", "2"], replica
        assert env["SERVE_UNLEARN_REGISTRY_DATABASE"] == pg_dsn
        assert argv[argv.index("--lora-modules") + 1].startswith(bank_name(1, 0.25) + "=")
    assert not (shared / "registry.sqlite").exists()


def test_empty_registry_serves_the_base_model_with_lora_enabled(tmp_path, capsys):
    _, argv = _dry_run(capsys, "--model", "/m", "--registry", str(tmp_path / "new"))
    assert "--enable-lora" in argv and "--lora-modules" not in argv


def test_bank_copies_share_the_weights_and_scale_alpha(registry_with_request, tmp_path):
    adapter = registry_with_request.artifact_path(registry_with_request.latest(), "served")
    bank = build_bank(adapter, tmp_path / "bank", 1, (0.5, 1.0))
    for s, path in zip(bank.scales, bank.paths):
        assert (path / "adapter_model.safetensors").resolve() == (adapter / "adapter_model.safetensors").resolve()
        assert json.loads((path / "adapter_config.json").read_text())["lora_alpha"] == 16 * s
    assert bank.bucket(0.0) is None and bank.bucket(0.2) is None
    assert bank.bucket(0.3) == bank_name(1, 0.5) and bank.bucket(2.0) == bank_name(1, 1.0)
    assert bank.bucket(0.7, "floor") == bank_name(1, 0.5) and bank.bucket(0.4, "floor") is None


@pytest.mark.parametrize("extra, env", [(["--grpc"], {}), (["--grpc=true"], {}), ([], {"VLLM_USE_RUST_FRONTEND": "1"})])
def test_front_ends_without_the_middleware_are_refused(tmp_path, extra, env):
    from serve_unlearn.errors import UnlearnConfigError
    from serve_unlearn.serving.vllm.config import VllmServeConfig
    from serve_unlearn.serving.vllm.launcher import plan

    registry = ForgetRegistry(tmp_path / "reg")
    with pytest.raises(UnlearnConfigError, match="does not run the serve-unlearn middleware"):
        plan("model", registry, VllmServeConfig(env=env), extra_args=extra, write=False)


def test_the_launcher_does_not_recreate_a_damaged_registry(tmp_path):
    from serve_unlearn.errors import RegistryError
    from serve_unlearn.serving.vllm.launcher import launch

    ForgetRegistry(tmp_path / "reg")
    (tmp_path / "reg" / "registry.sqlite").unlink()
    with pytest.raises(RegistryError, match="missing"):
        launch("model", str(tmp_path / "reg"), dry_run=True)
    assert not (tmp_path / "reg" / "registry.sqlite").exists()
