"""The folder benchmark's worker reads every image of both splits once and reports its
memory; the page's claim compares the peak RSS growth with the extra images' decoded size."""

from benchmarks import folder_data
from benchmarks.record import RunRecord


def test_the_worker_reads_each_image_once_and_the_claim_follows_the_growth(tmp_path):
    folder_data.write_folder(str(tmp_path), 60, 8)
    row = folder_data.worker(str(tmp_path), 8)
    assert row["images"] == 60 == row["train_size"] + row["test_size"]
    assert row["peak_rss_mib"] >= row["baseline_rss_mib"] > 0
    small = {"count": 2000, "size": 32, "peak_rss_mib": 700.0}
    flat = folder_data.summarize([small, {**small, "count": 20000, "peak_rss_mib": 720.0}],
                                 "docs/folder_data.md")
    grown = folder_data.summarize([small, {**small, "count": 20000, "peak_rss_mib": 900.0}],
                                  "docs/folder_data.md")
    # 18,000 extra images of 32x32x3 float32: 211 MiB decoded.
    assert flat[0]["verdict"] == "met" and grown[0]["verdict"] == "missed"
    record = RunRecord("python -m benchmarks.folder_data", "2026-12-07", "m", 2, 0.1,
                       others_cpu=0.01)
    page = folder_data.render(record, [{**row, "count": 60, "size": 8, "epoch_s": 1.0,
                                        "prepare_s": 1.0, "others_cpu": 0.01}], flat)
    assert any(line.startswith("| 60 |") for line in page)
