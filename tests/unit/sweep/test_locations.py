"""Where a sweep writes, in a Ray job or on several nodes (issue 13): PUREGEN_ROOT places every relative output
under one shared directory; locations inside Ray's temp directory (the job's working-dir cache) are refused with
the settings to give; custom Ray resources come from config. The real job path: tests/integration/test_cluster_job.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from puregen_dist.config.errors import ConfigError, UserInputError
from puregen_dist.plugins import load_plugins
from puregen_dist.sweep import locations
from puregen_dist.sweep.locations import Location, in_ray_temp, sweep_locations
from puregen_dist.sweep.runner import git_revision
from puregen_dist.sweep.spec import ROOT_ENV, load_sweep, rebase_on_root
from puregen_dist.tracking.redaction import browse_hint

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _plugins():
    load_plugins()


def test_puregen_root_rebases_relative_outputs_and_keeps_absolute_ones_and_uris(monkeypatch):
    monkeypatch.setenv(ROOT_ENV, "/mnt/shared/pg")
    sweep = load_sweep(QUICKSTART, ["settings.storage=s3://bucket/tune", "settings.store=/abs/store"])
    assert sweep.cells[0].config.output_dir == "/mnt/shared/pg/outputs/quickstart"
    assert (sweep.settings.storage, sweep.settings.store) == ("s3://bucket/tune", "/abs/store")
    defaults = rebase_on_root({"name": "x"}, "/r", source="s")  # defaults are rebased too
    assert defaults["base"]["output_dir"] == "/r/outputs" and defaults["settings"]["store"] == "/r/outputs/store"
    assert rebase_on_root({"name": "x"}, "", source="s") == {"name": "x"}


@pytest.mark.parametrize("root", ["relative/dir", "s3://bucket/pg"])
def test_puregen_root_must_be_an_absolute_directory(monkeypatch, root):
    monkeypatch.setenv(ROOT_ENV, root)
    with pytest.raises(ConfigError, match="PUREGEN_ROOT.*absolute directory"):
        load_sweep(QUICKSTART)


def test_locations_name_every_output_the_database_and_the_data_roots(tmp_path):
    sweep = load_sweep(REPO / "sweeps" / "cifar10_fidelity_nf128.yaml")
    found = {loc.key: loc for loc in sweep_locations(sweep, "sqlite:////x/mlflow.db")}
    assert {"settings.store", "settings.storage", "base.output_dir",
            "base.tracking.uri (the sqlite database)"} <= set(found)
    inputs = [loc for loc in found.values() if not loc.output]
    assert {loc.path for loc in inputs} == {"../shared/datasets/cifar10-jpeg"}  # each path once
    assert "base.tracking.uri (the sqlite database)" not in {
        loc.key for loc in sweep_locations(sweep, "http://mlflow:5000")}


def test_paths_inside_rays_temp_dir_are_found_even_through_a_symlink(tmp_path):
    temp = tmp_path / "ray"
    cache = temp / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    cache.mkdir(parents=True)
    (tmp_path / "link").symlink_to(cache)
    found = [Location("a", str(cache / "outputs")), Location("b", str(tmp_path / "link" / "store")),
             Location("c", str(tmp_path / "shared")), Location("d", "s3://bucket/x")]
    assert [loc.key for loc in in_ray_temp(found, temp)] == ["a", "b"]


def test_a_job_with_outputs_in_the_working_dir_cache_is_refused_naming_the_settings(tmp_path, monkeypatch):
    """check_sweep_locations as a job sees it: Ray's temp dir holds the working directory."""
    import ray

    cache = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    cache.mkdir(parents=True)
    monkeypatch.chdir(cache)
    monkeypatch.setenv(locations.JOB_ENV, "{}")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "n1"}])

    class Context:
        def get_temp_dir(self) -> str:
            return str(tmp_path / "ray")

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    sweep = load_sweep(QUICKSTART)
    with pytest.raises(UserInputError) as refused:
        locations.check_sweep_locations(sweep, f"sqlite:///{cache / 'outputs/quickstart/mlflow.db'}")
    text = str(refused.value)
    assert "as a Ray job" in text and "settings.store" in text and "base.output_dir" in text
    assert "PUREGEN_ROOT" in text and "working-dir cache" in text
    assert not (cache / "outputs").exists()  # nothing written

    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "shared"))
    locations.check_sweep_locations(load_sweep(QUICKSTART), f"sqlite:///{tmp_path / 'shared/mlflow.db'}")


def test_outside_a_job_on_one_node_nothing_is_checked(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv(locations.JOB_ENV, raising=False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "n1"}, {"Alive": False, "NodeID": "n2"}])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: pytest.fail("must not look at Ray's temp dir"))
    locations.check_sweep_locations(load_sweep(QUICKSTART), "sqlite:////tmp/x.db")


def test_custom_resources_come_from_config_and_cpu_gpu_stay_in_their_fields():
    sweep = load_sweep(QUICKSTART, ["settings.trial_resources={gpu_pool: 0.5}",
                                    "settings.pipeline.resources_per_actor={gpu_pool: 0.25}",
                                    "settings.pipeline.num_gpus_per_actor=0.5",
                                    "models.ebm.resources={num_gpus: 0.5, resources: {big: 1}}"])
    assert sweep.settings.trial_resources == {"gpu_pool": 0.5}
    actor = sweep.settings.pipeline.actor_resources()
    assert (actor.num_gpus, actor.resources) == (0.5, {"gpu_pool": 0.25})
    assert sweep.models["ebm"].resources.ray_options() == {"num_cpus": 1.0, "num_gpus": 0.5, "max_retries": 2,
                                                           "resources": {"big": 1.0}}
    for bad, message in (("{GPU: 1}", "not a custom resource"), ("{x: -1}", "finite number >= 0"),
                         ("[1]", "expected a mapping"), ("{x: yes}", "expected a number")):
        with pytest.raises(ConfigError, match=message):
            load_sweep(QUICKSTART, [f"settings.trial_resources={bad}"])


def test_git_revision_from_the_submitter_and_the_browse_hint(monkeypatch):
    monkeypatch.setenv("PUREGEN_GIT_REVISION", "abc123-dirty")
    assert git_revision() == "abc123-dirty"
    assert browse_hint("http://127.0.0.1:5000/", "e") == "browse: http://127.0.0.1:5000 (experiment 'e')"
    assert browse_hint("sqlite:////x/mlflow.db", "e") == "browse: mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
