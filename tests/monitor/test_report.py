"""write_html_report: one self-contained, escaped HTML file with the results and the figures."""

import base64
import math
import re
import struct
import zlib

import pytest
import torch

from eqlosses.data.frequency import many_medium_few_groups
from eqlosses.metrics import ClassificationMetrics
from eqlosses.monitor import ReportImage, write_html_report

COUNTS = torch.tensor([500, 150, 60, 30, 10, 3])  # many: 0, 1; medium: 2, 3; few: 4, 5


def tiny_png(path, rgb=(200, 30, 30)):
    """A valid 2x2 PNG written by hand (no imaging library needed)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + bytes(rgb) * 2 for _ in range(2))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def metrics_for(preds, targets):
    m = ClassificationMetrics(6)
    m.update(torch.nn.functional.one_hot(torch.tensor(preds), 6).float(), torch.tensor(targets))
    return m.compute(many_medium_few_groups(COUNTS))


@pytest.fixture
def runs():
    targets = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    ce = metrics_for([0, 0, 1, 1, 2, 0, 3, 0, 0, 0, 0, 0], targets)
    eql = metrics_for([0, 0, 1, 0, 2, 2, 3, 3, 4, 0, 5, 0], targets)
    return [{"name": "CE baseline", "loss": "CrossEntropyLoss", "metrics": ce, "seed": 0},
            {"name": "<script>alert('x')</script>", "loss": "SoftmaxEQLLoss & co",
             "metrics": eql, "checkpoint": "/ignored"}]


def test_report_table_figures_and_notes(tmp_path, runs):
    img1 = tiny_png(tmp_path / "gradient_ratio.png")
    img2 = tiny_png(tmp_path / "group_accuracy.png", rgb=(0, 0, 255))
    out = write_html_report(tmp_path / "out" / "report.html", "CE vs Softmax-EQL", runs,
                            [img1, str(img2)], notes="tau = 1.0\nline two <b>")
    assert out == tmp_path / "out" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    assert "<title>CE vs Softmax-EQL</title>" in text

    # CE: top-1 6/12 = 50.00; balanced (1 + 1 + .5 + .5 + 0 + 0) / 6 = 50.00;
    #     many 100.00, medium 50.00, few 0.00
    # EQL: top-1 9/12 = 75.00; many (1 + .5) / 2 = 75.00; medium 100.00; few 50.00
    rows = re.findall(r"<tr>(.*?)</tr>", text, flags=re.S)
    assert len(rows) == 3  # header + one per run
    header = re.findall(r"<th>(.*?)</th>", rows[0])
    assert header == ["Run", "Loss", "Top-1 (%)", "Balanced acc. (%)", "many (%)",
                      "medium (%)", "few (%)"]  # head to tail
    cells = [re.sub(r"<.*?>", "", c) for c in re.findall(r"<td[^>]*>.*?</td>", rows[1])]
    assert cells == ["CE baseline", "CrossEntropyLoss", "50.00", "50.00", "100.00", "50.00",
                     "0.00"]
    cells = [re.sub(r"<.*?>", "", c) for c in re.findall(r"<td[^>]*>.*?</td>", rows[2])]
    assert cells[2:] == ["75.00", "75.00", "75.00", "100.00", "50.00"]
    assert '<td class="num best">75.00</td>' in rows[2]  # the best top-1 is bold
    assert '<td class="num best">100.00</td>' in rows[1]  # the best "many" is CE's

    # thresholds stated under the table
    assert "few: count \u2264 19; medium: 20 \u2264 count \u2264 100; many: count &gt; 100" in text

    # images embedded, in order, as data URIs of the files' bytes
    uris = re.findall(r'<img src="([^"]+)"', text)
    assert uris == [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"
                    for p in (img1, img2)]
    assert "<figcaption>gradient ratio</figcaption>" in text

    assert "tau = 1.0\nline two &lt;b&gt;" in text
    # the ignored keys do not show up
    assert "/ignored" not in text


def test_report_is_self_contained_and_escaped(tmp_path, runs):
    out = write_html_report(tmp_path / "r.html", "A <b>bold</b> title", runs,
                            [tiny_png(tmp_path / "f.png")])
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"https?:", text, flags=re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "SoftmaxEQLLoss &amp; co" in text
    assert "<h1>A &lt;b&gt;bold&lt;/b&gt; title</h1>" in text
    # every src/href points inside the file
    assert all(v.startswith("data:") for v in re.findall(r'(?:src|href)="([^"]*)"', text))


def test_nan_and_missing_values_show_a_dash(tmp_path, runs):
    runs[0]["metrics"]["groups"]["few"] = math.nan
    runs.append({"name": "no groups", "loss": "BCELoss",
                 "metrics": {"top1": 0.5, "balanced_accuracy": 0.4, "groups": {}}})
    text = write_html_report(tmp_path / "r.html", "t", runs, []).read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", text, flags=re.S)
    assert rows[1].count("\u2013") == 1  # CE's few
    assert rows[3].count("\u2013") == 3  # no group column value
    assert "<h2>Figures</h2>" not in text


def test_different_group_thresholds_are_listed_per_run(tmp_path, runs):
    runs[1]["metrics"]["group_bounds"] = {"rare": [-math.inf, 10.0],
                                          "frequent": [10.0, math.inf]}
    text = write_html_report(tmp_path / "r.html", "t", runs, []).read_text()
    assert "they differ between runs" in text
    assert "<li>CE baseline: few: count" in text
    assert "rare: count \u2264 10; frequent: count &gt; 10" in text


def test_bad_runs_and_images_are_rejected(tmp_path, runs):
    with pytest.raises(ValueError, match=r"runs\[0\] lacks \['loss'\]"):
        write_html_report(tmp_path / "r.html", "t", [{"name": "a", "metrics": {}}], [])
    with pytest.raises(ValueError, match=r"runs\[1\]\['metrics'\] must be the dict"):
        write_html_report(tmp_path / "r.html", "t", [runs[0], {"name": "b", "loss": "x",
                                                               "metrics": 0.5}], [])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"expected an image file.*found '\.txt'"):
        write_html_report(tmp_path / "r.html", "t", runs, [tmp_path / "notes.txt"])
    with pytest.raises(FileNotFoundError):
        write_html_report(tmp_path / "r.html", "t", runs, [tmp_path / "missing.png"])
    assert not (tmp_path / "r.html").exists()


def test_report_embeds_a_real_figure(tmp_path, runs):
    pytest.importorskip("matplotlib")
    from eqlosses.monitor import plot_per_class_accuracy

    png = tmp_path / "per_class_accuracy.png"
    plot_per_class_accuracy({r["name"]: r["metrics"]["per_class_accuracy"] for r in runs},
                            COUNTS, png)
    text = write_html_report(tmp_path / "r.html", "t", runs, [png]).read_text()
    uri = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert len(uri) == 1 and base64.b64decode(uri[0]) == png.read_bytes()
    assert "<script" not in text.lower()  # the run name with <script> stays escaped


def test_figures_have_titles_and_captions(tmp_path, runs):
    img = tiny_png(tmp_path / "gradient_ratio.png")
    text = write_html_report(tmp_path / "r.html", "t", runs, [
        ReportImage(img, "Gradient ratio per class", "Bars far below 1 are <suppressed>.")
    ]).read_text()
    assert ('<figcaption><b>Gradient ratio per class.</b> Bars far below 1 are '
            '&lt;suppressed&gt;.</figcaption>') in text
    assert 'alt="Gradient ratio per class"' in text
    assert "gradient ratio</figcaption>" not in text  # not the file name


def test_status_missing_settings_configs_and_the_ratio_explained(tmp_path, runs):
    settings = {"CE baseline": {"loss": "ce", "optim.lr": 0.1, "seed": 0},
                runs[1]["name"]: {"loss": "softmax_eql", "optim.lr": 0.1, "seed": 0}}
    text = write_html_report(
        tmp_path / "r.html", "t", runs, [], notes="a  b\n  c",
        status="This run has not finished.", missing=["No <stats> recorded."],
        results_note="From the last evaluation.", settings=settings,
        configs={"CE baseline": "optim:\n  lr: 0.1\n"}, explain_ratio=True).read_text()
    assert '<p class="status">This run has not finished.</p>' in text
    assert "<li>No &lt;stats&gt; recorded.</li>" in text
    assert '<p class="meta">From the last evaluation.</p>' in text
    rows = dict(re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", text))
    assert rows["loss"] == '<td class="differs">ce</td><td class="differs">softmax_eql</td>'
    assert rows["optim.lr"] == "<td>0.1</td><td>0.1</td>"  # the same in both runs
    assert "<pre>optim:\n  lr: 0.1\n</pre>" in text and "<details>" in text
    assert "<h2>The gradient ratio</h2>" in text
    assert "P_j / N_j" in text and "balanced" in text and "far below 1" in text
    assert "<pre>a  b\n  c</pre>" in text  # notes keep their alignment
    assert text.index("Results") < text.index("Settings") < text.index("The gradient ratio")


def test_a_report_without_results(tmp_path):
    text = write_html_report(tmp_path / "r.html", "running", [], []).read_text()
    assert "<p>No results yet.</p>" in text
    assert "gradient ratio</h2>" not in text  # explained only when asked
