"""Run the four notebooks headless through papermill from one params profile.

``python -m furlib.pipeline params/demo.yaml [--stages 02_train,03_eval] [-p key=value ...]``

A profile is one flat YAML file for the whole pipeline. Every key must be declared in the
``parameters`` cell of at least one notebook (an undeclared key is an error, not a warning);
each notebook receives only the keys it declares. Executed notebooks land beside the run's
outputs: ``<outputs_dir>/<run_name>/NN_verb.ipynb``.
"""

import argparse
import ast
import difflib
import json
import logging
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("01_data_prep", "02_train", "03_eval", "04_export")
# parameters that may name a file or folder; a relative one is taken from where you run the
# pipeline (the notebooks run in the repository root), unless it is one of the special values
PATH_KEYS = ("source", "train_source", "eval_source", "base_model", "base_config")
# 02's base to train; in 03 and 04 a replacement for the run's own base (read from its checkpoint),
# so a profile's (what 02 trained from, unless a -p changed it) never reaches them: only a -p does
BASE_KEYS = ("base_model", "base_config", "base_family")
RUN_BASE_STAGES = ("03_eval", "04_export")
SPECIAL = {"", "builtin", "val", "tiny", "tiny-random", "random:sd"}


class StageFailed(RuntimeError):
    """A notebook raised; the message is one plain line (the traceback is in the executed notebook)."""


def notebook_path(stage: str) -> Path:
    return ROOT / "notebooks" / f"{stage}.ipynb"


def declared_parameters(stage: str) -> dict:
    """name -> default (as source text) of a notebook's ``parameters`` cell.

    Read with ``ast``, not papermill, so ``python -m furlib.training.fit`` runs where papermill is not
    installed (a test checks both read the same names).
    """
    cells = json.loads(notebook_path(stage).read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{notebook_path(stage)} must have exactly one cell tagged 'parameters'")
    source = "".join(tagged[0]["source"])
    return {node.targets[0].id: ast.get_source_segment(source, node.value)
            for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)}


def stage_defaults(stage: str) -> dict:
    """A notebook's parameter defaults as values (its ``parameters`` cell, evaluated)."""
    return {k: ast.literal_eval(v) for k, v in declared_parameters(stage).items()}


