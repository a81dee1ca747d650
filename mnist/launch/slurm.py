"""Submit runs to Slurm through submitit: one job, or one job array for a sweep.

The login-node side: it checks the config and the cluster, creates each run folder with its
resolved config, renders the sbatch script through submitit (so `dry_run=true` prints the very
bytes submitit writes), submits, records the job for `python -m mnist.jobs`, and returns.
It never imports torch and knows nothing about models beyond their name.
"""
import contextlib
import datetime
import math
import os
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnist import datafiles, figures, rundir
from mnist.errors import UserError
from mnist.launch import gateway, record, resources


class SubmitError(UserError):
    pass


def log_paths(log_dir, array) -> tuple[str, str]:
    """The user-facing logs: %x (job name) _ %j (job id), or %A_%a for a task of an array."""
    stem = "%x_%A_%a" if array else "%x_%j"
    return str(Path(log_dir) / f"{stem}.out"), str(Path(log_dir) / f"{stem}.err")


def job_name(cfgs) -> str:
    names = sorted({c.model.name for c in cfgs})
    return "-".join(names)


def parameters(cfg, name, array=False) -> dict:
    """submitit's SlurmExecutor parameters for a run (or, with array=True, each task of a sweep)."""
    launcher = cfg.launcher
    options = resources.sbatch_options(cfg.resources)
    out, err = log_paths(launcher.log_dir, array)
    setup = []
    if launcher.activate_env and sys.prefix != sys.base_prefix:
        setup.append(f"source {shlex.quote(os.path.join(sys.prefix, 'bin', 'activate'))}")
    setup += [str(line) for line in launcher.setup]
    # submitit's own srun --output/--error name files in its folder; ours come after and win. Since Slurm 22.05
    # srun does not take --cpus-per-task from sbatch (nor does submitit pass it): where tasks are pinned to their
    # CPUs, the training step would run on one of them.
    srun_args = ["--output", out, "--error", err, f"--cpus-per-task={options['cpus_per_task']}"]
    if options["nodes"] * options["ntasks_per_node"] > 1:  # a rank that fails ends the step, not waits for the others
        srun_args.append("--kill-on-bad-exit=1")  # (else they wait for it for torch's 30-minute timeout)
    signal_delay_s = resources.signal_delay(int(launcher.signal_delay_s), options["time"] * 60)
    params = dict(options, job_name=name, setup=setup, srun_args=srun_args, signal_delay_s=signal_delay_s)
    if array:
        params["array_parallelism"] = int(launcher.array_parallelism)
    # The batch script's own output (the setup lines, srun's and Slurm's messages) goes to the same files,
    # not to submitit's folder: sbatch --output/--error too. Both are opened for appending (submitit asks
    # for --open-mode=append, which srun inherits), so a requeued job adds to them.
    # --requeue: Slurm requeues the job (it resumes from its checkpoint) when its node fails or it is preempted,
    # also on clusters whose JobRequeue=0; the course's batch scripts ask the same
    params["additional_parameters"] = {"output": out, "error": err, "requeue": True,
                                       **resources.extra_options(cfg.resources)}
    return params


def _common_parameters(cfgs, name, array):
    """One array, one set of sbatch options: the runs may differ only in their time limit
    (the CNN needs longer than the MLP), and the array gets the longest."""
    each = [parameters(cfg, name, array) for cfg in cfgs]
    longest = max(p["time"] for p in each)
    for p in each:
        p["time"] = longest
        p["signal_delay_s"] = each[0]["signal_delay_s"]
    differing = sorted(k for p in each for k in set(p) | set(each[0]) if p.get(k) != each[0].get(k))
    if differing:
        raise SubmitError(
            f"A job array asks Slurm for one set of resources, but these runs differ in {', '.join(differing)}. "
            f"Sweep over those in separate submissions."
        )
    return each[0]


def submitit_folder(cfg) -> str:
    return str(Path(cfg.launcher.log_dir) / "submitit" / "%j")


