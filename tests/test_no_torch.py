"""The supervisor side never imports torch & co. (checked in a fresh interpreter)."""

import json
import subprocess
import sys

from conftest import subprocess_env

HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "huggingface_hub")


def _heavy_modules(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + f"\nimport sys, json\n"
                          f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"],
                         env=subprocess_env(), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_supervisor_and_cli_import_no_torch():
    """Importing trainerd.supervisor and trainerd.cli (check, health, the model reference) loads none
    of the worker's libraries, huggingface_hub included."""
    assert _heavy_modules("import trainerd.supervisor.daemon, trainerd.cli, trainerd.memguard, "
                          "trainerd.supervisor.views.health, trainerd.core.modelref, trainerd.supervisor.metrics") == []


def test_every_module_of_the_torch_free_side_imports_no_torch():
    """Every module of the supervisor side, the CLI, the memory guard and the kernel, all imported in one
    fresh interpreter (each with what it imports, transitively), loads none of the worker's libraries."""
    code = ("import importlib, pkgutil, sys\n"
            "names = []\n"
            "for pkg in ('trainerd.core', 'trainerd.supervisor', 'trainerd.memguard', 'trainerd.cli'):\n"
            "    p = importlib.import_module(pkg)\n"
            "    names += [m.name for m in pkgutil.walk_packages(p.__path__, pkg + '.') if not m.name.endswith('__main__')]\n"
            "for n in names:\n"
            "    importlib.import_module(n)\n"
            "assert len(names) > 60, names")
    assert _heavy_modules(code) == []


def test_status_command_imports_no_torch(tmp_path):
    """A full `trainerd status` run (with a ledger to read) loads none of the worker's libraries."""
    from trainerd.supervisor.ledger import Ledger

    Ledger(tmp_path / "state.db").close()
    code = (f"import sys\nsys.argv = ['trainerd', 'status', '--root', {str(tmp_path)!r}]\n"
            "from trainerd.cli import main\nmain()")
    assert _heavy_modules(code) == []


def test_check_command_imports_no_torch(tmp_path):
    """A full `trainerd check` run (a ledger to read) loads none of the worker's libraries."""
    from trainerd.supervisor.ledger import Ledger

    Ledger(tmp_path / "state.db").close()
    code = (f"import sys\nsys.argv = ['trainerd', 'check', '--root', {str(tmp_path)!r}]\n"
            "from trainerd.cli import main\nmain()")
    assert _heavy_modules(code) == []


def test_learned_and_history_import_no_torch(tmp_path):
    """`trainerd learned --no-ask` and `trainerd history` (a version with its held-out figures) load
    none of the worker's libraries: only asking the model starts a child that does."""
    from trainerd.supervisor.ledger import Ledger

    Ledger(tmp_path / "state.db").close()
    (tmp_path / "adapters" / "1").mkdir(parents=True)
    (tmp_path / "adapters" / "1" / "lineage.json").write_text(json.dumps(
        {"version": 1, "kind": "blessed", "batch": 1, "heldout": {"before": 2.4, "after": 0.8, "change": -1.6,
                                                                  "stderr": 0.08, "examples": 8, "tokens": 111}}))
    for argv in (["learned", "1", "--no-ask"], ["history"]):
        code = (f"import sys\nsys.argv = ['trainerd', *{argv!r}, '--root', {str(tmp_path)!r}]\n"
                "from trainerd.cli import main\nmain()")
        assert _heavy_modules(code) == [], argv
