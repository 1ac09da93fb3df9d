"""The command line itself: lazy imports, both entry points, one-line errors."""

import subprocess
import sys

from cli_util import run_cli


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom modelcypher.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "False False"
    for verb in ("merge", "align", "barrier", "diagnose", "evolve", "demo"):
        assert verb in r.stdout


def test_console_script_and_module_agree():
    import shutil

    exe = shutil.which("modelcypher")
    assert exe, "the modelcypher console script is installed"
    a = subprocess.run([exe, "merge", "--help"], capture_output=True, text=True)
    b = run_cli("merge", "--help")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


def test_missing_config_is_one_line():
    r = run_cli("merge", "/nonexistent/cfg.yaml", "-o", "/tmp/never-written")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such config file" in r.stderr
