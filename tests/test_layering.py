"""Algorithm packages are pure PyTorch: they import with ray and mlflow unavailable (DESIGN §4); diffusers is imported only
when a DDPM is built or loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PURE_PACKAGES = ["attacks", "classifiers", "config", "data", "data.io", "defenses", "generative",
                 "generative.train_ebm", "generative.train_ddpm", "generative.diagnostics", "generative.purifiers",
                 "generative.ddpm", "experiment", "jobs", "diagnose", "plots", "types", "protocols", "registry"]

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'mlflow'}:
            raise ImportError(f'layering violation: {name} imported')
sys.meta_path.insert(0, Block())
"""


def test_algorithm_packages_import_without_ray_and_mlflow():
    imports = "\n".join(f"import puregen_dist.{name}" for name in PURE_PACKAGES)
    check = "\nassert not any(m.split('.')[0] in {'ray', 'mlflow'} for m in sys.modules)\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", BLOCKER + imports + check], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_blocker_really_blocks():
    proc = subprocess.run([sys.executable, "-c", BLOCKER + "import mlflow"], capture_output=True, text=True)
    assert proc.returncode != 0 and "layering violation" in proc.stderr


def test_diffusers_is_imported_only_when_a_ddpm_is_built():
    """Importing diffusers costs about 1.6 s; the CLI, the plugins, jobs and sweep trials (every Ray worker)
    must not pay it unless they build or load a DDPM."""
    script = textwrap.dedent("""
        import sys
        import puregen_dist.cli, puregen_dist.jobs, puregen_dist.sweep.trial, puregen_dist.sweep.runner
        from puregen_dist.plugins import load_plugins
        load_plugins()
        before = "diffusers" in sys.modules
        from puregen_dist.config.generative import DDPMConfig
        from puregen_dist.generative.unet import build_unet
        build_unet(DDPMConfig(size="S", in_channels=1, image_size=16, layers_per_block=1))
        print(before, "diffusers" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