def render(cfg, params, array_size=None) -> str:
    """The sbatch script submitit would write for these parameters, byte for byte."""
    from mnist import private_apis

    return private_apis.sbatch_script(submitit_folder(cfg), params, array_size)


def check(cfg, asked=None) -> None:
    """Everything that can be checked before submitting: resources, the cluster, the data. A dry run checks
    the same, and says so when it cannot ask a cluster.

    `asked`, a dict shared by the runs of one submission, keeps the answers an earlier run got (a sweep of
    50 seeds reads the data's headers and calls sinfo once)."""
    asked = {} if asked is None else asked
    resources.sbatch_options(cfg.resources)
    resources.extra_options(cfg.resources)
    resources.check_gpus(cfg.resources, cfg.trainer.device)
    array_parallelism(cfg.launcher)
    runs_per_task(cfg.launcher)
    if "signal" not in asked:
        asked["signal"] = _requeue_signal_agrees()
    data = ("data", cfg.data.root, cfg.data.name)
    if data not in asked:
        datafiles.check_on_login_node(cfg.data.root, cfg.data.name)
        asked[data] = True
    if "cluster" not in asked:
        asked["cluster"] = resources.ask_cluster(cfg.dry_run)
    if asked["cluster"] is not None:
        resources.check_cluster(cfg.resources, asked["cluster"])


def _requeue_signal_agrees():
    """submitit asks Slurm for, and listens to, the signal our jobs stop on before their time limit (USR2)."""
    from mnist import private_apis
    from mnist.stopping import REQUEUE_SIGNAL

    theirs = private_apis.submitit_requeue_signal()
    if theirs != REQUEUE_SIGNAL:
        raise SubmitError(
            f"SUBMITIT_PREEMPT_SIGNAL={os.environ.get('SUBMITIT_PREEMPT_SIGNAL')} is set, so submitit would ask Slurm "
            f"for {theirs.name} before the time limit, but a run checkpoints on {REQUEUE_SIGNAL.name}: it would be "
            f"requeued without a checkpoint of where it was. Unset SUBMITIT_PREEMPT_SIGNAL (or set it to "
            f"{REQUEUE_SIGNAL.name.removeprefix('SIG')}) and submit again.")
    return True


def prepare(cfg, run_dir, overrides=None) -> Path:
    """Create the run folder and save the resolved config the job will train on; a single run's
    command-line overrides are its start record (a sweep's runs get theirs from the sweep launcher)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_config(run_dir, OmegaConf.to_container(cfg, resolve=True))
    if overrides is not None:
        rundir.record_start(run_dir, overrides)
    return run_dir


def folder_rules(cfg, run_dir, overrides) -> tuple[DictConfig | None, str]:
    """The run-folder rules every submission applies, as a single run's does (mnist.run): a folder that holds a run
    resumes it with its own config (rundir.resume_config refuses an override that changes what it trains).
    Returns (the config to submit, "") or (None, why it is left alone: complete, or in use)."""
    if rundir.holds_run(run_dir):
        cfg = OmegaConf.create(rundir.resume_config(run_dir, OmegaConf.to_container(cfg), overrides))
    held = rundir.holder(run_dir)
    if held:
        return None, f"in use (process {held.get('pid')} on {held.get('host')})"
    if rundir.complete(run_dir, cfg):
        return None, "complete"
    return cfg, ""


def still_queued(log_dir, run_dirs) -> dict[str, str]:
    """{run folder: why it is left alone} for those of run_dirs a job recorded in log_dir still has queued or
    running (one squeue call, only where the record names one of them)."""
    from mnist.launch import outcome

    wanted = {str(Path(d).resolve()) for d in run_dirs}
    entries = [e for folder, mine in record.by_run(record.read(log_dir)).items() if folder in wanted for e in mine]
    if not entries:
        return {}
    known = record.states(entries)
    if known.unreachable:
        raise SubmitError(gateway.unreachable(known.unreachable, "which runs of this sweep are still queued or "
                                                                 "running cannot be told"))
    found = {}
    for job in outcome.describe(entries, known, log_dir):
        if job["state"] in outcome.GOING:
            found[str(Path(job["run_dir"]).resolve())] = f"still {job['state'] or '?'} as job {job['job_id']}"
    return found


def _executor(cfg, params):
    import submitit

    Path(cfg.launcher.log_dir).mkdir(parents=True, exist_ok=True)
    # One more than ours: TrainJob itself stops asking for requeues after launcher.max_requeues.
    executor = submitit.SlurmExecutor(folder=submitit_folder(cfg), max_num_timeout=int(cfg.launcher.max_requeues) + 1)
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _submitting():
    """sbatch's refusal as Slurm words it, not as a traceback from inside submitit."""
    import subprocess

    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        yield
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as e:
        text = getattr(e, "output", None) or str(e)
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        lines = [line.strip() for line in str(text).splitlines() if "error" in line.lower()] or [str(text).strip()]
        raise SubmitError(f"sbatch refused the job: {' '.join(lines)[:600]}. "
                          f"Fix the request and submit again.") from None


