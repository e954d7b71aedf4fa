"""Every notebook parameter checked strictly, before anything is written (issue 24).

One rule for all four notebooks, ``python -m furlib.pipeline`` and the library calls that take a
flag: a parameter's type is its declared default's (the notebook's ``parameters`` cell), and a
value of another type is an error naming the key and what to write. So the string ``'False'``
(a YAML profile's quoted value, a ``-p`` of papermill) is never taken as a boolean, ``'big'`` is
not a size, and a float is finite (``inf`` and ``nan`` are refused). A name papermill injects that
the notebook does not declare (``-p max_step 4``) is an error before the run starts, with the
closest declared name, instead of papermill's warning and a run with the default.

``check_notebook(stage, globals())`` is a notebook's first line after its parameters.
"""

import ast
import difflib
import math

SEED_LIMIT = 2 ** 32  # every stage's seed is below it: a time.time_ns() overflowed torch's generator


def expected(default) -> tuple[type, str] | None:
    """(type, words) a parameter whose default is ``default`` must have; None: anything goes."""
    if isinstance(default, bool):
        return bool, "true or false (unquoted: True/False in Python and -p, true/false in YAML)"
    if isinstance(default, int):
        return int, "an integer"
    if isinstance(default, float):
        return float, "a finite number"
    if isinstance(default, str):
        return str, "a string"
    if isinstance(default, (list, tuple)):
        return list, "a list"
    return None


def problem(key: str, value, default) -> str | None:
    """What is wrong with ``value`` for ``key`` (default ``default``), or None."""
    want = expected(default)
    if want is None:
        return None
    kind, words = want
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is list:
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, str)
    if ok:
        return None
    return f"{key}={value!r}: must be {words}{hint(value, kind)}"


def hint(value, kind: type) -> str:
    """Why a value a user meant as right arrived wrong (YAML's and papermill's parsing)."""
    if value is None:
        return (" (an empty value, ~ or null is YAML's null, not the default: write the value, \"\" for an empty "
                "string, or leave the key out for its default)")
    if kind is str and isinstance(value, (dict, list)):
        return " (YAML reads [a, b] as a list and 'a: b' as a mapping: quote the string)"
    if kind is int and isinstance(value, (str, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            return ""
        return f" (write {int(number)}, without a dot or an exponent)" if number.is_integer() else ""
    if kind is bool and isinstance(value, str):
        return " (a quoted string is not a boolean)"
    if kind is str and isinstance(value, (bool, int, float)):
        return (" (YAML and -p read a bare yes/no/true/false as a boolean and 1.10 as a number: quote it, "
                "e.g. pixel_cache: \"yes\", version: \"1.10\")")
    if kind in (int, float) and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads 5e-7 without a dot as a string: write 5.0e-7, unquoted)"
    return ""


def strict_bool(key: str, value) -> bool:
    """``value`` if it is a real boolean; else a ValueError naming ``key`` (for library calls)."""
    found = problem(key, value, False)
    if found:
        raise ValueError(found)
    return value


def finite(key: str, value) -> float:
    """``value`` as a float when it is a finite number; else a ValueError naming ``key``."""
    found = problem(key, value, 0.0)
    if found:
        raise ValueError(found)
    return float(value)


def problems(values: dict, defaults: dict) -> list[str]:
    """One line per value whose type differs from its default's (keys without a default: skipped)."""
    return [line for key, value in values.items() if key in defaults
            for line in [problem(key, value, defaults[key])] if line]


def unknown_names(given, declared, where: str) -> str | None:
    """An error naming each given name not declared, with the closest declared spelling."""
    unknown = sorted(set(given) - set(declared))
    if not unknown:
        return None
    hints = [f"{n!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, declared, 1)) else "")
             for n in unknown]
    return (f"{where} does not declare the parameter(s) {', '.join(hints)}: nothing was run. Fix the "
            "spelling; the names are those of its parameters cell")


def _assigned(source: str) -> list[str] | None:
    """Names a cell assigns at top level, or None when it is not all simple assignments."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    if not body or not all(isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) for t in n.targets)
                           for n in body):
        return None
    return [t.id for n in body for t in n.targets]


def injected_names(namespace: dict, declared) -> list[str]:
    """Names set by the cell run just before this one, when it is papermill's injected parameters
    (source starting ``# Parameters``) or the notebook's own parameters cell; else []."""
    history = namespace.get("In")  # IPython's input history; absent outside a kernel
    if not isinstance(history, list) or len(history) < 2:
        return []
    previous = history[-2]
    names = _assigned(previous) or []
    if previous.lstrip().startswith("# Parameters") or set(names) & set(declared):
        return names
    return []


def check_notebook(stage: str, namespace: dict) -> None:
    """A notebook's parameters: no unknown injected name, every value of its default's type, a
    plain ``run_name``. Raises one ValueError listing every problem."""
    from furlib.pipeline import BASE_KEYS, RUN_BASE_STAGES, STAGES, declared_parameters, stage_defaults

    defaults = stage_defaults(stage)
    given = injected_names(namespace, defaults)
    others = set().union(*(declared_parameters(s) for s in STAGES)) - set(defaults)
    if foreign := sorted(set(given) & others):  # a whole profile (papermill -f params/x.yaml)
        print(f"NOTE: {stage} leaves {', '.join(foreign)} to the stages that declare them")
        if stage in RUN_BASE_STAGES:  # as in the pipeline: a profile's base is what 02 trained
            for key in sorted(set(BASE_KEYS) & set(given)):
                print(f"NOTE: {key}={namespace[key]!r} came with a whole profile: it is 02's; {stage} uses the run's "
                      "own base (to replace it, pass base_model without -f)")
                namespace[key] = defaults[key]
    unknown = unknown_names([n for n in given if n not in others], defaults, stage)
    found = ([unknown] if unknown else []) + problems(
        {k: namespace[k] for k in defaults if k in namespace}, defaults)
    if "run_name" in defaults and not found:
        from furlib.runinfo import run_dir

        run_dir(namespace["outputs_dir"], namespace["run_name"])
    if found:
        raise ValueError(f"invalid {stage} parameter(s):\n  " + "\n  ".join(found))
