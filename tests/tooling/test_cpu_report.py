"""The CPU comparison behind docs/benchmarks.md at toy sizes: cpu_compare.py's interleaved rows
with both step designs, the targets table's arithmetic (harness/targets.py), plot.py reading
cpu_compare.py's CSV, and cpu_report.py end to end (its files, run.json's facts, the docs
block). Nothing here asserts a timing: the targets are printed, never tested."""
from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import require_backend

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
TOY = ["--n", "16", "--d", "8", "--rounds", "2", "--threads", "1"]
TOY_PROVIDERS = ["native", "native-products", "reference", "floor"]   # no compile: seconds


def _bench(module: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(module)


@pytest.fixture
def restore_process():
    """cpu_compare.main sets the thread count; the providers set the step design."""
    import robustft_ext as rft
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    rft.set_step_design(None)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- the targets table

def _row(loss, n, **ms):
    row = dict(loss=loss, N=n, D=512, dtype="fp32", mode="full", threads=2, load1=1.5)
    for p in ("native", "native-products", "reference", "reference+compile", "floor"):
        row[f"{p}_min_ms"] = ms.get(p.replace("-", "_").replace("+", "_"))
        row[f"{p}_med_ms"] = None if row[f"{p}_min_ms"] is None else row[f"{p}_min_ms"] * 1.1
    return row


def test_targets_rows_ratios_and_verdicts():
    targets = _bench("harness.targets")
    rows = [_row("clip", 1024, native=10.0, reference=30.0, reference_compile=20.0, floor=9.0),
            _row("clip_m2mix", 1024, native=21.0, native_products=30.0, reference=40.0,
                 reference_compile=25.0, floor=15.0),
            _row("robust_step", 1024, native=25.0, native_products=24.0, reference=23.0,
                 reference_compile=40.0, floor=20.0),
            _row("clip", 256, native=1.0, floor=1.0),        # not an N of the targets
            _row("siglip", 1024, native=9.0, floor=8.0)]     # no target
    trows = targets.target_rows(rows)
    assert [(t["loss"], t["N"], t["provider"]) for t in trows] == [
        ("clip", 1024, "native"), ("clip_m2mix", 1024, "native"),
        ("clip_m2mix", 1024, "native-products"), ("robust_step", 1024, "native"),
        ("robust_step", 1024, "native-products")]
    clip, m2_gram, m2_products, step_gram, step_products = trows
    assert clip["x_floor"] == pytest.approx(10 / 9) and clip["target_met"] == "yes"
    assert clip["target"] == "x_floor <= 1.15" and clip["design"] == ""
    assert m2_gram["x_clip"] == pytest.approx(2.1) and m2_gram["target_met"] == "yes"
    assert m2_gram["x_floor"] == pytest.approx(1.4) and m2_gram["design"] == "gram"
    assert m2_products["x_clip"] == pytest.approx(3.0) and m2_products["target_met"] == "no"
    assert m2_products["design"] == "products"
    assert (m2_products["faster_than_reference"],
            m2_products["faster_than_compile"]) == ("yes", "no")
    assert step_gram["target"] == "x_clip <= 2.4" and step_gram["target_met"] == "no"
    assert (step_gram["faster_than_reference"], step_gram["faster_than_compile"]) == ("no", "yes")
    assert step_products["target_met"] == "yes"
    assert [t["N"] for t in targets.target_rows(rows, None) if t["loss"] == "clip"] == [256, 1024]

    text = targets.format_tables(trows)
    assert "| 1024 | 10 | 9 | 1.11 | yes | 30 | 20 | yes / yes |" in text
    assert ("| CLIP + 0.01 m^2 | 1024 | 21 | 30 | 2.10 | 3.00 | <= 2.2 | yes / no | 1.40 | 2.00 "
            "| 40 | 25 | yes / yes | yes / no |") in text
    summary = targets.summarise(trows)
    assert any(s.startswith("RobustFTLoss step, native (gram), N = 1024: target (x_clip <= 2.4): "
                            "no (0 of 1); faster than reference: no (0 of 1)") for s in summary)


def test_targets_tolerate_missing_cells_and_csv_strings(tmp_path):
    """Rows read back from a CSV are strings, an empty cell a provider not measured; no fused
    CLIP at that N: no x CLIP and no verdict, and the table still prints."""
    targets = _bench("harness.targets")
    row = {k: ("" if v is None else str(v))
           for k, v in _row("clip_m2mix", 2048, native=5.0, floor=4.0).items()}
    (trow,) = targets.target_rows([row])
    assert trow["x_clip"] is None and trow["target_met"] == "" and trow["x_floor"] == 1.25
    assert trow["faster_than_reference"] == ""
    assert "| CLIP + 0.01 m^2 | 2048 | 5 | - | - | - |" in targets.format_tables([trow])
    targets.write_csv([trow], tmp_path / "t.csv")
    (back,) = _read(tmp_path / "t.csv")
    assert list(back) == targets.COLUMNS and back["x_floor"] == "1.25" and back["x_clip"] == ""


# --------------------------------------------------------------------------- cpu_compare.py

def test_cpu_compare_interleaves_both_designs(tmp_path, capsys, restore_process):
    require_backend("native", "cpu")
    cpu_compare = _bench("cpu_compare")
    out, tcsv = tmp_path / "compare.csv", tmp_path / "targets.csv"
    rows = cpu_compare.main(TOY + ["--losses", "clip", "clip_m2mix", "robust_step", "--modes",
                                   "full", "--providers", *TOY_PROVIDERS, "--csv", str(out),
                                   "--targets-csv", str(tcsv), "--table-n", "16"])
    assert [(r["loss"], r["mode"]) for r in rows] == [
        ("clip", "full"), ("clip_m2mix", "full"), ("robust_step", "full")]
    back = _read(out)
    assert list(back[0]) == cpu_compare.csv_columns(TOY_PROVIDERS)
    by_loss = {r["loss"]: r for r in back}
    assert by_loss["clip"]["native-products_min_ms"] == ""          # no design for CLIP
    for loss in ("clip_m2mix", "robust_step"):
        for p in TOY_PROVIDERS:
            assert float(by_loss[loss][f"{p}_min_ms"]) > 0
            assert float(by_loss[loss][f"{p}_med_ms"]) >= float(by_loss[loss][f"{p}_min_ms"])
    assert by_loss["clip"]["device"] and by_loss["clip"]["threads"] == "1"
    tback = _read(tcsv)
    assert [(t["loss"], t["provider"], t["design"]) for t in tback] == [
        ("clip", "native", ""), ("clip_m2mix", "native", "gram"),
        ("clip_m2mix", "native-products", "products"), ("robust_step", "native", "gram"),
        ("robust_step", "native-products", "products")]
    printed = capsys.readouterr().out
    assert "Fused CLIP (native) against its floor" in printed and "At every N" in printed
    # A file of another set of providers is refused before anything is measured.
    with pytest.raises(SystemExit, match="native-products"):
        cpu_compare.main(TOY + ["--providers", "native", "floor", "--csv", str(out)])


# --------------------------------------------------------------------------- plot.py

def _compare_csv(path: Path) -> None:
    cpu_compare = _bench("cpu_compare")
    rows = []
    for n, scale in ((256, 1.0), (512, 4.0)):
        row = dict(loss="clip_m2mix", N=n, D=512, dtype="fp32", mode="full", threads=2,
                   clock="wall", rounds=3, load1=1.0, device="Some CPU (2 cores)")
        for p, ms in (("native", 2.0), ("native-products", 3.0), ("reference", 5.0),
                      ("reference+compile", 4.0), ("floor", 1.0)):
            row.update({f"{p}_min_ms": ms * scale, f"{p}_med_ms": ms * scale * 1.2,
                        f"{p}_peak_mb": 10.0 * scale})
        rows.append(row)
    cpu_compare.append_csv(path, rows, list(cpu_compare.PROVIDERS))


def test_plot_reads_cpu_compare_rows(tmp_path):
    plot = _bench("plot")
    _compare_csv(tmp_path / "compare.csv")
    kind, rows = plot.read_rows(tmp_path / "compare.csv")
    assert kind == "compare" and len(rows) == 10
    r = next(r for r in rows if r["provider"] == "native-products" and r["N"] == "512")
    assert [float(r[k]) for k in ("ms_median", "ms_p20", "ms_p80")] == pytest.approx([12, 12, 14.4])
    assert r["device"] == "Some CPU (2 cores), 2 threads" and float(r["peak_mb"]) == 40.0
    groups = plot.load(tmp_path / "compare.csv", {"full"})
    (key,) = groups
    assert set(groups[key]) == {"native", "native-products", "reference", "reference+compile",
                                "floor"}
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed: the drawing is not tested")
    written = plot.main(["--csv", str(tmp_path / "compare.csv"), "--out", str(tmp_path / "p"),
                         "--no-device-in-name"])
    assert [p.name for p in written] == ["clip_m2mix_fp32_D512_full.png"]


# --------------------------------------------------------------------------- cpu_report.py

def test_cpu_report_end_to_end(tmp_path, restore_process):
    """The one command at toy sizes: its files, run.json's facts, the docs block rewritten
    with links that resolve from the page, and its measuring folder under the ignored
    benchmarks/results/."""
    require_backend("native", "cpu")
    cpu_report = _bench("cpu_report")
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(f"# Page\n\nbefore\n\n{cpu_report.BEGIN}\nold numbers\n{cpu_report.END}\n"
                    "\nafter\n")
    out = tmp_path / "cpu_results"
    results = BENCH / "results"
    existing = set(results.iterdir()) if results.exists() else set()
    try:
        status = cpu_report.main(TOY + ["--losses", "clip", "clip_m2mix", "--providers",
                                        *TOY_PROVIDERS, "--out", str(out), "--docs", str(page)])
    finally:
        made = (set(results.iterdir()) if results.exists() else set()) - existing
        for p in made:
            shutil.rmtree(p)
    assert status == 0
    assert len(made) == 1 and next(iter(made)).name.startswith("cpu_report_")
    names = {p.name for p in out.iterdir()}
    assert {"compare.csv", "targets.csv", "run.json", "report.md"} <= names
    run = json.loads((out / "run.json").read_text())
    for key in ("cpu", "cores", "threads", "torch", "robustft_ext", "commit", "load_before",
                "load_after", "start", "end", "duration_s", "command", "groups"):
        assert key in run, key
    assert run["threads"] == 1 and run["trial"] is True and len(run["load_before"]) == 3
    assert run["torch"] == torch.__version__ and run["groups"] == [[[16], 2]]
    assert run["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {t["provider"] for t in _read(out / "targets.csv")} == {"native", "native-products"}
    text = page.read_text()
    assert text.startswith("# Page\n\nbefore\n\n" + cpu_report.BEGIN)
    assert text.endswith(cpu_report.END + "\n\nafter\n") and "old numbers" not in text
    assert "A trial run at N = 16" in text and f"{run['cores']} cores, 1 threads" in text
    assert f"({run['cpu_capability']}), {run['cores']} cores" in text
    assert "| CLIP + 0.01 m^2 | 16 |" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "plots" / "clip_m2mix_fp32_D8_full.png").exists()
        assert "](../cpu_results/plots/clip_m2mix_fp32_D8_full.png)" in text
    # --render redraws the same block from the folder, measuring nothing.
    page.write_text(f"{cpu_report.BEGIN}\n{cpu_report.END}\n")
    assert cpu_report.main(["--render", str(out), "--out", str(out), "--docs", str(page),
                            "--no-plots"]) == 0
    assert "| CLIP + 0.01 m^2 | 16 |" in page.read_text()


def test_the_page_holds_the_cpu_report_block():
    cpu_report = _bench("cpu_report")
    text = cpu_report.DOCS.read_text()
    assert text.count(cpu_report.BEGIN) == 1 and text.count(cpu_report.END) == 1
    assert text.index(cpu_report.BEGIN) < text.index(cpu_report.END)
