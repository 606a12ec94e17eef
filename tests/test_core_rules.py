"""The pure core: size classes, admission, outcome classification, and the import rules that keep it pure."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.classes import (
    DEFAULT_TABLE,
    Admission,
    check_budget,
    load_table,
    load_table_from,
    parse_bytes,
)
from dispatcher.errors import ConfigError
from dispatcher.models import (
    MIB,
    Exit,
    JobState,
    KillReason,
    Outcome,
    Running,
)
from dispatcher.outcome import Backoff, classify, decide
from job_image.contract import EXIT_BAD_INPUT, EXIT_OK, EXIT_TEMPFAIL

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=False)


def test_the_import_contracts_hold():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("module, wrong", [
    ("dispatcher/loop.py", "from . import queue"),
    ("dispatcher/runtimes/docker.py", "from . import process"),
    ("job_image/pipeline.py", "import dispatcher.loop"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, wrong):
    for part in ("dispatcher", "job_image", "jobcell", "pyproject.toml"):
        src = ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / part)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{wrong}  # deliberately wrong\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout


def test_default_table_matches_the_design():
    t = load_table(DEFAULT_TABLE)
    assert [(c.name, c.memory_limit_bytes // MIB, c.max_running, c.timeout_s) for c in t.classes] == [
        ("small", 512, 15, 600), ("medium", 1024, 5, 1800), ("large", 2048, 1, 3600)]
    assert t.for_size(4_999_999).name == "small"
    assert t.for_size(5_000_000).name == "medium"
    assert t.for_size(19_999_999).name == "medium"
    assert t.for_size(20_000_000).name == "large"
    assert t.next_tier("small").name == "medium" and t.next_tier("large") is None


@pytest.mark.parametrize("change, says", [
    ({"memory_limit_bytes": "2MiB"}, "greater than or equal"),
    ({"max_running": 0}, "max_running"),
    ({"timeout_s": "soon"}, "not a duration"),
    ({"memory_limit_bytes": "lots"}, "not a size"),
    ({"colour": "red"}, "colour"),
])
def test_a_bad_class_is_refused_with_what_to_fix(change, says):
    table = [dict(DEFAULT_TABLE[0], **change), *DEFAULT_TABLE[1:]]
    with pytest.raises(ConfigError) as e:
        load_table(table, "test")
    assert says in str(e.value) and "classes.0" in str(e.value)


def test_limits_must_grow_so_that_escalation_helps():
    table = [dict(DEFAULT_TABLE[0]), dict(DEFAULT_TABLE[1], memory_limit_bytes="256MiB"), DEFAULT_TABLE[2]]
    with pytest.raises(ConfigError, match="memory limits must grow"):
        load_table(table)


def test_only_the_last_class_is_open_ended():
    with pytest.raises(ConfigError, match="only the last class"):
        load_table([dict(DEFAULT_TABLE[0], max_input_bytes=None), DEFAULT_TABLE[2]])
    with pytest.raises(ConfigError, match="must have no max_input_bytes"):
        load_table(DEFAULT_TABLE[:2])


def test_table_from_env_json_and_toml_file(tmp_path):
    f = tmp_path / "classes.toml"
    f.write_text('[[classes]]\nname = "only"\nmemory_limit_bytes = "300MiB"\nmax_running = 2\ntimeout_s = "5min"\n')
    assert load_table_from(None, str(f)).get("only").timeout_s == 300
    assert load_table_from('[{"name": "x", "memory_limit_bytes": 100000000, "max_running": 1, "timeout_s": 1}]',
                           None).top.name == "x"
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_table_from("{", None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_table_from(None, str(tmp_path / "missing.toml"))


def test_budget_smaller_than_the_top_tier_is_refused():
    t = load_table(DEFAULT_TABLE)
    with pytest.raises(ConfigError, match="JOBCELL_MEMORY_BUDGET"):
        check_budget(t, 1024 * MIB)
    check_budget(t, 2048 * MIB)


def test_admission_needs_a_slot_and_room_in_the_budget():
    t = load_table(DEFAULT_TABLE)
    a = Admission(t, 2560 * MIB, [Running(1, "medium", 1024 * MIB)])
    assert a.fits("small") and a.fits("medium") and not a.fits("large")  # 1 GiB + 2 GiB > 2.5 GiB
    a.take("medium")
    assert not a.fits("medium")  # 2 GiB used + 1 GiB > 2.5 GiB
    assert a.fits("small")
    full = Admission(t, 100 * 1024 * MIB, [Running(i, "large", 2048 * MIB) for i in range(1)])
    assert not full.fits("large")  # no slot, whatever the budget


def test_a_job_that_waited_long_enough_gets_its_memory_reserved():
    t = load_table(DEFAULT_TABLE)
    running = [Running(1, "medium", 1024 * MIB)]
    fresh = Admission(t, 2560 * MIB, running, reserve_after_s=120)
    assert not fresh.consider(10, "large", waited_s=5)  # no room yet, and it has not waited long
    assert fresh.consider(11, "small", waited_s=0)  # small jobs fill the room meanwhile
    waited = Admission(t, 2560 * MIB, running, reserve_after_s=120)
    assert not waited.consider(10, "large", waited_s=300)  # still no room, but now it is reserved
    assert waited.ledger("large").reserved_for == 10 and waited.ledger("large").reserved_bytes == 2048 * MIB
    assert not waited.consider(11, "small", waited_s=0)  # the stream of small jobs no longer starves it
    after = Admission(t, 2560 * MIB, [], reserve_after_s=120)  # the medium job ended
    assert after.consider(10, "large", waited_s=310)


def test_a_class_renamed_while_jobs_ran_resolves_by_memory():
    t = load_table(DEFAULT_TABLE)
    assert t.resolve("medium").name == "medium"
    assert t.resolve("huge-old-name", 1024 * MIB).name == "medium"
    assert t.resolve("gone", 64 * 1024 * MIB).name == "large" and t.resolve("gone").name == "large"
    a = Admission(t, 8192 * MIB, [Running(1, "gone", 600 * MIB)])  # counted, not a KeyError
    assert a.ledger("medium").used_bytes == 600 * MIB and a.slots["medium"] == 1


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * MIB and parse_bytes("5MB") == 5_000_000 and parse_bytes(7) == 7
    with pytest.raises(ValueError):
        parse_bytes("12 parsecs")


@pytest.mark.parametrize("exit, killed_by, outcome", [
    (Exit(EXIT_OK), None, Outcome.SUCCEEDED),
    (Exit(EXIT_BAD_INPUT), None, Outcome.BAD_INPUT),
    (Exit(EXIT_TEMPFAIL), None, Outcome.ERROR),
    (Exit(137, oom_killed=True), None, Outcome.OOM),
    (Exit(137), None, Outcome.LOST),  # a SIGKILL no OOM signal explains: an engine restart, a human's kill
    (Exit(86), None, Outcome.OOM),  # the cell ran out of memory and lived to say so
    (Exit(137), KillReason.DEADLINE, Outcome.TIMEOUT),
    (Exit(137), KillReason.CANCEL, Outcome.CANCELLED),
    (Exit(137, oom_killed=True), KillReason.CANCEL, Outcome.CANCELLED),
    (Exit(None, lost=True), None, Outcome.LOST),
    (Exit(None, deadline_exceeded=True), None, Outcome.TIMEOUT),  # Kubernetes' activeDeadlineSeconds
    (Exit(2), None, Outcome.ERROR),
    (Exit(87), None, Outcome.NEEDS_MORE),  # its own estimate, before any work: not an OOM
])
def test_classify(exit, killed_by, outcome):
    assert classify(exit, killed_by) is outcome


def test_decide_escalates_oom_and_stops_at_the_top():
    t = load_table(DEFAULT_TABLE)
    b = Backoff()
    d = decide(Outcome.OOM, tier="small", attempt=1, max_attempts=5, table=t, backoff=b)
    assert (d.state, d.tier, d.delay_s) == (JobState.QUEUED, "medium", 0.0)
    d = decide(Outcome.OOM, tier="large", attempt=3, max_attempts=5, table=t, backoff=b)
    assert d.state is JobState.FAILED and d.reason is not None and "needs more than 2048 MiB" in d.reason


def test_a_cell_that_needs_more_goes_straight_to_the_tier_that_holds_it():
    t = load_table(DEFAULT_TABLE)  # 512 MiB, 1 GiB, 2 GiB
    b = Backoff()
    d = decide(Outcome.NEEDS_MORE, tier="small", attempt=1, max_attempts=5, table=t, backoff=b,
               need_bytes=1500 * MIB)
    assert (d.state, d.tier, d.delay_s) == (JobState.QUEUED, "large", 0.0)  # medium skipped: no OOM climb
    assert d.reason == "needs about 1.5 GiB for its largest page, over the 'small' tier's 512 MiB: moved to " \
                       "'large' before it ran out"
    assert decide(Outcome.NEEDS_MORE, tier="small", attempt=1, max_attempts=5, table=t, backoff=b,
                  need_bytes=600 * MIB).tier == "medium"
    over = decide(Outcome.NEEDS_MORE, tier="small", attempt=1, max_attempts=5, table=t, backoff=b,
                  need_bytes=9000 * MIB)
    assert over.tier == "large"  # the estimate errs high: the top tier may still hold it
    top = decide(Outcome.NEEDS_MORE, tier="large", attempt=2, max_attempts=5, table=t, backoff=b,
                 need_bytes=9000 * MIB)
    assert top.state is JobState.FAILED and "the top tier 'large' has 2 GiB" in (top.reason or "")


def test_decide_never_retries_bad_input_and_backs_off_errors():
    t = load_table(DEFAULT_TABLE)
    b = Backoff(exponent=4, jitter=0.25)
    d = decide(Outcome.BAD_INPUT, tier="small", attempt=1, max_attempts=5, table=t, backoff=b,
               exit_reason="encrypted PDF")
    assert (d.state, d.reason) == (JobState.FAILED, "encrypted PDF")
    d = decide(Outcome.ERROR, tier="medium", attempt=2, max_attempts=5, table=t, backoff=b,
               rand=random.Random(1))
    assert d.state is JobState.QUEUED and d.tier == "medium" and 16 <= d.delay_s <= 20
    d = decide(Outcome.LOST, tier="small", attempt=5, max_attempts=5, table=t, backoff=b)
    assert d.state is JobState.FAILED and "gave up after 5 attempts" in (d.reason or "")


ROUTED = [dict(c, runtime="render") if c["name"] == "large" else c for c in DEFAULT_TABLE]


def test_a_class_routed_to_a_runtime_counts_against_that_runtimes_budget_only():
    t = load_table(ROUTED)
    # the worker's 1 GiB holds small and medium jobs; large ones (2 GiB) run on Render's plans, budget 4 GiB
    a = Admission(t, 1024 * MIB, [Running(1, "small", 512 * MIB), Running(2, "large", 2048 * MIB)],
                  budgets={"render": 4096 * MIB})
    assert a.ledger("small").used_bytes == 512 * MIB and a.ledger("large").used_bytes == 2048 * MIB
    assert a.fits("small") and not a.fits("medium")  # 512 + 1024 > 1024 on the worker
    assert not a.fits("large")  # its one slot is taken, whatever the budget
    roomy = Admission(t, 1024 * MIB, [Running(1, "small", 512 * MIB)], budgets={"render": 4096 * MIB})
    assert roomy.fits("large")  # the worker's budget is not asked: Render's plan is not its memory
    assert roomy.consider(3, "large", 0) and (roomy.take("large") or True)
    assert roomy.ledger("large").used_bytes == 2048 * MIB and roomy.ledger("small").used_bytes == 512 * MIB


def test_every_budget_must_hold_the_largest_class_routed_to_it():
    t = load_table(ROUTED)
    check_budget(t, 1024 * MIB, {"render": 2048 * MIB})  # the worker holds medium; Render holds large
    with pytest.raises(ConfigError, match=r"JOBCELL_RUNTIME_BUDGETS\['render'\] \(1 GiB\) is smaller than the "
                                          r"'large' class limit \(2 GiB\)"):
        check_budget(t, 8192 * MIB, {"render": 1024 * MIB})
    with pytest.raises(ConfigError, match=r"JOBCELL_MEMORY_BUDGET \(512 MiB\) is smaller than the 'medium'"):
        check_budget(t, 512 * MIB, {"render": 8192 * MIB})


def test_a_routed_runtime_without_a_budget_is_refused_saying_how_to_set_one():
    from dispatcher.routing import routed_budgets

    t = load_table(ROUTED)
    assert routed_budgets(t, "process", {"render": 1, "kubernetes": 2}) == {"render": 1}
    assert routed_budgets(t, "render", {}) == {}  # routed to the default runtime: the default budget
    with pytest.raises(ConfigError, match=r"JOBCELL_RUNTIME_BUDGETS needs a memory budget for 'render' \(class "
                                          r"large\): e\.g\. JOBCELL_RUNTIME_BUDGETS='\{\"render\": \"8GiB\"\}'"):
        routed_budgets(t, "process", {})


CPU_TABLE = [dict(c, cpus=2) if c["name"] == "large" else c for c in DEFAULT_TABLE]


def test_cpu_admission_counts_each_class_cpus_beside_memory():
    t = load_table(CPU_TABLE)
    a = Admission(t, 64 * 1024 * MIB, [Running(1, "small", 512 * MIB)], cpu_budget=2)
    assert a.fits("small") and not a.fits("large")  # memory and slots are plenty; 1 + 2 CPUs > 2
    a.take("small")
    assert not a.fits("small") and not a.fits("medium")  # two cells on two CPUs: the third would only wait
    assert a.ledger("small").used_cpus == 2
    off = Admission(t, 64 * 1024 * MIB, [Running(1, "small", 512 * MIB), Running(2, "small", 512 * MIB)])
    assert off.fits("small")  # no CPU budget: memory and slots alone, as before


def test_a_job_that_waited_long_gets_its_cpus_reserved_too():
    t = load_table(CPU_TABLE)
    running = [Running(1, "small", 512 * MIB)]
    a = Admission(t, 64 * 1024 * MIB, running, reserve_after_s=120, cpu_budget=2)
    assert not a.consider(10, "large", waited_s=300)  # needs both CPUs; one is busy
    assert a.ledger("large").reserved_cpus == 2
    assert not a.consider(11, "small", waited_s=0)  # the free CPU is kept for it: small jobs cannot starve it


def test_a_routed_class_is_not_counted_against_this_hosts_cpus():
    t = load_table([dict(c, runtime="render") if c["name"] == "large" else c for c in CPU_TABLE])
    a = Admission(t, 1024 * MIB, [Running(1, "small", 512 * MIB), Running(2, "small", 512 * MIB)],
                  budgets={"render": 4096 * MIB}, cpu_budget=2)
    assert not a.fits("small") and a.fits("large")  # Render's machine has its own CPUs
    assert a.ledger("large").used_cpus == 0


def test_a_cpu_budget_below_a_class_cpus_is_refused():
    t = load_table(CPU_TABLE)
    check_budget(t, 4096 * MIB, cpu_budget=2)
    with pytest.raises(ConfigError, match=r"JOBCELL_CPU_BUDGET \(1\) is smaller than the 'large' class's cpus"):
        check_budget(t, 4096 * MIB, cpu_budget=1)
