"""Every Slurm command of the login node goes through one door, mnist/launch/gateway.py: one timeout, one way to
say that Slurm cannot be reached. Here it is pointed at a fake Slurm that hangs, fails or answers."""
import ast
import subprocess

import pytest
from conftest import ROOT

from mnist import jobs
from mnist.errors import UserError
from mnist.launch import gateway, record, resources

SLURM_COMMANDS = {"squeue", "sacct", "sinfo", "scontrol", "scancel", "sbatch", "srun", "salloc"}


def test_no_module_but_the_gateway_runs_a_slurm_command():
    """No module of mnist/ names a Slurm command as the first item of a list (a command line), but the gateway's
    callers, which hand it to gateway.call; and only the gateway imports subprocess to run one."""
    for path in sorted((ROOT / "mnist").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("run", "Popen", "check_output"):
                head = node.args[0] if node.args else None
                first = head.elts[0] if isinstance(head, ast.List) and head.elts else None
                assert not (isinstance(first, ast.Constant) and first.value in SLURM_COMMANDS), (
                    f"{path.relative_to(ROOT)}:{node.lineno} runs {first.value} itself: call gateway.call instead")


@pytest.fixture
def fake_slurm(monkeypatch, tmp_path):
    """gateway.run replaced: answers[command name] is what that command does (an exception to raise, or
    (exit status, stdout, stderr)); every call is kept in `calls`."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    answers, calls = {}, []

    def run(command, **kwargs):
        calls.append((command, kwargs.get("timeout")))
        answer = answers[command[0]]
        if isinstance(answer, BaseException):
            raise answer
        code, out, err = answer
        return subprocess.CompletedProcess(command, code, out, err)

    monkeypatch.setattr(gateway, "run", run)
    return answers, calls


def test_no_module_but_env_reads_slurms_variables():
    """mnist/env.py is the one reader of SLURM_* variables: no other module of mnist/ (or the Hydra plugin) reads
    one from os.environ or os.getenv."""
    def slurm_name(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("SLURM_")

    def environ(node):
        return isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")

    readers = []
    for path in sorted([*ROOT.glob("mnist/**/*.py"), *ROOT.glob("hydra_plugins/**/*.py")]):
        if path == ROOT / "mnist" / "env.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            reads = (
                isinstance(node, ast.Subscript) and environ(node.value) and slurm_name(node.slice)
                or isinstance(node, ast.Call) and node.args and slurm_name(node.args[0]) and (
                    environ(node.func) or isinstance(node.func, ast.Attribute) and environ(node.func.value))
                or isinstance(node, ast.Compare) and slurm_name(node.left) and any(environ(c) for c in node.comparators)
            )
            if reads:
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not readers, f"Slurm's variables read outside mnist/env.py: {readers}"


def test_a_slurm_that_hangs_is_said_once_with_the_one_timeout(fake_slurm, tmp_path, capsys):
    answers, calls = fake_slurm
    answers["squeue"] = subprocess.TimeoutExpired("squeue", gateway.TIMEOUT_S)
    answers["sinfo"] = subprocess.TimeoutExpired("sinfo", gateway.TIMEOUT_S)
    record.append(tmp_path, [record.Entry("31", str(tmp_path / "run"), str(tmp_path / "mlp_31.out"))])
    assert [job["state"] for job in jobs.describe(tmp_path)] == ["?"]
    said = capsys.readouterr().err
    assert said.startswith(f"Slurm cannot be reached (squeue gave no answer within {gateway.TIMEOUT_S} s), so job "
                           f"states are shown as ?."), said
    with pytest.raises(resources.ResourceError, match="sinfo gave no answer within"):
        resources.ask_cluster()
    assert {timeout for _, timeout in calls} == {gateway.TIMEOUT_S}


def test_scancel_goes_through_the_gateway_and_its_refusal_is_one_paragraph(fake_slurm, tmp_path, capsys):
    answers, calls = fake_slurm
    answers["squeue"] = (0, "31|RUNNING|0:05|n1|None|0|5:00|2026-12-01T10:00:00|2026-12-01T10:00:01|cpu=1|\n", "")
    answers["sacct"] = (1, "", "sacct: error: Slurm accounting storage is disabled\n")
    answers["scancel"] = (1, "", "scancel: error: Kill job error on job id 31: Access/permission denied\n")
    record.append(tmp_path, [record.Entry("31", str(tmp_path / "run"), str(tmp_path / "mlp_31.out"))])
    with pytest.raises(UserError, match=r"^scancel 31 failed: scancel: error: Kill job error on job id 31: "
                                        r"Access/permission denied\. Its log and run folder are as they were\.$"):
        jobs.cancel(tmp_path, "31")
    assert [command[0] for command, _ in calls] == ["squeue", "sacct", "scancel"]