def submit(cfg, run_dir, overrides=None) -> str | None:
    """One run, one job. Prints the job id, the run folder and the log paths; returns the job id."""
    return submit_array([(cfg, run_dir)], single=True, overrides=overrides)


def submit_array(runs, single=False, overrides=None, previous=None, asked=None) -> str | None:
    """Several runs (a sweep) as ONE job array: one sbatch call, each task with its own folder.
    `previous`: for a resubmission, the job id each run had before (the record links them); `asked`: what the
    caller already asked the cluster (check's cache)."""
    cfgs = [cfg for cfg, _ in runs]
    asked = {} if asked is None else asked
    chosen = fill_auto(cfgs, sweep=not single, checked=asked)
    for cfg in cfgs:
        check(cfg, asked)
    first = cfgs[0]
    name = job_name(cfgs)
    per_task = 1 if single else min(runs_per_task(first.launcher), len(runs))
    tasks = [list(range(i, min(i + per_task, len(runs)))) for i in range(0, len(runs), per_task)]
    array = len(tasks) > 1  # (submitit submits a batch of one job as a plain job)
    params = _packed(_common_parameters(cfgs, name, array), first, per_task)
    if per_task > 1 and asked.get("cluster"):
        longest = max(resources.time_seconds(c.resources.time) for c in cfgs)
        fewer = resources.runs_within(per_task, longest, resources.max_time_s(first.resources, asked["cluster"]))
        resources.check_limits(first.resources, 60 * params["time"], asked["cluster"],
                               what=f"a task of {per_task} packed runs ({figures.limit_text(60 * params['time'])})",
                               time_fix=f"launcher.runs_per_task={fewer}")
    if first.dry_run:
        if chosen:  # stdout is the script, byte for byte
            print("\n".join(chosen), file=sys.stderr)
        sys.stdout.write(render(first, params, array_size=len(tasks) if array else None))
        return None
    run_dirs = [prepare(cfg, run_dir, overrides) for cfg, run_dir in runs]
    from mnist.launch.job import PackedJob, TrainJob

    executor = _executor(first, params)
    trainers = [TrainJob(OmegaConf.to_container(cfg, resolve=True), d, int(cfg.launcher.max_requeues))
                for cfg, d in zip(cfgs, run_dirs)]
    with _submitting():
        if not array:
            jobs = [executor.submit(PackedJob(trainers) if len(trainers) > 1 else trainers[0])]
        else:
            with executor.batch():
                jobs = [executor.submit(PackedJob([trainers[i] for i in task]) if len(task) > 1 else trainers[task[0]])
                        for task in tasks]
    if chosen:
        print("\n".join(chosen))
    _record(first, name, jobs, runs, array, tasks, previous)
    if previous is None:  # a resubmission says itself which folder each task reruns
        _announce(first, name, jobs, run_dirs, array, tasks)
    return jobs[0].job_id.split("_")[0]


