"""Start JupyterLab on the notebooks with the project's settings: ``python -m topk_lib.infra.lab [OPTIONS]``.

``make lab`` runs this; the options go to ``jupyter lab`` unchanged (``--no-browser``,
``--port=8890``, ...). The project's lab settings live in ``lab/`` at the repository root:
``lab/jupyter_server_config.py``, found through ``JUPYTER_CONFIG_PATH``, points JupyterLab's
settings defaults at ``lab/settings/overrides.json``, which makes Jupytext the default viewer
of ``.py`` files (a double-click opens a notebook) and starts new notebooks on the
``topk-lab`` kernel. Defaults, not user settings: what one changes in the settings editor is
kept in one's own settings folder as usual, never in the repository.
"""

from __future__ import annotations

import os
import sys

from topk_lib.infra import paths

__all__ = ["LAB_CONFIG", "lab_command", "lab_environment", "main"]

LAB_CONFIG = paths.ROOT / "lab"


def lab_environment(environ=None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with ``LAB_CONFIG`` first on ``JUPYTER_CONFIG_PATH``."""
    env = dict(os.environ if environ is None else environ)
    rest = [p for p in env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep) if p and p != str(LAB_CONFIG)]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join([str(LAB_CONFIG), *rest])
    return env


def lab_command(*options: str, python: str | None = None) -> list[str]:
    """The ``jupyter lab`` command line: served from ``notebooks/``, then ``options``.

    As root (CI, containers) it adds ``--allow-root``, without which the server refuses to start.
    """
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in options else []
    return [python or sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={paths.NOTEBOOKS}", *root, *options]


def main(argv=None) -> None:
    command = lab_command(*(sys.argv[1:] if argv is None else argv))
    os.execve(command[0], command, lab_environment())


if __name__ == "__main__":
    main()
