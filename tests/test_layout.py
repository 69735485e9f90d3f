"""The house's rules, checked on the source: rooms by concern, data flowing one way, no import circles."""
import ast
import subprocess
import sys
from pathlib import Path

import fedfar

PACKAGE = Path(fedfar.__file__).parent
ROOMS = ("methods", "devices", "federation")


def _room(module: str) -> str:
    """fedfar.methods.far.layer -> methods; fedfar.train -> train."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    """fedfar modules that `path` imports anywhere (function-level imports too), except for type checking."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fedfar")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("fedfar"):
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = _room(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        graph.setdefault(src, set()).update(_room(t) for t in _imports(path) if _room(t) != src)
    return graph


def test_the_concerns_are_rooms_a_newcomer_finds_with_ls():
    for room in ROOMS:
        assert (PACKAGE / room / "__init__.py").is_file()
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert flat == ["bench", "cli", "data", "finetune", "models", "train"]


def test_no_import_circles_between_rooms():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_data_flows_one_way_methods_and_devices_never_reach_the_federation():
    graph = _graph()
    assert "federation" not in graph["methods"] and "devices" not in graph["methods"]
    assert "federation" not in graph["devices"]
    for room in ("methods", "devices", "train", "data", "models"):
        assert "cli" not in graph.get(room, ()) and "bench" not in graph.get(room, ())


def test_methods_and_devices_import_without_flower():
    code = ("import sys, fedfar.methods, fedfar.devices.device, fedfar.train; "
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('fedfar.federation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flower_handlers_are_thin():
    """Each ClientApp handler fits on a screen: the work is in federation/client.py and the devices room."""
    tree = ast.parse((PACKAGE / "federation" / "client_app.py").read_text())
    handlers = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.decorator_list]
    assert {h.name for h in handlers} == {"register", "prime", "train", "evaluate"}
    for h in handlers:
        assert h.end_lineno - h.lineno + 1 <= 25, h.name
