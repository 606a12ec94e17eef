"""The hostile suite: what a document that got code execution inside its cell would try, run for real on the
Docker and process runtimes with their default settings. Every attempt must fail, and each is checked from
outside: a listener the test starts sees no connection, the other job's rows are unchanged, `docker inspect`
shows no secret. The attacks live in the job image's `probe` workload (job_image/probe.py)."""

from __future__ import annotations

import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from dispatcher.models import NewJob
from dispatcher.queue import PostgresQueue
from dispatcher.runtimes.docker import DockerOptions, DockerRuntime
from dispatcher.runtimes.process import ProcessOptions, ProcessRuntime
from dispatcher.store import LocalStore

from .conftest import CORPUS, diag, pool_containers, sql, wait_final, wait_for
from .test_documents import docs  # noqa: F401 (fixture)

SECRET = "jobcell-test-pw"  # the test database's password: it must reach no cell


class Listener:
    """A TCP listener that counts who connected: the proof, from outside, that nothing got out."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted: list[Any] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def bridge(docker_client: docker.DockerClient) -> Iterator[str]:
    """A bridge network of the test's own; its gateway is this host, where a listener waits."""
    net = docker_client.networks.create(f"jobcell-test-{uuid.uuid4().hex[:8]}", driver="bridge")
    try:
        net.reload()
        yield net.attrs["IPAM"]["Config"][0]["Gateway"]
    finally:
        net.remove()


def probe(queue: PostgresQueue, **params: Any) -> int:
    job_id, _ = queue.submit(NewJob(document_uri="diag:", document_bytes=0, unique_key=f"probe:{uuid.uuid4()}",
                                    size_class="small", workload="probe", params=params, max_attempts=1))
    return job_id


def report(queue: PostgresQueue, job_id: int) -> dict[str, Any]:
    [attempt] = queue.attempts(job_id)
    line = next(ln for ln in (attempt.log_tail or "").splitlines() if ln.startswith("probe "))
    return json.loads(line.removeprefix("probe "))  # type: ignore[no-any-return]


def pg_addresses(docker_client: docker.DockerClient, db_url: str) -> list[list[Any]]:
    """Every address at which the test's Postgres answers: published on loopback, and on the engine's bridge."""
    port = int(db_url.rsplit(":", 1)[1].split("/")[0])
    targets: list[list[Any]] = [["127.0.0.1", port]]
    for c in docker_client.containers.list():
        for net in c.attrs["NetworkSettings"]["Networks"].values():
            if c.attrs["Config"]["Image"].startswith(("postgres", "jobcell/postgres")) and net.get("IPAddress"):
                targets.append([net["IPAddress"], 5432])
                targets.append([net["Gateway"], port])
    return targets


def run_probe(queue: PostgresQueue, start_dispatcher: Any, runtime: Any, listener: Listener,
              **params: Any) -> tuple[Any, dict[str, Any]]:
    """One escape probe through a real dispatcher on `runtime`: the job as it ended, and the probe's report."""
    try:
        job = probe(queue, **params)
        start_dispatcher(rt=runtime)
        [j] = wait_final(queue, [job])
        return j, report(queue, job)
    finally:
        listener.close()


def assert_sealed(job: Any, got: dict[str, Any], listener: Listener) -> None:
    """What every runtime's cell must have failed at, seen from inside (its report) and outside (the listener)."""
    assert job.state.value == "succeeded", job.reason
    assert listener.accepted == []
    assert all(r.startswith("refused") for r in got["tcp"].values()), got["tcp"]
    assert got["secrets_seen"] == []
    assert not [k for k in got["env_names"] if any(w in k for w in ("DATABASE", "KEY", "SECRET", "AWS", "TOKEN"))]
    assert all(not r.startswith(("read", "listed")) for r in got["read"].values()), got["read"]
    assert all(r.startswith("denied") for r in got["write"].values()), got["write"]
    assert got["scratch_fill_mib"] <= 16  # its cap, not the host's disk


def test_a_docker_cell_reaches_nothing(queue, start_dispatcher, docker_client, pool, db_url, bridge, tmp_path):
    listener = Listener(bridge)
    other = LocalStore(str(tmp_path / "store")).put(str(CORPUS / "ocrmypdf-linn.png"))[0]
    runtime = DockerRuntime(DockerOptions(image="jobcell-job:dev", pool=pool, queue_id=queue.queue_id(),
                                          scratch_size="16m", pids_limit=64), client=docker_client)
    j, got = run_probe(queue, start_dispatcher, runtime, listener, secrets=[SECRET, db_url],
                       tcp=[[bridge, listener.port], ["127.0.0.1", listener.port],
                            *pg_addresses(docker_client, db_url)],
                       dns=["postgres", "host.docker.internal"],
                       read=["/store", "/var/run/docker.sock", f"/store/{other.removeprefix('store:')}",
                             str(tmp_path / "store")],
                       write=["/etc/jobcell", "/app/jobcell", "/jobcell", "/home/jobcell"], fill_mib=64, forks=200)
    assert_sealed(j, got, listener)
    assert all(r.startswith("failed") for r in got["dns"].values()), got["dns"]
    assert got["uid"] != 0
    assert got["exec_from_scratch"].startswith("denied")  # noexec
    assert got["forks"] < 64


