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


def test_align_and_barrier_take_their_flags_and_defaults_from_align_options():
    from modelcypher.cli import _align_options, build_parser
    from modelcypher.options import AlignOptions

    p = build_parser()
    align = p.parse_args(["align", "b", "--to", "a", "-o", "out"])
    barrier = p.parse_args(["barrier", "a", "b", "--data", "t.txt"])
    assert _align_options(align) == AlignOptions()
    assert barrier.method == "none"  # barrier measures the raw pair unless --align names a method
    tuned = p.parse_args(["barrier", "a", "b", "--data", "t.txt", "--align", "learned", "--max-sweeps", "3",
                          "--steps", "7", "--lr", "0.01", "--probe", "p.txt", "--seed", "2"])
    assert _align_options(tuned) == AlignOptions(method="learned", max_sweeps=3, steps=7, lr=0.01, data="p.txt", seed=2)


def test_a_bad_alignment_setting_is_one_line():
    r = run_cli("align", "b", "--to", "a", "-o", "out", "--lr", "nan")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "lr" in r.stderr, r.stderr


def test_a_merge_never_imports_transformers():
    code = ("import sys\nimport modelcypher.api, modelcypher.merging.run\n"
            "print('transformers' in sys.modules, 'scipy.optimize' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "False False", r.stdout + r.stderr
