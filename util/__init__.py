"""The project's library: ``run/`` (the training process), ``data/``, ``eval/``, ``weights/``, and the leaves
``config``, ``errors`` and ``files``.

Every entry point and tool imports this package before anything heavy. An interpreter without requirements.txt's
packages (a launcher run outside its virtual environment: ``python`` is the system's) gets one line naming the
interpreter and what it lacks, instead of a ``ModuleNotFoundError`` traceback from deep inside an import.
"""

import importlib.util
import sys

# import names of requirements.txt's packages that every entry point loads (the others load where they are used)
_REQUIRED = ("numpy", "yaml", "PIL", "torch", "torchvision", "timm", "safetensors")
_missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(
        f"error: {sys.executable} has no {', '.join(_missing)}: run with the Python that requirements.txt was "
        "installed into (activate its virtual environment: . .venv/bin/activate; or set PYTHON=/path/to/python for "
        "the launchers)"
    )
