"""Log event names are short snake_case constants; every value is a field, never baked into the name."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("miner", "runners")
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]{2,39}$")

LOG_METHODS = frozenset(
    {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "msg"}
    | {"adebug", "ainfo", "awarning", "aerror", "aexception", "acritical"}
)
LOGGER_NAMES = frozenset({"log", "logger"})
BIND_METHODS = frozenset({"bind", "new", "unbind", "try_unbind"})


@dataclass(frozen=True)
class Problem:
    """One log call whose event name breaks the house style."""

    where: str
    line: int
    event: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}:{self.event} ({self.why})"


def _logger_names(tree: ast.Module) -> set[str]:
    """``log``/``logger`` plus any name a module binds to ``structlog.get_logger(...)`` or ``.bind(...)``."""
    names = set(LOGGER_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            called = ast.unparse(node.value.func)
            if called.endswith("get_logger") or called.split(".")[-1] in BIND_METHODS:
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _is_log_method(node: ast.expr, names: set[str]) -> bool:
    """``log.warning``, ``log.error if bad else log.warning`` or ``getattr(log, name)``: a log method itself."""
    if isinstance(node, ast.Attribute):
        return node.attr in LOG_METHODS and _is_logger(node.value, names)
    if isinstance(node, ast.IfExp):
        return _is_log_method(node.body, names) and _is_log_method(node.orelse, names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        return bool(node.args) and _is_logger(node.args[0], names)
    return False


def _method_aliases(tree: ast.Module, names: set[str]) -> set[str]:
    """Names a module binds to a log method (``level = log.error if bad else log.warning``)."""
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _is_log_method(node.value, names):
            aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return aliases


def _is_log_call(call: ast.Call, names: set[str], aliases: set[str]) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in aliases
    if isinstance(func, ast.Attribute) and func.attr == "log":
        return _is_logger(func.value, names)
    return _is_log_method(func, names)


def _is_logger(node: ast.expr, names: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, ast.Attribute):  # self.log, self._log
        return node.attr.lstrip("_") in LOGGER_NAMES
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in BIND_METHODS:
        return _is_logger(node.func.value, names)
    return False


def _event_argument(call: ast.Call, method: str) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "event":
            return keyword.value
    position = 1 if method == "log" else 0  # log.log(level, event, ...)
    return call.args[position] if len(call.args) > position else None


def _why_not(event: ast.expr) -> str | None:
    """Why ``event`` is not a fit event name, or None when it is (a non-literal constant passes)."""
    if isinstance(event, ast.JoinedStr):
        return "an f-string: put the values in fields"
    if isinstance(event, ast.BinOp):
        return "a % expression: put the values in fields" if isinstance(event.op, ast.Mod) else "built by an expression"
    if isinstance(event, ast.Call) and isinstance(event.func, ast.Attribute) and event.func.attr == "format":
        return "a .format() call: put the values in fields"
    if isinstance(event, ast.Constant) and isinstance(event.value, str) and not EVENT_NAME.match(event.value):
        return "not snake_case of 3 to 40 characters"
    return None


def events_in(source: str, where: str) -> tuple[list[str], list[Problem]]:
    """Every literal event name logged in ``source``, and the calls that break the style."""
    tree = ast.parse(source, where)
    names = _logger_names(tree)
    aliases = _method_aliases(tree, names)
    found: list[str] = []
    problems: list[Problem] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _is_log_call(node, names, aliases)):
            continue
        method = node.func.attr if isinstance(node.func, ast.Attribute) else ""
        event = _event_argument(node, method)
        if event is None:
            continue
        if isinstance(event, ast.Constant) and isinstance(event.value, str):
            found.append(event.value)
        why = _why_not(event)
        if why is not None:
            problems.append(Problem(where, node.lineno, ast.unparse(event)[:80], why))
    return found, sorted(problems, key=lambda p: (p.where, p.line))


def scan_tree() -> tuple[list[str], list[Problem]]:
    """``events_in`` over every module under ``miner/`` and ``runners/``."""
    found: list[str] = []
    problems: list[Problem] = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            events, bad = events_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
            found += events
            problems += bad
    return found, problems


def test_every_event_name_is_a_short_snake_case_constant() -> None:
    """Every structlog event in miner/ and runners/ is a snake_case literal of at most 40 characters."""
    found, problems = scan_tree()
    assert len(found) >= 20, f"the scan found only {len(found)} log calls: has the logger name changed?"
    assert not problems, "log events break the naming style (file:line:event):\n" + "\n".join(map(str, problems))


def test_the_checker_flags_sentences_and_built_strings() -> None:
    """The checker flags sentences, f-strings, % and .format() events, through aliases too; a good name passes."""
    source = (
        "import structlog\n"
        "log = structlog.get_logger('x')\n"
        "jobs = log.bind(component='jobs')\n"
        "log.info('job_claimed', job_id=job_id)\n"
        "log.warning('job finished')\n"
        "log.error(f'gpu {index} failed')\n"
        "jobs.info('%s failed' % what)\n"
        "self.log.debug('{} done'.format(what))\n"
        "log.log(20, event='Bad Name')\n"
        "task.exception()\n"
        "level = log.error if fatal else log.warning\n"
        "level('registration failed; retrying')\n"
        "getattr(log, name)('Retrying')\n"
    )
    found, problems = events_in(source, "example.py")
    assert found == ["job_claimed", "job finished", "Bad Name", "registration failed; retrying", "Retrying"]
    assert [(p.line, p.why.split(":")[0]) for p in problems] == [
        (5, "not snake_case of 3 to 40 characters"),
        (6, "an f-string"),
        (7, "a % expression"),
        (8, "a .format() call"),
        (9, "not snake_case of 3 to 40 characters"),
        (12, "not snake_case of 3 to 40 characters"),
        (13, "not snake_case of 3 to 40 characters"),
    ]
    assert str(problems[0]) == "example.py:5:'job finished' (not snake_case of 3 to 40 characters)"
