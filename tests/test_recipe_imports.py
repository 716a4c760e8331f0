"""distill.recipe is the schema alone: importing it loads no model code."""

import subprocess
import sys
from pathlib import Path


def test_recipe_schema_imports_no_model_code():
    code = ("import sys, distill.recipe; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'zoo', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[]"
