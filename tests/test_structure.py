"""The house's shape: no import circles among jaxllm's modules, and no command imported by the library.

Read statically from the source (every `import jaxllm...` and `from jaxllm... import`,
including those inside functions), so a circle hidden behind a lazy import counts too.
"""

import ast
import os

from tests.helpers import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "jaxllm")
COMMANDS = {"jaxllm.train", "jaxllm.bench", "jaxllm.generate.__main__", "jaxllm.fill_mask",
            "jaxllm.convert.__main__", "jaxllm.convert_peft", "jaxllm.plot", "jaxllm.eval.__main__",
            "jaxllm.eval.humaneval"}


def import_graph() -> dict[str, set[str]]:
  modules = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
        modules[module.removesuffix(".__init__")] = path
  graph = {}
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        deps.add(node.module)
        deps |= {f"{node.module}.{a.name}" for a in node.names}
    graph[module] = {d for d in deps if d in modules and d != module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_circles():
  assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_imports_no_command():
  graph = import_graph()
  offenders = {m: sorted(deps & COMMANDS) for m, deps in graph.items() if m not in COMMANDS and deps & COMMANDS}
  assert offenders == {}
