"""Reading YAML: one loader for every config, ``--set`` value and run folder's ``config.yaml``.

PyYAML's safe loader with two changes: YAML 1.1's base-60 integers are not numbers (so
``imbalance: 90:10`` stays a string) and ``1e-3`` is a float; and a document is refused, before any of
it is built, when its aliases would expand it past :data:`MAX_YAML_VALUES` values or nest it past
:data:`MAX_YAML_DEPTH` levels (or into itself).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from cmafnet.errors import ConfigError

# Bounds on what one YAML document may stand for once its aliases are expanded (a resolved config is
# ~320 values, 4 levels deep): an "alias bomb" of nine lines expands to 9^9 values and used to run
# for minutes; nesting past Python's recursion limit used to end in a traceback.
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 50


class YamlBoundError(yaml.MarkedYAMLError):
    """A YAML document past :data:`MAX_YAML_VALUES` or :data:`MAX_YAML_DEPTH` (refused, not parsed)."""


def _bounded(node: yaml.Node) -> None:
    """Raise :class:`YamlBoundError` if ``node`` expands to too many values, too deep, or into itself.

    Each node is walked once: an alias reuses the (values, depth) of the node it names, so the check is
    linear in the document's size whatever the expansion (and its recursion no deeper than the composed
    document, which :class:`_Loader` bounds).
    """
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    open_nodes: set[int] = set()  # on the current path: an alias to one of them is a cycle

    def walk(n: yaml.Node, level: int) -> tuple[int, int]:
        def refuse(problem: str) -> YamlBoundError:
            return YamlBoundError(problem=problem, problem_mark=n.start_mark)

        if id(n) in open_nodes:
            raise refuse("an alias names a node that contains it")
        values, depth = memo.get(id(n), (1, 0))
        if id(n) not in memo:
            children = n.value if isinstance(n, yaml.SequenceNode) else []
            if isinstance(n, yaml.MappingNode):
                children = [x for pair in n.value for x in pair]
            open_nodes.add(id(n))
            for child in children:
                v, d = walk(child, level + 1)
                values, depth = values + v, max(depth, d + 1)
                if values > MAX_YAML_VALUES:
                    raise refuse(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
            open_nodes.discard(id(n))
            memo[id(n)] = (values, depth)
        if level + depth > MAX_YAML_DEPTH:
            raise refuse(f"nested more than {MAX_YAML_DEPTH} levels deep")
        return values, depth

    walk(node, 0)


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 integers (so ``imbalance: 90:10`` stays a string), refusing
    a document past the bounds above before building any of it."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # The composer recurses per level: bound it before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlBoundError(
                    problem=f"nested more than {MAX_YAML_DEPTH} levels deep", problem_mark=mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _bounded(node)
        return super().construct_document(node)


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str, where: str = "YAML") -> Any:
    """Parse YAML with the project's loader (no base-60 numbers; '1e-3' is a float; the bounds above).

    Every YAML the package reads (configs, ``--set`` values, run folders' ``config.yaml``) comes here.

    Raises:
        ConfigError: one line naming ``where``: not valid YAML, or refused (past the bounds).
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]  # PyYAML's text spans lines
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if isinstance(err, YamlBoundError):
            raise ConfigError(f"{where}: refused, {problem}{at}") from None
        raise ConfigError(f"{where}: not valid YAML ({problem}{at})") from None
