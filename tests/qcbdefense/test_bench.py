"""bench runs attacks x quantizers x defences + scan from a config, writes its tables, and a rerun resumes from
its cache instead of recomputing."""

import csv
import json

import pytest

from qcbdefense.bench import BenchConfig, BenchRow, run_bench, scores_table, seed_summary
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

    lines.clear()  # a second seed reuses the first seed's cells and runs only its own
    rows = run_bench(config, tmp_path, log=lines.append, seeds=2)
    assert sum(line.startswith("[run]") for line in lines) == 2 * 2  # 2 rows x 2 defences, seed 1
    lac = rows[1].defenses["lac"]
    assert lac["seeds"] == [0, 1] and lac["runs"][0] == first[1]["defenses"]["lac"]
    assert lac["ca"] == pytest.approx((lac["runs"][0]["ca"] + lac["runs"][1]["ca"]) / 2)
    assert f"{lac['ca']:.2f} ± {lac['std']['ca']:.2f}" in (tmp_path / "results.md").read_text()
    with open(tmp_path / "results.csv") as f:
        assert {"ra", "der", "ca_std", "der_std"} <= set(csv.DictReader(f).fieldnames)


def test_seeds_are_summarised_as_mean_and_sample_std():
    runs = [{"ca": 80.0, "asr": 10.0, "ra": 70.0, "der": 90.0, "agreement": 95.0, "seconds": 1.0},
            {"ca": 82.0, "asr": 14.0, "ra": 66.0, "der": 88.0, "agreement": 97.0, "seconds": 3.0},
            {"ca": 84.0, "asr": 12.0, "ra": 68.0, "der": 86.0, "agreement": 96.0, "seconds": 2.0}]
    cell = seed_summary(runs, [0, 1, 2])
    # by hand: CA 80, 82, 84 -> mean 82, squared deviations 4 + 0 + 4 over n - 1 = 2 -> std 2; the same for
    # ASR (10, 14, 12), RA (70, 66, 68) and DER (90, 88, 86)
    assert {k: cell[k] for k in ("ca", "asr", "ra", "der", "agreement", "seconds")} == \
        {"ca": 82.0, "asr": 12.0, "ra": 68.0, "der": 88.0, "agreement": 96.0, "seconds": 2.0}
    assert cell["std"] == {"ca": 2.0, "asr": 2.0, "ra": 2.0, "der": 2.0}
    assert cell["seeds"] == [0, 1, 2] and cell["runs"] == runs
    config = BenchConfig.from_dict({**TINY, "defenses": ["lac"]})
    row = BenchRow("pq", "w8a8", {"ca": 85.0, "asr": 3.0, "ra": 80.0, "der": None, "agreement": 100.0},
                   defenses={"lac": cell})
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in
             scores_table(config, [row]).splitlines()]
    assert lines[-1] == ["pq", "w8a8", "LAC", "82.00 ± 2.00", "12.00 ± 2.00", "68.00 ± 2.00", "88.00 ± 2.00", "2.0"]
    assert lines[-2] == ["pq", "w8a8", "FP", "85.00", "3.00", "80.00", "-", "-"]  # one run: no spread


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
