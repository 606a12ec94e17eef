"""The Render runtime's own promises beyond the behaviour suite: plans by memory, no secret in commands or logs."""

from __future__ import annotations

import logging

import pytest

from dispatcher.models import MIB, LaunchSpec
from dispatcher.runtimes.render import RenderError, RenderOptions, RenderRuntime, plan_for

from .fake_render import FakeRender


def test_a_tier_runs_on_the_smallest_plan_that_holds_its_limit():
    assert plan_for(512 * MIB) == "starter"
    assert plan_for(1024 * MIB) == "standard"
    assert plan_for(2048 * MIB) == "standard"
    assert plan_for(4096 * MIB) == "pro"
    with pytest.raises(ValueError, match="JOBCELL_RENDER_PLANS"):
        plan_for(64 * 1024 * MIB)


def test_the_key_travels_only_in_the_authorization_header(caplog):
    fake = FakeRender("srv-x", {"starter": 512 * MIB})
    with fake.serve(), caplog.at_level(logging.DEBUG):
        rt = RenderRuntime(RenderOptions(service_id="srv-x", api_key="rnd_SECRET", pool="p", queue_id="q",
                                         base_url=fake.url))
        spec = LaunchSpec(5, 1, "small", 512 * MIB, 60, "store:a.pdf", "ocr")
        h = rt.launch(spec)
        assert rt.launch(spec) == h, "the same attempt is never created twice"
        [job] = [j["job"] for j in fake.jobs.values()]
        assert job["planId"] == "starter" and "rnd_SECRET" not in job["startCommand"]
        assert "JOBCELL_JOB_ID=5" in job["startCommand"] and "JOBCELL_ATTEMPT=1" in job["startCommand"]
        with pytest.raises(RenderError) as e:
            rt._call("GET", "/jobs/job-missing")
        assert "rnd_SECRET" not in str(e.value)
    assert {auth for _, _, auth in fake.requests} == {"Bearer rnd_SECRET"}
    assert "rnd_SECRET" not in caplog.text and "rnd_SECRET" not in repr(rt.options)
