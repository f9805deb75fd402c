"""bench runs attacks x quantizers x defences + scan from a config, writes its tables, and a rerun resumes from
its cache instead of recomputing."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from qcbdefense.bench import (BenchConfig, BenchRow, load_reference_scores, plan, run_bench, save_reference_scores,
                              scores_table, seed_summary)
from qcbdefense.errors import InputError
from qcbdefense.scoring import Score

TINY = yaml.safe_load((Path(__file__).parents[2] / "benchmarks" / "tiny.yaml").read_text())
STEPS = 1 + 2 + 2 * (2 + 1)  # clean, two attacks, the clean and the planted model x (2 defences + scan)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The tiny bench, run once sequentially on one thread: its folder, rows and log lines."""
    import torch

    folder, lines = tmp_path_factory.mktemp("tiny"), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = run_bench(BenchConfig.from_dict(TINY), folder, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return folder, rows, lines


@pytest.mark.slow  # the tiny bench trains a clean model and two attacks: several minutes on 2 cores
def test_bench_writes_its_tables_and_resumes_from_its_cache(one_thread, tiny_bench):
    config = BenchConfig.from_dict(TINY)
    tmp_path, rows, lines = tiny_bench
    lines = list(lines)
    assert [(r.model, r.spec) for r in rows] == [("clean", "w8a8"), ("pq", "pqbackdoor-w4a4"),
                                                 ("pq-unmet", "pqbackdoor-w4a4")]
    planted, unmet = rows[:2], rows[2]
    assert all(set(r.defenses) == {"nearest", "lac"} and r.scan is not None for r in planted), rows
    assert sum(line.startswith("[run]") for line in lines) == STEPS
    # the attack held to criteria it cannot meet is reported as such, neither purified nor scanned
    assert unmet.not_planted and "W4 ASR" in unmet.not_planted and not unmet.defenses and unmet.scan is None
    assert sum(line.startswith("[skipped]") and "pq-unmet" in line for line in lines) == 2 + 1
    assert not (tmp_path / "purify" / "pq-unmet-pqbackdoor-w4a4-lac").exists()
    table = (tmp_path / "results.md").read_text()
    assert "| pq " in table and "LAC" in table and "NOT planted" in table and "- pq-unmet: W4 ASR" in table
    with open(tmp_path / "results.csv") as f:
        lines_csv = list(csv.DictReader(f))
    assert len(lines_csv) == 2 * (1 + 2) + 1  # per planted row: FP + each defence; the unmet row: FP only
    assert lines_csv[-1]["scan_verdict"] == "not planted"
    first = json.loads((tmp_path / "results.json").read_text())["rows"]

    lines.clear()
    again = run_bench(config, tmp_path, log=lines.append)
    assert lines and all(line.startswith(("[cached]", "[skipped]")) for line in lines if line.startswith("["))
    assert not any(line.startswith("[run]") for line in lines)
    assert [r.defenses for r in again] == [r["defenses"] for r in first]

    lines.clear()  # an edited attack entry must not reuse the model (and cells) made with the old one
    edited = {**TINY["attacks"][0], "train": {"epochs": 2, "train_subset": 1000}}
    with pytest.raises(InputError, match=r"pq .*other settings \(changed: attack\)"):
        run_bench(BenchConfig.from_dict({**TINY, "attacks": [edited, TINY["attacks"][1]]}), tmp_path,
                  log=lines.append)
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
    # every defence after the first of a model, quantizer and seed reused its FP and nearest scores
    assert {p.stem for p in (tmp_path / "scores").glob("*.json")} == {
        f"{row}-seed{seed}" for row in ("clean-w8a8", "pq-pqbackdoor-w4a4") for seed in (0, 1)}
    run_bench(config, tmp_path, log=lines.append)  # back to the single-seed results the Ray test compares with


def test_reference_scores_round_trip_and_are_not_reused_under_other_settings(tmp_path):
    fp = Score(ca=90.0, asr=2.5, ra=88.0, agreement=100.0, per_class_accuracy=[90.0, 90.0], n_clean=4,
               n_poisoned=2, predictions=torch.tensor([0, 1, 1, 0]))
    nearest = Score(ca=85.0, asr=97.0, ra=3.0, agreement=75.0, der=50.0, per_class_accuracy=[80.0, 90.0],
                    n_clean=4, n_poisoned=2, predictions=torch.tensor([0, 1, 0, 0]))
    settings = {"model": "small_cnn", "spec": "w4a4", "seed": 1, "target": 3}
    save_reference_scores(tmp_path / "pq-w4a4-seed1", settings, fp, nearest)
    loaded = load_reference_scores(tmp_path / "pq-w4a4-seed1", settings)
    assert loaded == (fp, nearest)
    assert all(torch.equal(a.predictions, b.predictions) for a, b in zip(loaded, (fp, nearest)))
    assert load_reference_scores(tmp_path / "pq-w4a4-seed1", {**settings, "target": 4}) is None
    assert load_reference_scores(tmp_path / "pq-w4a4-seed2", settings) is None


def test_seeds_are_summarised_as_mean_and_sample_std():
    runs = [{"ca": 80.0, "asr": 10.0, "ra": 70.0, "der": 90.0, "agreement": 95.0, "seconds": 1.0, "peak_rss_mb": 500.0},
            {"ca": 82.0, "asr": 14.0, "ra": 66.0, "der": 88.0, "agreement": 97.0, "seconds": 3.0, "peak_rss_mb": 700.0},
            {"ca": 84.0, "asr": 12.0, "ra": 68.0, "der": 86.0, "agreement": 96.0, "seconds": 2.0, "peak_rss_mb": 600.0}]
    cell = seed_summary(runs, [0, 1, 2])
    # by hand: CA 80, 82, 84 -> mean 82, squared deviations 4 + 0 + 4 over n - 1 = 2 -> std 2; the same for
    # ASR (10, 14, 12), RA (70, 66, 68) and DER (90, 88, 86)
    assert {k: cell[k] for k in ("ca", "asr", "ra", "der", "agreement", "seconds", "peak_rss_mb")} == \
        {"ca": 82.0, "asr": 12.0, "ra": 68.0, "der": 88.0, "agreement": 96.0, "seconds": 2.0, "peak_rss_mb": 600.0}
    assert cell["std"] == {"ca": 2.0, "asr": 2.0, "ra": 2.0, "der": 2.0}
    assert cell["seeds"] == [0, 1, 2] and cell["runs"] == runs
    config = BenchConfig.from_dict({**TINY, "defenses": ["lac"]})
    row = BenchRow("pq", "w8a8", {"ca": 85.0, "asr": 3.0, "ra": 80.0, "der": None, "agreement": 100.0},
                   defenses={"lac": cell})
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in
             scores_table(config, [row]).splitlines()]
    assert lines[-1] == ["pq", "w8a8", "LAC", "82.00 ± 2.00", "12.00 ± 2.00", "68.00 ± 2.00", "88.00 ± 2.00", "2.0",
                         "600"]
    assert lines[-2] == ["pq", "w8a8", "FP", "85.00", "3.00", "80.00", "-", "-", "-"]  # one run: no spread


