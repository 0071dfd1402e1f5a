"""bench/remote.py's bookkeeping: which sides run, and how rounds become figures."""

import pytest

from actors.media.policy import MediaSource
from bench import remote
from schemas.job import MediaConfig
from schemas.rows import RowError


def test_local_disk_first_then_every_delay_with_and_without_concurrent_prefetch():
    sides = remote.sides([0, 50], [1])
    default = MediaConfig().remote_concurrency
    assert sides[0] == ("local", None, None)
    assert sides[1:] == [(f"s3.0ms.c{default}", 0, default), ("s3.0ms.c1", 0, 1),
                         (f"s3.50ms.c{default}", 50, default), ("s3.50ms.c1", 50, 1)]  # fmt: skip
    widths = [c for _, _, c in remote.sides([200], [1, 4 * default, default])[1:]]
    assert widths == [4 * default, default, 1]  # the default once, widest first


def test_figures_are_medians_over_rounds_and_relative_to_local_disk_round_by_round():
    runs = {
        "local": [{"rows_per_s": 10.0, "cpu_busy": 1.0}, {"rows_per_s": 30.0, "cpu_busy": 0.9},
                  {"rows_per_s": 20.0, "cpu_busy": 0.95}],
        "s3.50ms.c1": [{"rows_per_s": 5.0, "cpu_busy": 0.2}, {"rows_per_s": 6.0, "cpu_busy": 0.4},
                       {"rows_per_s": 4.0, "cpu_busy": 0.3}],
    }  # fmt: skip
    figures = remote.summarise(runs)
    assert figures["local.rows_per_s"] == 20.0 and figures["local.cpu_busy"] == 0.95
    assert figures["s3.50ms.c1.rows_per_s"] == 5.0
    assert figures["s3.50ms.c1.over_local"] == 0.2  # rounds: 0.5, 0.2, 0.2 (the ratio of medians: 0.25)
    assert "local.over_local" not in figures
    assert "s3.50ms.c1.over_local" not in remote.summarise({"s3.50ms.c1": runs["s3.50ms.c1"]})


def test_reads_are_timed_as_the_rows_see_them_and_the_reader_is_put_back():
    import actors.media.decode

    read = actors.media.decode.read_media_path
    with remote.timed_reads([]) as waits:
        with pytest.raises(RowError):
            actors.media.decode.read_media_path(
                "/nowhere/x.jpg", MediaSource(media_root="/elsewhere"), "image"
            )
    assert len(waits) == 1 and waits[0] >= 0
    assert actors.media.decode.read_media_path is read
