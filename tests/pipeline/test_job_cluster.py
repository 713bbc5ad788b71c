"""`ray start --head` on loopback, `ray job submit` end to end, and resume after killing a job mid-run.

The head runs as `ray start --head --block` in a child process; terminating that child shuts down
exactly this cluster (`ray stop` would stop every Ray on the machine, other users' included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import good_rows, job_config, job_env, read_output, write_config, write_parquet

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "batch_infer.py"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A 2-CPU Ray head on 127.0.0.1; yields (gcs address, dashboard URL, env for clients)."""
    gcs, dash = free_port(), free_port()
    env = job_env()
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    token = Path.home() / ".ray" / "auth_token"
    had_token = token.exists()
    # `ray start` records itself as the machine's current cluster, which bare ray.init() calls of other
    # processes would then join (or hang on, once it is gone): put the previous value back afterwards.
    current = Path("/tmp/ray/ray_current_cluster")
    previous = current.read_text() if current.exists() else None
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 360
        # The job agent comes up a little after the dashboard: wait until a trivial job goes through.
        while (probe := subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--",
                                        sys.executable, "-c", "pass"], env=env, capture_output=True, text=True)
               ).returncode != 0:
            assert proc.poll() is None, "ray start --head exited"
            assert time.time() < deadline, f"Ray head did not come up: {probe.stderr[-1500:]}"
            time.sleep(3)
        yield f"127.0.0.1:{gcs}", url, env
    finally:
        # SIGTERM to `ray start --block` tears down the processes it started, then wait for it.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if not had_token and token.exists():
            token.unlink()
        if current.exists() and current.read_text().strip() == f"127.0.0.1:{gcs}":
            if previous is None:
                current.unlink()
            else:
                current.write_text(previous)


def test_ray_job_submit_end_to_end(head, tiny_model_dir, tmp_path):
    _, url, env = head
    rows = good_rows(6)
    write_parquet(rows, tmp_path / "in.parquet")
    cfg = write_config(job_config(tiny_model_dir, str(tmp_path / "in.parquet"), str(tmp_path / "out")),
                       tmp_path / "job.yaml")
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--", sys.executable, str(JOB),
         "--config", str(cfg)],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "records      6" in proc.stdout
    out = read_output(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    assert all(r["answer"] and r["error"] is None for r in out)


def test_resume_after_killing_the_job(head, tiny_model_dir, tmp_path):
    """SIGKILL the driver once some files are written; the rerun completes with one row per id."""
    gcs, _, env = head
    rows = good_rows(24)
    write_parquet(rows, tmp_path / "in.parquet")
    out_dir = tmp_path / "out"
    cfg = job_config(tiny_model_dir, str(tmp_path / "in.parquet"), str(out_dir),
                     output={"min_rows_per_file": 2}, engine={"generation": {"max_new_tokens": 16}},
                     zoom_transfer="recompute")
    cfg_path = write_config(cfg, tmp_path / "job.yaml")
    cmd = [sys.executable, str(JOB), "--config", str(cfg_path)]
    env = {**env, "RAY_ADDRESS": gcs}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out_dir.glob("*.parquet"))) < 2:
        assert first.poll() is None, "the job finished before it could be killed; give it more work"
        assert time.time() < deadline
        time.sleep(0.2)
    first.kill()
    first.wait()
    # A file the dead job was still writing is torn; the rerun's resume drops it, so it counts as not done.
    partial = set()
    for f in out_dir.glob("*.parquet"):
        with contextlib.suppress(pa.ArrowInvalid, OSError):
            partial |= set(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    assert 0 < len(partial) < len(rows)

    # A changed config must not resume into this output.
    changed = write_config(cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"max_batch_size": 2})}),
                           tmp_path / "changed.yaml")
    refused = subprocess.run([sys.executable, str(JOB), "--config", str(changed)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "another config" in refused.stderr

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    ids = [r["id"] for r in read_output(out_dir).to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # none lost, none duplicated
    assert f"{len(rows) - len(partial)} this run" in second.stdout or "this run" in second.stdout
