"""The package's layers (CONTRIBUTING.md, "Layout"): a module imports only from layers below its
own, never from a sibling unit of its layer, never from the package face, and no imports form a
cycle. Read from the source with the standard library's ast, lazy imports included."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "timm_splat"

# Lowest first. A unit is a top-level module or subpackage of timm_splat.
LAYERS = [
    {"splats", "images", "samples", "extension", "reference", "resources", "version"},
    {"ops", "testing", "augment", "codec"},
    {"report", "codec_refine"},
    {"fitting"},
    {"transforms"},
    {"models", "data"},
    {"hub"},
    # The application: checkpoints, programs as functions, then the command line.
    {"checkpoints"},
    {"training", "evaluation"},
    {"reproduce", "serve"},
    {"cli"},
]
# Inside the fitter (a package of one unit), one module per stage, lowest first: a stage imports
# only the stages before it, so a fit reads top-down from loop to config.
FITTING_STAGES = [
    "config",
    "sampling",
    "views",
    "parameters",
    "initial",
    "solvers",
    "schedules",
    "topology",
    "loop",
]
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}
FACE = {"__init__", "__main__"}  # timm_splat/__init__.py re-exports; __main__ runs the CLI


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def exists(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The timm_splat modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "timm_splat"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "timm_splat":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if exists(sub) else target)
    return found


def unit_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")} - FACE
    assert units <= set(LAYER_OF), (
        f"add {sorted(units - set(LAYER_OF))} to LAYERS and CONTRIBUTING.md"
    )


def test_imports_go_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        unit = unit_of(module)
        if unit in FACE:
            continue
        for target in targets:
            other = unit_of(target)
            if other == unit:
                continue  # inside one unit (e.g. data.prefit -> data.shards)
            if other in FACE or target == "timm_splat":
                wrong.append(f"{module} -> {target} (the package face)")
            elif LAYER_OF[other] >= LAYER_OF[unit]:
                wrong.append(
                    f"{module} (layer {LAYER_OF[unit]}) -> {target} (layer {LAYER_OF[other]})"
                )
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_fitter_stages_import_downwards():
    modules = {name for name in graph() if unit_of(name) == "fitting"} - {"timm_splat.fitting"}
    stages = {name.split(".")[2] for name in modules}
    assert stages == set(FITTING_STAGES), (
        f"add {sorted(stages - set(FITTING_STAGES))} to FITTING_STAGES"
    )
    rank = {stage: i for i, stage in enumerate(FITTING_STAGES)}
    wrong = []
    for module in modules:
        for target in graph()[module]:
            if unit_of(target) != "fitting":
                continue
            if target == "timm_splat.fitting":
                wrong.append(f"{module} -> {target} (the fitter's face)")
            elif rank[target.split(".")[2]] >= rank[module.split(".")[2]]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "fitter stages importing upwards:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = {m: {t for t in ts if t != m} for m, ts in graph().items()}
    # A package's __init__ importing its own modules is how packages work; modules that import
    # their package's __init__ back would close a cycle and are caught here.
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_checker_sees_a_back_edge(tmp_path, monkeypatch):
    """The checks can fail: a low module importing a high one is reported."""
    fake = tmp_path / "timm_splat"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "splats.py").write_text("def f():\n    from .cli import main\n")
    (fake / "cli.py").write_text("from . import splats\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"timm_splat.splats \(layer 0\) -> timm_splat.cli"):
        test_imports_go_down_the_layers()
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles()


@pytest.mark.parametrize(
    "blocked", [("timm", "torchvision", "open_clip", "datasets", "accelerate")]
)
def test_the_core_needs_torch_alone(blocked):
    """Kernels, fitting and splat IO import and run with torch (and numpy, pillow, safetensors,
    tqdm) alone; the models come with timm."""
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in blocked)
    code = (
        f"import sys; {block}\n"
        "import torch, timm_splat\n"
        "result = timm_splat.fit_splats(torch.rand(1, 3, 8, 8), num_splats=4, iterations=2)\n"
        "print(hasattr(timm_splat, 'from_rgb'), tuple(result.splats.shape), "
        "tuple(timm_splat.render_splats(torch.zeros(1, 2, 8), 4, 4).shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False (1, 4, 8) (1, 3, 4, 4)"
