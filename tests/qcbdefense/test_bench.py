"""bench runs attacks x quantizers x defences + scan from a config, writes its tables, and a rerun resumes from
its cache instead of recomputing."""

import csv
import json

import pytest

from qcbdefense.bench import BenchConfig, run_bench
from qcbdefense.errors import InputError

TINY = {
    "name": "tiny", "model": "small_cnn", "data": "builtin",
    "clean": {"epochs": 1, "train_subset": 2000, "optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0},
    "attacks": [{"name": "pq", "method": "pqbackdoor", "bits": 4, "spec": "pqbackdoor-w4a4",
                 "train": {"epochs": 1, "train_subset": 1000}, "options": {"stage1_epochs": 1, "monitor": 0,
                                                                          "transfer": []}}],
    "clean_specs": ["w8a8"], "defenses": ["nearest", "lac"], "defense_options": {"lac": {"steps": 20}},
    "calib": 128, "scan": {"images": 128, "steps": 5, "images_per_class": 4},
}


def test_bench_writes_its_tables_and_resumes_from_its_cache(one_thread, tmp_path):
    config = BenchConfig.from_dict(TINY)
    lines: list[str] = []
    rows = run_bench(config, tmp_path, log=lines.append)
    assert [(r.model, r.spec) for r in rows] == [("clean", "w8a8"), ("pq", "pqbackdoor-w4a4")]
    assert all(set(r.defenses) == {"nearest", "lac"} and r.scan is not None for r in rows)
    assert sum(line.startswith("[run]") for line in lines) == 1 + 1 + 2 * (2 + 1)  # clean, attack, 2 x (2 + scan)
    table = (tmp_path / "results.md").read_text()
    assert "| pq " in table and "LAC" in table
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * (1 + 2)  # per row: FP + each defence
    first = json.loads((tmp_path / "results.json").read_text())["rows"]

    lines.clear()
    again = run_bench(config, tmp_path, log=lines.append)
    assert lines and all(line.startswith("[cached]") for line in lines if line.startswith("["))
    assert not any(line.startswith("[run]") for line in lines)
    assert [r.defenses for r in again] == [r["defenses"] for r in first]

    lines.clear()  # an edited attack entry must not reuse the model (and cells) made with the old one
    edited = {**TINY["attacks"][0], "train": {"epochs": 2, "train_subset": 1000}}
    with pytest.raises(InputError, match=r"pq .*other settings \(changed: attack\)"):
        run_bench(BenchConfig.from_dict({**TINY, "attacks": [edited]}), tmp_path, log=lines.append)
    with pytest.raises(InputError, match=r"clean small_cnn made with other settings \(changed: clean\)"):
        run_bench(BenchConfig.from_dict({**TINY, "clean": {**TINY["clean"], "epochs": 2}}), tmp_path,
                  log=lines.append)
    assert not any(line.startswith("[run]") for line in lines)


@pytest.mark.parametrize("change, message", [
    ({"model": "nope"}, "unknown model"),
    ({"colour": "red"}, "unknown key"),
    ({"defenses": ["magic"]}, "magic"),
    ({"defenses": []}, "no defences"),
    ({"attacks": [{"name": "clean", "method": "pqbackdoor", "bits": 4}]}, "unique"),
])
def test_bad_configs_are_refused_before_anything_runs(change, message):
    with pytest.raises(InputError, match=message):
        BenchConfig.from_dict({**TINY, **change})


def test_bench_config_files_in_the_repo_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].joinpath("benchmarks").glob("*.yaml")):
        BenchConfig.load(path)
