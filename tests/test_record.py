"""The launcher's job record (logs/jobs.jsonl, mnist.launch.record) as the commands that read it show it:
submissions made at the same time, a damaged record, and a Slurm that cannot be reached."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run

from mnist.launch import outcome, record

WRITERS, SUBMISSIONS, TASKS = 8, 40, 20


def entry(job_id, run_dir, log_dir, name="mlp"):
    """A record entry as the launcher writes it."""
    return record.Entry(job_id, str(run_dir), str(Path(log_dir) / f"{name}_{job_id}.out"),
                        str(Path(log_dir) / f"{name}_{job_id}.err"), name, name, "2026-11-25T14:03:07",
                        str(Path(log_dir) / "submitit" / job_id))


@pytest.fixture
def no_slurm(tmp_path):
    """SLURM_CONF naming no file: every Slurm command would fail (after retrying for a minute)."""
    return {"SLURM_CONF": str(tmp_path / "no-such-cluster.conf")}


def jobs(args, cwd, env=None):
    return run([str(a) for a in args], cwd=cwd, env=env, timeout=60, module="mnist.jobs")


def listed(stdout):
    """The jobs table as {JOB: STATE}."""
    return {line.split()[0]: line.split()[2] for line in stdout.splitlines()[1:] if line.strip()}


def test_eight_submissions_at_once_leave_every_line_whole_and_none_lost(tmp_path, capsys):
    """Each writer makes SUBMISSIONS submissions of a TASKS-task array, each over 8 KiB (more than one
    buffered write), while this process keeps reading the record as `python -m mnist.jobs` does."""
    logs = tmp_path / "logs"
    logs.mkdir()
    writer = (
        "import sys\n"
        "from mnist.launch import record\n"
        "w, logs = int(sys.argv[1]), sys.argv[2]\n"
        f"for s in range({SUBMISSIONS}):\n"
        f"    record.append(logs, [record.Entry(f'{{w}}{{s:03d}}_{{t}}', 'x' * 400, f'{{w}} {{s}} {{t}}', name='mlp',\n"
        f"                                      model='mlp') for t in range({TASKS})])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(w + 1), str(logs)], env=env, stderr=subprocess.PIPE,
                                text=True) for w in range(WRITERS)]
    reads = 0
    while any(w.poll() is None for w in writers):
        record.read(logs)  # as `python -m mnist.jobs` would, meanwhile: never half a submission
        reads += 1
    for w in writers:
        assert w.wait() == 0, w.stderr.read()
    assert reads > 0 and capsys.readouterr().err == ""

    lines = (logs / "jobs.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line whole
    assert len(entries) == WRITERS * SUBMISSIONS * TASKS  # none lost
    assert len({e["job_id"] for e in entries}) == len(entries)
    for start in range(0, len(entries), TASKS):  # each submission's lines together, in order
        submission = entries[start:start + TASKS]
        writer_and_submission = {e["stdout"].rsplit(" ", 1)[0] for e in submission}
        assert len(writer_and_submission) == 1, submission
        assert [e["stdout"].rsplit(" ", 1)[1] for e in submission] == [str(t) for t in range(TASKS)]


@pytest.mark.parametrize("damage, line", [("garbage in the middle", 2), ("half-written last line", 4)])
def test_a_damaged_line_is_skipped_with_one_warning_and_the_other_jobs_are_listed(tmp_path, no_slurm, damage, line):
    logs = tmp_path / "logs"
    logs.mkdir()
    good = [entry(str(job), tmp_path / "run" / str(job), logs) for job in (101, 102, 103)]
    lines = [e.line() for e in good]
    if damage == "garbage in the middle":
        lines.insert(1, "}{ not json \x00")
        text = "\n".join(lines) + "\n"
    else:
        text = "\n".join(lines) + "\n" + entry("104", tmp_path / "run" / "104", logs).line()[:60]
    (logs / "jobs.jsonl").write_text(text)

    result = jobs(["--logs", logs], tmp_path, env=no_slurm)
    assert result.returncode == 0, result.stderr
    assert list(listed(result.stdout)) == ["101", "102", "103"]
    warnings = [w for w in result.stderr.splitlines() if w.startswith("warning:")]
    assert warnings == [f"warning: {logs / 'jobs.jsonl'}, line {line}: not a whole job record "
                        f"(damaged or half-written), skipped."], result.stderr
    assert "Traceback" not in result.stderr

    tail = jobs(["--logs", logs, "tail", "102"], tmp_path, env=no_slurm)
    assert tail.returncode == 0 and tail.stdout.startswith(f"==> {logs / 'mlp_102.out'} <==")
    assert tail.stderr.count("warning:") == 1


def test_the_report_shows_the_jobs_of_a_damaged_record_and_warns_once(tmp_path, no_slurm):
    logs = tmp_path / "logs"
    logs.mkdir()
    runs = []
    for n in range(2):
        run_dir = tmp_path / "sweep" / str(n)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("model: {name: mlp}\noptimizer: {name: sgd}\ntrainer: {epochs: 2}\n"
                                             "data: {name: mnist}\n")
        runs.append(run_dir)
    (logs / "jobs.jsonl").write_text(entry("7_0", runs[0], logs).line() + "\nnot json\n"
                                     + entry("7_1", runs[1], logs).line() + "\n")
    result = run(["sweep", "--logs", "logs", "--no-figures"], tmp_path, env=no_slurm, module="mnist.report")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^0 .*not started\s+0/2 .*\s7_0\s", result.stdout, re.M), result.stdout
    assert re.search(r"^1 .*not started\s+0/2 .*\s7_1\s", result.stdout, re.M), result.stdout
    assert result.stderr.count(f"warning: {Path('logs') / 'jobs.jsonl'}, line 2:") == 1, result.stderr
    assert result.stderr.count("Slurm cannot be reached") == 1 and "no-such-cluster.conf" in result.stderr


def test_a_submission_after_a_half_written_line_starts_a_line_of_its_own(tmp_path, capsys):
    (tmp_path / "jobs.jsonl").write_text(entry("1", tmp_path, tmp_path).line() + "\n{\"job_id\": \"2\", \"na")
    record.append(tmp_path, [entry("3", tmp_path, tmp_path)])
    assert [e.job_id for e in record.read(tmp_path)] == ["1", "3"]
    assert "line 2:" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["SLURM_CONF names no file", "no squeue installed"])
def test_without_a_reachable_slurm_the_jobs_are_listed_with_state_unknown_and_the_reason(tmp_path, no_slurm, how):
    logs = tmp_path / "logs"
    logs.mkdir()
    record.append(logs, [entry("31", tmp_path / "run31", logs), entry("32_0", tmp_path / "run32", logs)])
    (logs / "mlp_31.out").write_text("Train Epoch: 1 [0/60000 (0%)]\tLoss: 2.302585\n")
    if how == "SLURM_CONF names no file":
        env, reason = no_slurm, f"SLURM_CONF={no_slurm['SLURM_CONF']} is not a file"
    else:
        empty = tmp_path / "bin"
        empty.mkdir()
        env, reason = {"PATH": str(empty), "SLURM_CONF": ""}, "squeue is not installed here (not on PATH)"
    result = jobs(["--logs", logs], tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"Slurm cannot be reached ({reason}), so job states are shown as ?. Check that "
                                    f"`squeue` answers"), result.stderr
    assert result.stderr.count("\n") == 1  # one paragraph
    assert listed(result.stdout) == {"31": "?", "32_0": "?"}
    assert "[0/60000 (0%)] Loss: 2.302585" in result.stdout and "\t" not in result.stdout


def test_tail_prints_its_header_on_stdout_before_the_log(tmp_path, no_slurm):
    logs = tmp_path / "logs"
    logs.mkdir()
    record.append(logs, [entry("41", tmp_path / "run", logs)])
    (logs / "mlp_41.out").write_text("".join(f"line {i}\n" for i in range(30)))
    piped = subprocess.run(f"{sys.executable} -m mnist.jobs --logs {logs} tail -n 2 | cat", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, **no_slurm}, timeout=60)
    assert piped.stdout == f"==> {logs / 'mlp_41.out'} <==\nline 28\nline 29\n", piped.stderr


@pytest.mark.slurm
@pytest.mark.parametrize("ids", [["11"], ["11", "12", "13"]])
def test_jobs_slurm_does_not_know_are_read_from_their_results_not_called_unreachable(slurm_env, tmp_path, ids):
    """Ids this cluster never had (its ids start far higher), as after sacct's and squeue's memory ends."""
    from submitit.core.utils import cloudpickle_dump

    logs = tmp_path / "logs"
    outcomes = {"11": ("success", [{"epoch": 1, "accuracy": 0.9}]), "12": ("error", "Traceback ...")}
    entries = [entry(job, tmp_path / "run" / job, logs) for job in ids]
    for job, pickled in outcomes.items():
        (logs / "submitit" / job).mkdir(parents=True)
        cloudpickle_dump(pickled, logs / "submitit" / job / f"{job}_0_result.pkl")
    record.append(logs, entries)
    result = jobs(["--logs", logs], tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    expected = {"11": "COMPLETED", "12": "FAILED", "13": "UNKNOWN"}  # 13: no result, no log
    assert listed(result.stdout) == {job: expected[job] for job in ids}


def test_sacct_and_squeue_lines_give_states_reasons_requeues_and_usage():
    """Lines as this project's cluster prints them: a job line, then its steps, whose MaxRSS (times the
    step's tasks) is the job's peak; squeue -r -O with each field ended by |."""
    sacct = record.parse_sacct(
        "7|FAILED|9:0|12|00:06.100|||5|2026-11-25T14:03:07|2026-11-25T14:03:09|2026-11-25T14:03:21|"
        "billing=1,cpu=1,mem=400M,node=1|vm|None\n"
        "7.batch|FAILED|9:0|12|00:00.020|3000K|1||2026-11-25T14:03:09|2026-11-25T14:03:09|2026-11-25T14:03:21|"
        "cpu=1,mem=400M,node=1|vm|\n"
        "7.0|OUT_OF_MEMORY|0:9|12|00:06.080|403330K|2||2026-11-25T14:03:09|2026-11-25T14:03:09|"
        "2026-11-25T14:03:21|cpu=1,mem=400M,node=1|vm|\n"
        "8_[1-3%1]|PENDING|0:0|0|00:00:00|||5|2026-11-25T14:03:07|Unknown|Unknown||None assigned|JobArrayTaskLimit\n")
    job = sacct["7"]
    assert (job.state, job.exit_code, job.elapsed_s, job.limit_s, job.cpus, job.mem) == ("FAILED", "9:0", 12, 300, 1,
                                                                                      400 << 20)
    assert job.cpu_s == pytest.approx(6.1) and job.max_rss == 2 * 403330 * 1024
    folded = sacct["8_[1-3%1]"]
    assert (folded.node, folded.reason, folded.start) == ("", "JobArrayTaskLimit", "")
    squeue = record.parse_squeue(
        "9_1|PENDING|0:00||JobArrayTaskLimit|0|5:00|2026-11-25T14:03:07|N/A|cpu=1,mem=2G,node=1,billing=1|\n"
        "9_0|RUNNING|1:02|vm|None|2|5:00|2026-11-25T14:03:07|2026-11-25T14:03:08|cpu=1,mem=2G,node=1,billing=1|\n")
    assert (squeue["9_1"].state, squeue["9_1"].reason, squeue["9_1"].start) == ("PENDING", "JobArrayTaskLimit", "")
    assert (squeue["9_0"].restarts, squeue["9_0"].elapsed_s, squeue["9_0"].limit_s, squeue["9_0"].mem) == (
        2, 62, 300, 2 << 30)


def test_a_multi_node_jobs_peak_is_its_fullest_nodes_not_all_its_tasks(tmp_path):
    """Two nodes of 3G each, one rank on each, each rank's peak 3G: MaxRSS is one task's, so a node held 3G (the
    job's 6G would read as twice what each node was asked for); two ranks on one node add up."""
    line = ("20|COMPLETED|0:0|60|01:00.000|||5|2026-11-25T14:03:07|2026-11-25T14:03:09|2026-11-25T14:04:09|"
            "billing=2,cpu=2,mem=6G,node=2|n[1-2]|None|2\n"
            "20.0|COMPLETED|0:0|60|01:00.000|3G|{tasks}||2026-11-25T14:03:09|2026-11-25T14:03:09|2026-11-25T14:04:09|"
            "cpu=2,mem=6G,node=2|n[1-2]||{nodes}\n")
    assert record.parse_sacct(line.format(tasks=2, nodes=2))["20"].max_rss == 3 << 30
    assert record.parse_sacct(line.format(tasks=4, nodes=2))["20"].max_rss == 6 << 30
    job = entry("20", tmp_path / "run", tmp_path)
    [job] = outcome.describe([job], record.States(record.parse_sacct(line.format(tasks=2, nodes=2))))
    assert outcome.shown(job)["mem"] == "3.0G/3.0G"


MEMORY_KILL = "slurmstepd: error: StepId=12.0 exceeded memory limit (826019840 > 419430400), being killed\n"
OOM_KILL = ("slurmstepd: error: Detected 1 oom-kill event(s) in StepId=12.batch. Some of your processes may have "
            "been killed by the cgroup out-of-memory handler.\n")
CANCELLED = "slurmstepd: error: *** JOB 12 ON n1 CANCELLED AT 2026-11-30T10:00:00{} ***\n"


@pytest.mark.parametrize("err, killed", [
    (MEMORY_KILL + CANCELLED.format(""), "memory"),  # OverMemoryKill: the step is then CANCELLED, for that
    (OOM_KILL, "memory"),
    (CANCELLED.format(" DUE TO TIME LIMIT"), "time"),
    ("srun: error: *** STEP 12.0 CANCELLED AT 2026-11-30T10:00:00 DUE TO TIME LIMIT ***\n", "time"),
    (CANCELLED.format(" DUE TO JOB REQUEUE") + CANCELLED.format(" DUE TO TIME LIMIT"), "time"),  # its last attempt's
    (OOM_KILL + CANCELLED.format(" DUE TO JOB REQUEUE") + CANCELLED.format(" DUE TO TIME LIMIT"), "time"),
    (CANCELLED.format(" DUE TO TIME LIMIT") + MEMORY_KILL, "memory"),
    (CANCELLED.format(""), None),  # scancel: neither
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", None),  # the GPU's, not --mem's
])
def test_what_a_job_was_killed_for_is_read_from_slurmstepds_last_words(err, killed):
    assert outcome.killed_for("Train Epoch: 1 [0/60000 (0%)]\tLoss: 2.3\n" + err) == killed


@pytest.mark.parametrize("err, state", [
    (OOM_KILL, "OUT_OF_MEMORY"),
    (MEMORY_KILL + CANCELLED.format(""), "FAILED"),
    (CANCELLED.format(" DUE TO TIME LIMIT"), "TIMEOUT"),
    # a requeued job's .err: the state is its last attempt's (it read CANCELLED, the requeue's line)
    (CANCELLED.format(" DUE TO JOB REQUEUE") + CANCELLED.format(" DUE TO TIME LIMIT"), "TIMEOUT"),
    (MEMORY_KILL + CANCELLED.format("") + CANCELLED.format(" DUE TO JOB REQUEUE")
     + CANCELLED.format(" DUE TO TIME LIMIT"), "TIMEOUT"),
    (CANCELLED.format(" DUE TO JOB REQUEUE") + OOM_KILL, "OUT_OF_MEMORY"),
])
def test_without_slurm_a_jobs_end_is_read_from_its_err_as_slurm_would_say_it(tmp_path, err, state):
    job = entry("12", tmp_path / "run", tmp_path)
    Path(job.stdout).write_text("Train Epoch: 1 [0/60000 (0%)]\tLoss: 2.3\n")
    Path(job.stderr).write_text(err)
    [job] = outcome.describe([job], record.States(by_job={}))
    assert job["state"] == state


def slurm_answering(monkeypatch, squeue, sacct):
    """gateway.run as a Slurm that prints these lines for squeue and for sacct."""
    from mnist.launch import gateway

    def answer(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, {"squeue": squeue, "sacct": sacct}[command[0]], "")

    monkeypatch.setattr(gateway, "run", answer)
    monkeypatch.delenv("SLURM_CONF", raising=False)


SQUEUE_LINE = "{id}|{state}|0:13|{node}|{reason}|0|5:00|2026-12-03T18:35:17|{start}|cpu=1,mem=1G,node=1|\n"
SACCT_LINE = "{id}|{state}|0:0|{elapsed}|00:00.010|||5|2026-12-03T18:35:17|{start}|{end}|{tres}|{node}|None|1\n"


def test_array_tasks_cancelled_while_pending_read_cancelled_never_unknown(tmp_path, monkeypatch):
    """As measured on this project's cluster: `sbatch -a 0-3%1`, then `scancel A_2` and `scancel A_1` while task 0
    ran. Both vanished from squeue -r and from sacct (which still folded them as `A_[1,3%1] PENDING`, later
    `A_[1%1] CANCELLED by 0`, task 2 on no line at all): they read CANCELLED, never started, not UNKNOWN."""
    logs = tmp_path / "logs"
    entries = [entry(f"28864001_{task}", tmp_path / "run" / str(task), logs) for task in range(4)]
    logs.mkdir()
    for task in (0, 3):
        Path(entries[task].stdout).write_text("started\n")
    squeue = SQUEUE_LINE.format(id="28864001_3", state="RUNNING", node="vm", reason="None",
                                start="2026-12-03T18:35:49")
    started = SACCT_LINE.format(id="28864001_0", state="COMPLETED", elapsed=31, start="2026-12-03T18:35:18",
                                end="2026-12-03T18:35:49", tres="billing=1,cpu=1,mem=1G,node=1", node="vm")
    for folded in ("28864001_[1,3%1]|PENDING", "28864001_[1%1]|CANCELLED by 0"):
        state, *_ = folded.split("|")[1:]
        line = SACCT_LINE.format(id=folded.split("|")[0], state=state, elapsed=0, start="Unknown", end="Unknown",
                                 tres="", node="None assigned")
        slurm_answering(monkeypatch, squeue, started + line)
        found = record.states(entries)
        assert {job: s.state for job, s in found.by_job.items()} == {
            "28864001_0": "COMPLETED", "28864001_1": "CANCELLED", "28864001_2": "CANCELLED",
            "28864001_3": "RUNNING"}, folded
        described = {job["job_id"]: job["cause"] for job in outcome.describe(entries, found, logs)}
        assert described["28864001_2"] == described["28864001_1"] == "cancelled before it started"


@pytest.mark.parametrize("folded, tasks", [
    ("5_[1-3]", {"1", "2", "3"}), ("5_[1,4-6%2]", {"1", "4", "5", "6"}), ("5_[1%1]", {"1"}), ("5_[7]", {"7"}),
])
def test_every_folded_form_of_an_array_is_read_for_each_of_its_tasks(tmp_path, monkeypatch, folded, tasks):
    """sacct's and squeue's folded task lists (ranges, lists, a %limit): each task they hold gets the line's
    state, and no other task does (those read as cancelled while pending: Slurm lists their array)."""
    entries = [entry(f"5_{task}", tmp_path / str(task), tmp_path) for task in range(8)]
    line = SACCT_LINE.format(id=folded, state="CANCELLED by 0", elapsed=0, start="Unknown", end="Unknown", tres="",
                             node="None assigned")
    slurm_answering(monkeypatch, "", line)
    found = record.states(entries).by_job
    assert {job for job, s in found.items() if s.source == "sacct"} == {f"5_{t}" for t in tasks}
    assert {s.state for s in found.values()} == {"CANCELLED"}


def test_a_job_requeued_after_its_node_failed_says_which_node(tmp_path):
    """`sacct -D` as measured on the multi-node cluster after `localslurm.py kill-node n1`: the attempt on n1
    ended NODE_FAIL, the job runs again on n2. The state is the latest attempt's; the cause names the node."""
    fields = ("|{exit}|{elapsed}|00:00.010|||5|2026-12-03T19:10:20|{start}|{end}|billing=1,cpu=1,mem=1G,node=1|"
              "{node}|{why}|1")
    lines = "\n".join([
        "28107001|NODE_FAIL" + fields.format(exit="0:0", elapsed=32, start="2026-12-03T19:10:28",
                                             end="2026-12-03T19:11:00", node="n1", why="None"),
        "28107001.batch|CANCELLED" + fields.format(exit="0:0", elapsed=32, start="2026-12-03T19:10:28",
                                                   end="2026-12-03T19:11:00", node="n1", why=""),
        "28107001|RUNNING" + fields.format(exit="0:0", elapsed=10, start="2026-12-03T19:11:12", end="Unknown",
                                           node="n2", why="BeginTime"),
    ]) + "\n"
    job = record.parse_sacct(lines)["28107001"]
    assert (job.state, job.node, job.earlier) == ("RUNNING", "n2", (("NODE_FAIL", "n1"),))
    [described] = outcome.describe([entry("28107001", tmp_path / "run", tmp_path)], record.States({"28107001": job}))
    assert described["cause"] == "requeued: its node n1 failed; resuming from its checkpoint"
