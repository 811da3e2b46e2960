"""The house rules of ../shared/STYLE.md, checked on the core modules (the .py files at the repo root):
imports run only downward through three floors, no script imports another, no cycles; and the room
rules (files of at most 450 lines, functions of at most 80, at most 10% of lines over 100 characters).
A new module must be given a floor here, so each one is placed on purpose."""
import ast

from conftest import ROOT

# The floors, bottom first: a module may import modules of its own floor and of those below.
FLOORS = [
    # the model, the tokenizer and small shared helpers
    {"common", "config", "readers", "shards", "llm", "bpe", "chat"},
    # data preparation and loading, checkpoints, generation, what the training loop is built from
    {"checkpoint", "generate", "data", "sft_data", "mmlu", "loader", "tasks", "loss_eval", "plan",
     "runlog", "gguf_export", "val_split", "parallel", "optim", "train_state", "mc_data",
     "demo_world"},
    # the scripts
    {"train", "sample", "eval_mmlu", "export_hf", "demo"},
]
SCRIPTS = FLOORS[-1]
FLOOR = {name: i for i, floor in enumerate(FLOORS) for name in floor}


def core_files():
    return sorted(ROOT.glob("*.py"))


def kiln_imports(path):
    """The core modules a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & {p.stem for p in core_files()}


def test_every_module_has_a_floor():
    assert {p.stem for p in core_files()} == set(FLOOR)


def test_imports_run_downward_and_no_script_imports_another():
    upward = []
    for path in core_files():
        for name in kiln_imports(path):
            if FLOOR[name] > FLOOR[path.stem] or (name in SCRIPTS and name != path.stem):
                upward.append(f"{path.name} imports {name}")
    assert not upward


def test_no_import_cycles():
    graph = {p.stem: kiln_imports(p) - {p.stem} for p in core_files()}
    done, on_path = set(), []

    def visit(name):
        assert name not in on_path, " -> ".join(on_path + [name])
        if name in done:
            return
        on_path.append(name)
        for dep in graph[name]:
            visit(dep)
        on_path.pop()
        done.add(name)
    for name in graph:
        visit(name)


def test_room_sizes():
    too_big = []
    for path in core_files():
        lines = path.read_text().splitlines()
        if len(lines) > 450:
            too_big.append(f"{path.name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    too_big.append(f"{path.name}: {node.name} is {n} lines")
    assert not too_big


def test_line_lengths():
    lines = [line for path in core_files() for line in path.read_text().splitlines()]
    wide = sum(len(line) > 100 for line in lines)
    assert wide <= 0.10 * len(lines), f"{wide} of {len(lines)} core lines are over 100 characters"
