"""RunLayout is the only place that spells a run's paths."""
import ast
import re
from pathlib import Path

from orchestrator.layout import PhaseDir, RunLayout
from orchestrator.storage import Store

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"
# names of a run's files and folders (orchestrator/layout.py): flagged alone, or inside a path
RUN_FILES = ("checkpoints", "final", "pipeline.json", "metrics.jsonl", "metrics.live.jsonl", "COMMITTED", "DONE",
             "LOCK", "FAILED", "exports", "backbone.pth", "model.pth")
# common words that are run folders only inside a path ("report/", "/logs")
RUN_FOLDERS = ("report", "trace", "stages", "logs", "shards", "ray", "debug", "embeddings")


def _path_literals(tree: ast.AST):
    """(line, text) of string constants used as values: not docstrings, dict keys or subscripts."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
        if isinstance(node, ast.Subscript):
            skip.add(id(node.slice))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def _is_run_path(text: str) -> bool:
    parts = [p for p in re.split(r"[/{}]", text) if p] if "/" in text else []
    return text in RUN_FILES or text.startswith("step-") or any(p in RUN_FILES + RUN_FOLDERS for p in parts)


def test_no_run_path_literal_outside_layout():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py":
            continue
        for no, text in _path_literals(ast.parse(path.read_text())):
            if _is_run_path(text):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{no}: {text!r}")
    assert not offenders, "run paths spelled outside orchestrator/layout.py:\n" + "\n".join(offenders)


def test_layout_names_every_path_of_a_run(tmp_path):
    layout = RunLayout(Store(str(tmp_path)), "job")
    phase = layout.phase("distill-vit_small")
    assert phase.checkpoint(100).url == f"{tmp_path}/job/distill-vit_small/checkpoints/step-0000100"
    assert PhaseDir.parse_step("step-0000100") == 100 and PhaseDir.parse_step("step-12") is None
    assert phase.final_backbone.url.endswith("distill-vit_small/final/backbone.pth")
    assert layout.pipeline.url == f"{tmp_path}/job/pipeline.json" and layout.lock.url.endswith("job/LOCK")
    assert layout.export_file("distill-vit_small", "pth").url.endswith("job/exports/distill-vit_small.pth")
    storage, name = layout.ray_run("pretrain")
    assert (storage / name).url == layout.phase("pretrain").root.url  # Ray's run folder is the phase folder
    assert phase.restarts.url.endswith("distill-vit_small/restarts.json")
