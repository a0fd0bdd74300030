"""Installable anywhere: the config groups ship inside the package (peftrun/conf), a built wheel
runs from an empty folder, and `--config-dir DIR` adds a user's own option files to the groups."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import peftrun.cli as cli
from peftrun.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MY_LORA = "defaults:\n  - lora_schema\n  - _self_\n\nname: lora\nr: 2\n"


def user_conf(folder: Path) -> Path:
    (folder / "method").mkdir(parents=True)
    (folder / "method" / "my_lora.yaml").write_text(MY_LORA)
    return folder


def test_the_configs_live_in_the_package():
    assert cli.CONFIG_DIR == ROOT / "peftrun" / "conf" or "PEFTRUN_CONFIG_DIR" in os.environ
    assert (ROOT / "peftrun" / "conf" / "config.yaml").is_file() and not (ROOT / "conf").exists()
    assert '"peftrun" = ["conf/**/*.yaml"]' in (ROOT / "pyproject.toml").read_text()


def test_config_dir_adds_the_users_options(tmp_path):
    mine = user_conf(tmp_path / "my_conf")
    argv = ["--config-dir", str(mine), "method=my_lora"]
    dirs = cli.user_config_dirs(argv)
    assert dirs == [mine]
    cfg = cli.compose_config(["method=my_lora"], dirs)
    assert cfg.method.name == "lora" and cfg.method.r == 2 and cfg.method.alpha == 16  # the schema's defaults
    assert cli.compose_config(["method=lora"], dirs).method.r == 8  # the shipped options stay
    try:
        cli.compose_config(["method=nope"], dirs)
    except Exception as e:  # noqa: BLE001
        err = cli.explain_composition_error(e, dirs)
    assert err.key == "method" and "my_lora" in err.message and "tied_lora" in err.message
    with pytest.raises(ConfigError, match="--config-dir: .* is not a folder"):
        cli.user_config_dirs(["--config-dir", str(tmp_path / "missing")])


@pytest.mark.slow
def test_a_built_wheel_runs_from_an_empty_folder(tmp_path):
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ folder.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "peftrun", src / "peftrun", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("peftrun-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    shutil.rmtree(src)  # nothing of the sources is left to import but the installed copy

    empty = tmp_path / "empty"
    empty.mkdir()
    user_conf(empty / "my_conf")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "COLUMNS": "120",
           "PEFTRUN_CACHE": "off"}
    env.pop("PEFTRUN_CONFIG_DIR", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(site / "bin" / "peftrun"), *args], cwd=empty, env=env,
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import peftrun; print(peftrun.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # the installed copy, not the checkout

    out = run("--help")
    assert out.returncode == 0 and "task: " in out.stdout and "chat" in out.stdout, out.stderr[-2000:]
    # The user's own option (LoRA at r=2: 4,096 parameters on the tiny model) from --config-dir.
    out = run("--config-dir", "my_conf", "method=my_lora", "trainer.max_steps=2", "task.num_train=64",
              "task.num_dev=16", "task.num_test=8", "trainer.progress=false", "hydra.run.dir=outputs/default")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainable parameters: 4,096" in out.stdout, out.stdout[-2000:]
    assert (empty / "outputs" / "default" / "adapter" / "adapter_model.safetensors").is_file()