def submit_workers(cfg, folder, workers, previous=None, asked=None, trial_cfgs=()) -> str | None:
    """A search's workers (mnist.search): ONE job array of `workers` tasks, each training trials of the study in
    `folder` until it has its n_trials; every task asks for what `cfg`'s resources say a run needs, and for the
    longest time limit of `trial_cfgs` (the configs its trials may get that differ in it). `asked`: what
    check() already found."""
    from mnist.launch.job import SearchWorker

    check(cfg, asked)
    array = workers > 1
    params = _common_parameters([cfg, *trial_cfgs], "search", array)
    if cfg.dry_run:
        sys.stdout.write(render(cfg, params, array_size=workers if array else None))
        return None
    executor = _executor(cfg, params)
    worker = SearchWorker(folder, int(cfg.launcher.max_requeues))
    with _submitting():
        if not array:
            jobs = [executor.submit(worker)]
        else:
            with executor.batch():
                jobs = [executor.submit(worker) for _ in range(workers)]
    _record(cfg, "search", jobs, [(cfg, folder)] * workers, array, [[i] for i in range(workers)], previous)
    main_id = jobs[0].job_id.split("_")[0]
    out, _ = _log_files(cfg, "search", f"{main_id}_0" if array else main_id, array)
    print(f"Submitted job {'array ' * array}{main_id} (search): {workers} worker{'s' * array}, at most "
          f"{min(workers, int(cfg.launcher.array_parallelism))} at once, each training trials until the study "
          f"has them all\n  search folder: {folder}\n"
          f"  logs:          {out.replace(f'{main_id}_0', f'{main_id}_<task>')}\n  watch with:    python -m mnist.jobs")
    return main_id


def array_parallelism(launcher) -> int:
    """launcher.array_parallelism as a number: at least 1 (how many array tasks may run at once)."""
    value = launcher.array_parallelism
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise SubmitError(f"launcher.array_parallelism={value} must be at least 1: how many array tasks may run "
                          f"at once, e.g. launcher.array_parallelism=8.")
    return number