def load_profile(path: str | Path, overrides: dict | None = None) -> dict:
    """A profile's parameters; raises ValueError naming any key no notebook declares."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist or is not a file (see params/ for profiles)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeError) as err:
        raise ValueError(f"{path} is not a YAML profile: {' '.join(str(err).split())}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must be a flat mapping of parameter names to values")
    declared = set().union(*(declared_parameters(s) for s in STAGES))
    for where, keys in ((str(path), params), ("-p", overrides or {})):  # blame the one that has it
        unknown = sorted(set(keys) - declared)
        if unknown:
            close = {k: difflib.get_close_matches(k, declared, 1) for k in unknown}
            hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
            raise ValueError(f"{where}: no notebook declares {unknown}{' (' + hints + ')' if hints else ''}; "
                             "check the spelling against the notebooks' parameters cells")
    return dict(params, **(overrides or {}))


def resolve_paths(params: dict, cwd: Path) -> dict:
    """A relative file or folder parameter that exists from ``cwd`` (where the user typed the
    command) becomes absolute, since the notebooks run in the repository root."""
    out = dict(params)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value not in SPECIAL and not Path(value).is_absolute() \
                and (cwd / value).exists():
            out[key] = str((cwd / value).resolve())
    return out


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML; a `` #`` that YAML would read as a comment (and
    drop: ``training_data=art from #e621`` was 'art from') is an error."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"override {text!r} must look like key=value")
    try:
        node = yaml.compose(value)
        dropped = (value[node.end_mark.index:] if node else value).strip()
        if dropped:
            fix = (f"quote the value to keep it: -p '{key}=\"{value.strip()}\"'" if node is None or
                   isinstance(node, yaml.ScalarNode) else "leave the comment out")
            raise ValueError(f"-p {text!r}: YAML reads {dropped!r} as a comment and would drop it; {fix}")
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ValueError(f"-p {text!r}: the value is not YAML ({' '.join(str(err).split())}); "
                         "quote it for a string: -p 'key=\"...\"'") from None


def stage_parameters(stage: str, params: dict, asked) -> dict:
    """What ``stage`` is handed: the keys it declares; for 03 and 04 a base only from a -p (``asked``:
    the keys given with -p)."""
    mine = {k: v for k, v in params.items() if k in declared_parameters(stage)}
    if stage in RUN_BASE_STAGES:  # the run's own base, unless a -p names another
        mine = {k: v for k, v in mine.items() if k not in BASE_KEYS or k in asked}
    return mine


def check_before_writing(params: dict, stages, asked=()) -> Path:
    """Every check that needs no model, before the pipeline writes anything: the stages' names and order,
    each value's type (``furlib.params``), a plain ``run_name``, 02's, 03's and 04's value checks
    (a bad 04 value must not wait for 150k steps of training), and that no executed notebook would
    overwrite a file that is not an earlier executed notebook (a project notebook, say). Returns
    the run folder."""
    from furlib import parameters as params_lib
    from furlib.runinfo import run_dir as plain_run_dir

    bad_stages = [s for s in stages if s not in STAGES]
    if bad_stages:
        raise ValueError(f"unknown stage(s) {bad_stages}; choose from {STAGES}")
    if list(stages) != sorted(set(stages), key=STAGES.index):  # 03 before 02 scored the old checkpoint
        raise ValueError(f"--stages {','.join(stages)}: each stage at most once, in the pipeline's order "
                         f"(stages hand off forward only): --stages {','.join(sorted(set(stages), key=STAGES.index))}")
    defaults = {}
    for stage in STAGES:
        defaults.update({k: v for k, v in stage_defaults(stage).items() if k not in defaults})
    found = params_lib.problems(params, defaults)
    if found:
        raise ValueError("invalid parameter(s):\n  " + "\n  ".join(found))
    run_dir = (ROOT / plain_run_dir(params["outputs_dir"], params["run_name"])).resolve()
    if "02_train" in stages:
        from furlib.training.settings import TrainSettings

        TrainSettings.from_params({k: v for k, v in params.items() if k in declared_parameters("02_train")})
    if "03_eval" in stages:
        from furlib.evaluation.eval_inputs import check_parameters

        check_parameters({**stage_defaults("03_eval"), **stage_parameters("03_eval", params, asked)})
    if "04_export" in stages:
        from furlib.export.release_files import check_parameters

        check_parameters({**stage_defaults("04_export"), **stage_parameters("04_export", params, asked)})
    for stage in stages:
        _check_output(run_dir / f"{stage}.ipynb")
    return run_dir


def _check_output(out: Path) -> None:
    """An executed notebook may replace only an earlier executed notebook (papermill metadata)."""
    if out in {notebook_path(s).resolve() for s in STAGES}:
        raise ValueError(f"outputs_dir/run_name put the executed notebook on the project's own {out}: "
                         "choose another outputs_dir or run_name")
    if out.exists():
        try:
            earlier = "papermill" in json.loads(out.read_text()).get("metadata", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            earlier = False
        if not earlier:
            raise ValueError(f"{out} exists and is not an executed notebook of an earlier run: the pipeline "
                             "will not overwrite it; move it, or choose another outputs_dir or run_name")


STOP_GRACE_S = 120.0  # a Ctrl-C's kernel shutdown waits this long for 02 to finish its step and save it


def patient_kernel_manager():
    """The kernel manager papermill runs each notebook with. A Ctrl-C makes it shut the kernel
    down: SIGINT first (02 finishes the step in progress and checkpoints it), then SIGTERM after
    half of ``shutdown_wait_time``, jupyter's 5 s by default: a step and a large checkpoint's write
    were cut short. Here the kernel gets ``STOP_GRACE_S``; a second Ctrl-C stops waiting."""
    from jupyter_client import AsyncKernelManager
    from traitlets import Float

    class PatientKernelManager(AsyncKernelManager):
        shutdown_wait_time = Float(STOP_GRACE_S, config=True)

    return PatientKernelManager


def run(profile: str | Path, stages=STAGES, overrides: dict | None = None, log_output: bool = False) -> Path:
    """Execute ``stages`` in order; returns the run folder. Stops at the first failing stage."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    params = resolve_paths(load_profile(profile, overrides), Path.cwd())
    asked = set(overrides or {})  # the keys a -p gave (only their names are compared)
    defaults = stage_defaults(STAGES[0])  # the notebooks' own defaults
    for key in ("run_name", "outputs_dir"):  # every stage works on the same run folder
        params.setdefault(key, defaults[key])
    run_dir = check_before_writing(params, stages, asked)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        mine = stage_parameters(stage, params, asked)
        t0 = time.time()
        print(f"[{stage}] running with {len(mine)} parameters -> {run_dir / (stage + '.ipynb')}", flush=True)
        executed = run_dir / f"{stage}.ipynb"
        try:
            papermill.execute_notebook(str(notebook_path(stage)), str(executed), parameters=mine,
                                       cwd=str(ROOT), log_output=log_output, progress_bar=False,
                                       kernel_manager_class=patient_kernel_manager())
        except papermill.PapermillExecutionError as err:
            said = " ".join(str(err.evalue).split())  # a multi-line message (a list of bad values) on one line
            raise StageFailed(f"[{stage}] failed: {err.ename}: {said} -- fix that, then re-run from "
                              f"here with --stages {_from(stages, stage)} (traceback: {executed})") from None
        except DeadKernelError:  # no Python error to show: the process was killed or crashed
            raise StageFailed(f"[{stage}] failed: its kernel died (out of memory, or a crash in native code; "
                              f"see the system log); {_saved(run_dir)}. The cells that ran are in {executed}; "
                              f"re-run from here with --stages {_from(stages, stage)}") from None
        except KeyboardInterrupt:  # the kernel had STOP_GRACE_S to save the step in progress
            raise KeyboardInterrupt(f"[{stage}] stopped by hand; {_saved(run_dir)}. Re-run with --stages "
                                    f"{_from(stages, stage)} to continue (02 resumes from its latest checkpoint)") from None
        print(f"[{stage}] done in {time.time() - t0:.0f} s", flush=True)
    return run_dir


def _saved(run_dir: Path) -> str:
    latest = run_dir / "checkpoints" / "latest"
    return f"the latest checkpoint is {latest.read_text().strip()}" if latest.is_file() else "no checkpoint yet"


def _from(stages, stage: str) -> str:
    return ",".join(stages[list(stages).index(stage):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="a params file, e.g. params/demo.yaml")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    ap.add_argument("-p", "--param", action="append", default=[], help="override: key=value")
    ap.add_argument("--log-output", action="store_true", help="stream notebook output")
    args = ap.parse_args(argv)
    if args.log_output:  # papermill streams cell output through `logging`, silent until configured
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        overrides = dict(parse_override(p) for p in args.param)
        run_dir = run(args.profile, args.stages.split(","), overrides, args.log_output)
    except (StageFailed, ValueError, FileNotFoundError) as err:  # one plain line, last
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as stop:  # run() says which stage and what was saved
        print(f"STOPPED: {stop or 'by hand'}", file=sys.stderr, flush=True)
        return 130
    print(f"outputs: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
