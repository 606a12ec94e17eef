"""The Render runtime's own promises beyond the behaviour suite: plans by memory as Render documents them, cells
on a base service of their own that holds no secret, no secret in any start command, output from the logs API."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from dispatcher.classes import check_budget, parse_bytes
from dispatcher.errors import ConfigError, JobcellError
from dispatcher.models import MIB, LaunchSpec
from dispatcher.ports import CellInput
from dispatcher.routing import routed_budgets
from dispatcher.runtimes.render import PLANS, RenderError, RenderOptions, RenderRuntime, command_env, plan_for
from dispatcher.settings import load_settings
from job_image.contract import Header, decode

from .conftest import ROOT
from .fake_render import FakeRender, fake_presign

SECRETS = ["rnd_SECRET", "postgresql://jobcell:pw@db/jobcell", "AKIAEXAMPLE", "aws-secret-value", "sk-openai"]
SECRET_NAME = re.compile(r"DATABASE|PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|^AWS_|^OPENAI_|^RENDER_API", re.I)


def spec_and_cell(job_id: int = 5, attempt: int = 1, document_bytes: int = 2048, **params: Any
                  ) -> tuple[LaunchSpec, CellInput]:
    spec = LaunchSpec(job_id, attempt, "small", 512 * MIB, 60, "s3://bucket/docs/a.pdf", "diag", params)
    header = Header(job_id=job_id, attempt=attempt, tier="small", memory_limit_bytes=512 * MIB, workload="diag",
                    params=params, document_name="a.pdf", document_bytes=document_bytes)
    return spec, CellInput(header, spec.document_uri)


def options(fake: FakeRender, **kw: Any) -> RenderOptions:
    return RenderOptions(**{"service_id": "srv-cell", "api_key": "rnd_SECRET", "pool": "p", "queue_id": "q",
                            "base_url": fake.url, "own_service_id": "srv-dispatcher", "log_poll_s": 0.1,
                            "log_settle_s": 0.5, **kw})


@pytest.fixture
def render() -> Iterator[tuple[FakeRender, RenderRuntime]]:
    fake = FakeRender("srv-cell", {plan: memory for plan, memory in PLANS})
    with fake.serve():
        yield fake, RenderRuntime(options(fake), presign=fake_presign)


def test_a_tier_runs_on_the_smallest_documented_plan_that_holds_its_limit() -> None:
    # render.com/docs/one-off-jobs, "Instance type IDs" (web services, private services, background workers)
    assert PLANS == (("plan-srv-006", 512 * MIB), ("plan-srv-008", 2048 * MIB), ("plan-srv-010", 4096 * MIB),
                     ("plan-srv-011", 8192 * MIB), ("plan-srv-013", 16384 * MIB), ("plan-srv-014", 32768 * MIB))
    assert plan_for(512 * MIB) == "plan-srv-006"
    assert plan_for(1024 * MIB) == plan_for(2048 * MIB) == "plan-srv-008"
    assert plan_for(4096 * MIB) == "plan-srv-010"
    assert plan_for(8192 * MIB) == "plan-srv-011"
    assert plan_for(16384 * MIB) == "plan-srv-013"
    assert plan_for(32768 * MIB) == "plan-srv-014"
    with pytest.raises(ValueError, match="JOBCELL_RENDER_PLANS"):
        plan_for(64 * 1024 * MIB)


def test_the_start_command_holds_the_header_and_url_and_no_secret(render: tuple[FakeRender, RenderRuntime],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    fake, rt = render
    with caplog.at_level(logging.DEBUG):
        spec, cell = spec_and_cell()
        h = rt.launch(spec, cell)
        assert rt.launch(spec, cell) == h, "the same attempt is never created twice"
        [job] = [j["job"] for j in fake.jobs.values()]
        command = job["startCommand"]
        assert job["planId"] == "plan-srv-006"
        for secret in SECRETS:
            assert secret not in command
        env = command_env(command)
        assert set(env) == {"JOBCELL_POOL", "JOBCELL_QUEUE", "JOBCELL_HEADER", "JOBCELL_DOCUMENT_URL"}
        assert Header.model_validate_json(env["JOBCELL_HEADER"]) == cell.header
        assert env["JOBCELL_DOCUMENT_URL"] == fake_presign(cell.document_uri, rt.options.document_url_ttl_s)
        assert command.endswith(" python -m job_image.entrypoint")
        with pytest.raises(RenderError) as e:
            rt._call("GET", "/jobs/job-missing")
        assert e.value.status == 404 and isinstance(e.value, JobcellError)
        assert "rnd_SECRET" not in str(e.value)
    assert {auth for _, _, auth in fake.requests} == {"Bearer rnd_SECRET"}
    assert "rnd_SECRET" not in caplog.text and "rnd_SECRET" not in repr(rt.options)
    assert "X-Amz-Signature" not in caplog.text, "the document URL is never logged"


def test_a_cell_without_document_bytes_gets_no_url(render: tuple[FakeRender, RenderRuntime]) -> None:
    fake, rt = render
    rt.launch(*spec_and_cell(document_bytes=0))
    [job] = [j["job"] for j in fake.jobs.values()]
    assert "JOBCELL_DOCUMENT_URL" not in command_env(job["startCommand"])


def test_jobs_never_run_on_the_dispatchers_own_service() -> None:
    fake = FakeRender("srv-dispatcher", {})
    with fake.serve(), pytest.raises(ConfigError, match="JOBCELL_RENDER_SERVICE_ID") as e:
        RenderRuntime(options(fake, service_id="srv-dispatcher"), presign=fake_presign)
    assert "jobcell-cell" in str(e.value)
    with pytest.raises(ConfigError, match="JOBCELL_RENDER_SERVICE_ID"):
        RenderRuntime(options(fake, service_id=""), presign=fake_presign)


def test_a_base_service_with_credentials_is_refused() -> None:
    fake = FakeRender("srv-cell", {}, env_vars={"JOBCELL_DATABASE_URL": "postgresql://jobcell:pw@db/jobcell",
                                                "RENDER_API_KEY": "rnd_SECRET", "HARMLESS": "1",
                                                "SOMETHING": "postgresql://u:pw@host/db"})
    with fake.serve(), pytest.raises(ConfigError) as e:
        RenderRuntime(options(fake), presign=fake_presign)
    message = str(e.value)
    assert "JOBCELL_DATABASE_URL" in message and "RENDER_API_KEY" in message and "SOMETHING" in message
    assert "HARMLESS" not in message
    assert "pw" not in message and "rnd_SECRET" not in message, "names only, never values"


def test_output_is_the_records_from_the_jobs_logs(render: tuple[FakeRender, RenderRuntime]) -> None:
    _, rt = render
    spec, cell = spec_and_cell(alloc_mib=20, sleep_s=0.3)
    h = rt.launch(spec, cell)
    data = b"".join(rt.output(h))  # read until the job ended and its logs settled
    records = [decode(line) for line in data.splitlines()]
    assert [r.type for r in records] == ["document", "done", "peak"]
    assert {(r.job, r.attempt) for r in records} == {(5, 1)}
    assert b"allocated" not in data, "stderr lines are not records"
    assert b"".join(rt.output(h)) == data, "read again, the same bytes from the start"
    assert rt.poll(h) is not None and rt.poll(h).exit_code == 0  # type: ignore[union-attr]


def test_the_logs_api_is_paged_through(render: tuple[FakeRender, RenderRuntime]) -> None:
    _, rt = render
    spec, cell = spec_and_cell(exit_code=0, message="hello")
    h = rt.launch(spec, cell)
    list(rt.output(h))
    job = rt._call("GET", f"/jobs/{h.ref}")
    entries = list(rt._logs(h.ref, job["createdAt"], limit=2))
    assert [e["message"].split(" ")[0] for e in entries][:2] == ["allocated", "hello"]
    assert len(entries) == 5 and len({e["id"] for e in entries}) == 5
    # Two lines share a timestamp; a page of one cannot get past them: an error, not an endless loop.
    with pytest.raises(RenderError, match="do not advance"):
        list(rt._logs(h.ref, job["createdAt"], limit=1))


def test_a_failure_reads_its_reason_from_the_logs(render: tuple[FakeRender, RenderRuntime]) -> None:
    _, rt = render
    spec, cell = spec_and_cell(exit_code=65, message="page 3 is not a valid JPEG stream")
    h = rt.launch(spec, cell)
    assert [decode(line).type for line in b"".join(rt.output(h)).splitlines()] == ["peak"]
    exit = rt.poll(h)
    assert exit is not None and (exit.exit_code, exit.reason) == (65, "page 3 is not a valid JPEG stream")
    assert '{"' not in exit.log_tail


def test_a_vanished_job_is_lost(render: tuple[FakeRender, RenderRuntime]) -> None:
    _, rt = render
    from dispatcher.models import Handle

    exit = rt.poll(Handle("render", "job-missing", 1, 1))
    assert exit is not None and exit.lost
    assert list(rt.output(Handle("render", "job-missing", 1, 1))) == []


def test_the_blueprint_gives_cells_a_base_service_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    services = {s["name"]: s for s in blueprint["services"]}
    cell, dispatcher = services["jobcell-cell"], services["jobcell-dispatcher"]
    assert cell["dockerfilePath"] == dispatcher["dockerfilePath"] == "./Dockerfile.render", "one image, one contract"
    for var in cell.get("envVars", []):
        assert set(var) == {"key", "value"}, f"{var}: no fromDatabase, fromService, fromGroup or sync:false in a cell"
        assert not SECRET_NAME.search(var["key"]), var["key"]
        assert not any(secret in str(var["value"]) for secret in SECRETS)
    assert "envVarGroups" not in blueprint or all(
        "fromGroup" not in v for v in cell.get("envVars", [])), "no env group reaches a cell"
    keys = {v["key"]: v for v in dispatcher["envVars"]}
    assert keys["JOBCELL_RENDER_SERVICE_ID"] == {"key": "JOBCELL_RENDER_SERVICE_ID", "sync": False}
    assert keys["JOBCELL_RUNTIME"]["value"] == "process"  # small documents on the worker itself
    assert blueprint["databases"][0]["postgresMajorVersion"] == "16"
    # the dispatcher's configuration as the blueprint gives it is one the dispatcher accepts
    env = {v["key"]: str(v["value"]) for v in dispatcher["envVars"] if "value" in v}
    env.update(JOBCELL_DATABASE_URL="postgresql://u:p@db/jobcell", JOBCELL_RENDER_SERVICE_ID="srv-cell",
               RENDER_API_KEY="rnd_x", JOBCELL_S3_BUCKET="docs")
    monkeypatch.setattr(os, "environ", env)
    s = load_settings()
    table = s.table()
    assert s.runtimes() == ["process", "render"] and s.process.cap == "watchdog"
    assert [(c.name, c.runtime) for c in table.classes] == [("small", None), ("medium", "render"),
                                                             ("large", "render")]
    budgets = routed_budgets(table, s.runtime, {k: parse_bytes(v) for k, v in s.runtime_budgets.items()})
    check_budget(table, s.budget_bytes(512 * MIB), budgets)
    assert [plan_for(c.memory_limit_bytes) for c in table.classes[1:]] == ["plan-srv-008", "plan-srv-010"]
    for name in ("RENDER_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"):
        assert keys[name] == {"key": name, "sync": False}, f"{name} is set in the dashboard, never in this file"


def test_owned_finds_this_queues_jobs_from_their_start_commands(render: tuple[FakeRender, RenderRuntime]) -> None:
    fake, rt = render
    h = rt.launch(*spec_and_cell(job_id=9, attempt=2, sleep_s=5))
    other = RenderRuntime(options(fake, queue_id="another-queue"), presign=fake_presign)
    other.launch(*spec_and_cell(job_id=9, attempt=2, sleep_s=5))
    assert rt.owned() == [h]
    rt.kill(h)
    assert json.loads(command_env(fake.jobs[h.ref]["job"]["startCommand"])["JOBCELL_HEADER"])["job_id"] == 9
