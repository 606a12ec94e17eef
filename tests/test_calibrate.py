"""`jobcell classes --recommend`'s arithmetic, on the pure core: recorded attempts in, a calibrated table out."""

from __future__ import annotations

import pytest

from dispatcher.calibrate import Policy, recommend, to_toml
from dispatcher.classes import DEFAULT_TABLE, load_table, load_table_from
from dispatcher.models import MIB
from dispatcher.views import PeakSample

pytestmark = pytest.mark.unit
TABLE = load_table(DEFAULT_TABLE)  # 512 MiB, 1 GiB, 2 GiB


def ok(tier: str, peak_mib: float, limit_mib: int, need_mib: float | None = None) -> PeakSample:
    return PeakSample(tier, "succeeded", limit_mib * MIB, int(peak_mib * MIB),
                      int(need_mib * MIB) if need_mib else None)


def test_a_class_comes_down_to_its_high_percentile_with_headroom():
    small = [ok("small", 40 + i, 512, need_mib=60 + i) for i in range(100)]  # peaks 40..139 MiB
    cal = recommend(TABLE, small)
    [s, m, lg] = cal.classes
    assert (s.peak_p50, s.peak_high, s.peak_max) == (int(89.5 * MIB), 134 * MIB, 139 * MIB)  # p95: nearest rank
    assert s.recommended_bytes == 176 * MIB  # 134 x 1.2 = 160.8, rounded up to 16 MiB
    assert s.frees_bytes == 336 * MIB and s.need_p50 == int(109.5 * MIB)
    assert (m.recommended_bytes, lg.recommended_bytes) == (1024 * MIB, 2048 * MIB)  # no evidence: kept
    assert "fewer than 20" in m.note
    assert cal.median_reserved_now == 512 * MIB and cal.median_reserved_after == 176 * MIB
    assert cal.table.get("small").memory_limit_bytes == 176 * MIB and cal.table.get("small").max_running == 15


def test_a_class_that_runs_out_of_memory_is_never_lowered_and_none_is_ever_raised():
    ooming = [ok("small", 100, 512) for _ in range(30)] + [PeakSample("small", "oom", 512 * MIB, 512 * MIB, None)] * 3
    assert recommend(TABLE, ooming).classes[0].recommended_bytes == 512 * MIB  # 3 of 33 OOM: over 5%
    full = [ok("small", 500, 512) for _ in range(30)]
    [s, *_] = recommend(TABLE, full).classes
    assert s.recommended_bytes == 512 * MIB and "already need" in s.note  # 600 MiB would be a raise


def test_limits_keep_growing_so_that_an_oom_retry_always_gets_more():
    samples = [ok("small", 200, 512) for _ in range(30)] + [ok("medium", 50, 1024) for _ in range(30)]
    [s, m, _] = recommend(TABLE, samples, Policy(headroom=1.0)).classes
    assert s.recommended_bytes == 208 * MIB
    assert m.recommended_bytes == 224 * MIB and "raised above the class below" in m.note  # not 64 MiB


def test_the_written_table_loads_as_a_classes_file(tmp_path):
    cal = recommend(TABLE, [ok("small", 70, 512) for _ in range(25)])
    f = tmp_path / "classes.toml"
    f.write_text(to_toml(cal.table))
    assert load_table_from(None, str(f)) == cal.table


def test_with_sizing_the_few_whose_estimate_is_over_the_limit_move_up_instead_of_setting_it():
    pages = [ok("small", 40 + 2 * i, 512, need_mib=50 + 2 * i) for i in range(30)]  # peaks 40..98 MiB
    huge = [ok("small", 248, 512, need_mib=323) for _ in range(2)]  # a 6000 x 6000 px page each
    [s, *_] = recommend(TABLE, pages + huge).classes
    assert s.recommended_bytes == 128 * MIB  # p95 of those that stay, 98 MiB x 1.2; the two move up first
    assert "2 of 32 would move up by their estimate" in s.note
    [without, *_] = recommend(TABLE, pages + huge, Policy(sizing=False)).classes
    assert without.recommended_bytes == 304 * MIB  # with no sizing step, the limit must hold them: 248 x 1.2
    many = pages + [ok("small", 248, 512, need_mib=323) for _ in range(6)]  # 6 of 36: over 10% would move
    assert recommend(TABLE, many).classes[0].recommended_bytes == 336 * MIB  # just above their estimate: they stay


def test_those_that_would_move_up_are_counted_where_they_would_land():
    pages = [ok("small", 40 + 2 * i, 512, need_mib=50 + 2 * i) for i in range(30)]
    huge = [ok("small", 248, 512, need_mib=323) for _ in range(3)]  # no medium attempt was ever recorded
    cal = recommend(TABLE, pages + huge, Policy(min_samples=3))
    [s, m, _] = cal.classes
    assert s.recommended_bytes == 128 * MIB
    assert m.recommended_bytes == 336 * MIB and "with 3 that would move up from the class below" in m.note
    # their reservation after is medium's, where they would run: the median moves from 512 MiB to small's
    assert cal.median_reserved_now == 512 * MIB and cal.median_reserved_after == 128 * MIB
