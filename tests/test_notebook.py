"""The sharding notebook runs top to bottom (so it cannot rot) and shows what it says."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharding_layouts_notebook_executes():
  path = os.path.join(ROOT, "notebooks", "sharding_layouts.ipynb")
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:                        # start from a clean notebook
    if cell.cell_type == "code":
      cell.outputs = []
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # the notebook sets its own
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  old = dict(os.environ)
  os.environ.clear()
  os.environ.update(env)
  try:
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "mlra4  TP 4: tensor=4 x tensor_rep=1" in text and "mlra4  TP 8: tensor=4 x tensor_rep=2" in text
  assert "6 KV heads cannot be laid out on tensor:4" in text
  assert "mlra4  TP 4:  1.5 d_h" in text and "mla    TP 8:  4.5 d_h" in text
  # the TP x CP section: MLA's 1152 bf16 bytes fall as 1 / CP at any TP; MLRA-4 at TP 4 x CP 2 holds 192
  assert "mla    TP 8: CP 1:   1152  CP 2:    576  CP 4:    288  CP 8:    144" in text
  assert "mlra4  TP 4: CP 1:    384  CP 2:    192" in text
  assert images >= 1