def test_a_process_cell_reaches_nothing(queue, start_dispatcher, docker_client, pool, db_url, tmp_path,
                                        monkeypatch):
    listener = Listener("127.0.0.1")
    monkeypatch.setenv("JOBCELL_TEST_SECRET", SECRET)  # in the dispatcher's environment, never the cell's
    store = LocalStore(str(tmp_path / "store"))
    other = store.put(str(CORPUS / "ocrmypdf-linn.png"))[0]
    runtime = ProcessRuntime(ProcessOptions(state_root=str(tmp_path / "units"), pool=pool,
                                            queue_id=queue.queue_id(), scratch_bytes=16 * 1024 * 1024,
                                            pids_limit=64), documents=store.open)
    assert runtime.sealed, "the suite runs as root: the process runtime must seal its cells"
    j, got = run_probe(queue, start_dispatcher, runtime, listener, secrets=[SECRET, db_url],
                       tcp=[["127.0.0.1", listener.port], *pg_addresses(docker_client, db_url)],
                       read=[str(tmp_path / "store" / other.removeprefix("store:")), str(tmp_path / "units"),
                             "/proc/1/environ"],
                       write=[str(tmp_path / "jobcell"), "/etc/jobcell"], fill_mib=64, forks=200)
    assert_sealed(j, got, listener)
    assert got["uid"] >= 200_000 and "JOBCELL_TEST_SECRET" not in got["env_names"]
    assert got["forks"] < 64


@pytest.mark.parametrize("mode, reason", [
    ("other_job", "emitted a record for job"),
    ("too_many_pages", "emitted page 2 of a document it declared to have 1"),
    ("huge_words", "emitted (more than 4 MiB of results|a record larger than 4 MiB)"),
    ("malformed", "not a result record"),
    ("forge_state", "not a result record"),
    ("forge_done", r"claimed to be done with 2 page\(s\) never emitted"),
])
def test_a_cell_that_breaks_the_result_contract_is_refused_once(queue, start_dispatcher, db_url, mode, reason):
    victim = diag(queue)  # another job with a stored page, which the hostile cell tries to overwrite
    sql(db_url, "UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", victim)
    sql(db_url, "INSERT INTO document_pages (job_id, page, attempt, dpi, width, height, text, words, ocr_seconds)"
                " VALUES (%s, 1, 1, 200, 10, 10, 'the real text', '[]', 0.1)", victim)
    before = sql(db_url, "SELECT * FROM document_pages WHERE job_id = %s", victim)
    job = probe(queue, mode=mode, target_job=victim)
    start_dispatcher()
    [j] = wait_final(queue, [job])
    assert j.state.value == "failed" and re.search(reason, j.reason or ""), j.reason
    assert (j.reason or "").startswith("refused the cell's results")
    assert [a.outcome for a in queue.attempts(job)] == ["bad_input"]  # never retried
    assert sql(db_url, "SELECT * FROM document_pages WHERE job_id = %s", victim) == before
    assert queue.get(victim).state.value == "succeeded"
    # only its own first page can have been stored, and no result was recorded for it
    assert {r[0] for r in sql(db_url, "SELECT page FROM document_pages WHERE job_id = %s", job)} <= {1}
    assert sql(db_url, "SELECT * FROM document_results WHERE job_id = %s", job) == []


def test_exit_0_without_a_whole_result_is_not_success(queue, start_dispatcher):
    job = probe(queue, mode="silent_success")
    start_dispatcher()
    [j] = wait_final(queue, [job])
    assert j.state.value == "failed" and "exited 0 without emitting a result" in (j.reason or ""), j.reason
    assert [a.outcome for a in queue.attempts(job)] == ["error"]


def test_docker_inspect_of_a_running_cell_shows_no_secret(queue, start_dispatcher, docker_client, pool, db_url):
    diag(queue, sleep_s=30)
    d = start_dispatcher()
    [listed] = wait_for(lambda: pool_containers(docker_client, pool, running_only=True), what="a running cell")
    inspected = docker_client.api.inspect_container(listed["Id"])
    text = json.dumps(inspected)
    assert SECRET not in text and db_url not in text
    env = dict(e.split("=", 1) for e in inspected["Config"]["Env"])
    image_env = {e.split("=", 1)[0] for e in docker_client.images.get("jobcell-job:dev").attrs["Config"]["Env"]}
    assert set(env) - image_env == set()  # nothing of the dispatcher's: the image's own settings only
    host = inspected["HostConfig"]
    assert host["NetworkMode"] == "none" and host["Init"] is True
    assert inspected["Mounts"] == [] and not host.get("Binds")  # no store, no volume, no socket
    assert "noexec" in host["Tmpfs"]["/scratch"] and "size=" in host["Tmpfs"]["/scratch"]
    d.stop()


def test_a_document_is_streamed_into_a_cell_that_sees_only_it(docs):  # noqa: F811
    """Real OCR on network none, no mount: the page text proves the cell got its document, and only it."""
    q = docs.start()
    job_id = docs.submit(CORPUS / "tesseract-phototest.tif")
    [job] = wait_final(q, [job_id], timeout=180)
    assert job.state.value == "succeeded", job.reason
    assert "quick brown" in q.pages(job_id)[0].text
    assert not [p for p in Path(docs.store_dir).iterdir() if p.stat().st_mode & 0o077]  # the dispatcher's only
