# JupyterLab settings of `make lab` (found through JUPYTER_CONFIG_PATH, set by topk_lib.infra.lab).
# Defaults live in settings/overrides.json, so a change made in the lab's settings editor
# still goes to the user's own settings, never into the repository.
from pathlib import Path

c.LabApp.app_settings_dir = str(Path(__file__).resolve().parent / "settings")  # noqa: F821 (c: traitlets config)
c.MappingKernelManager.default_kernel_name = "topk-lab"  # noqa: F821 (a new notebook starts the project's kernel)
