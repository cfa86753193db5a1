"""``make lab``'s launcher and the project's lab settings it points JupyterLab at."""

import json
import os
import sys
from pathlib import Path

from topk_lib.infra import lab, paths


def test_the_project_config_comes_first_on_the_config_path_once():
    env = lab.lab_environment({"JUPYTER_CONFIG_PATH": os.pathsep.join(["/elsewhere", str(lab.LAB_CONFIG)]), "X": "1"})
    assert env["JUPYTER_CONFIG_PATH"].split(os.pathsep) == [str(lab.LAB_CONFIG), "/elsewhere"]
    assert env["X"] == "1"
    assert lab.lab_environment({})["JUPYTER_CONFIG_PATH"] == str(lab.LAB_CONFIG)


def test_the_command_serves_the_notebooks_and_passes_options_on():
    command = lab.lab_command("--no-browser", "--port=9999", python="/py")
    assert command[:3] == ["/py", "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={paths.NOTEBOOKS}" in command
    assert command[-2:] == ["--no-browser", "--port=9999"]
    assert ("--allow-root" in command) == (os.geteuid() == 0)
    assert lab.lab_command("--allow-root").count("--allow-root") == 1
    assert lab.lab_command()[0] == sys.executable


def test_the_server_config_points_at_the_shipped_overrides():
    from traitlets.config import Config

    config = Config()
    source = lab.LAB_CONFIG / "jupyter_server_config.py"
    exec(compile(source.read_text(), str(source), "exec"), {"c": config, "__file__": str(source)})
    settings = Path(config.LabApp.app_settings_dir)
    assert settings == lab.LAB_CONFIG / "settings"
    assert config.MappingKernelManager.default_kernel_name == "topk-lab"
    overrides = json.loads((settings / "overrides.json").read_text())
    assert overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["python"] == "Jupytext Notebook"


def test_jupytext_still_names_its_viewer_so():
    """The overrides name jupytext's widget factory; a jupytext that renamed it would open .py as text again."""
    import jupyterlab_jupytext

    static = Path(jupyterlab_jupytext.__file__).parent / "labextension" / "static"
    if not static.is_dir():  # installed as a shared labextension instead
        static = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "jupyterlab-jupytext" / "static"
    assert any('"Jupytext Notebook"' in p.read_text(errors="replace") for p in static.glob("*.js")), static