@pytest.mark.parametrize("change, message", [
    ({"model": "nope"}, "unknown model"),
    ({"colour": "red"}, "unknown key"),
    ({"defenses": ["magic"]}, "magic"),
    ({"defenses": []}, "no defences"),
    ({"attacks": [{"name": "clean", "method": "pqbackdoor", "bits": 4}]}, "unique"),
    ({"attacks": [{"name": "a", "method": "pqbackdoor", "bits": 4, "criteria": {"min_asr": 120}}]}, "percentage"),
    ({"attacks": [{"name": "a", "method": "pqbackdoor", "bits": 4, "criteria": {"asr": 90}}]}, "bad criteria"),
])
def test_bad_configs_are_refused_before_anything_runs(change, message):
    with pytest.raises(InputError, match=message):
        BenchConfig.from_dict({**TINY, **change})


def test_a_clean_entry_of_a_checkpoint_alone_is_that_checkpoint_untrained(tmp_path):
    import torch

    from models import create_model
    from qcbdefense.bench import BenchStep, run_step
    from qcbdefense.checkpoints import load_model, save_model

    model = create_model("small_cnn")
    save_model(model, tmp_path / "init.pt")
    config = BenchConfig.from_dict({**TINY, "clean": {"init": str(tmp_path / "init.pt")}})
    run_step(config, BenchStep("clean", "clean"), tmp_path / "bench", None, "cpu", print)  # no data: no training
    clean = load_model("small_cnn", tmp_path / "bench" / "clean" / "model.pt").state_dict()
    assert all(torch.equal(value, clean[key]) for key, value in model.state_dict().items())


def test_bench_config_files_in_the_repo_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].joinpath("benchmarks").glob("*.yaml")):
        BenchConfig.load(path)


def _without_timings(value):
    """A results record with every wall time and memory peak dropped: what two runs of the same bench may differ
    in."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in ("seconds", "peak_rss_mb", "environment")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow  # the tiny bench twice, sequentially and on Ray
def test_bench_on_a_local_ray_gives_the_sequential_results(one_thread, tiny_bench, tmp_path, monkeypatch):
    """The tiny bench sequentially and as Ray tasks on a local Ray with 2 CPUs: the same results files (every
    score, verdict and not-planted row; only wall times differ), and a Ray rerun on the sequential bench's folder
    only reads its cache, on a local Ray of its own even when RAY_ADDRESS names a cluster."""
    pytest.importorskip("ray")
    from qcbdefense.bench import results_table
    from qcbdefense.bench_ray import run_bench_on_ray

    config = BenchConfig.from_dict(TINY)
    sequential, rows, _ = tiny_bench
    on_ray = tmp_path / "ray"
    lines: list[str] = []
    ray_rows = run_bench_on_ray(config, on_ray, num_cpus=2, log=lines.append)
    assert sum(line.startswith("[run]") for line in lines) == STEPS
    assert sum(line.startswith("[ray]") and "finished on" in line for line in lines) == len(plan(config))

    def results(folder):
        with open(folder / "results.csv") as f:
            table = [{k: v for k, v in line.items() if k not in ("seconds", "peak_rss_mb")} for line in csv.DictReader(f)]
        return table, _without_timings(json.loads((folder / "results.json").read_text()))

    assert results(on_ray) == results(sequential)
    assert results_table(config, ray_rows) == results_table(config, rows)
    scores = "CA, ASR, RA (triggered"  # the results.md text before the scores table, whose column s is timings
    assert (on_ray / "results.md").read_text().split(scores)[0] == \
        (sequential / "results.md").read_text().split(scores)[0]

    lines.clear()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # no cluster there: joining it would fail
    run_bench_on_ray(config, sequential, num_cpus=2, log=lines.append)
    assert not any(line.startswith("[run]") for line in lines)
    assert sum(line.startswith("[cached]") for line in lines) == STEPS
    assert results(sequential)[0] == results(on_ray)[0]