def runs_per_task(launcher) -> int:
    """launcher.runs_per_task: a whole number >= 1 (how many runs of a sweep each array task trains)."""
    value = launcher.get("runs_per_task", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SubmitError(
            f"launcher.runs_per_task={value!r} is not a whole number >= 1 or auto. It is how many runs of a sweep "
            f"each array task trains one after another (start-up paid once): e.g. launcher.runs_per_task=5, 1 "
            f"for one run a task, or auto to fill tasks of launcher.pack_minutes from past runs."
        )
    return value


def fill_auto(cfgs, sweep=True, whole=True, checked=None) -> list[str]:
    """Replace resources.mem/time=auto and launcher.runs_per_task=auto by what the history of runs like these
    says (mnist.launch.history); returns the lines that say what was chosen, from how many runs, and
    what conf/ asks. One array asks for one memory: the largest chosen. `whole`: cfgs are all of the sweep's
    runs (not so for `mnist.jobs suggest`'s one config). `checked`: check()'s answers, to which packing adds the
    cluster's nodes (None: packing does not ask the cluster)."""
    from mnist.launch import history

    wanted = [k for k in ("mem", "time") if any(str(c.resources[k]) == "auto" for c in cfgs)]
    pack = str(cfgs[0].launcher.get("runs_per_task")) == "auto"
    if pack and not sweep:  # one run is one task: nothing to pack
        cfgs[0].launcher.runs_per_task, pack = 1, False
    if not wanted and not pack:
        return []
    lines, choices, pasts, keys = [], {}, {}, {}
    for cfg in cfgs:
        config = OmegaConf.to_container(cfg, resolve=True)
        key = keys[id(cfg)] = repr(history.match_key(config))
        if key not in pasts:
            pasts[key] = history.history(cfg.launcher.log_dir, config)
        asked = cfg.resources.asked
        choices[id(cfg)] = {"mem": history.choose_mem(pasts[key], asked.mem),
                            "time": history.choose_time(pasts[key], asked.time, int(cfg.trainer.epochs))}
        for k in wanted:
            shown = choices[id(cfg)][k]
            value = figures.limit_text(60 * shown.value) if k == "time" else shown.value
            lines.append(f"resources.{k}=auto: {value} ({shown.why}; conf/ asks {asked[k]})")
    if "mem" in wanted:
        largest = max((choices[id(c)]["mem"].value for c in cfgs), key=resources.memory_bytes_of)
        for cfg in cfgs:
            cfg.resources.mem = largest
    for cfg in cfgs:
        if "time" in wanted:
            cfg.resources.time = choices[id(cfg)]["time"].value
    if pack:
        lines.append(_pack_auto(cfgs, [pasts[keys[id(cfg)]] for cfg in cfgs], whole, checked))
    return list(dict.fromkeys(lines))  # a seed sweep says it once


def _pack_auto(cfgs, pasts, whole=True, asked=None):
    """launcher.runs_per_task=auto: tasks of about launcher.pack_minutes of estimated work, 1 without history; for
    a sweep, never so few tasks that fewer run at once than can (ceil(runs / at once) runs a task at most: all the
    tasks can then run in one wave), where what can run at once is the smaller of launcher.array_parallelism and
    what the partition's nodes hold."""
    from mnist.launch import history

    minutes = float(cfgs[0].launcher.pack_minutes)
    work = [history.estimated_work_s(p, int(c.trainer.epochs)) for p, c in zip(pasts, cfgs)]
    if minutes <= 0:
        raise SubmitError(f"launcher.pack_minutes={minutes:g} must be above 0, e.g. launcher.pack_minutes=10.")
    if any(w is None for w in work):
        per_task, why = 1, f"fewer than {history.MIN_RUNS} completed past runs like these"
    else:
        run_s, runs = max(max(work), 1.0), len(cfgs)
        per_task = max(1, int(minutes * 60 // run_s))
        why = f"about {minutes:g} minutes of work at {max(work):.0f} s a run, by the past runs"
        parallel, limit = _at_once(cfgs[0], asked) if whole else (1, "")
        filling = math.ceil(runs / parallel) if whole else per_task
        if filling == 1 < per_task:
            per_task = 1
            why = f"the {runs} run{'s' * (runs > 1)} can all run at once ({limit})"
        elif filling < per_task:
            per_task, task_s = filling, filling * run_s
            each = f"{task_s:.0f} s" if task_s < 120 else f"{task_s / 60:.0f} minutes"
            why = (f"the {runs} runs as {math.ceil(runs / filling)} tasks, which can all run at once ({limit}): "
                   f"about {each} of work each at {max(work):.0f} s a run; tasks of "
                   f"launcher.pack_minutes={minutes:g} would be fewer")
    nodes = (asked or {}).get("cluster")
    limit_s = resources.max_time_s(cfgs[0].resources, nodes)
    run_limit_s = max(resources.time_seconds(c.resources.time) for c in cfgs)
    wanted, per_task = per_task, resources.runs_within(per_task, run_limit_s, limit_s)
    if per_task < wanted:
        partition = resources.partition_nodes(cfgs[0].resources, nodes)[0].partition
        why = (f"a task asks for the sum of its runs' time limits, and {per_task} of "
               f"{figures.limit_text(run_limit_s)} fill partition {partition}'s MaxTime of "
               f"{figures.limit_text(limit_s)}; by the past runs {wanted} would do")
    for cfg in cfgs:
        cfg.launcher.runs_per_task = per_task
    return f"launcher.runs_per_task=auto: {per_task} ({why})"


def _at_once(cfg, asked):
    """(how many tasks of this sweep can run at once, what limits it): launcher.array_parallelism, or fewer where
    the partition's nodes hold fewer such tasks side by side (asked once: one sinfo call, shared with check())."""
    parallel = array_parallelism(cfg.launcher)
    if asked is not None and "cluster" not in asked:
        asked["cluster"] = resources.ask_cluster(cfg.dry_run)
    nodes = (asked or {}).get("cluster")
    held = resources.jobs_at_once(cfg.resources, nodes) if nodes else 0
    if 0 < held < parallel:
        partition = resources.partition_nodes(cfg.resources, nodes)[0].partition
        return held, f"partition {partition}'s nodes hold {held} such tasks at once"
    return parallel, f"launcher.array_parallelism={parallel}"


def _packed(params, cfg, per_task):
    """A task of `per_task` runs asks for the sum of their time limits, and its warning signal fits that."""
    if per_task == 1:
        return params
    minutes = params["time"] * per_task
    delay = resources.signal_delay(int(cfg.launcher.signal_delay_s), minutes * 60)
    return {**params, "time": minutes, "signal_delay_s": delay}


def _log_files(cfg, name, job_id, array):
    out, err = log_paths(cfg.launcher.log_dir, array)
    if array:
        main, task = job_id.split("_")
        fill = lambda p: p.replace("%x", name).replace("%A", main).replace("%a", task)  # noqa: E731
    else:
        fill = lambda p: p.replace("%x", name).replace("%j", job_id)  # noqa: E731
    return fill(out), fill(err)


def _record(cfg, name, jobs, runs, array, tasks, previous=None):
    """One Entry a run (the runs of a packed task share its job id; `pack` is (place, runs in the task));
    `previous`, for a resubmission, is the job id each run had before (the record links them)."""
    now = datetime.datetime.now().isoformat(timespec="seconds")
    previous = previous or [""] * len(runs)
    entries = []
    for job, task in zip(jobs, tasks):
        for place, i in enumerate(task):
            run_cfg, run_dir = runs[i]
            out, err = _log_files(cfg, name, job.job_id, array)
            entries.append(record.Entry(
                job.job_id, str(run_dir), out, err, name, run_cfg.model.name, now, str(job.paths.folder), previous[i],
                **_asked(run_cfg.resources), pack=(place, len(task)) if len(task) > 1 else None))
    record.append(cfg.launcher.log_dir, entries)


def _asked(res):
    """What the job asks for, in the record: the status table then needs no run's config to show it."""
    return {"mem": resources.memory(res.mem), "time": str(res.time),
            "cpus": int(res.cpus_per_task) * int(res.tasks_per_node) * int(res.nodes)}


def _announce(cfg, name, jobs, run_dirs, array, tasks):
    main_id = jobs[0].job_id.split("_")[0]
    if not array and len(run_dirs) > 1:  # a sweep packed into one task: a plain job that trains them all in turn
        out, _ = _log_files(cfg, name, main_id, False)
        print(f"Submitted job {main_id} ({name}): {len(run_dirs)} runs in 1 task, one after another\n"
              f"  run folders: {Path(run_dirs[0]).parent}/<run>\n  log:         {out}")
    elif not array:
        out, err = _log_files(cfg, name, main_id, False)
        print(f"Submitted job {main_id} ({name})\n  run folder: {run_dirs[0]}\n  log:        {out}\n"
              f"  errors:     {err}")
    else:
        out, _ = _log_files(cfg, name, f"{main_id}_0", True)
        packing = f" in {len(tasks)} tasks of up to {len(tasks[0])}" if len(tasks[0]) > 1 else ""
        print(f"Submitted job array {main_id} ({name}): {len(run_dirs)} runs{packing}, at most "
              f"{cfg.launcher.array_parallelism} at once\n"
              f"  run folders: {Path(run_dirs[0]).parent}/<{'run' if packing else 'task'}>\n"
              f"  logs:        {out.replace(f'{main_id}_0', f'{main_id}_<task>')}")
    print("  watch with:  python -m mnist.jobs")
